"""The CuPy backend: the CUDA C kernels of ``kernels/*.cu`` between cuBLAS GEMMs, on CuPy arrays.

Interface and shapes: see ``kernels/__init__.py``; every sweep also takes ``math`` ("fp32" | "tf32" | "bf16", see
gemm.py) for its GEMMs. Every step of a sweep is one GEMM (cuBLAS GemmEx, prepared once per sweep: gemm.Matmul)
into a buffer of the sweep, then one fused pointwise launch (Jordan: two GEMMs, two launches) whose arguments are
built once per sweep; the input bias b_ih is added by the pointwise kernels. The whole time loop is captured into a
CUDA graph on its first call with a given shape and replayed after (graphs.py). Everything goes on CuPy's current
stream and nothing in a sweep waits for the device or reads device memory on the host. The .cu files are compiled
into one ``cupy.RawModule`` on first use, once per device, never at import; cupy itself is imported on first use.
With GPURNN_CUDA_HOST=1 the same code runs on NumPy arrays, its kernels compiled for the CPU (``cuda_host``,
``cupy_host``). ``sweep="auto"`` is the per-step sweep; this backend has no persistent (one-launch) sweep yet.
"""
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import ACTIVATIONS, CELLS, JordanCtx, gemm, graphs

SOURCES = ("rnn.cu", "lstm.cu", "gru.cu", "jordan.cu")
HEADER = "common.cuh"
OPTIONS = ("--std=c++17",)
THREADS = 256
FLOAT_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
ACTIVATION_TYPES = {"tanh": "Tanh", "relu": "Relu", "sigmoid": "Sigmoid", "identity": "Identity"}
SWEEPS = ("auto", "step")


def header():
    """common.cuh after the #defines of its float32 activations' constants, written from cpu_fused (their one
    definition) as exact hexadecimal float literals."""
    from . import cpu_fused
    defines = [f"#define GPURNN_{name} ({float(getattr(cpu_fused, name)).hex()}f)"
               for name in cpu_fused.ACTIVATION_CONSTANTS]
    return "\n".join(defines + [(Path(__file__).parent / HEADER).read_text()])


def source():
    """The module's CUDA C, one translation unit: header(), then the .cu files without their include of common.cuh."""
    here = Path(__file__).parent
    include = f'#include "{HEADER}"'
    return "\n".join([header()] + [(here / name).read_text().replace(include, "") for name in SOURCES])


def kernel_name(stem, dtype, act=None):
    """The name expression of one instantiation, e.g. ``rnn_forward_step<float, Tanh>``."""
    args = [FLOAT_TYPES[np.dtype(dtype)]] + ([ACTIVATION_TYPES[act]] if act else [])
    return f"{stem}<{', '.join(args)}>"


def step_kernels(cell, dtype):
    """(forward, backward) name expressions of a cell's per-step kernels."""
    family, act = ("rnn", cell[4:]) if cell.startswith("rnn_") else (cell, None)
    return kernel_name(f"{family}_forward_step", dtype, act), kernel_name(f"{family}_backward_step", dtype, act)


def jordan_kernels(act, out_act, dtype):
    """Name expressions of the Jordan kernels: hidden forward, output forward, output backward, hidden backward."""
    return (kernel_name("jordan_hidden_forward", dtype, act), kernel_name("jordan_output_forward", dtype, out_act),
            kernel_name("rnn_backward_step", dtype, out_act), kernel_name("jordan_hidden_backward", dtype, act))


def kernel_names():
    """Every instantiation in the module (cell x direction x dtype, Jordan x activations): the one list of names."""
    names = []
    for dtype in FLOAT_TYPES:
        for cell in CELLS:
            names += step_kernels(cell, dtype)
        for act in ("tanh", "relu", "sigmoid"):
            for out_act in ACTIVATIONS:
                names += jordan_kernels(act, out_act, dtype)
    return list(dict.fromkeys(names))


@functools.lru_cache(maxsize=None)
def _module(device_id):
    """The RawModule of every instantiation on one device; NVRTC compiles it on its first get_function."""
    cp = _cupy()
    with cp.cuda.Device(device_id):
        return cp.RawModule(code=source(), options=OPTIONS, name_expressions=kernel_names())


@functools.lru_cache(maxsize=None)
def _kernel(device_id, name):
    with _cupy().cuda.Device(device_id):
        return _module(device_id).get_function(name)


def _cupy():
    """cupy, or its NumPy stand-in under GPURNN_CUDA_HOST=1."""
    from .cuda_host import enabled
    if enabled():
        from . import cupy_host
        return cupy_host
    import cupy
    return cupy


def array_module():
    """The array module of this backend: cupy, or cupy_host under GPURNN_CUDA_HOST=1."""
    return _cupy()


def _kernels(*names):
    device_id = _cupy().cuda.Device().id
    return tuple(_kernel(device_id, name) for name in names)


def _launcher(kernel, rows, cols):
    """launch(*args): `kernel` with one thread per element of a (rows, cols) array; every kernel takes (..., B, N)
    last."""
    grid, block, tail = ((rows * cols + THREADS - 1) // THREADS,), (THREADS,), (np.int32(rows), np.int32(cols))
    return lambda *args: kernel(grid, block, args + tail)


def _float_type(a, name):
    if np.dtype(a.dtype) not in FLOAT_TYPES:
        raise TypeError(f"{name} must be float32 or float64 for the cupy backend, got {np.dtype(a.dtype).name}")
    return np.dtype(a.dtype)


def _check_sweep(sweep):
    if sweep not in SWEEPS:
        raise ValueError(f"sweep must be one of {', '.join(map(repr, SWEEPS))} for the cupy backend "
                         f"(a launch per step); got {sweep!r}")


@dataclass
class SweepCtx:
    cell: str
    lengths: object     # (B,) int32
    w_hh: object        # (G*H, H)
    h0: object          # (B, H)
    y: object           # (T, B, H)
    gates: object       # (T, B, G*H) activated gates (Elman: None, y holds h)
    c0: object = None   # (B, H) LSTM
    c: object = None    # (T, B, H) LSTM cell state after each step
    hn: object = None   # (T, B, H) GRU h_prev @ W_hn.T + b_hn
    h_prev: object = None   # (T, B, H) the state before each step: h0, y[0], ..., y[T-2] (one buffer with y)
    math: str = "fp32"


def forward_buffers(cell, training, math, a):
    """What a forward sweep writes, shaped from its inputs `a`: hs (T+1, B, H) with hs[0] = h0 and y = hs[1:]; h (and
    c): (B, H) state; gates (T, B, G*H) and per_step (T, B, H) (LSTM c_t, GRU hn_t), one step of scratch in
    inference; gh (B, G*H) the step's GEMM output; the bf16 operand copies (None unless math is "bf16")."""
    cp = _cupy()
    T, B, GH = a["xw"].shape
    H, dtype = a["w_hh"].shape[1], a["xw"].dtype
    saved = T if training else 1                        # inference overwrites one step's scratch
    gated = cell in ("lstm", "gru")
    h = cp.empty((B, H), dtype)
    return dict(hs=cp.empty((T + 1, B, H), dtype), h=h, c=cp.empty((B, H), dtype) if cell == "lstm" else None,
                gates=cp.empty((saved, B, GH), dtype) if gated else None,
                per_step=cp.empty((saved, B, H), dtype) if gated else None, gh=cp.empty((B, GH), dtype),
                h_low=gemm.Operand.buffer(cp, h, math), w_low=gemm.Operand.buffer(cp, a["w_hh"].T, math))


def step_forward(cell, training, math, a):
    """The forward sweep on the arrays `a` (inputs + forward_buffers): per step the GEMM gh = h @ W_hh.T and one
    pointwise launch. Allocates nothing and reads nothing on the host: capturable."""
    cp = _cupy()
    T, B, H = a["hs"].shape[0] - 1, *a["h"].shape
    dtype = np.dtype(a["hs"].dtype)
    launch = _launcher(*_kernels(step_kernels(cell, dtype)[0]), B, H)
    cp.copyto(a["h"], a["h0"])
    cp.copyto(a["hs"][0], a["h0"])
    if cell == "lstm":
        cp.copyto(a["c"], a["c0"])
    w = gemm.constant(cp, a["w_hh"].T, math, a["w_low"])
    h = gemm.Operand(cp, a["h"], math, a["h_low"])
    product = gemm.Matmul(cp, h, w, a["gh"], math)
    y, xw, gates, per_step = a["hs"][1:], a["xw"], a["gates"], a["per_step"]
    head = (a["gh"], a["b_hh"], a["b_ih"], a["h"])
    steps = []                                           # each step's arguments, built before the loop
    for t in range(T):
        s, tail = (t if training else 0), (a["lengths"], np.int32(t))
        if cell == "lstm":
            steps.append((xw[t], *head, a["c"], y[t], gates[s], per_step[s], *tail))
        elif cell == "gru":
            steps.append((xw[t], *head, y[t], gates[s], per_step[s], *tail))
        else:
            steps.append((xw[t], *head, y[t], *tail))
    for args in steps:
        h.update()
        product()
        launch(*args)


def forward(cell, xw, w_hh, b_hh, state0, lengths, training=True, sweep="auto", b_ih=None, math="fp32"):
    _check_sweep(sweep)
    cp = _cupy()
    dtype = _float_type(xw, "xw")
    T, B, GH = xw.shape
    H = w_hh.shape[1]
    inputs = dict(xw=xw, w_hh=w_hh, b_hh=b_hh, b_ih=cp.zeros(b_hh.shape, dtype) if b_ih is None else b_ih,
                  lengths=lengths, h0=state0[0])
    if cell == "lstm":
        inputs["c0"] = state0[1]
    inputs = {k: cp.ascontiguousarray(v, dtype=np.int32 if k == "lengths" else dtype) for k, v in inputs.items()}
    keep = ("hs", "h") + (("c",) if cell == "lstm" else ()) + \
        (("gates", "per_step") if training and cell in ("lstm", "gru") else ())
    key = ("cupy", "forward", cell, T, B, H, dtype.str, training, math, cp.cuda.Device().id)
    out = graphs.run(cp, key, inputs, functools.partial(forward_buffers, cell, training, math),
                     functools.partial(step_forward, cell, training, math), keep)
    y = out["hs"][1:]
    state_n = (out["h"], out["c"]) if cell == "lstm" else (out["h"],)
    if not training:
        return y, state_n, None
    per_step = out.get("per_step")
    ctx = SweepCtx(cell, inputs["lengths"], w_hh, inputs["h0"], y, out.get("gates"),
                   c0=inputs.get("c0"), c=per_step if cell == "lstm" else None,
                   hn=per_step if cell == "gru" else None, h_prev=out["hs"][:-1], math=math)
    return y, state_n, ctx


def backward_buffers(cell, math, a):
    """dgx (T, B, G*H): every row written (0 at padded steps), no fill; dgh (GRU; else dgx); dh, dc (B, H) carried
    gradients; dhh (B, H) the step's GEMM output; the bf16 operand copies."""
    cp = _cupy()
    T, B, H = a["y"].shape
    GH, dtype = a["w_hh"].shape[0], a["y"].dtype
    dgx = cp.empty((T, B, GH), dtype)
    return dict(dgx=dgx, dgh=cp.empty_like(dgx) if cell == "gru" else dgx, dh=cp.empty((B, H), dtype),
                dc=cp.empty((B, H), dtype) if cell == "lstm" else None, dhh=cp.empty((B, H), dtype),
                g_low=gemm.Operand.buffer(cp, dgx[0], math), w_low=gemm.Operand.buffer(cp, a["w_hh"], math))


def step_backward(cell, math, a):
    """The backward sweep on the arrays `a`: per step, t = T-1..0, one pointwise launch, then the GEMM
    dgh_t @ W_hh into dhh (t = 0: added into dh, which then holds dL/dh0). Capturable."""
    cp = _cupy()
    T, B, H = a["y"].shape
    dtype = np.dtype(a["y"].dtype)
    launch = _launcher(*_kernels(step_kernels(cell, dtype)[1]), B, H)
    cp.copyto(a["dh"], a["dh_n"])
    if cell == "lstm":
        cp.copyto(a["dc"], a["dc_n"])
    cp.copyto(a["dhh"], 0)                               # no step after T-1
    w = gemm.constant(cp, a["w_hh"], math, a["w_low"])
    products = gemm.per_step(cp, T, a["dgh"], w, a["dhh"], math, a["g_low"], into=a["dh"])
    dy, y, dgx, dgh = a["dy"], a["y"], a["dgx"], a["dgh"]
    carry = (a["dhh"], a["dh"])
    steps = []
    for t in range(T):
        tail = (a["lengths"], np.int32(t))
        if cell == "lstm":
            c_prev = a["c"][t - 1] if t > 0 else a["c0"]
            steps.append((dy[t], a["gates"][t], a["c"][t], c_prev, *carry, a["dc"], dgx[t], *tail))
        elif cell == "gru":
            h_prev = y[t - 1] if t > 0 else a["h0"]
            steps.append((dy[t], a["gates"][t], a["hn"][t], h_prev, *carry, dgx[t], dgh[t], *tail))
        else:
            steps.append((dy[t], y[t], *carry, dgx[t], *tail))
    for t in range(T - 1, -1, -1):
        launch(*steps[t])
        products[t]()


def backward(ctx, dy, dstate_n):
    cp = _cupy()
    cell = ctx.cell
    T, B, H = ctx.y.shape
    dtype = np.dtype(ctx.y.dtype)
    inputs = dict(dy=dy, y=ctx.y, h0=ctx.h0, lengths=ctx.lengths, w_hh=ctx.w_hh, dh_n=dstate_n[0])
    inputs.update({"lstm": dict(gates=ctx.gates, c=ctx.c, c0=ctx.c0, dc_n=dstate_n[-1]),
                   "gru": dict(gates=ctx.gates, hn=ctx.hn)}.get(cell, {}))
    inputs = {k: cp.ascontiguousarray(v, dtype=np.int32 if k == "lengths" else dtype) for k, v in inputs.items()}
    keep = ("dgx", "dh") + (("dgh",) if cell == "gru" else ()) + (("dc",) if cell == "lstm" else ())
    key = ("cupy", "backward", cell, T, B, H, dtype.str, ctx.math, cp.cuda.Device().id)
    out = graphs.run(cp, key, inputs, functools.partial(backward_buffers, cell, ctx.math),
                     functools.partial(step_backward, cell, ctx.math), keep)
    dgx = out["dgx"]
    dgh = out["dgh"] if cell == "gru" else dgx
    return dgx, dgh, ((out["dh"], out["dc"]) if cell == "lstm" else (out["dh"],))


def jordan_buffers(training, math, a):
    """hs (T, B, H) (one step of scratch in inference), y (T, B, O), state (B, O) y_{t-1}, gy (B, H) and py (B, O)
    the GEMM outputs, the bf16 operand copies."""
    cp = _cupy()
    T, B, H = a["xw"].shape
    O, dtype = a["w_hy"].shape[0], a["xw"].dtype
    hs, state = cp.empty((T if training else 1, B, H), dtype), cp.empty((B, O), dtype)
    low = functools.partial(gemm.Operand.buffer, cp, math=math)
    return dict(hs=hs, y=cp.empty((T, B, O), dtype), state=state, gy=cp.empty((B, H), dtype),
                py=cp.empty((B, O), dtype), s_low=low(state), h_low=low(hs[0]), yh_low=low(a["w_yh"].T),
                hy_low=low(a["w_hy"].T))


def step_jordan_forward(act, out_act, training, math, a):
    """Per step: GEMM y_{t-1} @ W_yh.T, hidden launch, GEMM h_t @ W_hy.T, output launch. Capturable."""
    cp = _cupy()
    T, B, H = a["xw"].shape
    O = a["y"].shape[2]
    hidden, output = _kernels(*jordan_kernels(act, out_act, np.dtype(a["y"].dtype))[:2])
    hidden, output = _launcher(hidden, B, H), _launcher(output, B, O)
    cp.copyto(a["state"], a["y0"])
    w_yh, w_hy = (gemm.constant(cp, a[k].T, math, a[low]) for k, low in (("w_yh", "yh_low"), ("w_hy", "hy_low")))
    state = gemm.Operand(cp, a["state"], math, a["s_low"])
    recurrent = gemm.Matmul(cp, state, w_yh, a["gy"], math)
    outputs = gemm.per_step(cp, T, a["hs"], w_hy, a["py"], math, a["h_low"])    # inference: one row of hs
    hs = a["hs"]
    for t in range(T):
        tt = np.int32(t)
        state.update()
        recurrent()
        hidden(a["xw"][t], a["gy"], hs[t % hs.shape[0]], a["lengths"], tt)
        outputs[t]()
        output(a["py"], a["b_y"], a["state"], a["y"][t], a["lengths"], tt)


def jordan_forward(xw, w_yh, w_hy, b_y, y0, lengths, act, out_act, training=True, math="fp32"):
    cp = _cupy()
    dtype = _float_type(xw, "xw")
    T, B, H = xw.shape
    O = w_hy.shape[0]
    inputs = {k: cp.ascontiguousarray(v, dtype=np.int32 if k == "lengths" else dtype)
              for k, v in dict(xw=xw, w_yh=w_yh, w_hy=w_hy, b_y=b_y, lengths=lengths, y0=y0).items()}
    key = ("cupy", "jordan_forward", act, out_act, T, B, H, O, dtype.str, training, math, cp.cuda.Device().id)
    out = graphs.run(cp, key, inputs, functools.partial(jordan_buffers, training, math),
                     functools.partial(step_jordan_forward, act, out_act, training, math), ("hs", "y", "state"))
    if not training:
        return out["y"], out["state"], None
    ctx = JordanCtx(inputs["lengths"], w_yh, w_hy, act, out_act, inputs["y0"], out["hs"], out["y"])
    ctx.math = math
    return out["y"], out["state"], ctx


def jordan_backward_buffers(math, a):
    """dph (T, B, H), dpy (T, B, O): every row written; dstate (B, O) dL/dy_{t} carried (dL/dy0 at the end); dyh
    (B, O) dph_{t+1} @ W_yh; the bf16 operand copies."""
    cp = _cupy()
    T, B, O = a["y"].shape
    H, dtype = a["h"].shape[2], a["y"].dtype
    dph, dpy = cp.empty((T, B, H), dtype), cp.empty((T, B, O), dtype)
    low = functools.partial(gemm.Operand.buffer, cp, math=math)
    return dict(dph=dph, dpy=dpy, dstate=cp.empty((B, O), dtype), dyh=cp.empty((B, O), dtype),
                ph_low=low(dph[0]), py_low=low(dpy[0]), yh_low=low(a["w_yh"]), hy_low=low(a["w_hy"]))


def step_jordan_backward(act, out_act, math, a):
    """Per step, t = T-1..0: output launch (dpy_t), GEMM dpy_t @ W_hy into dph_t, hidden launch (dph_t in place),
    GEMM dph_t @ W_yh (t = 0: added into dstate, which then holds dL/dy0). Capturable."""
    cp = _cupy()
    T, B, O = a["y"].shape
    H = a["h"].shape[2]
    output, hidden = _kernels(*jordan_kernels(act, out_act, np.dtype(a["y"].dtype))[2:])
    output, hidden = _launcher(output, B, O), _launcher(hidden, B, H)
    cp.copyto(a["dstate"], a["dy_n"])
    cp.copyto(a["dyh"], 0)
    w_yh, w_hy = (gemm.constant(cp, a[k], math, a[low]) for k, low in (("w_yh", "yh_low"), ("w_hy", "hy_low")))
    to_hidden = gemm.per_step(cp, T, a["dpy"], w_hy, a["dph"], math, a["py_low"])
    to_state = gemm.per_step(cp, T, a["dph"], w_yh, a["dyh"], math, a["ph_low"], into=a["dstate"])
    for t in range(T - 1, -1, -1):
        output(a["dy"][t], a["y"][t], a["dyh"], a["dstate"], a["dpy"][t], a["lengths"], np.int32(t))
        to_hidden[t]()
        hidden(a["dph"][t], a["h"][t])
        to_state[t]()


def jordan_backward(ctx, dy, dy_n):
    cp = _cupy()
    T, B, O = ctx.y.shape
    H = ctx.h.shape[2]
    dtype = np.dtype(ctx.y.dtype)
    math = getattr(ctx, "math", "fp32")
    inputs = {k: cp.ascontiguousarray(v, dtype=np.int32 if k == "lengths" else dtype)
              for k, v in dict(dy=dy, y=ctx.y, h=ctx.h, lengths=ctx.lengths, w_yh=ctx.w_yh, w_hy=ctx.w_hy,
                               dy_n=dy_n).items()}
    key = ("cupy", "jordan_backward", ctx.act, ctx.out_act, T, B, H, O, dtype.str, math, cp.cuda.Device().id)
    out = graphs.run(cp, key, inputs, functools.partial(jordan_backward_buffers, math),
                     functools.partial(step_jordan_backward, ctx.act, ctx.out_act, math), ("dph", "dpy", "dstate"))
    return out["dph"], out["dpy"], out["dstate"]
