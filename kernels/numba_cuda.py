"""The numba backend's sweeps: Numba CUDA kernels (numba_cuda_kernels.py, numba_persistent.py) driven from the host.

Interface and shapes: see ``kernels/__init__.py``. Arrays are CuPy on a GPU and NumPy under
NUMBA_ENABLE_CUDASIM=1 (the simulator runs the kernels on host arrays). Two ways to run a sweep, chosen by the
launch planner (numba_plan.py) from the sizes and the device:
- "step": per step one GEMM through the array module (cuBLAS on a GPU) into a (B, G*H) buffer allocated once
  per call, then ONE fused pointwise kernel (all gates + state update; backward: all gate gradients + dc).
- "persistent": one cooperative launch for all T steps, each block holding its slice of W_hh in shared memory,
  one grid-wide barrier per step (Jordan: its slices of W_yh and W_hy, two barriers per step). If the device
  refuses the launch, the sweep runs per step instead (one warning per launch configuration). Under the
  simulator it runs through numba_sim (every block at once).
Kernels launch on CuPy's current stream, on the device of the input arrays; nothing in the time loop waits.
"""
import contextlib
import functools
import warnings
from dataclasses import dataclass

import numpy as np
from numba import cuda

from . import JordanCtx, numba_plan
from .numba_cuda_kernels import ACT_CODES, CELL_CODES, build
from .numba_persistent import build as build_persistent, build_jordan, simulator

SWEEPS = numba_plan.SWEEPS
THREADS = 256              # threads per block of the per-step kernels on a GPU
SIM_THREADS = 32           # the simulator runs one Python thread per CUDA thread: keep blocks small there


def array_module():
    if simulator():
        return np
    import cupy
    return cupy


def threads():
    return SIM_THREADS if simulator() else THREADS


def device_view(a):
    """What a kernel takes: a zero-copy device view of `a` (a NumPy wrapper in the simulator, which would
    otherwise copy every host array in and out of each launch). sync=False: the kernels run on the stream
    that produced `a`, so no wait is needed."""
    if simulator():
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
        return FakeCUDAArray(a)
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

    @property
    def sweep(self):
        return self.plan.sweep


REFUSED = numba_plan.Plan("step", reason="the device refused the persistent launch")


def forward(cell, xw, w_hh, b_hh, state0, lengths, training=True, sweep="auto", b_ih=None):
    xp = array_module()
    if b_ih is not None:
        xw = xw + b_ih
    T, B, GH = xw.shape
    H = w_hh.shape[1]
    code, act = CELL_CODES[cell], ACT_CODES.get(cell[4:], 0)
    lstm, gru = cell == "lstm", cell == "gru"
    with on_device_of(xw):
        plan = numba_plan.plan(sweep, B, H, GH // H, xw.dtype.itemsize, current_device())
        xw, w_hh, b_hh = (xp.ascontiguousarray(a) for a in (xw, w_hh, b_hh))
        h0 = xp.ascontiguousarray(state0[0])
        y = xp.empty((T, B, H), xw.dtype)
        gates = xp.empty((T, B, GH), xw.dtype) if (lstm or gru) else y
        c0 = xp.ascontiguousarray(state0[1]) if lstm else xp.zeros((1, 1), xw.dtype)
        c = c0.copy()                                                     # (B, H) updated in place
        cs = xp.empty((T, B, H), xw.dtype) if lstm else xp.zeros((1, 1, 1), xw.dtype)
        hns = xp.empty((T, B, H), xw.dtype) if gru else xp.zeros((1, 1, 1), xw.dtype)
        stream = launch_stream()
        d = [device_view(a) for a in (xw, b_hh, lengths, c, y, gates, cs, hns)]
        h = persistent_forward(code, act, plan, w_hh, h0, stream, d) if plan.sweep == "persistent" else None
        if h is None:
            plan = REFUSED if plan.sweep == "persistent" else plan
            h = step_forward(code, act, w_hh, h0, stream, d)
    state_n = (h, c) if lstm else (h,)
    if not training:
        return y, state_n, None
    return y, state_n, SweepCtx(cell, act, plan, lengths, w_hh, h0, y, gates, c0, cs, hns)


def persistent_forward(code, act, plan, w_hh, h0, stream, d):
    """The forward sweep in one launch; returns h_n, or None when the device refused the launch.
    d: device views of (xw, b_hh, lengths, c, y, gates, cs, hns)."""
    xp = array_module()
    B, H = h0.shape
    T = d[0].shape[0]
    hbuf = xp.empty((2, B, H), h0.dtype)                                  # h double buffer
    kernel = build_persistent(h0.dtype.type, code).forward
    args = (act, plan.units, plan.forward.tiles, plan.forward.splits, d[0], device_view(w_hh), d[1], d[2],
            device_view(h0[None]), device_view(hbuf), *d[3:])
    return hbuf[T % 2] if launch_persistent(kernel, plan.forward, stream, args) else None


def step_forward(code, act, w_hh, h0, stream, d):
    """The forward sweep per step: a GEMM and a fused pointwise kernel per step; returns h_n.
    d: device views of (xw, b_hh, lengths, c, y, gates, cs, hns)."""
    xp = array_module()
    K = build(h0.dtype.type)
    B, H = h0.shape
    T = d[0].shape[0]
    h = h0.copy()                                                         # (B, H) updated in place
    gh = xp.empty((B, w_hh.shape[0]), h0.dtype)                           # h @ W_hh.T, reused every step
    h_d, gh_d = device_view(h), device_view(gh)
    step = K.step_forward[blocks(B * H), threads(), stream]
    for t in range(T):
        xp.matmul(h, w_hh.T, out=gh)
        step(code, act, t, d[0], gh_d, d[1], d[2], h_d, *d[3:])
    return h


def backward(ctx, dy, dstate_n):
    xp = array_module()
    T, B, H = ctx.y.shape
    code = CELL_CODES[ctx.cell]
    with on_device_of(dy):
        dy = xp.ascontiguousarray(dy)
        dgx = xp.zeros((T, B, ctx.w_hh.shape[0]), dy.dtype)
        dgh = xp.zeros_like(dgx) if ctx.cell == "gru" else dgx
        dh = xp.array(dstate_n[0], copy=True)                             # (B, H) carried dL/dh
        dc = xp.array(dstate_n[1], copy=True) if ctx.cell == "lstm" else xp.zeros((1, 1), dy.dtype)
        stream = launch_stream()
        d = [device_view(a) for a in (dh, dy, ctx.y, ctx.h0, ctx.gates, ctx.cs, ctx.c0, ctx.hns, ctx.lengths,
                                      dc, dgx, dgh)]
        if not (ctx.plan.sweep == "persistent" and persistent_backward(code, ctx, stream, d)):
            dh += step_backward(code, ctx, dgh, stream, d)
    dstate0 = (dh, dc) if ctx.cell == "lstm" else (dh,)
    return dgx, dgh, dstate0


def persistent_backward(code, ctx, stream, d):
    """The backward sweep in one launch; False when the device refused the launch.
    d: device views of (dh, dy, y, h0, gates, cs, c0, hns, lengths, dc, dgx, dgh)."""
    kernel = build_persistent(ctx.y.dtype.type, code).backward
    launch = ctx.plan.backward
    args = (ctx.act, ctx.plan.units, launch.tiles, launch.splits, device_view(ctx.w_hh), d[8], *d[:8], *d[9:])
    return launch_persistent(kernel, launch, stream, args)


def step_backward(code, ctx, dgh, stream, d):
    """The backward sweep per step: a fused pointwise kernel and a GEMM per step; returns dG_0 @ W_hh, the
    part of dL/dh0 not yet in dh. d: as for persistent_backward."""
    xp = array_module()
    K = build(ctx.y.dtype.type)
    T, B, H = ctx.y.shape
    dhg = xp.zeros((B, H), ctx.y.dtype)                                   # dG_{t+1} @ W_hh, reused every step
    dhg_d = device_view(dhg)
    step = K.step_backward[blocks(B * H), threads(), stream]
    for t in range(T - 1, -1, -1):
        step(code, ctx.act, t, dhg_d, *d)
        xp.matmul(dgh[t], ctx.w_hh, out=dhg)
    return dhg


@dataclass
class JordanSweepCtx(JordanCtx):
    plan: object = None    # numba_plan.Plan of the forward sweep; backward takes the same path


def jordan_forward(xw, w_yh, w_hy, b_y, y0, lengths, act, out_act, training=True, sweep="auto"):
    xp = array_module()
    T, B, H = xw.shape
    O = w_hy.shape[0]
    with on_device_of(xw):
        plan = numba_plan.jordan_plan(sweep, B, H, O, xw.dtype.itemsize, current_device())
        xw, w_yh, w_hy, b_y = (xp.ascontiguousarray(a) for a in (xw, w_yh, w_hy, b_y))
        h = xp.empty((T, B, H), xw.dtype)
        y = xp.empty((T, B, O), xw.dtype)
        codes = ACT_CODES[act], ACT_CODES[out_act]
        stream = launch_stream()
        d = [device_view(a) for a in (xw, w_yh, w_hy, b_y, lengths, h, y)]
        state = persistent_jordan_forward(codes, plan, y0, stream, d) if plan.sweep == "persistent" else None
        if state is None:
            plan = REFUSED if plan.sweep == "persistent" else plan
            state = step_jordan_forward(codes, w_yh, w_hy, y0, h, stream, d)
    if not training:
        return y, state, None
    return y, state, JordanSweepCtx(lengths, w_yh, w_hy, act, out_act, y0, h, y, plan)


def persistent_jordan_forward(codes, plan, y0, stream, d):
    """The Jordan forward sweep in one launch; returns y_n, or None when the device refused the launch.
    d: device views of (xw, w_yh, w_hy, b_y, lengths, h, y)."""
    xp = array_module()
    T, B, O = d[6].shape
    ybuf = xp.empty((2, B, O), y0.dtype)                                  # the state, double buffered
    args = (*codes, plan.units, plan.out_units, plan.forward.tiles, plan.forward.splits, *d[:5],
            device_view(xp.ascontiguousarray(y0)[None]), device_view(ybuf), *d[5:])
    ok = launch_persistent(build_jordan(y0.dtype.type).forward, plan.forward, stream, args)
    return ybuf[T % 2] if ok else None


def step_jordan_forward(codes, w_yh, w_hy, y0, h, stream, d):
    """Per step: GEMM y_{t-1} @ W_yh.T, kernel h_t, GEMM h_t @ W_hy.T, kernel y_t; returns y_n.
    d: device views of (xw, w_yh, w_hy, b_y, lengths, h, y)."""
    xp = array_module()
    K = build(y0.dtype.type)
    T, B, H = h.shape
    O = w_hy.shape[0]
    state = xp.array(y0, copy=True)                                       # (B, O) y of the last valid step
    hy = xp.empty((B, H), y0.dtype)
    py = xp.empty((B, O), y0.dtype)
    xw_d, by_d, len_d, h_d, y_d = d[0], d[3], d[4], d[5], d[6]
    hy_d, py_d, st_d = (device_view(a) for a in (hy, py, state))
    hidden = K.jordan_hidden[blocks(B * H), threads(), stream]
    output = K.jordan_output[blocks(B * O), threads(), stream]
    for t in range(T):
        xp.matmul(state, w_yh.T, out=hy)
        hidden(codes[0], t, xw_d, hy_d, len_d, h_d)
        xp.matmul(h[t], w_hy.T, out=py)
        output(codes[1], t, py_d, by_d, len_d, y_d, st_d)
    return state


def jordan_backward(ctx, dy, dy_n):
    xp = array_module()
    T, B, H = ctx.h.shape
    O = ctx.y.shape[2]
    plan = getattr(ctx, "plan", None) or numba_plan.Plan("step")
    with on_device_of(dy):
        dy = xp.ascontiguousarray(dy)
        dph = xp.zeros((T, B, H), dy.dtype)
        dpy = xp.zeros((T, B, O), dy.dtype)
        carry = xp.array(dy_n, copy=True)                                 # (B, O) dL/dy_state across padding
        codes = ACT_CODES[ctx.act], ACT_CODES[ctx.out_act]
        stream = launch_stream()
        d = [device_view(a) for a in (dy, ctx.y, ctx.h, ctx.lengths, carry, dph, dpy)]
        if plan.sweep == "persistent":
            args = (*codes, plan.units, plan.out_units, plan.backward.tiles, plan.backward.splits,
                    device_view(ctx.w_yh), device_view(ctx.w_hy), d[3], d[0], d[1], d[2], *d[4:])
            if launch_persistent(build_jordan(dy.dtype.type).backward, plan.backward, stream, args):
                return dph, dpy, carry
        return dph, dpy, carry + step_jordan_backward(codes, ctx, dph, dpy, stream, d)


def step_jordan_backward(codes, ctx, dph, dpy, stream, d):
    """Per step, t = T-1..0: kernel dpy_t, GEMM dpy_t @ W_hy, kernel dph_t, GEMM dph_t @ W_yh; returns
    dph[0] @ W_yh, the part of dL/dy0 not yet in carry. d: device views of (dy, y, h, lengths, carry, dph, dpy)."""
    xp = array_module()
    K = build(ctx.y.dtype.type)
    T, B, H = ctx.h.shape
    O = ctx.y.shape[2]
    dsum = xp.zeros((B, O), dph.dtype)                                    # dph[t+1] @ W_yh
    dhh = xp.empty((B, H), dph.dtype)                                     # dpy[t] @ W_hy
    dsum_d, dhh_d = device_view(dsum), device_view(dhh)
    dy_d, y_d, h_d, len_d, carry_d, dph_d, dpy_d = d
    output = K.jordan_output_backward[blocks(B * O), threads(), stream]
    hidden = K.jordan_hidden_backward[blocks(B * H), threads(), stream]
    for t in range(T - 1, -1, -1):
        output(codes[1], t, dy_d, y_d, len_d, carry_d, dsum_d, dpy_d)
        xp.matmul(dpy[t], ctx.w_hy, out=dhh)
        hidden(codes[0], t, dhh_d, h_d, dph_d)
        xp.matmul(dph[t], ctx.w_yh, out=dsum)
    return dsum
