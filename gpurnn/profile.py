"""`gpurnn bench --profile`: where one CPU training step of a single layer spends its time.

Each part is the same call the layer makes (``layers._Recurrent.forward/backward`` on the numpy backend), timed
alone on the same arrays, median of `repeats` after one warm-up, with the same allocation (a Workspace when
`workspace` is on, fresh arrays otherwise). The sweeps are also split into their per-step recurrent GEMMs (and, for
the Elman forward, the copy that turns the GEMM output batch-major); what is left of a sweep is its fused pointwise
work (input bias included, on the step kernels' threads). "rest" is the whole step minus the parts: checks, copies,
Python.
"""
import time

import numpy as np

from .kernels import GATES, cpu_fused
from .layers import matmul
from .workspace import Workspace


def _median_ms(fn, repeats, setup=None):
    """Median milliseconds of fn(arg), arg = setup() made fresh (untimed) for every call; one warm-up call."""
    times = []
    for k in range(repeats + 1):
        arg = setup() if setup else None
        t = time.perf_counter()
        fn(arg)
        if k:
            times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def profile_step(cell, T, B, H, repeats=10, seed=0, workspace=False):
    """[(part, ms, GEMM GFLOP or 0)] for one float32 training step, I = H, then ("whole step", ms, total)."""
    from .bench import make_ours
    G = GATES[cell]
    ws = Workspace() if workspace else None
    rng = np.random.default_rng(seed)
    x2d = rng.standard_normal((T * B, H)).astype(np.float32)               # (T*B, I)
    w_ih = (rng.standard_normal((G * H, H)) / np.sqrt(H)).astype(np.float32)
    w_hh = (rng.standard_normal((G * H, H)) / np.sqrt(H)).astype(np.float32)
    b_ih, b_hh = (np.full(G * H, 0.1, np.float32) for _ in range(2))
    dy = rng.standard_normal((T, B, H)).astype(np.float32)
    state0 = tuple(np.zeros((B, H), np.float32) for _ in range(2 if cell == "lstm" else 1))
    lengths = np.full(B, T, np.int32)
    xw = (x2d @ w_ih.T).reshape(T, B, G * H)
    empty = np.empty if ws is None else ws.empty

    def sweep_f(a):
        return cpu_fused.forward(cell, a, w_hh, b_hh, state0, lengths, b_ih=b_ih, workspace=ws)

    def fresh_xw():                                                            # what the sweep overwrites
        a = empty(xw.shape, np.float32)
        np.copyto(a, xw)
        return a

    _, _, ctx = sweep_f(fresh_xw())
    dgx, dgh, _ = cpu_fused.backward(ctx, dy, state0)
    dgx2d, dgh2d = dgx.reshape(T * B, G * H), dgh.reshape(T * B, G * H)
    ones = np.ones(T * B, np.float32)
    h = np.zeros((B, H), np.float32)
    gh, dh, gh_rows = np.empty((G * H, B), np.float32), np.empty((H, B), np.float32), np.empty((B, G * H), np.float32)
    proj = 2 * T * B * G * H * H / 1e9                                          # GFLOP of one (T*B, H) x (H, G*H)

    def recurrent_gemms(_):
        for _t in range(T):
            np.matmul(w_hh, h.T, out=gh)

    def transposes(_):                                                         # the Elman forward's only
        for _t in range(T):
            np.copyto(gh_rows, gh.T)

    def backward_gemms(_):
        for t in range(T):
            np.matmul(w_hh.T, dgh[t].T, out=dh)

    def weight_grads(_):
        matmul(np, ws, dgx2d.T, x2d)
        matmul(np, ws, dgh[0].T, ctx.h0)
        matmul(np, ws, dgh2d[B:].T, ctx.y[:-1].reshape(-1, H))
        matmul(np, ws, dgx2d, w_ih)

    def bias_sums(_):
        ones @ dgh2d
        if dgh is not dgx:
            ones @ dgx2d

    parts = [("input projection x W_ihᵀ", _median_ms(lambda _: matmul(np, ws, x2d, w_ih.T), repeats), proj)]
    whole_f = _median_ms(sweep_f, repeats, fresh_xw)
    gemm_f = _median_ms(recurrent_gemms, repeats)
    copy_f = _median_ms(transposes, repeats) if cell.startswith("rnn") else 0.0
    parts += [("forward sweep: recurrent GEMMs", gemm_f, proj)]
    parts += [("forward sweep: GEMM output transposes", copy_f, 0.0)] if copy_f else []
    parts += [("forward sweep: fused pointwise + bias", whole_f - gemm_f - copy_f, 0.0)]
    whole_b = _median_ms(lambda _: cpu_fused.backward(ctx, dy, state0), repeats)
    gemm_b = _median_ms(backward_gemms, repeats)
    parts += [("backward sweep: recurrent GEMMs", gemm_b, proj),
              ("backward sweep: fused pointwise", whole_b - gemm_b, 0.0),
              ("dW_ih, dW_hh, dx GEMMs", _median_ms(weight_grads, repeats), 3 * proj),
              ("bias sums (GEMV)", _median_ms(bias_sums, repeats), 0.0)]
    step = make_ours("numpy", cell, T, B, H, seed=seed, workspace=workspace)
    whole = _median_ms(lambda _: step(), repeats)
    parts.append(("rest (checks, copies, Python)", whole - sum(ms for _, ms, _ in parts), 0.0))
    parts.append(("whole step", whole, 6 * proj))
    return parts


def format_profile(cell, T, B, H, parts, workspace=False, threads=None):
    whole = parts[-1][1]
    how = ("workspace on" if workspace else "fresh buffers") + (f", Numba threads {threads}" if threads else "")
    lines = [f"{cell} T={T} B={B} H=I={H}, one training step, float32, {how}:",
             f"  {'part':<42}{'ms':>8}{'share':>7}{'GFLOP/s':>9}"]
    for name, ms, gflop in parts:
        rate = f"{gflop / ms * 1e3:9.1f}" if gflop and ms > 0 else f"{'':>9}"
        lines.append(f"  {name:<42}{ms:8.2f}{100 * ms / whole:6.0f}%{rate}")
    return "\n".join(lines)
