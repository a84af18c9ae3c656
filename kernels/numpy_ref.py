"""The NumPy sweeps: the CPU fallback and the readable reference every other backend is tested against.

Interface and shapes: see ``kernels/__init__.py``. Activation derivatives are written in terms of the
activation's output (tanh' = 1 - y^2, sigmoid' = y (1 - y); relu's backward selects), so backward needs only what
forward saved.
"""
from dataclasses import dataclass

import numpy as np

from . import JordanCtx


def tanh(x):
    """tanh; float32 computed in float64 and rounded once: within 0.5 ulp (plus float64's error, ~2^-29 ulp) of the
    exact value, so exactly +-1 wherever the correctly rounded value is."""
    return np.tanh(x.astype(np.float64, copy=False)).astype(x.dtype, copy=False)


def sigmoid(x):
    """1 / (1 + e^-x), relatively accurate for every x (also tiny results): e = e^-|x| in [0, 1] never overflows,
    then 1 / (1 + e) for x >= 0 and e / (1 + e) for x < 0. float32 goes through float64 as in tanh."""
    x64 = x.astype(np.float64, copy=False)
    e = np.exp(-np.abs(x64))
    return (np.where(x64 < 0, e, 1.0) / (1.0 + e)).astype(x.dtype, copy=False)


def relu(x):
    """max(x, 0); NaN stays NaN (np.maximum propagates it)."""
    return np.maximum(x, 0)


def identity(x):
    return x


ACT = {"tanh": tanh, "relu": relu, "sigmoid": sigmoid, "identity": identity}


def act_backward(name, dy, y):
    """dL/d pre-activation from dL/dy and the activation's output y: dy act', act' written from y (exactly 0 where
    tanh is +-1 and sigmoid 0 or 1). relu selects, as torch's threshold backward does: 0 where y <= 0, whatever dy
    is (NaN or Inf there stops), dy elsewhere (NaN y included)."""
    if name == "tanh":
        return dy * (1 - y * y)
    if name == "sigmoid":
        return dy * (y * (1 - y))
    if name == "relu":
        return np.where(y <= 0, y.dtype.type(0), dy)
    return dy


def valid_mask(lengths, T):
    """(T, B, 1) bool: step t of sequence b is inside its length."""
    return (np.arange(T)[:, None] < np.asarray(lengths)[None, :])[:, :, None]


@dataclass
class SweepCtx:
    cell: str
    valid: np.ndarray   # (T, B, 1) bool
    w_hh: np.ndarray    # (G*H, H)
    h0: np.ndarray      # (B, H)
    y: np.ndarray       # (T, B, H)
    gates: np.ndarray   # (T, B, G*H) activated gates (Elman: unused, y holds h)
    c0: np.ndarray = None   # (B, H) LSTM
    c: np.ndarray = None    # (T, B, H) LSTM cell state after each step
    hn: np.ndarray = None   # (T, B, H) GRU h_prev @ W_hn.T + b_hn


def forward(cell, xw, w_hh, b_hh, state0, lengths, training=True, b_ih=None):
    if b_ih is not None:
        xw = xw + b_ih
    T, B, GH = xw.shape
    H = w_hh.shape[1]
    valid = valid_mask(lengths, T)
    h = state0[0].copy()
    c = state0[1].copy() if cell == "lstm" else None
    y = np.zeros((T, B, H), xw.dtype)
    gates = np.empty((T, B, GH), xw.dtype)
    cs = np.empty((T, B, H), xw.dtype) if cell == "lstm" else None
    hns = np.empty((T, B, H), xw.dtype) if cell == "gru" else None
    for t in range(T):
        m = valid[t]                                      # (B, 1)
        if cell == "gru":
            gh = h @ w_hh.T + b_hh                        # (B, 3H)
            r = sigmoid(xw[t, :, :H] + gh[:, :H])
            z = sigmoid(xw[t, :, H:2 * H] + gh[:, H:2 * H])
            n = tanh(xw[t, :, 2 * H:] + r * gh[:, 2 * H:])
            h_new = (1 - z) * n + z * h
            gates[t] = np.concatenate([r, z, n], axis=1)
            hns[t] = gh[:, 2 * H:]
        elif cell == "lstm":
            g = xw[t] + h @ w_hh.T + b_hh                 # (B, 4H)
            i, f, o = sigmoid(g[:, :H]), sigmoid(g[:, H:2 * H]), sigmoid(g[:, 3 * H:])
            gg = tanh(g[:, 2 * H:3 * H])
            c_new = f * c + i * gg
            h_new = o * tanh(c_new)
            gates[t] = np.concatenate([i, f, gg, o], axis=1)
            c = np.where(m, c_new, c)
            cs[t] = c
        else:
            h_new = ACT[cell[4:]](xw[t] + h @ w_hh.T + b_hh)
            gates[t] = h_new
        h = np.where(m, h_new, h)
        y[t] = np.where(m, h_new, 0)
    state_n = (h, c) if cell == "lstm" else (h,)
    if not training:
        return y, state_n, None
    ctx = SweepCtx(cell, valid, w_hh, state0[0], y, gates,
                   c0=state0[1] if cell == "lstm" else None, c=cs, hn=hns)
    return y, state_n, ctx


def backward(ctx, dy, dstate_n):
    cell, valid, w_hh = ctx.cell, ctx.valid, ctx.w_hh
    T, B, H = ctx.y.shape
    dgx = np.zeros(ctx.gates.shape, ctx.gates.dtype)
    dgh = np.zeros_like(dgx) if cell == "gru" else dgx
    dh = dstate_n[0].copy()
    dc = dstate_n[1].copy() if cell == "lstm" else None
    for t in range(T - 1, -1, -1):
        m = valid[t]
        dh_t = dh + np.where(m, dy[t], 0)
        h_prev = ctx.y[t - 1] if t > 0 else ctx.h0
        if cell == "lstm":
            i, f, g, o = (ctx.gates[t, :, k * H:(k + 1) * H] for k in range(4))
            c_prev = ctx.c[t - 1] if t > 0 else ctx.c0
            tc = tanh(ctx.c[t])
            # h = o tanh(c):  do = dh tanh(c);  dc += dh o (1 - tanh^2 c)
            dc_t = dc + dh_t * o * (1 - tc * tc)
            # c = f c_prev + i g:  di = dc g, df = dc c_prev, dg = dc i, dc_prev = dc f
            d = np.concatenate([dc_t * g * i * (1 - i), dc_t * c_prev * f * (1 - f),
                                dc_t * i * (1 - g * g), dh_t * tc * o * (1 - o)], axis=1)
            dgx[t] = np.where(m, d, 0)
            dc = np.where(m, dc_t * f, dc)
            dh_prev = dgx[t] @ w_hh
        elif cell == "gru":
            r, z, n = (ctx.gates[t, :, k * H:(k + 1) * H] for k in range(3))
            # h = (1 - z) n + z h_prev:  dn = dh (1 - z),  dz = dh (h_prev - n),  dh_prev = dh z + ...
            dn_pre = dh_t * (1 - z) * (1 - n * n)
            dz_pre = dh_t * (h_prev - n) * z * (1 - z)
            # n = tanh(xn + r hn):  dr = dn_pre hn,  d(hn) = dn_pre r
            dr_pre = dn_pre * ctx.hn[t] * r * (1 - r)
            dgx[t] = np.where(m, np.concatenate([dr_pre, dz_pre, dn_pre], axis=1), 0)
            dgh[t] = np.where(m, np.concatenate([dr_pre, dz_pre, dn_pre * r], axis=1), 0)
            dh_prev = dh_t * z + dgh[t] @ w_hh
        else:
            # h = act(p):  dp = dh act'(p), written from h
            dgx[t] = np.where(m, act_backward(cell[4:], dh_t, ctx.gates[t]), 0)
            dh_prev = dgx[t] @ w_hh
        dh = np.where(m, dh_prev, dh)
    dstate0 = (dh, dc) if cell == "lstm" else (dh,)
    return dgx, dgh, dstate0


def jordan_forward(xw, w_yh, w_hy, b_y, y0, lengths, act, out_act, training=True):
    T, B, H = xw.shape
    valid = valid_mask(lengths, T)
    state = y0.copy()
    hs = np.zeros((T, B, H), xw.dtype)
    y = np.zeros((T, B, w_hy.shape[0]), xw.dtype)
    for t in range(T):
        m = valid[t]
        h = ACT[act](xw[t] + state @ w_yh.T)
        y_t = ACT[out_act](h @ w_hy.T + b_y)
        hs[t] = np.where(m, h, 0)
        y[t] = np.where(m, y_t, 0)
        state = np.where(m, y_t, state)
    if not training:
        return y, state, None
    return y, state, JordanCtx(lengths, w_yh, w_hy, act, out_act, y0, hs, y)


def jordan_backward(ctx, dy, dy_n):
    T = ctx.y.shape[0]
    valid = valid_mask(ctx.lengths, T)
    dph = np.zeros(ctx.h.shape, ctx.h.dtype)
    dpy = np.zeros(ctx.y.shape, ctx.y.dtype)
    dstate = dy_n.copy()
    for t in range(T - 1, -1, -1):
        m = valid[t]
        # y_t feeds the loss (dy) and the next step (dstate)
        dy_t = dstate + np.where(m, dy[t], 0)
        dpy[t] = np.where(m, act_backward(ctx.out_act, dy_t, ctx.y[t]), 0)     # y = out_act(py)
        dph[t] = act_backward(ctx.act, dpy[t] @ ctx.w_hy, ctx.h[t])            # py = h W_hy^T + b_y
        dstate = np.where(m, dph[t] @ ctx.w_yh, dstate)                          # ph = xw + y_prev W_yh^T
    return dph, dpy, dstate
