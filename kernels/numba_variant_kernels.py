"""The numba backend's per-step kernels for the variants (layer normalisation, zoneout, the LSTM's projection; see
kernels/__init__.py), built per float dtype and variant by `build(dtype, ln, zoneout, proj)`: the flags are
closure constants, so each combination compiles to its own kernel with the other variants' code pruned.

Layout: a row kernel (`row_forward`, `row_backward`) runs one block of ROW threads per batch row b: LN needs the
statistics of a whole row of G*H entries, reduced inside the block (two passes, each a shared-memory tree:
block_sums), and each thread then serves the units j = tid, tid + ROW, ... of its row (the same thread owns the
same j, and the same entry k of a G*H loop, in every loop of a launch, so it re-reads what it wrote without a
barrier; reads of others' entries come after a block barrier). The projection's element kernels (`proj_forward`,
`proj_backward`) run one thread per (b, p) of h, around the GEMMs m W_hr^T and dh~ W_hr.

Zoneout masks come from the generator of kernels/__init__.py, compiled from cpu_fused's own functions (mix32,
row_key, kept: one definition for both backends), keyed per row once (row_key) and per unit (kept). The per-call
numbers reach the kernels in `keys` (5,) int64 on the device: (t0, seed_h, threshold_h, seed_c, threshold_c), so a
captured CUDA graph replays with each call's seeds; the kernel step of local step s is t0 + s. Padded steps
(s >= lengths[b], lengths already shifted by t0) output 0 and keep the state; their gradient rows are 0.
Accumulations (row statistics and parameter gradients) are in the array dtype (float32 for float32).
"""
import functools
import math
import types
from types import SimpleNamespace

import numpy as np
from numba import cuda

from . import LN_EPS, cpu_fused
from .numba_cuda_kernels import GRU, LSTM, build as build_cells

ROW = 4 if cuda.config.ENABLE_CUDASIM else 256      # threads per row block, a power of two (the reduction tree);
                                                     # the simulator runs a Python thread per CUDA thread: few there


def shared_bytes(dtype):
    """Dynamic shared memory of a row kernel launch: the (4 ROW,) sums of block_sums. Dynamic rather than static, as
    the simulator hands a static shared array to the threads of a block through an unlocked dict (two threads can
    each get one of their own), while its dynamic one is a single buffer."""
    return 4 * ROW * np.dtype(dtype).itemsize


@functools.lru_cache(maxsize=None)
def generator():
    """SimpleNamespace(mix32, row_key, kept): cpu_fused's zoneout generator (uint32 values held in uint64, wrapped by
    masking) compiled as CUDA device functions from the same source."""
    scope = dict(vars(cpu_fused))
    for name in ("mix32", "row_key", "kept"):
        fn = getattr(cpu_fused, name).py_func
        scope[name] = cuda.jit(device=True)(types.FunctionType(fn.__code__, scope, name, fn.__defaults__,
                                                                fn.__closure__))
    return SimpleNamespace(**{name: scope[name] for name in ("mix32", "row_key", "kept")})


@functools.lru_cache(maxsize=None)
def build(dtype, ln, zoneout, proj):
    """SimpleNamespace(row_forward, row_backward, proj_forward, proj_backward) for float dtype `dtype` and the
    variants on (bools)."""
    DTYPE = np.dtype(dtype)
    F = DTYPE.type
    cells = build_cells(dtype)
    sigmoid, tanh, activate, activate_backward = cells.sigmoid, cells.tanh, cells.activate, cells.activate_backward
    gru_backward = cells.gru_backward
    row_key, kept = generator().row_key, generator().kept
    EPS = F(LN_EPS)
    ZERO, ONE = F(0), F(1)

    @cuda.jit(device=True)
    def block_sums(shared, a, b, c, d):
        """(sum a, sum b, sum c, sum d) over the block's ROW threads, returned to every thread. shared: (4 ROW,)."""
        tid = cuda.threadIdx.x
        shared[tid] = a
        shared[ROW + tid] = b
        shared[2 * ROW + tid] = c
        shared[3 * ROW + tid] = d
        cuda.syncthreads()
        step = ROW // 2
        while step > 0:
            if tid < step:
                for k in range(4):
                    shared[k * ROW + tid] += shared[k * ROW + tid + step]
            cuda.syncthreads()
            step //= 2
        sums = shared[0], shared[ROW], shared[2 * ROW], shared[3 * ROW]
        cuda.syncthreads()                      # before the next call overwrites shared
        return sums

    @cuda.jit(device=True)
    def row_stats(u, v, shared):
        """(mean u, rstd u, mean v, rstd v) of rows u, v (n,), rstd = 1 / sqrt(var + LN_EPS), biased variance, two
        passes (sum, then sum of squared deviations)."""
        tid = cuda.threadIdx.x
        n = u.shape[0]
        su = ZERO
        sv = ZERO
        for k in range(tid, n, ROW):
            su += u[k]
            sv += v[k]
        su, sv, _, _ = block_sums(shared, su, sv, ZERO, ZERO)
        mu = su / F(n)
        mv = sv / F(n)
        qu = ZERO
        qv = ZERO
        for k in range(tid, n, ROW):
            qu += (u[k] - mu) * (u[k] - mu)
            qv += (v[k] - mv) * (v[k] - mv)
        qu, qv, _, _ = block_sums(shared, qu, qv, ZERO, ZERO)
        return mu, ONE / math.sqrt(qu / F(n) + EPS), mv, ONE / math.sqrt(qv / F(n) + EPS)

    @cuda.jit(device=True)
    def zone(prev, new, training, p, key, threshold, j):
        """k prev + (1 - k) new for unit j: training, k = 1 where the generator's bits of row `key` fall below
        `threshold` (a select, so prev or new exactly); evaluation, k = p."""
        if training:
            return prev if kept(key, np.uint64(j), threshold) else new
        return p * prev + (ONE - p) * new

    @cuda.jit(device=True)
    def emit(h, y, s, b, j, valid, new, training, p_h, key_h, threshold_h):
        """h_t of unit (b, j) from h~ = new: y[s, b, j] = h_t (0 when padded), the state h (B, P) takes it."""
        if zoneout:
            new = zone(h[b, j], new, training, p_h, key_h, threshold_h, j)
        y[s, b, j] = new if valid else ZERO
        if valid:
            h[b, j] = new

    @cuda.jit(device=True)
    def projections(xw, gh, b_ih, b_hh, s, b, k, gamma_ih, gamma_hh, m_x, r_x, m_h, r_h):
        """(gi, gh) of entry k of row b: LN(xw_t; gamma_ih) + b_ih and LN(h W_hh^T; gamma_hh) + b_hh with ln (means
        m_x, m_h and rstds r_x, r_h of the rows), else xw_t + b_ih and h W_hh^T + b_hh."""
        if ln:
            return (gamma_ih[k] * ((xw[s, b, k] - m_x) * r_x) + b_ih[k],
                    gamma_hh[k] * ((gh[b, k] - m_h) * r_h) + b_hh[k])
        return xw[s, b, k] + b_ih[k], gh[b, k] + b_hh[k]

    @cuda.jit
    def row_forward(cell, act, s, p_h, p_c, training, keys, xw, gh, b_hh, b_ih, lengths, gamma_ih, gamma_hh,
                    gamma_c, beta_c, h, c, y, gates, cs, hns, vhat_ih, vhat_hh, stats, m):
        """Step s of row b = blockIdx.x. xw: (T, B, G*H) x W_ih^T (no bias); gh: (B, G*H) h W_hh^T, the GEMM's
        output; b_hh, b_ih: (G*H,); lengths: (B,) int32, shifted by t0; p_h, p_c: zoneout's p (evaluation);
        training: 1 masks, 0 blends; keys: (5,) int64 (module docstring).
        ln: gamma_ih, gamma_hh (G*H,), gamma_c, beta_c (H,) (LSTM); writes vhat_ih, vhat_hh (T, B, G*H) the
        normalised rows and stats (T, B, 4) = (rstd_ih, rstd_hh, mean_c, rstd_c) for backward.
        h: (B, P) state in/out (the projection's kernel updates it instead under proj); c: (B, H) LSTM cell state
        in/out; y: (T, B, P); gates: (T, B, G*H) activated gates (Elman: y itself); cs: (T, B, H) LSTM c_t (c~ while
        the step runs); hns: (T, B, H) GRU gh_n (after LN) + b_hn; m: (T, B, H) o tanh(.) under proj (0 at padded
        rows). Variants' arrays a cell does not use are 1-element placeholders."""
        shared = cuda.shared.array(0, DTYPE)              # (4 ROW,) dynamic: shared_bytes(dtype)
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        G = 4 if cell == LSTM else 3 if cell == GRU else 1
        H = b_hh.shape[0] // G
        valid = s < lengths[b]
        t = np.uint64(keys[0] + s)
        key_h = row_key(np.uint64(keys[1]), t, b)
        key_c = row_key(np.uint64(keys[3]), t, b)
        threshold_h, threshold_c = np.uint64(keys[2]), np.uint64(keys[4])
        m_x = r_x = m_h = r_h = m_c = r_c = ZERO
        if ln:
            m_x, r_x, m_h, r_h = row_stats(xw[s, b], gh[b], shared)
            for k in range(tid, G * H, ROW):
                vhat_ih[s, b, k] = (xw[s, b, k] - m_x) * r_x
                vhat_hh[s, b, k] = (gh[b, k] - m_h) * r_h
            if tid == 0:
                stats[s, b, 0] = r_x
                stats[s, b, 1] = r_h
        if cell == LSTM:
            for j in range(tid, H, ROW):
                xi, hi = projections(xw, gh, b_ih, b_hh, s, b, j, gamma_ih, gamma_hh, m_x, r_x, m_h, r_h)
                xf, hf = projections(xw, gh, b_ih, b_hh, s, b, H + j, gamma_ih, gamma_hh, m_x, r_x, m_h, r_h)
                xg, hg = projections(xw, gh, b_ih, b_hh, s, b, 2 * H + j, gamma_ih, gamma_hh, m_x, r_x, m_h, r_h)
                xo, ho = projections(xw, gh, b_ih, b_hh, s, b, 3 * H + j, gamma_ih, gamma_hh, m_x, r_x, m_h, r_h)
                i = sigmoid(xi + hi)
                f = sigmoid(xf + hf)
                g = tanh(xg + hg)
                gates[s, b, j] = i
                gates[s, b, H + j] = f
                gates[s, b, 2 * H + j] = g
                gates[s, b, 3 * H + j] = sigmoid(xo + ho)
                cs[s, b, j] = f * c[b, j] + i * g                  # c~ = f c + i g
            if ln:                                                # u = LN(c~; gamma_c) + beta_c
                m_c, r_c, _, _ = row_stats(cs[s, b], cs[s, b], shared)
                if tid == 0:
                    stats[s, b, 2] = m_c
                    stats[s, b, 3] = r_c
            for j in range(tid, H, ROW):
                ct = cs[s, b, j]
                u = gamma_c[j] * ((ct - m_c) * r_c) + beta_c[j] if ln else ct
                new = gates[s, b, 3 * H + j] * tanh(u)             # m = o tanh(u)
                if zoneout:                                       # c_t = k c_{t-1} + (1 - k) c~
                    ct = zone(c[b, j], ct, training, p_c, key_c, threshold_c, j)
                if valid:
                    c[b, j] = ct
                cs[s, b, j] = c[b, j]
                if proj:
                    m[s, b, j] = new if valid else ZERO
                else:
                    emit(h, y, s, b, j, valid, new, training, p_h, key_h, threshold_h)
        elif cell == GRU:
            for j in range(tid, H, ROW):
                xr, hr = projections(xw, gh, b_ih, b_hh, s, b, j, gamma_ih, gamma_hh, m_x, r_x, m_h, r_h)
                xz, hz = projections(xw, gh, b_ih, b_hh, s, b, H + j, gamma_ih, gamma_hh, m_x, r_x, m_h, r_h)
                xn, hn = projections(xw, gh, b_ih, b_hh, s, b, 2 * H + j, gamma_ih, gamma_hh, m_x, r_x, m_h, r_h)
                r = sigmoid(xr + hr)
                z = sigmoid(xz + hz)
                n = tanh(xn + r * hn)                             # n = tanh(gi_n + r gh_n)
                gates[s, b, j] = r
                gates[s, b, H + j] = z
                gates[s, b, 2 * H + j] = n
                hns[s, b, j] = hn
                emit(h, y, s, b, j, valid, (ONE - z) * n + z * h[b, j], training, p_h, key_h, threshold_h)
        else:
            for j in range(tid, H, ROW):
                x, r = projections(xw, gh, b_ih, b_hh, s, b, j, gamma_ih, gamma_hh, m_x, r_x, m_h, r_h)
                emit(h, y, s, b, j, valid, activate(act, x + r), training, p_h, key_h, threshold_h)

    @cuda.jit(device=True)
    def lstm_cell_backward(gates, cs, c0, dc, dgx, s, b, j, H, dct_h, key_c, threshold_c):
        """Gate gradients i, f, g of unit (b, j) from dct_h = dL/dc~ through h~, and dc (B, H) on to c_{t-1}:
        c_t = k c_{t-1} + (1 - k) c~:  dc~ = (1 - k) dc_t + dct_h,  and k dc_t goes straight on;
        c~ = f c_prev + i g:  di = dc~ g,  df = dc~ c_prev,  dg = dc~ i,  dc_prev = f dc~ (+ k dc_t);
        each times its gate's derivative (sigmoid' = i (1 - i), tanh' = 1 - g^2)."""
        i = gates[s, b, j]
        f = gates[s, b, H + j]
        g = gates[s, b, 2 * H + j]
        c_prev = cs[s - 1, b, j] if s > 0 else c0[b, j]
        dc_t = dc[b, j]
        keep = kept(key_c, np.uint64(j), threshold_c) if zoneout else False
        dct = (ZERO if keep else dc_t) + dct_h
        dgx[s, b, j] = dct * g * i * (ONE - i)
        dgx[s, b, H + j] = dct * c_prev * f * (ONE - f)
        dgx[s, b, 2 * H + j] = dct * i * (ONE - g * g)
        dc[b, j] = f * dct + (dc_t if keep else ZERO)

    @cuda.jit
    def row_backward(cell, act, s, keys, dhg, dh, dy, y, h0, gates, cs, c0, hns, lengths, dc, dgx, dgh, gamma_ih,
                     gamma_hh, gamma_c, beta_c, vhat_ih, vhat_hh, stats, dm, acc):
        """Backward of step s for row b = blockIdx.x (training: zoneout's masks). dhg: (B, P) dgh[s+1] @ W_hh (0
        at s = T-1); dh: (B, P) the carried part of dL/dh, updated in place (under proj the projection's kernel
        does it, and dm (B, H) = dL/dm arrives from the GEMM dh~ W_hr); dy, y: (T, B, P); h0: (B, P); dc: (B, H)
        LSTM dL/dc in/out; dgx: (T, B, G*H) dL/dxw; dgh: (T, B, G*H) dL/d(h W_hh^T) (dgx itself for the Elman
        and the LSTM without ln); acc: (6, B, G*H) per-row sums of dgamma_ih, dgamma_hh, dbias_ih, dbias_hh, and
        (first H) dgamma_c, dbeta_c (ln); other arguments as row_forward saved them."""
        shared = cuda.shared.array(0, DTYPE)              # (4 ROW,) dynamic: shared_bytes(dtype)
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        G = 4 if cell == LSTM else 3 if cell == GRU else 1
        H = dgx.shape[2] // G
        if not (s < lengths[b]):
            for k in range(tid, G * H, ROW):
                dgx[s, b, k] = ZERO
                dgh[s, b, k] = ZERO
            if not proj:
                for j in range(tid, H, ROW):
                    dh[b, j] += dhg[b, j]
            return
        t = np.uint64(keys[0] + s)
        key_h = row_key(np.uint64(keys[1]), t, b)
        key_c = row_key(np.uint64(keys[3]), t, b)
        threshold_h, threshold_c = np.uint64(keys[2]), np.uint64(keys[4])
        m_c = r_c = ZERO
        if ln and cell == LSTM:
            m_c = stats[s, b, 2]
            r_c = stats[s, b, 3]
        s1 = ZERO
        s2 = ZERO
        for j in range(tid, H, ROW):
            if proj:
                dht = dm[b, j]
            else:
                # h_t = k h_{t-1} + (1 - k) h~:  dh~ = (1 - k) dh_t, k dh_t goes on to h_{t-1} (k is 0 or 1)
                d = dh[b, j] + dhg[b, j] + dy[s, b, j]
                keep = kept(key_h, np.uint64(j), threshold_h) if zoneout else False
                dht = ZERO if keep else d
                dh[b, j] = d if keep else ZERO
            if cell == LSTM:
                i = gates[s, b, j]
                o = gates[s, b, 3 * H + j]
                c_prev = cs[s - 1, b, j] if s > 0 else c0[b, j]
                ct = gates[s, b, H + j] * c_prev + i * gates[s, b, 2 * H + j]     # c~, recomputed
                chat = (ct - m_c) * r_c
                u = gamma_c[j] * chat + beta_c[j] if ln else ct
                tu = tanh(u)
                # m = o tanh(u):  do = dm tanh(u),  du = dm o (1 - tanh^2 u)
                du = dht * o * (ONE - tu * tu)
                dgx[s, b, 3 * H + j] = dht * tu * o * (ONE - o)
                if ln:
                    # u = gamma_c chat + beta_c:  dbeta_c += du,  dgamma_c += du chat,  dchat = gamma_c du (held in
                    # di's slot until the row's means are known)
                    acc[5, b, j] += du
                    acc[4, b, j] += du * chat
                    dchat = gamma_c[j] * du
                    dgx[s, b, j] = dchat
                    s1 += dchat
                    s2 += dchat * chat
                else:
                    lstm_cell_backward(gates, cs, c0, dc, dgx, s, b, j, H, du, key_c, threshold_c)
            elif cell == GRU:
                dh[b, j] += gru_backward(s, b, j, H, dht, y, h0, gates, hns, dgx, dgh)   # dgx, dgh before LN
            else:
                # h~ = act(p):  dp = dh~ act'(p), written from y (in training y = h~ wherever dh~ is not 0)
                dgx[s, b, j] = activate_backward(act, dht, y[s, b, j])
        if ln and cell == LSTM:
            # chat = (c~ - mean) rstd:  dc~ = rstd (dchat - mean(dchat) - chat mean(dchat chat))
            s1, s2, _, _ = block_sums(shared, s1, s2, ZERO, ZERO)
            m1 = s1 / F(H)
            m2 = s2 / F(H)
            for j in range(tid, H, ROW):
                c_prev = cs[s - 1, b, j] if s > 0 else c0[b, j]
                ct = gates[s, b, H + j] * c_prev + gates[s, b, j] * gates[s, b, 2 * H + j]
                chat = (ct - m_c) * r_c
                dct_h = r_c * (dgx[s, b, j] - m1 - chat * m2)
                lstm_cell_backward(gates, cs, c0, dc, dgx, s, b, j, H, dct_h, key_c, threshold_c)
        if ln:
            # gi = gamma_ih vhat_ih + b_ih, gh likewise (LSTM: both sit in a, so d(gi) = d(gh) = da):
            # dbias += d,  dgamma += d vhat,  dv = rstd (gamma d - mean(gamma d) - vhat mean(gamma d vhat))
            cuda.syncthreads()                                    # the row's d written by every thread
            a1 = a2 = a3 = a4 = ZERO
            for k in range(tid, G * H, ROW):
                dx = dgx[s, b, k]
                dr = dgh[s, b, k] if cell == GRU else dx
                vx = vhat_ih[s, b, k]
                vh = vhat_hh[s, b, k]
                acc[0, b, k] += dx * vx
                acc[1, b, k] += dr * vh
                acc[2, b, k] += dx
                acc[3, b, k] += dr
                a1 += gamma_ih[k] * dx
                a2 += gamma_ih[k] * dx * vx
                a3 += gamma_hh[k] * dr
                a4 += gamma_hh[k] * dr * vh
            a1, a2, a3, a4 = block_sums(shared, a1, a2, a3, a4)
            n = F(G * H)
            r_x = stats[s, b, 0]
            r_h = stats[s, b, 1]
            for k in range(tid, G * H, ROW):
                dx = dgx[s, b, k]
                dr = dgh[s, b, k] if cell == GRU else dx
                dgh[s, b, k] = r_h * (gamma_hh[k] * dr - a3 / n - vhat_hh[s, b, k] * (a4 / n))
                dgx[s, b, k] = r_x * (gamma_ih[k] * dx - a1 / n - vhat_ih[s, b, k] * (a2 / n))

    @cuda.jit
    def proj_forward(s, p_h, training, keys, hp, lengths, h, y):
        """After the GEMM hp = m_s W_hr^T (B, P): h_t = k h_{t-1} + (1 - k) hp (zoneout) or hp, into y[s] (T, B, P)
        (0 when padded) and the state h (B, P)."""
        B, P = h.shape
        idx = cuda.grid(1)
        b = idx // P
        q = idx - b * P
        if b < B:
            emit(h, y, s, b, q, s < lengths[b], hp[b, q], training, p_h,
                 row_key(np.uint64(keys[1]), np.uint64(keys[0] + s), b), np.uint64(keys[2]))

    @cuda.jit
    def proj_backward(s, keys, dhg, dh, dy, lengths, dhn):
        """Before step s's row_backward under proj: dh_t = dh + dhg + dy[s] (B, P); dhn[s] (T, B, P) = dL/dh~ =
        (1 - k) dh_t (all of it without zoneout), the rest k dh_t left in dh for h_{t-1}; padded rows: dhn 0, dh
        takes dhg on."""
        B, P = dh.shape
        idx = cuda.grid(1)
        b = idx // P
        q = idx - b * P
        if b < B:
            if s < lengths[b]:
                d = dh[b, q] + dhg[b, q] + dy[s, b, q]
                keep = False
                if zoneout:
                    key = row_key(np.uint64(keys[1]), np.uint64(keys[0] + s), b)
                    keep = kept(key, np.uint64(q), np.uint64(keys[2]))
                dhn[s, b, q] = ZERO if keep else d
                dh[b, q] = d if keep else ZERO
            else:
                dhn[s, b, q] = ZERO
                dh[b, q] += dhg[b, q]

    return SimpleNamespace(row_forward=row_forward, row_backward=row_backward, proj_forward=proj_forward,
                           proj_backward=proj_backward)
