"""The numba backend's sweeps: Numba CUDA kernels (numba_cuda_kernels.py) driven from the host.

Interface and shapes: see ``kernels/__init__.py``. Arrays are CuPy on a GPU and NumPy under
NUMBA_ENABLE_CUDASIM=1 (the simulator runs the kernels on host arrays). Two ways to run a sweep:
- "step": per step one GEMM through the array module (cuBLAS on a GPU) into a (B, G*H) buffer allocated once
  per call, then ONE fused pointwise kernel (all gates + state update; backward: all gate gradients + dc).
- "persistent": one cooperative launch for all T steps, each block holding its slice of W_hh in shared memory,
  one grid-wide barrier per step. Used when W_hh fits in the shared memory of the co-resident blocks.
Kernels launch on CuPy's current stream; nothing in the time loop waits for the device.
"""
from dataclasses import dataclass

import numpy as np
from numba import cuda

from . import JordanCtx
from .numba_cuda_kernels import ACT_CODES, CELL_CODES, build

SWEEPS = ("auto", "persistent", "step")
THREADS = 256              # threads per block on a GPU
SIM_THREADS = 32           # the simulator runs one Python thread per CUDA thread: keep blocks small there
SHARED_BYTES = 48 * 1024   # dynamic shared memory a block may use without an opt-in attribute
PERSISTENT_MAX_BATCH = 16  # "auto": larger batches keep cuBLAS busy per step; a starting point to tune on a GPU


def simulator():
    return bool(cuda.config.ENABLE_CUDASIM)


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


def blocks(n):
    return (n + threads() - 1) // threads()


def cooperative_blocks():
    """How many blocks a cooperative launch may use: one per SM (each block needs at most SHARED_BYTES and
    THREADS threads, so one always fits on an SM); 1 in the simulator, 0 without cooperative launch."""
    if simulator():
        return 1
    dev = cuda.get_current_device()
    return dev.MULTIPROCESSOR_COUNT if dev.COOPERATIVE_LAUNCH else 0


def persistent_grid(B, H, G, itemsize):
    """(blocks, shared bytes) for a persistent sweep, or None when W_hh does not fit on chip."""
    max_blocks = min(cooperative_blocks(), H)
    if max_blocks == 0:
        return None
    hs = (H + max_blocks - 1) // max_blocks          # hidden units per block
    nblocks = (H + hs - 1) // hs
    shared = (G * H * hs + 4 * threads()) * itemsize  # W_hh slice + 4 partial sums per thread
    return (nblocks, shared) if shared <= SHARED_BYTES else None


def choose_sweep(sweep, B, H, G, itemsize):
    """("persistent", (blocks, shared bytes)) or ("step", None) for the requested `sweep`."""
    if sweep not in SWEEPS:
        raise ValueError(f"sweep must be one of {', '.join(map(repr, SWEEPS))}; got {sweep!r}")
    grid = persistent_grid(B, H, G, itemsize) if sweep != "step" else None
    if sweep == "persistent" and grid is None:
        raise ValueError(f"sweep='persistent' needs W_hh ({G * H}x{H}) to fit in the shared memory of the "
                         f"co-resident blocks ({SHARED_BYTES} bytes each); use sweep='step' or 'auto'")
    if sweep == "auto" and (grid is None or B > PERSISTENT_MAX_BATCH):
        return "step", None
    return ("persistent", grid) if grid is not None else ("step", None)


@dataclass
class SweepCtx:
    cell: str
    act: int
    sweep: str             # "persistent" | "step", what forward ran
    grid: tuple            # (blocks, shared bytes) of the persistent launch, None for "step"
    lengths: object        # (B,) int32
    w_hh: object           # (G*H, H)
    h0: object             # (B, H)
    y: object              # (T, B, H)
    gates: object          # (T, B, G*H) activated gates (Elman: y)
    c0: object             # (B, H) LSTM, else a (1, 1) placeholder
    cs: object             # (T, B, H) LSTM cell state after each step, else a (1, 1, 1) placeholder
    hns: object            # (T, B, H) GRU h_prev @ W_hn.T + b_hn, else a (1, 1, 1) placeholder


def forward(cell, xw, w_hh, b_hh, state0, lengths, training=True, sweep="auto", b_ih=None):
    xp = array_module()
    if b_ih is not None:
        xw = xw + b_ih
    K = build(xw.dtype.type)
    T, B, GH = xw.shape
    H = w_hh.shape[1]
    xw, w_hh, b_hh = (xp.ascontiguousarray(a) for a in (xw, w_hh, b_hh))
    kind, grid = choose_sweep(sweep, B, H, GH // H, xw.dtype.itemsize)
    code, act = CELL_CODES[cell], ACT_CODES.get(cell[4:], 0)
    lstm, gru = cell == "lstm", cell == "gru"
    h0 = xp.ascontiguousarray(state0[0])
    y = xp.empty((T, B, H), xw.dtype)
    gates = xp.empty((T, B, GH), xw.dtype) if (lstm or gru) else y
    c0 = xp.ascontiguousarray(state0[1]) if lstm else xp.zeros((1, 1), xw.dtype)
    c = c0.copy()                                                         # (B, H) updated in place
    cs = xp.empty((T, B, H), xw.dtype) if lstm else xp.zeros((1, 1, 1), xw.dtype)
    hns = xp.empty((T, B, H), xw.dtype) if gru else xp.zeros((1, 1, 1), xw.dtype)
    stream = launch_stream()
    d = [device_view(a) for a in (xw, b_hh, lengths, c, y, gates, cs, hns)]
    if kind == "persistent":
        hbuf = xp.empty((2, B, H), xw.dtype)                              # h double buffer
        hbuf[0] = h0
        K.persistent_forward[grid[0], threads(), stream, grid[1]](
            code, act, d[0], device_view(w_hh), d[1], d[2], device_view(hbuf), *d[3:])
        h = hbuf[T % 2]
    else:
        h = h0.copy()                                                     # (B, H) updated in place
        gh = xp.empty((B, GH), xw.dtype)                                  # h @ W_hh.T, reused every step
        h_d, gh_d = device_view(h), device_view(gh)
        step = K.step_forward[blocks(B * H), threads(), stream]
        for t in range(T):
            xp.matmul(h, w_hh.T, out=gh)
            step(code, act, t, d[0], gh_d, d[1], d[2], h_d, *d[3:])
    state_n = (h, c) if lstm else (h,)
    if not training:
        return y, state_n, None
    return y, state_n, SweepCtx(cell, act, kind, grid, lengths, w_hh, h0, y, gates, c0, cs, hns)


def backward(ctx, dy, dstate_n):
    xp = array_module()
    K = build(ctx.y.dtype.type)
    T, B, H = ctx.y.shape
    GH = ctx.w_hh.shape[0]
    dy = xp.ascontiguousarray(dy)
    dgx = xp.zeros((T, B, GH), dy.dtype)
    dgh = xp.zeros_like(dgx) if ctx.cell == "gru" else dgx
    dh = xp.array(dstate_n[0], copy=True)                                 # (B, H) carried dL/dh
    dc = xp.array(dstate_n[1], copy=True) if ctx.cell == "lstm" else xp.zeros((1, 1), dy.dtype)
    stream = launch_stream()
    code = CELL_CODES[ctx.cell]
    d = [device_view(a) for a in (dh, dy, ctx.y, ctx.h0, ctx.gates, ctx.cs, ctx.c0, ctx.hns, ctx.lengths,
                                  dc, dgx, dgh)]
    if ctx.sweep == "persistent":
        blocks_, shared = ctx.grid
        K.persistent_backward[blocks_, threads(), stream, shared](code, ctx.act, device_view(ctx.w_hh), d[8],
                                                                  *d[:8], *d[9:])
    else:
        dhg = xp.zeros((B, H), dy.dtype)                                  # dG_{t+1} @ W_hh, reused every step
        dhg_d = device_view(dhg)
        step = K.step_backward[blocks(B * H), threads(), stream]
        for t in range(T - 1, -1, -1):
            step(code, ctx.act, t, dhg_d, *d)
            xp.matmul(dgh[t], ctx.w_hh, out=dhg)
        dh += dhg
    dstate0 = (dh, dc) if ctx.cell == "lstm" else (dh,)
    return dgx, dgh, dstate0


def jordan_forward(xw, w_yh, w_hy, b_y, y0, lengths, act, out_act, training=True):
    """Per step: GEMM y_{t-1} @ W_yh.T, kernel h_t, GEMM h_t @ W_hy.T, kernel y_t."""
    xp = array_module()
    K = build(xw.dtype.type)
    T, B, H = xw.shape
    O = w_hy.shape[0]
    xw = xp.ascontiguousarray(xw)
    state = xp.array(y0, copy=True)                                       # (B, O) y of the last valid step
    h = xp.empty((T, B, H), xw.dtype)
    y = xp.empty((T, B, O), xw.dtype)
    hy = xp.empty((B, H), xw.dtype)
    py = xp.empty((B, O), xw.dtype)
    stream = launch_stream()
    xw_d, hy_d, py_d, h_d, y_d, st_d, len_d, by_d = (device_view(a) for a in (xw, hy, py, h, y, state, lengths,
                                                                                xp.ascontiguousarray(b_y)))
    hidden = K.jordan_hidden[blocks(B * H), threads(), stream]
    output = K.jordan_output[blocks(B * O), threads(), stream]
    act_code, out_code = ACT_CODES[act], ACT_CODES[out_act]
    for t in range(T):
        xp.matmul(state, w_yh.T, out=hy)
        hidden(act_code, t, xw_d, hy_d, len_d, h_d)
        xp.matmul(h[t], w_hy.T, out=py)
        output(out_code, t, py_d, by_d, len_d, y_d, st_d)
    if not training:
        return y, state, None
    return y, state, JordanCtx(lengths, w_yh, w_hy, act, out_act, y0, h, y)


def jordan_backward(ctx, dy, dy_n):
    """Per step, t = T-1..0: kernel dpy_t, GEMM dpy_t @ W_hy, kernel dph_t, GEMM dph_t @ W_yh."""
    xp = array_module()
    K = build(ctx.y.dtype.type)
    T, B, H = ctx.h.shape
    O = ctx.y.shape[2]
    dy = xp.ascontiguousarray(dy)
    dph = xp.zeros((T, B, H), dy.dtype)
    dpy = xp.zeros((T, B, O), dy.dtype)
    carry = xp.array(dy_n, copy=True)                                     # (B, O) dL/dy_state across padding
    dsum = xp.zeros((B, O), dy.dtype)                                     # dph[t+1] @ W_yh
    dhh = xp.empty((B, H), dy.dtype)                                      # dpy[t] @ W_hy
    stream = launch_stream()
    dy_d, y_d, h_d, len_d, carry_d, dsum_d, dhh_d, dph_d, dpy_d = (
        device_view(a) for a in (dy, ctx.y, ctx.h, ctx.lengths, carry, dsum, dhh, dph, dpy))
    output = K.jordan_output_backward[blocks(B * O), threads(), stream]
    hidden = K.jordan_hidden_backward[blocks(B * H), threads(), stream]
    act_code, out_code = ACT_CODES[ctx.act], ACT_CODES[ctx.out_act]
    for t in range(T - 1, -1, -1):
        output(out_code, t, dy_d, y_d, len_d, carry_d, dsum_d, dpy_d)
        xp.matmul(dpy[t], ctx.w_hy, out=dhh)
        hidden(act_code, t, dhh_d, h_d, dph_d)
        xp.matmul(dph[t], ctx.w_yh, out=dsum)
    return dph, dpy, carry + dsum
