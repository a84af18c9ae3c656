"""The NumPy sweeps: the CPU fallback and the readable reference every other backend is tested against.

Interface and shapes: see ``kernels/__init__.py``. Activation derivatives are written in terms of the
activation's output (tanh' = 1 - y^2, sigmoid' = y (1 - y); relu's backward selects), so backward needs only what
forward saved.
"""
from dataclasses import dataclass

import numpy as np

from . import GATES, LN_EPS, JordanCtx, zoneout_threshold

MASK32 = 0xFFFFFFFF


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


def valid_mask(lengths, T, t0=0):
    """(T, B, 1) bool: kernel step t0 + s of sequence b is inside its length."""
    return (np.arange(t0, t0 + T)[:, None] < np.asarray(lengths)[None, :])[:, :, None]


def mix32(x):
    """The 32-bit integer hash of the zoneout generator (kernels/__init__.py), on uint64 arrays holding uint32s."""
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7feb352d)) & np.uint64(MASK32)
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x846ca68b)) & np.uint64(MASK32)
    return x ^ (x >> np.uint64(16))


def zoneout_bits(seed, t, B, n):
    """(B, n) uint64: zoneout_bits(seed, t, b, j) for every row b and unit j of kernel step t."""
    wrap = lambda v: v & np.uint64(MASK32)     # noqa: E731  (sums of two uint32s, mod 2^32)
    key = mix32(wrap(mix32(np.uint64(seed)) + np.uint64(t)))
    rows = mix32(wrap(key + np.arange(B, dtype=np.uint64)))
    return mix32(wrap(rows[:, None] + np.arange(n, dtype=np.uint64)[None, :]))


def zoneout_keep(p, seed, t, B, n, training, dtype):
    """(B, n) k_t: 1 where a unit keeps its previous value (training), or p everywhere (evaluation)."""
    if not training:
        return np.full((B, n), p, dtype)
    return (zoneout_bits(seed, t, B, n) < zoneout_threshold(p)).astype(dtype)


def layer_norm(v, gamma):
    """gamma (v - mean v) / sqrt(var v + LN_EPS) over each row of v (B, n); returns it, the normalised v and the
    rows' 1 / sqrt(var + eps) (B, 1)."""
    mean = v.mean(axis=1, keepdims=True)
    rstd = 1 / np.sqrt(((v - mean) ** 2).mean(axis=1, keepdims=True) + LN_EPS)
    vhat = (v - mean) * rstd
    return gamma * vhat, vhat, rstd


def layer_norm_backward(dout, vhat, rstd, gamma):
    """dv (B, n) and dgamma (n,) of out = gamma vhat, vhat = (v - mean v) rstd, rstd = (var v + eps)^(-1/2):
    with dvhat = gamma dout,  dv = rstd (dvhat - mean(dvhat) - vhat mean(dvhat vhat))  (d mean v / dv = 1/n,
    d rstd / dv = -rstd^2 vhat / n), and dgamma = sum over rows of dout vhat."""
    dvhat = dout * gamma
    dv = rstd * (dvhat - dvhat.mean(axis=1, keepdims=True) - vhat * (dvhat * vhat).mean(axis=1, keepdims=True))
    return dv, (dout * vhat).sum(axis=0)


@dataclass
class SweepCtx:
    cell: str
    valid: np.ndarray   # (T, B, 1) bool
    w_hh: np.ndarray    # (G*H, P)
    h0: np.ndarray      # (B, P)
    y: np.ndarray       # (T, B, P)
    gates: np.ndarray   # (T, B, G*H) activated gates (Elman: h~)
    c0: np.ndarray = None   # (B, H) LSTM
    c: np.ndarray = None    # (T, B, H) LSTM cell state after each step
    hn: np.ndarray = None   # (T, B, H) GRU h_prev @ W_hn.T + b_hn (after LN with ln)
    saved: dict = None      # per step, what the variants need (see forward)
    ln: tuple = None
    w_hr: np.ndarray = None
    has_zoneout: bool = False


def forward(cell, xw, w_hh, b_hh, state0, lengths, training=True, b_ih=None, t0=0, ln=None, zoneout=None,
            w_hr=None):
    if b_ih is not None and ln is None:
        xw = xw + b_ih
    b_in = b_ih if ln is not None and b_ih is not None else 0
    T, B, GH = xw.shape
    H = GH // GATES[cell]
    dt = xw.dtype
    valid = valid_mask(lengths, T, t0)
    h = state0[0].copy()
    c = state0[1].copy() if cell == "lstm" else None
    P = h.shape[1]
    y = np.zeros((T, B, P), dt)
    gates = np.empty((T, B, GH), dt)
    cs = np.empty((T, B, H), dt) if cell == "lstm" else None
    hns = np.empty((T, B, H), dt) if cell == "gru" else None
    saved = {k: [] for k in ("vhat_ih", "rstd_ih", "vhat_hh", "rstd_hh", "chat", "rstd_c", "tu", "m",
                             "keep_h", "keep_c")}
    for s in range(T):
        t = t0 + s
        mv = valid[s]                                     # (B, 1)
        gh = h @ w_hh.T                                   # (B, G*H)
        gx = xw[s]
        if ln is not None:
            gx, vhat_ih, rstd_ih = layer_norm(gx, ln[0])
            gh, vhat_hh, rstd_hh = layer_norm(gh, ln[1])
            saved["vhat_ih"].append(vhat_ih), saved["rstd_ih"].append(rstd_ih)
            saved["vhat_hh"].append(vhat_hh), saved["rstd_hh"].append(rstd_hh)
        gx, gh = gx + b_in, gh + b_hh
        if zoneout is not None:
            keep_h = zoneout_keep(zoneout.p_h, zoneout.seed_h, t, B, P, training, dt)
            saved["keep_h"].append(keep_h)
            if cell == "lstm":
                keep_c = zoneout_keep(zoneout.p_c, zoneout.seed_c, t, B, H, training, dt)
                saved["keep_c"].append(keep_c)
        if cell == "gru":
            r = sigmoid(gx[:, :H] + gh[:, :H])
            z = sigmoid(gx[:, H:2 * H] + gh[:, H:2 * H])
            n = tanh(gx[:, 2 * H:] + r * gh[:, 2 * H:])
            h_tilde = (1 - z) * n + z * h
            gates[s] = np.concatenate([r, z, n], axis=1)
            hns[s] = gh[:, 2 * H:]
        elif cell == "lstm":
            a = gx + gh                                   # (B, 4H)
            i, f, o = sigmoid(a[:, :H]), sigmoid(a[:, H:2 * H]), sigmoid(a[:, 3 * H:])
            gg = tanh(a[:, 2 * H:3 * H])
            c_tilde = f * c + i * gg
            u = c_tilde
            if ln is not None:
                u, chat, rstd_c = layer_norm(c_tilde, ln[2])
                u = u + ln[3]
                saved["chat"].append(chat), saved["rstd_c"].append(rstd_c)
            tu = tanh(u)
            m = o * tu
            h_tilde = m if w_hr is None else m @ w_hr.T
            saved["tu"].append(tu), saved["m"].append(m)
            gates[s] = np.concatenate([i, f, gg, o], axis=1)
            c = np.where(mv, c_tilde if zoneout is None else keep_c * c + (1 - keep_c) * c_tilde, c)
            cs[s] = c
        else:
            h_tilde = ACT[cell[4:]](gx + gh)
            gates[s] = h_tilde
        h_new = h_tilde if zoneout is None else keep_h * h + (1 - keep_h) * h_tilde
        h = np.where(mv, h_new, h)
        y[s] = np.where(mv, h_new, 0)
    state_n = (h, c) if cell == "lstm" else (h,)
    if not training:
        return y, state_n, None
    ctx = SweepCtx(cell, valid, w_hh, state0[0], y, gates, c0=state0[1] if cell == "lstm" else None, c=cs,
                   hn=hns, saved={k: np.stack(v) for k, v in saved.items() if v}, ln=ln, w_hr=w_hr,
                   has_zoneout=zoneout is not None)
    return y, state_n, ctx


def param_sums(cell, GH, H, ln, w_hr, dtype):
    """Zeroed sums of the variant parameters' gradients a backward reports in dparams."""
    names = ["gamma_ih", "gamma_hh", "bias_ih", "bias_hh"] if ln is not None else []
    sums = {name: np.zeros(GH, dtype) for name in names}
    if ln is not None and cell == "lstm":
        sums.update(gamma_c=np.zeros(H, dtype), beta_c=np.zeros(H, dtype))
    if w_hr is not None:
        sums["weight_hr"] = np.zeros(w_hr.shape, dtype)
    return sums


def backward(ctx, dy, dstate_n, dparams=None):
    cell, valid, w_hh, ln, sv = ctx.cell, ctx.valid, ctx.w_hh, ctx.ln, ctx.saved
    T = ctx.y.shape[0]
    GH = ctx.gates.shape[2]
    H = GH // GATES[cell]
    dt = ctx.gates.dtype
    separate = cell == "gru" or ln is not None            # dL/d(xw) and dL/d(h W_hh^T) differ
    dgx = np.zeros(ctx.gates.shape, dt)
    dgh = np.zeros_like(dgx) if separate else dgx
    dh = dstate_n[0].copy()
    dc = dstate_n[1].copy() if cell == "lstm" else None
    sums = param_sums(cell, GH, H, ln, ctx.w_hr, dt)
    for s in range(T - 1, -1, -1):
        mv = valid[s]
        dh_t = dh + np.where(mv, dy[s], 0)
        # h_t = k h_{t-1} + (1 - k) h~ (zoneout):  dh~ = (1 - k) dh_t, and k dh_t goes straight on to h_{t-1}
        dh_tilde = np.where(mv, dh_t if not ctx.has_zoneout else (1 - sv["keep_h"][s]) * dh_t, 0)
        dh_prev = 0 if not ctx.has_zoneout else sv["keep_h"][s] * dh_t
        h_prev = ctx.y[s - 1] if s > 0 else ctx.h0
        if cell == "lstm":
            i, f, g, o = (ctx.gates[s, :, k * H:(k + 1) * H] for k in range(4))
            c_prev = ctx.c[s - 1] if s > 0 else ctx.c0
            tu = sv["tu"][s]
            dm = dh_tilde
            if ctx.w_hr is not None:                      # h~ = m W_hr^T
                sums["weight_hr"] += dh_tilde.T @ sv["m"][s]
                dm = dh_tilde @ ctx.w_hr
            # m = o tanh(u):  do = dm tanh(u),  du = dm o (1 - tanh^2 u)
            du = dm * o * (1 - tu * tu)
            dc_from_h = du
            if ln is not None:                            # u = LN(c~; gamma_c) + beta_c
                sums["beta_c"] += du.sum(axis=0)
                dc_from_h, dgamma_c = layer_norm_backward(du, sv["chat"][s], sv["rstd_c"][s], ln[2])
                sums["gamma_c"] += dgamma_c
            # c_t = k_c c_{t-1} + (1 - k_c) c~,  c~ = f c_prev + i g:  dc~ = (1 - k_c) dc_t + dc (through h~);
            # di = dc~ g, df = dc~ c_prev, dg = dc~ i, dc_prev = k_c dc_t + f dc~
            keep_c = sv["keep_c"][s] if ctx.has_zoneout else None
            dc_tilde = np.where(mv, (dc if keep_c is None else (1 - keep_c) * dc) + dc_from_h, 0)
            da = np.concatenate([dc_tilde * g * i * (1 - i), dc_tilde * c_prev * f * (1 - f),
                                 dc_tilde * i * (1 - g * g), dm * tu * o * (1 - o)], axis=1)
            dc = np.where(mv, f * dc_tilde + (0 if keep_c is None else keep_c * dc), dc)
            d_gi = d_gh = da
        elif cell == "gru":
            r, z, n = (ctx.gates[s, :, k * H:(k + 1) * H] for k in range(3))
            # h~ = (1 - z) n + z h_prev:  dn = dh~ (1 - z),  dz = dh~ (h_prev - n),  dh_prev = dh~ z + ...
            dn_pre = dh_tilde * (1 - z) * (1 - n * n)
            dz_pre = dh_tilde * (h_prev - n) * z * (1 - z)
            # n = tanh(gi_n + r gh_n):  dr = dn_pre gh_n,  d(gh_n) = dn_pre r
            dr_pre = dn_pre * ctx.hn[s] * r * (1 - r)
            d_gi = np.concatenate([dr_pre, dz_pre, dn_pre], axis=1)
            d_gh = np.concatenate([dr_pre, dz_pre, dn_pre * r], axis=1)
            dh_prev = dh_prev + dh_tilde * z
        else:
            # h~ = act(p):  dp = dh~ act'(p), written from h~
            d_gi = d_gh = act_backward(cell[4:], dh_tilde, ctx.gates[s])
        if ln is not None:                                # gi = LN(xw; gamma_ih) + b_ih, gh likewise
            for key, d, gamma, out in (("ih", d_gi, ln[0], dgx), ("hh", d_gh, ln[1], dgh)):
                sums["bias_" + key] += d.sum(axis=0)
                out[s], dgamma = layer_norm_backward(d, sv["vhat_" + key][s], sv["rstd_" + key][s], gamma)
                sums["gamma_" + key] += dgamma
        else:
            dgx[s] = d_gi
            dgh[s] = d_gh
        dgx[s] = np.where(mv, dgx[s], 0)                  # a padded step's NaN or Inf reaches no gradient
        dgh[s] = np.where(mv, dgh[s], 0)
        dh = np.where(mv, dh_prev + dgh[s] @ w_hh, dh)
    if dparams is not None:
        dparams.update(sums)
    dstate0 = (dh, dc) if cell == "lstm" else (dh,)
    return dgx, dgh, dstate0


FEATURES = frozenset({"t0", "ln", "zoneout", "w_hr"})


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
