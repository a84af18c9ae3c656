"""The CuPy backend: the CUDA C kernels of ``kernels/*.cu`` between cuBLAS GEMMs, on CuPy arrays.

Interface and shapes: see ``kernels/__init__.py``. Every step of a sweep is one GEMM (``cupy.matmul``, cuBLAS) into
a buffer allocated once per call, then one fused pointwise launch (Jordan: two GEMMs, two launches). Everything
goes on CuPy's current stream and nothing in a time loop waits for the device. The .cu files are compiled into one
``cupy.RawModule`` on first use, once per device, never at import; cupy itself is imported on first use. With
GPURNN_CUDA_HOST=1 the same code runs on NumPy arrays, its kernels compiled for the CPU (``cuda_host``, ``cupy_host``).
``sweep="auto"`` is the per-step sweep; this backend has no persistent (one-launch) sweep yet.
"""
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import ACTIVATIONS, CELLS, JordanCtx

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


def _kernels(*names):
    device_id = _cupy().cuda.Device().id
    return tuple(_kernel(device_id, name) for name in names)


def _launch(kernel, rows, cols, *args):
    """One thread per element of a (rows, cols) array; every kernel takes (..., B, N) last."""
    blocks = (rows * cols + THREADS - 1) // THREADS
    kernel((blocks,), (THREADS,), args + (np.int32(rows), np.int32(cols)))


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


def forward(cell, xw, w_hh, b_hh, state0, lengths, training=True, sweep="auto", b_ih=None):
    _check_sweep(sweep)
    cp = _cupy()
    dtype = _float_type(xw, "xw")
    if b_ih is not None:
        xw = xw + b_ih
    T, B, GH = xw.shape
    H = w_hh.shape[1]
    (step,) = _kernels(step_kernels(cell, dtype)[0])
    xw = cp.ascontiguousarray(xw)
    b_hh = cp.ascontiguousarray(b_hh, dtype=dtype)
    lengths = cp.ascontiguousarray(lengths, dtype=np.int32)
    h0 = cp.ascontiguousarray(state0[0], dtype=dtype)
    h = h0.copy()
    c0 = cp.ascontiguousarray(state0[1], dtype=dtype) if cell == "lstm" else None
    c = c0.copy() if cell == "lstm" else None
    y = cp.empty((T, B, H), dtype)
    gh = cp.empty((B, GH), dtype)                       # h @ W_hh.T of the current step
    saved = T if training else 1                        # inference overwrites one step's scratch
    gates = cp.empty((saved, B, GH), dtype) if cell in ("lstm", "gru") else None
    per_step = cp.empty((saved, B, H), dtype) if cell in ("lstm", "gru") else None   # LSTM c_t, GRU hn_t
    for t in range(T):
        cp.matmul(h, w_hh.T, out=gh)
        s = t if training else 0
        if cell == "lstm":
            _launch(step, B, H, xw[t], gh, b_hh, h, c, y[t], gates[s], per_step[s], lengths, np.int32(t))
        elif cell == "gru":
            _launch(step, B, H, xw[t], gh, b_hh, h, y[t], gates[s], per_step[s], lengths, np.int32(t))
        else:
            _launch(step, B, H, xw[t], gh, b_hh, h, y[t], lengths, np.int32(t))
    state_n = (h, c) if cell == "lstm" else (h,)
    if not training:
        return y, state_n, None
    ctx = SweepCtx(cell, lengths, w_hh, h0, y, gates, c0=c0,
                   c=per_step if cell == "lstm" else None, hn=per_step if cell == "gru" else None)
    return y, state_n, ctx


def backward(ctx, dy, dstate_n):
    cp = _cupy()
    cell = ctx.cell
    T, B, H = ctx.y.shape
    dtype = np.dtype(ctx.y.dtype)
    GH = ctx.w_hh.shape[0]
    (step,) = _kernels(step_kernels(cell, dtype)[1])
    dy = cp.ascontiguousarray(dy, dtype=dtype)
    dh = cp.array(dstate_n[0], dtype=dtype)             # carry: dL/dh_t not yet in dhh
    dc = cp.array(dstate_n[1], dtype=dtype) if cell == "lstm" else None
    dhh = cp.zeros((B, H), dtype)                       # dgh_{t+1} @ W_hh
    dgx = cp.empty((T, B, GH), dtype)
    dgh = cp.empty_like(dgx) if cell == "gru" else dgx
    for t in range(T - 1, -1, -1):
        tt = np.int32(t)
        if cell == "lstm":
            c_prev = ctx.c[t - 1] if t > 0 else ctx.c0
            _launch(step, B, H, dy[t], ctx.gates[t], ctx.c[t], c_prev, dhh, dh, dc, dgx[t], ctx.lengths, tt)
        elif cell == "gru":
            h_prev = ctx.y[t - 1] if t > 0 else ctx.h0
            _launch(step, B, H, dy[t], ctx.gates[t], ctx.hn[t], h_prev, dhh, dh, dgx[t], dgh[t], ctx.lengths, tt)
        else:
            _launch(step, B, H, dy[t], ctx.y[t], dhh, dh, dgx[t], ctx.lengths, tt)
        cp.matmul(dgh[t], ctx.w_hh, out=dhh)
    dh += dhh
    return dgx, dgh, ((dh, dc) if cell == "lstm" else (dh,))


def jordan_forward(xw, w_yh, w_hy, b_y, y0, lengths, act, out_act, training=True):
    cp = _cupy()
    dtype = _float_type(xw, "xw")
    T, B, H = xw.shape
    O = w_hy.shape[0]
    hidden, output = _kernels(*jordan_kernels(act, out_act, dtype)[:2])
    xw = cp.ascontiguousarray(xw)
    b_y = cp.ascontiguousarray(b_y, dtype=dtype)
    lengths = cp.ascontiguousarray(lengths, dtype=np.int32)
    y0 = cp.ascontiguousarray(y0, dtype=dtype)
    state = y0.copy()                                   # y_{t-1}
    hs = cp.empty((T if training else 1, B, H), dtype)
    y = cp.empty((T, B, O), dtype)
    gy = cp.empty((B, H), dtype)                        # y_{t-1} @ W_yh.T
    py = cp.empty((B, O), dtype)                        # h_t @ W_hy.T
    for t in range(T):
        h_t = hs[t if training else 0]
        cp.matmul(state, w_yh.T, out=gy)
        _launch(hidden, B, H, xw[t], gy, h_t, lengths, np.int32(t))
        cp.matmul(h_t, w_hy.T, out=py)
        _launch(output, B, O, py, b_y, state, y[t], lengths, np.int32(t))
    if not training:
        return y, state, None
    return y, state, JordanCtx(lengths, w_yh, w_hy, act, out_act, y0, hs, y)


def jordan_backward(ctx, dy, dy_n):
    cp = _cupy()
    T, B, O = ctx.y.shape
    H = ctx.h.shape[2]
    dtype = np.dtype(ctx.y.dtype)
    output, hidden = _kernels(*jordan_kernels(ctx.act, ctx.out_act, dtype)[2:])
    dy = cp.ascontiguousarray(dy, dtype=dtype)
    dstate = cp.array(dy_n, dtype=dtype)                # carry: dL/dy_t not yet in dyh
    dyh = cp.zeros((B, O), dtype)                       # dph_{t+1} @ W_yh
    dph = cp.empty((T, B, H), dtype)
    dpy = cp.empty((T, B, O), dtype)
    for t in range(T - 1, -1, -1):
        _launch(output, B, O, dy[t], ctx.y[t], dyh, dstate, dpy[t], ctx.lengths, np.int32(t))
        cp.matmul(dpy[t], ctx.w_hy, out=dph[t])
        _launch(hidden, B, H, dph[t], ctx.h[t])
        cp.matmul(dph[t], ctx.w_yh, out=dyh)
    dstate += dyh
    return dph, dpy, dstate
