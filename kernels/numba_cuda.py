"""The numba backend's sweeps: Numba CUDA kernels (numba_cuda_kernels.py, numba_persistent.py) driven from the host.

Interface and shapes: see ``kernels/__init__.py``; every sweep also takes ``math`` ("fp32" | "tf32" | "bf16", see
gemm.py) for its cuBLAS GEMMs. Arrays are CuPy on a GPU and NumPy under NUMBA_ENABLE_CUDASIM=1 (the simulator runs
the kernels on host arrays; its array module is cupy_host, the NumPy stand-in for CuPy). Two ways to run a sweep,
chosen by the launch planner (numba_plan.py) from the sizes and the device:
- "step": per step one GEMM (cuBLAS GemmEx, prepared once per sweep: gemm.Matmul) into a (B, G*H) buffer, then ONE
  fused pointwise kernel (all gates + state update; backward: all gate gradients + dc), its overload resolved and
  its arguments built once per sweep. The whole time loop is captured into a CUDA graph on its first call with a
  given shape and replayed after (graphs.py).
- "persistent": one cooperative launch for all T steps, each block holding its slice of W_hh in shared memory,
  one grid-wide barrier per step (Jordan: its slices of W_yh and W_hy, two barriers per step); its recurrent
  products are float32 sums whatever `math` says. If the device refuses the launch, the sweep runs per step
  instead (one warning per launch configuration). Under the simulator it runs through numba_sim (every block at
  once).
The variants (kernels/__init__.py): t0 shifts `lengths` by t0 (so both paths take it); ln, zoneout and w_hr run in
numba_variants.py, per step only.
The input bias b_ih is added by the pointwise kernels (no pass of its own); y is the tail of one (T+1, B, H) buffer
whose head is h0, so ctx.h_prev = [h0; y[:T-1]] feeds the dW_hh GEMM without a copy; padded steps write their zero
gradient rows themselves (no zero-filled dgx). Kernels launch on CuPy's current stream, on the device of the input
arrays; nothing in a sweep waits for the device or reads device memory on the host.
"""
import contextlib
import functools
import warnings
from dataclasses import dataclass

import numpy as np
from numba import cuda

from . import JordanCtx, gemm, graphs, numba_plan
from .numba_cuda_kernels import ACT_CODES, CELL_CODES, build
from .numba_persistent import build as build_persistent, build_jordan, simulator

SWEEPS = numba_plan.SWEEPS
THREADS = 256              # threads per block of the per-step kernels on a GPU
SIM_THREADS = 32           # the simulator runs one Python thread per CUDA thread: keep blocks small there


def array_module():
    """CuPy, or its NumPy stand-in (cupy_host) in the simulator."""
    if simulator():
        from . import cupy_host
        return cupy_host
    import cupy
    return cupy


def threads():
    return SIM_THREADS if simulator() else THREADS


def device_view(a):
    """What a kernel takes: a zero-copy device view of `a` (a NumPy wrapper in the simulator, which would
    otherwise copy every host array in and out of each launch; of the plain ndarray, since a kernel's reads are
    device reads, not those of an ndarray subclass's Python methods). sync=False: the kernels run on the stream
    that produced `a`, so no wait is needed."""
    if simulator():
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
        return FakeCUDAArray(a.view(np.ndarray))
    return cuda.as_cuda_array(a, sync=False)


def launch_stream():
    """CuPy's current stream wrapped for Numba, so kernels and GEMMs stay in one order (0 in the simulator)."""
    if simulator():
        return 0
    import cupy
    ptr = cupy.cuda.get_current_stream().ptr
    return cuda.external_stream(ptr) if ptr else cuda.default_stream()


def on_device_of(a):
    """Numba's context for the GPU that holds `a` (else CuPy's current device), so launches go where the data
    is; nothing in the simulator."""
    if simulator():
        return contextlib.nullcontext()
    import cupy
    device = getattr(a, "device", None)
    return cuda.gpus[device.id if device is not None else cupy.cuda.Device().id]


def blocks(n):
    return (n + threads() - 1) // threads()


@functools.lru_cache(maxsize=None)
def _device(ordinal):
    return numba_plan.describe(cuda.gpus[ordinal])


def current_device():
    """The planner's description of the device the sweep runs on (numba_plan.SIMULATOR in the simulator)."""
    if simulator():
        return numba_plan.SIMULATOR
    return _device(cuda.get_current_device().id)


_refused = set()   # persistent launch configurations the device refused: they run per step from then on


def launch_persistent(kernel, launch, stream, args):
    """One cooperative launch of a persistent kernel; False when the device refuses it (too many blocks to be
    co-resident, no cooperative launch under MPS or an old driver, too much shared memory): the caller then runs
    the sweep per step. Warns once per configuration. Compile errors and errors inside the kernel are raised."""
    key = (kernel, launch)
    if key in _refused:
        return False
    from . import numba_sim
    try:
        if simulator():
            numba_sim.admit(launch.blocks, launch.threads, launch.shared)
        else:
            compiled = kernel.compile(tuple(kernel.typeof_pyval(a) for a in args))
            opt_in_shared_memory(compiled, launch.shared)
            co_resident = compiled.max_cooperative_grid_blocks(launch.threads, launch.shared)
            if launch.blocks > co_resident:
                raise RuntimeError(f"{launch.blocks} blocks of {launch.threads} threads and {launch.shared} bytes "
                                   f"of shared memory; only {co_resident} can be resident at once")
            kernel[launch.blocks, launch.threads, stream, launch.shared](*args)
    except Exception as e:   # noqa: BLE001 - whatever refused the launch, the per-step sweep does the work
        _refused.add(key)
        warnings.warn(f"persistent sweep not launched ({e}); running it per step", RuntimeWarning, stacklevel=3)
        return False
    if simulator():
        numba_sim.launch(kernel, launch.blocks, launch.threads, launch.shared, args)
    return True


def opt_in_shared_memory(compiled, nbytes):
    """Let `compiled` (a Numba _Kernel) take `nbytes` of dynamic shared memory; above 48 KB a kernel must opt in."""
    from numba.cuda.cudadrv.driver import binding, driver
    cufunc = compiled._codelibrary.get_cufunc()
    attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    driver.cuKernelSetAttribute(attr, nbytes, cufunc.handle, cufunc.device.id)


def prepared(kernel, n, stream, args, t_at, per_block=None, shared=0):
    """launch(t): `kernel` over n threads on `stream` with `args`, args[t_at] replaced by the step t (per_block: n
    blocks of that many threads instead; shared: bytes of dynamic shared memory per block). On a GPU the overload is
    resolved once here, so a launch skips Numba's dispatch (typing each argument); in the simulator a launch is
    device work of the stand-in (run now, or recorded while a graph is captured)."""
    grid, block = (blocks(n), threads()) if per_block is None else (n, per_block)
    if simulator():
        from .cupy_host import enqueue
        configured = kernel[grid, block, stream, shared]
        return lambda t: enqueue(lambda: configured(*args[:t_at], t, *args[t_at + 1:]))
    compiled = kernel.compile(tuple(kernel.typeof_pyval(a) for a in args))
    dims = (grid, 1, 1), (block, 1, 1)
    return lambda t: compiled.launch((*args[:t_at], t, *args[t_at + 1:]), *dims, stream, shared)


def low(xp, a, math):
    """The bfloat16 copy buffer of GEMM operand `a` when math is "bf16" (allocated with the sweep's buffers, so the
    captured loop allocates nothing), else None."""
    return gemm.Operand.buffer(xp, a, math)


def placeholder(xp, ndim, dtype):
    """A 1-element array for a kernel argument the cell does not use."""
    return xp.zeros((1,) * ndim, dtype)


@dataclass
class SweepCtx:
    cell: str
    act: int
    plan: object           # numba_plan.Plan of the sweep; plan.sweep is what forward ran
    lengths: object        # (B,) int32
    w_hh: object           # (G*H, H)
    h0: object             # (B, H)
    y: object              # (T, B, H)
    gates: object          # (T, B, G*H) activated gates (Elman: y)
    c0: object             # (B, H) LSTM, else a (1, 1) placeholder
    cs: object             # (T, B, H) LSTM cell state after each step, else a (1, 1, 1) placeholder
    hns: object            # (T, B, H) GRU h_prev @ W_hn.T + b_hn, else a (1, 1, 1) placeholder
    h_prev: object         # (T, B, H) the state before each step: h0, y[0], ..., y[T-2] (one buffer with y)
    math: str = "fp32"

    @property
    def sweep(self):
        return self.plan.sweep


REFUSED = numba_plan.Plan("step", reason="the device refused the persistent launch")


def forward_inputs(xp, cell, xw, w_hh, b_hh, b_ih, state0, lengths):
    """The sweep's inputs, contiguous; b_ih zeros when None (xw then holds it)."""
    inputs = dict(xw=xw, w_hh=w_hh, b_hh=b_hh, b_ih=xp.zeros(b_hh.shape, xw.dtype) if b_ih is None else b_ih,
                  lengths=lengths, h0=state0[0])
    if cell == "lstm":
        inputs["c0"] = state0[1]
    return {k: xp.ascontiguousarray(v) for k, v in inputs.items()}


def forward_buffers(cell, math, a):
    """What a forward sweep writes, shaped from its inputs `a`: hs (T+1, B, H) with hs[0] = h0 and y = hs[1:];
    h, c: (B, H) state; gates (T, B, G*H) (Elman: y); cs, hns (T, B, H) LSTM / GRU, else placeholders; gh (B, G*H)
    the step's GEMM output; h_low, w_low: the bf16 operand copies (None unless math is "bf16")."""
    xp = array_module()
    T, B, GH = a["xw"].shape
    H, dtype = a["w_hh"].shape[1], a["xw"].dtype
    hs = xp.empty((T + 1, B, H), dtype)
    h = xp.empty((B, H), dtype)
    return dict(hs=hs, h=h, gates=xp.empty((T, B, GH), dtype) if cell in ("lstm", "gru") else hs[1:],
                c=xp.empty((B, H), dtype) if cell == "lstm" else placeholder(xp, 2, dtype),
                cs=xp.empty((T, B, H), dtype) if cell == "lstm" else placeholder(xp, 3, dtype),
                hns=xp.empty((T, B, H), dtype) if cell == "gru" else placeholder(xp, 3, dtype),
                gh=xp.empty((B, GH), dtype), h_low=low(xp, h, math), w_low=low(xp, a["w_hh"].T, math))


FEATURES = frozenset({"t0", "ln", "zoneout", "w_hr"})


def forward(cell, xw, w_hh, b_hh, state0, lengths, training=True, sweep="auto", b_ih=None, math="fp32", t0=0,
            ln=None, zoneout=None, w_hr=None):
    xp = array_module()
    if t0:                                  # validity of kernel step t0 + s is s < lengths - t0
        with on_device_of(xw):
            lengths = xp.ascontiguousarray(lengths - np.int32(t0), dtype=np.int32)
    if ln is not None or zoneout is not None or w_hr is not None:
        from . import numba_variants
        return numba_variants.forward(cell, xw, w_hh, b_hh, state0, lengths, training, b_ih, t0, ln, zoneout, w_hr,
                                      sweep, math)
    T, B, GH = xw.shape
    H = w_hh.shape[1]
    code, act = CELL_CODES[cell], ACT_CODES.get(cell[4:], 0)
    lstm = cell == "lstm"
    with on_device_of(xw):
        plan = numba_plan.plan(sweep, B, H, GH // H, xw.dtype.itemsize, current_device())
        inputs = forward_inputs(xp, cell, xw, w_hh, b_hh, b_ih, state0, lengths)
        allocate = functools.partial(forward_buffers, cell, math)
        out = None
        if plan.sweep == "persistent":
            a = {**inputs, **allocate(inputs)}
            out = a if persistent_forward(code, act, plan, launch_stream(), a) else None
            plan = plan if out is not None else REFUSED
        if out is None:
            keep = ("hs", "h") + (("gates",) if cell in ("lstm", "gru") and training else ()) + \
                (("c",) if lstm else ()) + (("cs",) if lstm and training else ()) + \
                (("hns",) if cell == "gru" and training else ())
            key = ("numba", "forward", cell, T, B, H, xw.dtype.str, math, device_id())
            out = graphs.run(xp, key, inputs, allocate, functools.partial(step_forward, code, act, math), keep)
    y = out["hs"][1:]
    state_n = (out["h"], out["c"]) if lstm else (out["h"],)
    if not training:
        return y, state_n, None
    unused = placeholder(xp, 3, xw.dtype)
    return y, state_n, SweepCtx(cell, act, plan, lengths, w_hh, state0[0], y,
                                out["gates"] if cell in ("lstm", "gru") else y,
                                inputs["c0"] if lstm else placeholder(xp, 2, xw.dtype),
                                out["cs"] if lstm else unused, out["hns"] if cell == "gru" else unused,
                                out["hs"][:-1], math)


def device_id():
    return 0 if simulator() else cuda.get_current_device().id


def persistent_forward(code, act, plan, stream, a):
    """The forward sweep in one launch on the arrays `a` (forward_inputs + forward_buffers); False when the device
    refused the launch."""
    xp = array_module()
    T, B, H = a["hs"].shape[0] - 1, *a["h"].shape
    hbuf = xp.empty((2, B, H), a["h"].dtype)                             # h double buffer
    args = (act, plan.units, plan.forward.tiles, plan.forward.splits,
            *(device_view(a[k]) for k in ("xw", "w_hh", "b_hh", "b_ih", "lengths")), device_view(a["h0"][None]),
            device_view(hbuf), device_view(a["c"]), device_view(a["hs"][1:]),
            *(device_view(a[k]) for k in ("gates", "cs", "hns")))
    if "c0" in a:
        xp.copyto(a["c"], a["c0"])
    if not launch_persistent(build_persistent(a["h"].dtype.type, code).forward, plan.forward, stream, args):
        return False
    a["h"] = hbuf[T % 2]
    xp.copyto(a["hs"][0], a["h0"])
    return True


def start_forward(xp, math, a):
    """A per-step forward sweep's start on the arrays `a`: h (and hs[0]) from h0, c from c0; returns the Operand of
    h and the prepared GEMM gh = h @ W_hh.T (call the Operand's update() before it each step)."""
    xp.copyto(a["h"], a["h0"])
    xp.copyto(a["hs"][0], a["h0"])
    if "c0" in a:
        xp.copyto(a["c"], a["c0"])
    w = gemm.constant(xp, a["w_hh"].T, math, a["w_low"])
    h = gemm.Operand(xp, a["h"], math, a["h_low"])
    return h, gemm.Matmul(xp, h, w, a["gh"], math)


def step_forward(code, act, math, a):
    """The forward sweep per step on the arrays `a` (forward_inputs + forward_buffers): per step the GEMM
    gh = h @ W_hh.T and one fused pointwise launch. Allocates nothing, reads nothing on the host: capturable."""
    T, B, H = a["hs"].shape[0] - 1, *a["h"].shape
    h, product = start_forward(array_module(), math, a)
    args = (code, act, 0, *(device_view(a[k]) for k in ("xw", "gh", "b_hh", "b_ih", "lengths", "h", "c")),
            device_view(a["hs"][1:]), *(device_view(a[k]) for k in ("gates", "cs", "hns")))
    step = prepared(build(a["h"].dtype.type).step_forward, B * H, launch_stream(), args, 2)
    for t in range(T):
        h.update()
        product()
        step(t)


def backward_inputs(xp, ctx, dy, dstate_n):
    inputs = dict(dy=dy, y=ctx.y, h0=ctx.h0, gates=ctx.gates, cs=ctx.cs, c0=ctx.c0, hns=ctx.hns,
                  lengths=ctx.lengths, w_hh=ctx.w_hh, dh_n=dstate_n[0])
    if ctx.cell == "lstm":
        inputs["dc_n"] = dstate_n[1]
    if ctx.cell not in ("lstm", "gru"):
        del inputs["gates"]           # Elman: the gates are y
    return {k: xp.ascontiguousarray(v) for k, v in inputs.items()}


def backward_buffers(cell, math, a):
    """What a backward sweep writes: dgx (T, B, G*H), no zero-fill: every row is written; dgh (GRU; else dgx);
    dh, dc: (B, H) carried gradients (dc a placeholder but for the LSTM); dhg (B, H) the step's GEMM output; the
    bf16 operand copies."""
    xp = array_module()
    T, B, H = a["y"].shape
    GH, dtype = a["w_hh"].shape[0], a["y"].dtype
    dgx = xp.empty((T, B, GH), dtype)
    return dict(dgx=dgx, dgh=xp.empty((T, B, GH), dtype) if cell == "gru" else dgx, dh=xp.empty((B, H), dtype),
                dc=xp.empty((B, H), dtype) if cell == "lstm" else placeholder(xp, 2, dtype),
                dhg=xp.empty((B, H), dtype), g_low=low(xp, dgx[0], math), w_low=low(xp, a["w_hh"], math))


def backward(ctx, dy, dstate_n, dparams=None):
    if not isinstance(ctx, SweepCtx):
        from . import numba_variants
        return numba_variants.backward(ctx, dy, dstate_n, dparams)
    xp = array_module()
    T, B, H = ctx.y.shape
    code = CELL_CODES[ctx.cell]
    lstm = ctx.cell == "lstm"
    with on_device_of(dy):
        inputs = backward_inputs(xp, ctx, dy, dstate_n)
        allocate = functools.partial(backward_buffers, ctx.cell, ctx.math)
        out = None
        if ctx.plan.sweep == "persistent":
            a = {**inputs, **allocate(inputs)}
            out = a if persistent_backward(code, ctx, launch_stream(), a) else None
        if out is None:
            keep = ("dgx", "dh") + (("dgh",) if ctx.cell == "gru" else ()) + (("dc",) if lstm else ())
            key = ("numba", "backward", ctx.cell, T, B, H, ctx.y.dtype.str, ctx.math, device_id())
            out = graphs.run(xp, key, inputs, allocate, functools.partial(step_backward, code, ctx.act, ctx.math),
                             keep)
    dgx = out["dgx"]
    dgh = out["dgh"] if ctx.cell == "gru" else dgx
    return dgx, dgh, ((out["dh"], out["dc"]) if lstm else (out["dh"],))


def backward_args(a):
    """Device views of (dh, dy, y, h0, gates, cs, c0, hns, lengths, dc, dgx, dgh) of a backward's arrays."""
    gates = a.get("gates", a["y"])
    return [device_view(x) for x in (a["dh"], a["dy"], a["y"], a["h0"], gates, a["cs"], a["c0"], a["hns"],
                                     a["lengths"], a["dc"], a["dgx"], a["dgh"])]


def start_backward(xp, a):
    xp.copyto(a["dh"], a["dh_n"])
    if "dc_n" in a:
        xp.copyto(a["dc"], a["dc_n"])


def persistent_backward(code, ctx, stream, a):
    """The backward sweep in one launch on the arrays `a` (backward_inputs + backward_buffers); False when the
    device refused the launch."""
    start_backward(array_module(), a)
    d = backward_args(a)
    kernel = build_persistent(ctx.y.dtype.type, code).backward
    launch = ctx.plan.backward
    args = (ctx.act, ctx.plan.units, launch.tiles, launch.splits, device_view(a["w_hh"]), d[8], *d[:8], *d[9:])
    return launch_persistent(kernel, launch, stream, args)


def step_backward(code, act, math, a):
    """The backward sweep per step on the arrays `a`: per step, t = T-1..0, one fused pointwise launch, then the
    GEMM dG_t @ W_hh into dhg (t = 0: added into dh, which then holds dL/dh0). Capturable, as step_forward."""
    xp = array_module()
    T, B, H = a["y"].shape
    start_backward(xp, a)
    xp.copyto(a["dhg"], 0)                                               # no step after T-1
    w = gemm.constant(xp, a["w_hh"], math, a["w_low"])
    products = gemm.per_step(xp, T, a["dgh"], w, a["dhg"], math, a["g_low"], into=a["dh"])
    step = prepared(build(a["y"].dtype.type).step_backward, B * H, launch_stream(),
                    (code, act, 0, device_view(a["dhg"]), *backward_args(a)), 2)
    for t in range(T - 1, -1, -1):
        step(t)
        products[t]()


@dataclass
class JordanSweepCtx(JordanCtx):
    plan: object = None    # numba_plan.Plan of the forward sweep; backward takes the same path
    math: str = "fp32"


def jordan_forward(xw, w_yh, w_hy, b_y, y0, lengths, act, out_act, training=True, sweep="auto", math="fp32"):
    xp = array_module()
    T, B, H = xw.shape
    O = w_hy.shape[0]
    codes = ACT_CODES[act], ACT_CODES[out_act]
    with on_device_of(xw):
        plan = numba_plan.jordan_plan(sweep, B, H, O, xw.dtype.itemsize, current_device())
        inputs = {k: xp.ascontiguousarray(v) for k, v in
                  dict(xw=xw, w_yh=w_yh, w_hy=w_hy, b_y=b_y, lengths=lengths, y0=y0).items()}
        allocate = functools.partial(jordan_forward_buffers, math)
        out = None
        if plan.sweep == "persistent":
            a = {**inputs, **allocate(inputs)}
            out = a if persistent_jordan_forward(codes, plan, launch_stream(), a) else None
            plan = plan if out is not None else REFUSED
        if out is None:
            key = ("numba", "jordan_forward", codes, T, B, H, O, xw.dtype.str, math, device_id())
            out = graphs.run(xp, key, inputs, allocate, functools.partial(step_jordan_forward, codes, math),
                             ("h", "y", "state"))
    if not training:
        return out["y"], out["state"], None
    return out["y"], out["state"], JordanSweepCtx(lengths, w_yh, w_hy, act, out_act, y0, out["h"], out["y"], plan,
                                                  math)


def jordan_forward_buffers(math, a):
    """h (T, B, H), y (T, B, O), state (B, O) y of the last valid step, hy (B, H) and py (B, O) the GEMM outputs,
    and the bf16 operand copies."""
    xp = array_module()
    T, B, H = a["xw"].shape
    O, dtype = a["w_hy"].shape[0], a["xw"].dtype
    h, state = xp.empty((T, B, H), dtype), xp.empty((B, O), dtype)
    return dict(h=h, y=xp.empty((T, B, O), dtype), state=state, hy=xp.empty((B, H), dtype),
                py=xp.empty((B, O), dtype), s_low=low(xp, state, math), h_low=low(xp, h[0], math),
                yh_low=low(xp, a["w_yh"].T, math), hy_low=low(xp, a["w_hy"].T, math))


def persistent_jordan_forward(codes, plan, stream, a):
    """The Jordan forward sweep in one launch; False when the device refused the launch."""
    xp = array_module()
    T, B, O = a["y"].shape
    ybuf = xp.empty((2, B, O), a["y"].dtype)                            # the state, double buffered
    args = (*codes, plan.units, plan.out_units, plan.forward.tiles, plan.forward.splits,
            *(device_view(a[k]) for k in ("xw", "w_yh", "w_hy", "b_y", "lengths")), device_view(a["y0"][None]),
            device_view(ybuf), device_view(a["h"]), device_view(a["y"]))
    if not launch_persistent(build_jordan(a["y"].dtype.type).forward, plan.forward, stream, args):
        return False
    xp.copyto(a["state"], ybuf[T % 2])
    return True


def step_jordan_forward(codes, math, a):
    """Per step: GEMM y_{t-1} @ W_yh.T, kernel h_t, GEMM h_t @ W_hy.T, kernel y_t. Capturable."""
    xp = array_module()
    T, B, H = a["h"].shape
    O = a["y"].shape[2]
    xp.copyto(a["state"], a["y0"])
    w_yh, w_hy = (gemm.constant(xp, a[k].T, math, a[low_]) for k, low_ in (("w_yh", "yh_low"), ("w_hy", "hy_low")))
    state = gemm.Operand(xp, a["state"], math, a["s_low"])
    recurrent = gemm.Matmul(xp, state, w_yh, a["hy"], math)
    outputs = gemm.per_step(xp, T, a["h"], w_hy, a["py"], math, a["h_low"])
    K, stream = build(a["y"].dtype.type), launch_stream()
    d = {k: device_view(a[k]) for k in ("xw", "hy", "lengths", "h", "py", "b_y", "y", "state")}
    hidden = prepared(K.jordan_hidden, B * H, stream, (codes[0], 0, d["xw"], d["hy"], d["lengths"], d["h"]), 1)
    output = prepared(K.jordan_output, B * O, stream,
                      (codes[1], 0, d["py"], d["b_y"], d["lengths"], d["y"], d["state"]), 1)
    for t in range(T):
        state.update()
        recurrent()
        hidden(t)
        outputs[t]()
        output(t)


def jordan_backward(ctx, dy, dy_n):
    xp = array_module()
    T, B, H = ctx.h.shape
    O = ctx.y.shape[2]
    plan = getattr(ctx, "plan", None) or numba_plan.Plan("step")
    math = getattr(ctx, "math", "fp32")
    codes = ACT_CODES[ctx.act], ACT_CODES[ctx.out_act]
    with on_device_of(dy):
        inputs = {k: xp.ascontiguousarray(v) for k, v in
                  dict(dy=dy, y=ctx.y, h=ctx.h, lengths=ctx.lengths, w_yh=ctx.w_yh, w_hy=ctx.w_hy, dy_n=dy_n).items()}
        allocate = functools.partial(jordan_backward_buffers, math)
        if plan.sweep == "persistent":
            a = {**inputs, **allocate(inputs)}
            xp.copyto(a["carry"], a["dy_n"])
            xp.copyto(a["dph"], 0)                                       # the persistent kernel writes valid rows
            xp.copyto(a["dpy"], 0)
            d = [device_view(a[k]) for k in ("lengths", "dy", "y", "h", "carry", "dph", "dpy")]
            args = (*codes, plan.units, plan.out_units, plan.backward.tiles, plan.backward.splits,
                    device_view(a["w_yh"]), device_view(a["w_hy"]), *d)
            if launch_persistent(build_jordan(dy.dtype.type).backward, plan.backward, launch_stream(), args):
                return a["dph"], a["dpy"], a["carry"]
        key = ("numba", "jordan_backward", codes, T, B, H, O, dy.dtype.str, math, device_id())
        out = graphs.run(xp, key, inputs, allocate, functools.partial(step_jordan_backward, codes, math),
                         ("dph", "dpy", "carry"))
    return out["dph"], out["dpy"], out["carry"]


def jordan_backward_buffers(math, a):
    """dph (T, B, H), dpy (T, B, O): every row written; carry (B, O) dL/dy_state (dL/dy0 at the end); dsum (B, O)
    dph[t+1] @ W_yh; dhh (B, H) dpy[t] @ W_hy; the bf16 operand copies."""
    xp = array_module()
    T, B, H = a["h"].shape
    O, dtype = a["y"].shape[2], a["y"].dtype
    dph, dpy = xp.empty((T, B, H), dtype), xp.empty((T, B, O), dtype)
    return dict(dph=dph, dpy=dpy, carry=xp.empty((B, O), dtype), dsum=xp.empty((B, O), dtype),
                dhh=xp.empty((B, H), dtype), ph_low=low(xp, dph[0], math), py_low=low(xp, dpy[0], math),
                yh_low=low(xp, a["w_yh"], math), hy_low=low(xp, a["w_hy"], math))


def step_jordan_backward(codes, math, a):
    """Per step, t = T-1..0: kernel dpy_t, GEMM dpy_t @ W_hy, kernel dph_t, GEMM dph_t @ W_yh (t = 0: added into
    carry, which then holds dL/dy0). Capturable."""
    xp = array_module()
    T, B, H = a["h"].shape
    O = a["y"].shape[2]
    xp.copyto(a["carry"], a["dy_n"])
    xp.copyto(a["dsum"], 0)
    w_yh, w_hy = (gemm.constant(xp, a[k], math, a[low_]) for k, low_ in (("w_yh", "yh_low"), ("w_hy", "hy_low")))
    to_hidden = gemm.per_step(xp, T, a["dpy"], w_hy, a["dhh"], math, a["py_low"])
    to_state = gemm.per_step(xp, T, a["dph"], w_yh, a["dsum"], math, a["ph_low"], into=a["carry"])
    K, stream = build(a["y"].dtype.type), launch_stream()
    d = {k: device_view(a[k]) for k in ("dy", "y", "h", "lengths", "carry", "dsum", "dpy", "dhh", "dph")}
    output = prepared(K.jordan_output_backward, B * O, stream,
                      (codes[1], 0, d["dy"], d["y"], d["lengths"], d["carry"], d["dsum"], d["dpy"]), 1)
    hidden = prepared(K.jordan_hidden_backward, B * H, stream, (codes[0], 0, d["dhh"], d["h"], d["dph"]), 1)
    for t in range(T - 1, -1, -1):
        output(t)
        to_hidden[t]()
        hidden(t)
        to_state[t]()
