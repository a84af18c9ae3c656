"""The fast CPU sweeps: BLAS for the recurrent GEMM of each step, one fused Numba kernel for its gate math.

Interface and shapes: see ``kernels/__init__.py``. float32 runs here; float64 (the oracle's dtype) and the
Jordan network go to ``numpy_ref`` unchanged, so float64 results stay exactly the reference's.

Layout: the recurrent GEMM runs feature-major, ``W_hh (G*H, H) @ h^T (H, B) -> (G*H, B)`` forward and
``W_hh^T (H, G*H) @ dG^T (G*H, B) -> (H, B)`` backward; at small B that is the shape BLAS runs fastest (about
1.4x the batch-major one here), and the step kernels read that output as it is (one strided column per batch row),
so nothing is transposed (except for the Elman forward, see its kernel). Everything else is batch-major (T, B, .)
as in the interface. The activated gates overwrite ``xw`` in place (it is what backward reads); the input bias is
summed with ``b_hh`` once per sweep and added in the step kernel, not in a pass of its own.

Threads: the step kernels run their batch rows on Numba's threads (``numba.set_num_threads`` /
``NUMBA_NUM_THREADS``, all cores by default), the GEMMs on BLAS's; the two alternate, never overlap. Under Numba's
OpenMP threading layer the kernels run on one thread unless ``OMP_WAIT_POLICY=passive``: OpenMP workers spin
between parallel regions, BLAS's workers spin between GEMMs, and the two pools then fight for the cores every step
(many times slower than one thread on a busy 2-core machine); the tbb and workqueue layers let idle workers yield.
``THREADS`` (an int) overrides the choice. Buffers come from ``workspace.empty`` when a workspace is given
(``gpurnn.workspace.Workspace``), else ``np.empty``; every one is allocated once per sweep, nothing per step.

Activations: tanh and sigmoid in float32 arithmetic that vectorises, within 1.4 ulp and monotone (see below); relu
passes NaN on. Backward forms activation derivatives from the saved outputs, like the reference: exactly 0 where
tanh is +-1 and sigmoid 0 or 1.
"""
import math
import os
import threading
import types
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.extending import intrinsic

from . import GATES, numpy_ref

# contract/reassoc/afn/arcp let LLVM fuse and vectorise; no nnan/ninf, so NaN and Inf propagate as in NumPy
FAST = {"contract", "reassoc", "afn", "arcp", "nsz"}
jit = njit(fastmath=FAST, error_model="numpy", cache=True, nogil=True)
pjit = njit(fastmath=FAST, error_model="numpy", cache=True, nogil=True, parallel=True)
inline = njit(fastmath=FAST, error_model="numpy", cache=True, inline="always")

ACT_CODE = {"tanh": 0, "relu": 1, "sigmoid": 2, "identity": 3}
ONE, ZERO = np.float32(1), np.float32(0)

# tanh and sigmoid in float32 arithmetic that vectorises (no calls, no float64), from e^a = 2^n (1 + r q(r)), a >= 0:
# n = floor(a / ln2) taken a little low, so r = a - n ln2 lies in [0, ln2 (1 + 2^-8)] (no clamping), q a polynomial;
# then 1 / (1 + e^a) = 2^-n / ((1 + 2^-n) + r q) with one fused multiply-add and one division, relatively accurate
# however small. sigmoid(x) is that at a = |x| for x < 0 and 1 minus it for x >= 0; tanh|x| = 1 - 2 / (1 + e^2|x|)
# above TANH_SMALL, an odd polynomial below. Results near a saturation point are `1 - small`, so their rounding noise
# is relative to the distance from the limit. Measured over every float32 input (tests/test_activations.py with
# GPURNN_EXHAUSTIVE=1): tanh within 1.35 ulp, sigmoid within 1.32 ulp of the exact value, both monotone
# non-decreasing; exactly +-1 / 0 / 1 wherever the correctly rounded value is; NaN in, NaN out; +-Inf give the limits.
# Compiled apart from the FAST kernels with IEEE semantics (reassociation would undo the rounding trick and the
# exact residuals); LLVM inlines them into the step kernels' loops, which still vectorise.
exact = njit(fastmath=False, error_model="numpy", cache=True, nogil=True)   # set: not inherited from a caller
F32 = np.float32
INV_LN2_LOW = F32(1.44269504088896341 * (1 - 2.0 ** -16))   # 1 / ln2, a little low: n never exceeds floor(a / ln2)
LN2_HI, LN2_LO = F32(0.693145751953125), F32(1.42860682030941723212e-06)   # ln2 = HI + LO, n HI exact for n < 2^8
ROUNDER = F32(12582912.0)         # 1.5 * 2^23: v + ROUNDER rounds v to an integer n, held in its low bits
A_MAX = F32(110.0)                # 1 / (1 + e^a) rounds to 0 from 103.98 on; a <= A_MAX keeps n <= 159
TANH_A_MAX = F32(40.0)            # tanh rounds to 1 from 9.01 on; 2|x| <= TANH_A_MAX keeps 2^(1-n) normal
UNSCALE = F32(2.0 ** -64)         # sigmoid works with 2^64 / (1 + e^a), a normal float32 for every a <= A_MAX
TANH_SMALL = F32(0.55)            # below: the odd polynomial; above: 1 - 2 / (1 + e^2|x|) (then tanh > 0.5)
# q(r) ~ (e^r - 1) / r on [0, ln2 (1 + 2^-8)], least-squares fit on Chebyshev nodes: 1 + r q within 0.57 2^-24 e^r
Q5, Q4, Q3, Q2, Q1, Q0 = (F32(v) for v in (0.0019513999374820303, 0.007787333213802618, 0.04191845028500799,
                                           0.16660902190470428, 0.5000059838156959, 0.9999997957582586))
# (tanh x - x) / x^3 as a polynomial in x^2 on |x| <= TANH_SMALL, same fit (tanh within 1.26 ulp)
T3, T2, T1, T0 = (F32(v) for v in (0.01641081536003305, -0.0526556027791566, 0.13320422641228552,
                                   -0.3333292992485407))

THREADS = None     # threads of the step kernels; None: see step_threads()
_workqueue_lock = threading.Lock()   # Numba's workqueue layer aborts on parallel launches from two threads at once


@intrinsic
def float32_bits(typingctx, x):
    """The IEEE-754 bit pattern of a float32, as int32."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return numba.types.int32(numba.types.float32), codegen


@intrinsic
def bits_float32(typingctx, i):
    """The float32 whose bit pattern is the int32 i."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return numba.types.float32(numba.types.int32), codegen


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c rounded once (llvm.fma: a vector instruction where the CPU has FMA)."""
    def codegen(context, builder, signature, args):
        return builder.fma(*args)
    return numba.types.float32(numba.types.float32, numba.types.float32, numba.types.float32), codegen


@exact
def exp_parts(a, bias):
    """(p, c, r, q) with 2^bias / (1 + e^a) = p / (c + r q): p = 2^(bias-n), c = 1 + 2^-n (1 for n >= 24).

    a: float32 in [0, A_MAX] or NaN (NaN in r and q); bias - n + 127 must lie in 1..254.
    """
    t = fma(a, INV_LN2_LOW, F32(-0.5)) + ROUNDER           # n + ROUNDER, n = floor(a / ln2) or one less
    n = t - ROUNDER
    r = fma(-n, LN2_LO, fma(-n, LN2_HI, a))                # a - n ln2 (Cody-Waite)
    q = fma(fma(fma(fma(fma(Q5, r, Q4), r, Q3), r, Q2), r, Q1), r, Q0)
    # 2^(bias-n): t holds n in its low bits; shifted left by 23 they are n's exponent field, mod 2^9
    p = bits_float32(np.int32((127 + bias) << 23) - (float32_bits(t) << np.int32(23)))
    return p, fma(p, F32(2.0 ** -bias), ONE), r, q


@exact
def sigmoid(x):
    """1 / (1 + e^-x) of a float32: y = 1 / (1 + e^|x|) for x < 0, 1 - y for x >= 0.

    y = 2^-n / ((1 + 2^-n) + r q) in units of 2^-64 (normal down to the last subnormal result). The denominator's
    rounding error (with the 2^-n that c = 1 + 2^-n drops for n >= 24) and the quotient's (exact, by an fma) are
    added back, so y is rounded once (a subnormal once more, by the final scaling).
    """
    a = abs(x)
    a = A_MAX if a > A_MAX else a                          # NaN-preserving: NaN > c is False
    p, c, r, q = exp_parts(a, 64)
    den = fma(r, q, c)
    den_lo = fma(r, q, (ONE - den) + p * UNSCALE)          # (1 + 2^-n + r q) - den; 1 - den is exact
    y = p / den
    res = fma(-y, den_lo, fma(-y, den, p))                 # p - y (den + den_lo); the inner fma is exact
    y = fma(res, fma(F32(-0.5), den, F32(1.5)), y) * UNSCALE   # y + res / den, 1.5 - den/2 ~ 1 / den
    return y if x < ZERO else ONE - y


@exact
def tanh(x):
    """tanh of a float32: x + x^3 P(x^2) for |x| < TANH_SMALL, else 1 - 2 / (1 + e^2|x|); with the sign of x."""
    ax = abs(x)
    x2 = ax * ax
    small = fma(ax * x2, fma(fma(fma(T3, x2, T2), x2, T1), x2, T0), ax)
    a = F32(2) * ax
    a = TANH_A_MAX if a > TANH_A_MAX else a
    p, c, r, q = exp_parts(a, 1)
    large = ONE - p / fma(r, q, c)
    return math.copysign(small if ax < TANH_SMALL else large, x)


@inline
def relu(x):
    """max(x, 0) with NaN passed through (x <= 0 is False for NaN)."""
    return ZERO if x <= ZERO else x


@inline
def act(code, x):
    if code == 0:
        return tanh(x)
    if code == 1:
        return relu(x)
    if code == 2:
        return sigmoid(x)
    return x


@inline
def act_grad(code, y):
    """d act / d pre-activation from the output y (tanh' = 1 - y^2, sigmoid' = y (1 - y), relu' = [y > 0];
    relu' is 1 at NaN, as torch's threshold backward passes the gradient where y <= 0 is False)."""
    if code == 0:
        return ONE - y * y
    if code == 1:
        return ZERO if y <= ZERO else ONE
    if code == 2:
        return y * (ONE - y)
    return ONE


def both(fn):
    """A step kernel compiled twice: [False] on the calling thread (prange runs as range), [True] with its batch
    rows on Numba's threads. The parallel launch costs microseconds a call, so one thread takes the first."""
    serial = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    serial.__qualname__ = fn.__qualname__ + "_serial"   # a cache entry of its own: Numba's cache key ignores flags
    return jit(serial), pjit(fn)


@pjit
def _touch(a):
    for k in prange(a.shape[0]):
        a[k] = ZERO


@lru_cache(maxsize=None)
def threading_layer():
    """Numba's threading layer, started by one tiny parallel launch when none has run yet."""
    try:
        return numba.threading_layer()
    except ValueError:
        _touch(np.empty(1, np.float32))
        return numba.threading_layer()


def step_threads():
    """Threads for the step kernels: THREADS if set; else Numba's count, or 1 under spinning OpenMP workers."""
    if THREADS is not None:
        return THREADS
    if threading_layer() == "omp" and os.environ.get("OMP_WAIT_POLICY", "").lower() != "passive":
        return 1
    return numba.get_num_threads()


@contextmanager
def kernel_threads():
    """For one sweep: the calling thread's Numba thread count set to step_threads(), restored after; yields
    whether the parallel kernels run (more than one thread)."""
    before = numba.get_num_threads()
    threads = min(step_threads(), numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(threads)
    try:
        with _workqueue_lock if threads > 1 and threading_layer() == "workqueue" else nullcontext():
            yield threads > 1
    finally:
        numba.set_num_threads(before)


# Every step kernel can run its batch rows on all of Numba's threads (prange over b: a row's arithmetic is the same
# whichever thread runs it). It reads the recurrent GEMM's feature-major output, gh[:, b] a strided column, in one
# loop per row; the other loops run over contiguous rows and vectorise, each touching few arrays so LLVM keeps the
# vector form without giving up on alias checks.

@inline
def preact_row(g, gh, b, bias):
    """g (n,) += gh[:, b] + bias (n,); gh (n, B) read down column b."""
    for j in range(g.shape[0]):
        g[j] += gh[j, b] + bias[j]


@inline
def sigmoid_row(a):
    for j in range(a.shape[0]):
        a[j] = sigmoid(a[j])


@inline
def tanh_row(a):
    for j in range(a.shape[0]):
        a[j] = tanh(a[j])


@inline
def dh_row(dh, dh_in, b, dy):
    """dh (H,) += dh_in[:, b] + dy (H,): what reaches h_t, the GEMM's feature-major dh_in (H, B) read strided."""
    for j in range(dh.shape[0]):
        dh[j] += dh_in[j, b] + dy[j]


# ---- one step forward: g (B, G*H) is xw[t] in and the activated gates out; gh (G*H, B) = W_hh h_prev^T, the
# GEMM's output; bias (G*H,) = b_ih + b_hh, summed once per sweep; h_state (B, H) the running state in/out; y (B, H)
# is y[t]; padded sequences keep their state.

@both
def elman_forward_step(code, g, gh, bias, lengths, t, h_state, y):
    """gh: (B, H) batch-major, the one exception: at G = 1 reading the (H, B) GEMM output's strided columns
    cost more than numpy's transposing copy plus this one contiguous loop."""
    B, H = y.shape
    for b in prange(B):
        if t < lengths[b]:
            for j in range(H):
                h = act(code, g[b, j] + gh[b, j] + bias[j])
                y[b, j] = h
                h_state[b, j] = h
        else:
            y[b, :] = ZERO


@both
def lstm_forward_step(g, gh, bias, lengths, t, c, c_out, h_state, y):
    """c: (B, H) cell state in/out; c_out: (B, H) c_t saved for backward (may be c itself)."""
    B, H = y.shape
    for b in prange(B):
        cb, yb = c[b], y[b]
        if t < lengths[b]:
            gb = g[b]
            preact_row(gb, gh, b, bias)
            sigmoid_row(gb[:2 * H])
            tanh_row(gb[2 * H:3 * H])
            sigmoid_row(gb[3 * H:])
            i, f, gg, o = gb[:H], gb[H:2 * H], gb[2 * H:3 * H], gb[3 * H:]
            for j in range(H):
                cb[j] = f[j] * cb[j] + i[j] * gg[j]          # c' = f c + i g
            for j in range(H):
                yb[j] = o[j] * tanh(cb[j])                  # h' = o tanh(c')
            h_state[b] = yb
        else:
            yb[:] = ZERO
        c_out[b] = cb


@both
def gru_forward_step(g, gh, bias, b_hn, lengths, t, hn_out, h_state, y):
    """bias (3H,): b_ih + b_hh for r and z, b_in for n; b_hn (H,) sits inside r; hn_out: (B, H) h_prev W_hn^T + b_hn
    saved for backward."""
    B, H = y.shape
    for b in prange(B):
        yb = y[b]
        if t < lengths[b]:
            gb, hnb, hb = g[b], hn_out[b], h_state[b]
            preact_row(gb[:2 * H], gh, b, bias)                 # reads gh rows 0..2H-1
            sigmoid_row(gb[:2 * H])
            r, z, n = gb[:H], gb[H:2 * H], gb[2 * H:]
            for j in range(H):
                hnb[j] = gh[2 * H + j, b] + b_hn[j]
            for j in range(H):
                n[j] = tanh(n[j] + bias[2 * H + j] + r[j] * hnb[j])   # n = tanh(xn + b_in + r hn)
            for j in range(H):
                yb[j] = (ONE - z[j]) * n[j] + z[j] * hb[j]   # h' = (1 - z) n + z h
            h_state[b] = yb
        else:
            yb[:] = ZERO


# ---- one step backward, t = T-1..0. dh_in (H, B) = W_hh^T dG_{t+1}^T, the GEMM's output (zero columns where step
# t+1 was padded); dh_acc (B, H) carries what reaches h_t besides that GEMM: dstate_n until the sequence's last step,
# then the GRU's direct path dh z (0 for the others); each valid step adds dh_in and dy into it, uses it as dh_t and
# leaves there what goes on to h_{t-1}. dg (B, G*H) is dgx[t], and dgh[t] the next GEMM's operand.

@both
def elman_backward_step(code, y, dy, lengths, t, dh_in, dh_acc, dg):
    B, H = y.shape
    for b in prange(B):
        dgb = dg[b]
        if t < lengths[b]:
            dh, yb = dh_acc[b], y[b]
            dh_row(dh, dh_in, b, dy[b])
            for j in range(H):
                dgb[j] = dh[j] * act_grad(code, yb[j])      # h = act(p): dp = dh act'(p)
            dh[:] = ZERO
        else:
            dgb[:] = ZERO


@both
def lstm_backward_step(g, c, c_prev, dy, lengths, t, dh_in, dh_acc, dc_acc, dg):
    """g: (B, 4H) saved gates i, f, g, o; c, c_prev: (B, H) c_t, c_{t-1}; dc_acc: (B, H) dL/dc_t in, dL/dc_{t-1} out."""
    B, H = c.shape
    for b in prange(B):
        db = dg[b]
        if t < lengths[b]:
            gb, dh, dc = g[b], dh_acc[b], dc_acc[b]
            i, f, gg, o = gb[:H], gb[H:2 * H], gb[2 * H:3 * H], gb[3 * H:]
            di, df, dgg, do = db[:H], db[H:2 * H], db[2 * H:3 * H], db[3 * H:]
            cb, cpb = c[b], c_prev[b]
            dh_row(dh, dh_in, b, dy[b])
            for j in range(H):
                tc = tanh(cb[j])
                dc[j] += dh[j] * o[j] * (ONE - tc * tc)     # h = o tanh(c): dc += dh o (1 - tanh^2 c)
                do[j] = dh[j] * tc * o[j] * (ONE - o[j])    # do = dh tanh(c), times o'
            # c = f c_prev + i g: di = dc g, df = dc c_prev, dg = dc i, dc_prev = dc f; times each gate's derivative
            for j in range(H):
                di[j] = dc[j] * gg[j] * i[j] * (ONE - i[j])
            for j in range(H):
                df[j] = dc[j] * cpb[j] * f[j] * (ONE - f[j])
            for j in range(H):
                dgg[j] = dc[j] * i[j] * (ONE - gg[j] * gg[j])
            for j in range(H):
                dc[j] *= f[j]
            dh[:] = ZERO
        else:
            db[:] = ZERO


@both
def gru_backward_step(g, hn, h_prev, dy, lengths, t, dh_in, dh_acc, dgx, dgh):
    """g: (B, 3H) saved r, z, n; hn: (B, H) saved h_prev W_hn^T + b_hn; dgh: (B, 3H) dgh[t]."""
    B, H = hn.shape
    for b in prange(B):
        dxb, dhb = dgx[b], dgh[b]
        if t < lengths[b]:
            gb, dh = g[b], dh_acc[b]
            r, z, n = gb[:H], gb[H:2 * H], gb[2 * H:]
            dr, dz, dn = dxb[:H], dxb[H:2 * H], dxb[2 * H:]
            hnb, hpb = hn[b], h_prev[b]
            dh_row(dh, dh_in, b, dy[b])
            # h = (1 - z) n + z h_prev: dn = dh (1 - z), dz = dh (h_prev - n), dh_prev = dh z + GEMM
            for j in range(H):
                dn[j] = dh[j] * (ONE - z[j]) * (ONE - n[j] * n[j])
            for j in range(H):
                dz[j] = dh[j] * (hpb[j] - n[j]) * z[j] * (ONE - z[j])
            for j in range(H):
                dr[j] = dn[j] * hnb[j] * r[j] * (ONE - r[j])   # n = tanh(xn + r hn): dr = dn hn, d(hn) = dn r
            for j in range(H):
                dh[j] *= z[j]
            dhb[:2 * H] = dxb[:2 * H]
            for j in range(H):
                dhb[2 * H + j] = dn[j] * r[j]
        else:
            dxb[:] = ZERO
            dhb[:] = ZERO


@dataclass
class FusedCtx:
    cell: str
    lengths: np.ndarray     # (B,) int32
    w_hh: np.ndarray        # (G*H, H)
    h0: np.ndarray          # (B, H)
    y: np.ndarray           # (T, B, H)
    gates: np.ndarray       # (T, B, G*H) activated gates, the forward's xw buffer; None for Elman (y holds h)
    c0: np.ndarray = None   # (B, H) LSTM
    c: np.ndarray = None    # (T, B, H) LSTM cell state after each step
    hn: np.ndarray = None   # (T, B, H) GRU h_prev @ W_hn.T + b_hn
    workspace: object = None   # where backward takes its buffers, as forward did


def step_bias(cell, b_ih, b_hh):
    """What the step kernels add to xw[t] + gh: (G*H,) b_ih + b_hh, summed once per sweep; for the GRU the n rows
    get b_in only, and b_hn (H,) comes back separately (it sits inside r: n = tanh(xn + b_in + r (gh_n + b_hn)))."""
    H = b_hh.shape[0] // GATES[cell]
    if b_ih is None:
        bias = b_hh.astype(np.float32)          # a copy: the GRU's n rows are zeroed below
        b_ih_n = 0
    else:
        bias = np.add(b_ih, b_hh, dtype=np.float32)
        b_ih_n = b_ih[2 * H:]
    if cell != "gru":
        return bias, None
    bias[2 * H:] = b_ih_n
    return bias, np.ascontiguousarray(b_hh[2 * H:], dtype=np.float32)


def _allocator(workspace):
    return np.empty if workspace is None else workspace.empty


FEATURES = numpy_ref.FEATURES


def forward(cell, xw, w_hh, b_hh, state0, lengths, training=True, b_ih=None, t0=0, ln=None, zoneout=None, w_hr=None,
            workspace=None):
    if xw.dtype != np.float32 or t0 or ln is not None or zoneout is not None or w_hr is not None:
        return numpy_ref.forward(cell, xw, w_hh, b_hh, state0, lengths, training, b_ih=b_ih, t0=t0, ln=ln,
                                 zoneout=zoneout, w_hr=w_hr)
    empty = _allocator(workspace)
    T, B, GH = xw.shape
    H = w_hh.shape[1]
    g = np.ascontiguousarray(xw)                           # (T, B, GH), becomes the gates
    w_hh = np.ascontiguousarray(w_hh)
    bias, b_hn = step_bias(cell, b_ih, b_hh)
    lengths = np.ascontiguousarray(lengths, dtype=np.int32)
    h = np.array(state0[0], np.float32)                    # (B, H) running state, a copy: state0 stays as it was
    gh = empty((GH, B), np.float32)                        # W_hh h^T, the GEMM's fast layout, read as it is
    gh_rows = empty((B, H), np.float32) if cell.startswith("rnn") else None   # Elman: its transpose
    y = empty((T, B, H), np.float32)
    code = ACT_CODE.get(cell[4:])                          # Elman's activation
    c = cs = hn = None
    if cell == "lstm":
        c = np.array(state0[1], np.float32)
        cs = empty((T, B, H), np.float32) if training else None
    elif cell == "gru":
        hn = empty((T if training else 1, B, H), np.float32)
    with kernel_threads() as par:
        for t in range(T):
            np.matmul(w_hh, h.T, out=gh)
            if cell == "lstm":
                lstm_forward_step[par](g[t], gh, bias, lengths, t, c, cs[t] if training else c, h, y[t])
            elif cell == "gru":
                gru_forward_step[par](g[t], gh, bias, b_hn, lengths, t, hn[t if training else 0], h, y[t])
            else:
                np.copyto(gh_rows, gh.T)
                elman_forward_step[par](code, g[t], gh_rows, bias, lengths, t, h, y[t])
    state_n = (h, c) if cell == "lstm" else (h,)
    if not training:
        return y, state_n, None
    ctx = FusedCtx(cell, lengths, w_hh, state0[0], y, None if cell.startswith("rnn") else g,
                   c0=state0[1] if cell == "lstm" else None, c=cs, hn=hn if cell == "gru" else None,
                   workspace=workspace)
    return y, state_n, ctx


def backward(ctx, dy, dstate_n, dparams=None):
    if not isinstance(ctx, FusedCtx):
        return numpy_ref.backward(ctx, dy, dstate_n, dparams)
    empty = _allocator(ctx.workspace)
    cell, lengths, w_t = ctx.cell, ctx.lengths, ctx.w_hh.T   # w_t: (H, GH) view
    T, B, H = ctx.y.shape
    GH = ctx.w_hh.shape[0]
    dy = np.ascontiguousarray(dy, dtype=np.float32)
    dgx = empty((T, B, GH), np.float32)
    dgh = empty((T, B, GH), np.float32) if cell == "gru" else dgx
    dh_acc = np.array(dstate_n[0], np.float32)             # (B, H)
    dc_acc = np.array(dstate_n[1], np.float32) if cell == "lstm" else None
    dh_in = np.zeros((H, B), np.float32)                   # W_hh^T dG^T, the GEMM's fast layout; 0 beyond step T-1
    code = ACT_CODE.get(cell[4:])                          # Elman's activation
    with kernel_threads() as par:
        for t in range(T - 1, -1, -1):
            if cell == "lstm":
                c_prev = ctx.c[t - 1] if t > 0 else ctx.c0
                lstm_backward_step[par](ctx.gates[t], ctx.c[t], c_prev, dy[t], lengths, t, dh_in, dh_acc, dc_acc,
                                        dgx[t])
            elif cell == "gru":
                h_prev = ctx.y[t - 1] if t > 0 else ctx.h0
                gru_backward_step[par](ctx.gates[t], ctx.hn[t], h_prev, dy[t], lengths, t, dh_in, dh_acc, dgx[t],
                                       dgh[t])
            else:
                elman_backward_step[par](code, ctx.y[t], dy[t], lengths, t, dh_in, dh_acc, dgx[t])
            np.matmul(w_t, dgh[t].T, out=dh_in)
    dh_acc += dh_in.T
    return dgx, dgh, ((dh_acc, dc_acc) if cell == "lstm" else (dh_acc,))


jordan_forward = numpy_ref.jordan_forward
jordan_backward = numpy_ref.jordan_backward
