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
tanh is +-1 and sigmoid 0 or 1; relu's backward is a select, as torch's.
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

from . import GATES, LN_EPS, numpy_ref, zoneout_threshold

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
# The one definition of the algorithm and its constants: numba_cuda_kernels compiles these same functions for CUDA
# (`compile_activations`, each product a correctly rounded multiply that the GPU compiler cannot fuse), and
# common.cuh holds the same operations in CUDA C, its constants written from ACTIVATION_CONSTANTS by cupy_raw.
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
ACTIVATION_CONSTANTS = ("INV_LN2_LOW", "LN2_HI", "LN2_LO", "ROUNDER", "A_MAX", "TANH_A_MAX", "UNSCALE", "TANH_SMALL",
                        "Q5", "Q4", "Q3", "Q2", "Q1", "Q0", "T3", "T2", "T1", "T0")

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


@njit(fastmath=False, error_model="numpy", cache=True, inline="always")
def mul(a, b):
    """a * b: a plain product here; the CUDA build of the activations takes a multiply no compiler fuses into an fma."""
    return a * b


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
    den_lo = fma(r, q, (ONE - den) + mul(p, UNSCALE))      # (1 + 2^-n + r q) - den; 1 - den is exact
    y = p / den
    res = fma(-y, den_lo, fma(-y, den, p))                 # p - y (den + den_lo); the inner fma is exact
    y = mul(fma(res, fma(F32(-0.5), den, F32(1.5)), y), UNSCALE)   # y + res / den, 1.5 - den/2 ~ 1 / den
    return y if x < ZERO else ONE - y


@exact
def tanh(x):
    """tanh of a float32: x + x^3 P(x^2) for |x| < TANH_SMALL, else 1 - 2 / (1 + e^2|x|); with the sign of x."""
    ax = abs(x)
    x2 = mul(ax, ax)
    small = fma(mul(ax, x2), fma(fma(fma(T3, x2, T2), x2, T1), x2, T0), ax)
    a = mul(F32(2), ax)
    a = TANH_A_MAX if a > TANH_A_MAX else a
    p, c, r, q = exp_parts(a, 1)
    large = ONE - p / fma(r, q, c)
    return math.copysign(small if ax < TANH_SMALL else large, x)


def compile_activations(jit, **ops):
    """SimpleNamespace(sigmoid, tanh): the float32 functions above compiled by `jit` from this same source, with
    `ops` (some of fma, mul, float32_bits, bits_float32) in place of the CPU's, e.g. Numba CUDA's."""
    scope = dict(globals(), **ops)
    for name in ("exp_parts", "sigmoid", "tanh"):
        fn = globals()[name].py_func
        scope[name] = jit(types.FunctionType(fn.__code__, scope, name, fn.__defaults__, fn.__closure__))
    return types.SimpleNamespace(sigmoid=scope["sigmoid"], tanh=scope["tanh"])


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
def act_backward(code, dy, y):
    """dL/d pre-activation from dL/dy and the output y: dy act', act' written from y (tanh' = 1 - y^2, sigmoid' =
    y (1 - y)). relu selects as torch's threshold backward does: 0 where y <= 0 (a NaN dy stops there), else dy
    (NaN y included)."""
    if code == 0:
        return dy * (ONE - y * y)
    if code == 1:
        return ZERO if y <= ZERO else dy
    if code == 2:
        return dy * (y * (ONE - y))
    return dy


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
def dh_row(dh, dh_in, b, dy, carried):
    """dh (H,) += dh_in[:, b] + dy (H,): what reaches h_t, the GEMM's feature-major dh_in (H, B) read strided;
    dh_in only when `carried` (step t+1 of row b was valid: a padded step's 0 * W_hh is NaN if W_hh holds NaN)."""
    for j in range(dh.shape[0]):
        dh[j] += (dh_in[j, b] if carried else ZERO) + dy[j]


# ---- the variants' row helpers (definitions in kernels/__init__.py). A variant reaches a step kernel as an argument
# that is None when it is off: Numba compiles one version per argument types and prunes `if x is None` branches
# before typing, so the plain cells' kernels are the code they were, and each variant is a compile-time flag.
# zo: (training, seed, threshold, p) of zoneout on h or on c (training: masks from the generator; else the blend).

U15, U16, MASK32 = np.uint64(15), np.uint64(16), np.uint64(0xFFFFFFFF)
MIX1, MIX2 = np.uint64(0x7feb352d), np.uint64(0x846ca68b)
EPS = F32(LN_EPS)


@inline
def mix32(x):
    """numpy_ref.mix32 of one uint32 held in a uint64."""
    x ^= x >> U16
    x = (x * MIX1) & MASK32
    x ^= x >> U15
    x = (x * MIX2) & MASK32
    return x ^ (x >> U16)


@inline
def row_key(seed, t, b):
    """mix32(mix32(mix32(seed) + t) + b): the generator's state for row b of kernel step t."""
    return mix32((mix32((mix32(seed) + np.uint64(t)) & MASK32) + np.uint64(b)) & MASK32)


@inline
def kept(key, j, threshold):
    """Whether unit j keeps its previous value (training): its 32 bits fall below the threshold."""
    return mix32((key + np.uint64(j)) & MASK32) < threshold


@inline
def zoneout_row(prev, new, out, zo, t, b):
    """out (n,) = k prev + (1 - k) new, unit by unit; in training k is 0 or 1 and out is prev or new exactly (a
    select: fastmath could reassociate the arithmetic), in evaluation k = p. out may be prev or new."""
    if zo[0]:
        key = row_key(zo[1], t, b)
        for j in range(out.shape[0]):
            out[j] = prev[j] if kept(key, j, zo[2]) else new[j]
    else:
        p = zo[3]
        for j in range(out.shape[0]):
            out[j] = p * prev[j] + (ONE - p) * new[j]


@inline
def zoneout_split(d, d_new, zo, t, b):
    """Backward of out = k prev + (1 - k) new: d (n,) = dL/d(out) in, k d out (to prev); d_new = (1 - k) d."""
    if zo[0]:
        key = row_key(zo[1], t, b)
        for j in range(d.shape[0]):
            if kept(key, j, zo[2]):
                d_new[j] = ZERO
            else:
                d_new[j] = d[j]
                d[j] = ZERO
    else:
        p = zo[3]
        for j in range(d.shape[0]):
            d_new[j] = (ONE - p) * d[j]
            d[j] = p * d[j]


@inline
def carry(d, gate, d_new, zo):
    """What goes on to the step before through a gate: d (n,) = gate d_new, plus the k d_t zoneout_split left in d
    under zo (without zo, d_new is d itself)."""
    if zo is None:
        for j in range(d.shape[0]):
            d[j] *= gate[j]
    else:
        for j in range(d.shape[0]):
            d[j] += gate[j] * d_new[j]


@inline
def row_stats(v):
    """mean and 1 / sqrt(var + LN_EPS) of v (n,), biased variance, two passes."""
    n = F32(v.shape[0])
    s = ZERO
    for j in range(v.shape[0]):
        s += v[j]
    mean = s / n
    q = ZERO
    for j in range(v.shape[0]):
        q += (v[j] - mean) * (v[j] - mean)
    return mean, ONE / math.sqrt(q / n + EPS)


@inline
def normalise(v, vhat):
    """vhat (n,) = (v - mean v) rstd; returns rstd = 1 / sqrt(var v + eps)."""
    mean, rstd = row_stats(v)
    for j in range(v.shape[0]):
        vhat[j] = (v[j] - mean) * rstd
    return rstd


@inline
def ln_inputs(gb, gh, b, ln):
    """Both projections of row b normalised, for LN(xw; gamma_ih) and LN(h W_hh^T; gamma_hh): ln[2][b] = the
    normalised xw row gb, ln[3][b] = the normalised gh[:, b]; their rstd into ln[4][b, 0:2]."""
    ln[4][b, 0] = normalise(gb, ln[2][b])
    ln[4][b, 1] = normalise(gh[:, b], ln[3][b])


@inline
def ln_backward(d, vhat, rstd, gamma, out, dgamma):
    """out (n,) = dL/dv for LN's output gamma vhat, vhat = (v - mean v) rstd, given d = dL/d(output) (n,); out may be
    d. With dvhat = gamma d: dv = rstd (dvhat - mean(dvhat) - vhat mean(dvhat vhat)) (d mean / dv = 1/n,
    d rstd / dv = -rstd^2 vhat / n); dgamma (n,) += d vhat."""
    s1 = ZERO
    s2 = ZERO
    for j in range(d.shape[0]):
        dv = gamma[j] * d[j]
        s1 += dv
        s2 += dv * vhat[j]
        dgamma[j] += d[j] * vhat[j]
    n = F32(d.shape[0])
    m1, m2 = s1 / n, s2 / n
    for j in range(d.shape[0]):
        out[j] = rstd * (gamma[j] * d[j] - m1 - vhat[j] * m2)


# ---- one step forward: g (B, G*H) is xw[t] in and the activated gates out; gh (G*H, B) = W_hh h_prev^T, the
# GEMM's output; bias (G*H,) = b_ih + b_hh, summed once per sweep; h_state (B, P) the running state in/out; y (B, P)
# is y[t]; padded sequences keep their state. t is the kernel step (t0 + s). Variant arguments, None when off:
# ln = (gamma_ih, gamma_hh (G*H,), vhat_ih, vhat_hh (B, G*H), stats (B, 4)[, gamma_c, beta_c (H,)]): the gains, and
# what backward reads, written here: the normalised rows and stats = (rstd_ih, rstd_hh, mean_c, rstd_c);
# zo_h, zo_c: zoneout on h and c (see zoneout_row).

@both
def elman_forward_step(code, g, gh, bias, lengths, t, h_state, y, zo_h):
    """gh: (B, H) batch-major, the one exception: at G = 1 reading the (H, B) GEMM output's strided columns
    cost more than numpy's transposing copy plus this one contiguous loop."""
    B, H = y.shape
    for b in prange(B):
        if t < lengths[b]:
            if zo_h is None:
                for j in range(H):
                    h = act(code, g[b, j] + gh[b, j] + bias[j])
                    y[b, j] = h
                    h_state[b, j] = h
            else:
                yb = y[b]
                for j in range(H):
                    yb[j] = act(code, g[b, j] + gh[b, j] + bias[j])
                zoneout_row(h_state[b], yb, yb, zo_h, t, b)
                h_state[b] = yb
        else:
            y[b, :] = ZERO


@both
def lstm_forward_step(g, gh, bias, lengths, t, c, c_out, h_state, y, ln, zo_h, zo_c, m_out, scratch):
    """c: (B, H) cell state in/out; c_out: (B, H) c_t saved for backward (may be c itself). m_out: None, or (B, H)
    for m = o tanh(.) when a projection follows (then y and h_state are the caller's, see h_step); scratch: (B, H)
    for c~ under zo_c."""
    B, H = c.shape
    for b in prange(B):
        cb = c[b]
        if t < lengths[b]:
            gb = g[b]
            if ln is None:
                preact_row(gb, gh, b, bias)
            else:
                ln_inputs(gb, gh, b, ln)                   # a = LN(xw) + LN(h W_hh^T) + b
                gamma_ih, gamma_hh, vih, vhh = ln[0], ln[1], ln[2][b], ln[3][b]
                for j in range(4 * H):
                    gb[j] = gamma_ih[j] * vih[j] + gamma_hh[j] * vhh[j] + bias[j]
            sigmoid_row(gb[:2 * H])
            tanh_row(gb[2 * H:3 * H])
            sigmoid_row(gb[3 * H:])
            i, f, gg, o = gb[:H], gb[H:2 * H], gb[2 * H:3 * H], gb[3 * H:]
            ct = cb if zo_c is None else scratch[b]
            for j in range(H):
                ct[j] = f[j] * cb[j] + i[j] * gg[j]          # c~ = f c + i g
            hb = y[b] if m_out is None else m_out[b]
            if ln is None:
                for j in range(H):
                    hb[j] = o[j] * tanh(ct[j])              # h~ = o tanh(c~)
            else:
                mean_c, rstd_c = row_stats(ct)              # h~ = o tanh(LN(c~; gamma_c) + beta_c)
                ln[4][b, 2] = mean_c
                ln[4][b, 3] = rstd_c
                gamma_c, beta_c = ln[5], ln[6]
                for j in range(H):
                    hb[j] = o[j] * tanh(gamma_c[j] * ((ct[j] - mean_c) * rstd_c) + beta_c[j])
            if zo_c is not None:
                zoneout_row(cb, ct, cb, zo_c, t, b)         # c = k c + (1 - k) c~
            if m_out is None:
                if zo_h is not None:
                    zoneout_row(h_state[b], hb, hb, zo_h, t, b)
                h_state[b] = hb
        elif m_out is None:
            y[b, :] = ZERO
        else:
            m_out[b, :] = ZERO                              # read by backward's dW_hr GEMM, with dh~ = 0
        c_out[b] = cb


@both
def h_step(h_new, lengths, t, h_state, y, zo_h):
    """After a projected LSTM step: y (B, P) = h_t = h_new (B, P) = m W_hr^T, or k h_{t-1} + (1 - k) h_new under
    zoneout; h_state follows; padded rows output 0 and keep the state."""
    B = y.shape[0]
    for b in prange(B):
        if t < lengths[b]:
            yb = y[b]
            if zo_h is None:
                yb[:] = h_new[b]
            else:
                zoneout_row(h_state[b], h_new[b], yb, zo_h, t, b)
            h_state[b] = yb
        else:
            y[b, :] = ZERO


@both
def gru_forward_step(g, gh, bias, b_hn, lengths, t, hn_out, h_state, y, ln, zo_h):
    """bias (3H,): b_ih + b_hh for r and z, b_in for n; b_hn (H,) sits inside r; hn_out: (B, H) h_prev W_hn^T + b_hn
    (LN(.)_n + b_hn with ln) saved for backward."""
    B, H = y.shape
    for b in prange(B):
        yb = y[b]
        if t < lengths[b]:
            gb, hnb, hb = g[b], hn_out[b], h_state[b]
            if ln is None:
                preact_row(gb[:2 * H], gh, b, bias)                 # reads gh rows 0..2H-1
                for j in range(H):
                    hnb[j] = gh[2 * H + j, b] + b_hn[j]
            else:
                ln_inputs(gb, gh, b, ln)                   # gi = LN(xw) + b_ih, gh = LN(h W_hh^T) + b_hh
                gamma_ih, gamma_hh, vih, vhh = ln[0], ln[1], ln[2][b], ln[3][b]
                for j in range(2 * H):
                    gb[j] = gamma_ih[j] * vih[j] + gamma_hh[j] * vhh[j] + bias[j]
                for j in range(2 * H, 3 * H):
                    gb[j] = gamma_ih[j] * vih[j]
                for j in range(H):
                    hnb[j] = gamma_hh[2 * H + j] * vhh[2 * H + j] + b_hn[j]
            sigmoid_row(gb[:2 * H])
            r, z, n = gb[:H], gb[H:2 * H], gb[2 * H:]
            for j in range(H):
                n[j] = tanh(n[j] + bias[2 * H + j] + r[j] * hnb[j])   # n = tanh(xn + b_in + r hn)
            for j in range(H):
                yb[j] = (ONE - z[j]) * n[j] + z[j] * hb[j]   # h~ = (1 - z) n + z h
            if zo_h is not None:
                zoneout_row(hb, yb, yb, zo_h, t, b)
            h_state[b] = yb
        else:
            yb[:] = ZERO


# ---- one step backward, t = T-1..0. dh_in (P, B) = W_hh^T dG_{t+1}^T, the GEMM's output (zero columns where step
# t+1 was padded); dh_acc (B, P) carries what reaches h_t besides that GEMM: dstate_n until the sequence's last step,
# then the GRU's direct path dh z and zoneout's k dh (0 otherwise); each valid step adds dh_in and dy into it, uses
# it as dh_t and leaves there what goes on to h_{t-1}. dg (B, G*H) is dgx[t], and dgh[t] the next GEMM's operand.
# ln as forward saved it; acc: per-row sums of the variant parameters' gradients, (B, n) each.

@both
def elman_backward_step(code, y, dy, lengths, t, dh_in, dh_acc, dg, zo_h):
    """Under zoneout (training: k is 0 or 1) h~ = y where k = 0, and k = 1 takes no gradient into h~, so act'
    is read from y as without it."""
    B, H = y.shape
    for b in prange(B):
        dgb = dg[b]
        if t < lengths[b]:
            dh, yb = dh_acc[b], y[b]
            dh_row(dh, dh_in, b, dy[b], t + 1 < lengths[b])
            if zo_h is None:
                for j in range(H):
                    dgb[j] = act_backward(code, dh[j], yb[j])   # h = act(p): dp = dh act'(p)
                dh[:] = ZERO
            else:
                zoneout_split(dh, dgb, zo_h, t, b)             # dh~ = (1 - k) dh_t, k dh_t on to h_{t-1}
                for j in range(H):
                    dgb[j] = act_backward(code, dgb[j], yb[j])
        else:
            dgb[:] = ZERO


@both
def h_backward_step(dy, lengths, t, dh_in, dh_acc, dh_new, zo_h):
    """Before a projected LSTM step's backward: dh_new (B, P) = dL/d(m W_hr^T) from dh_t = dh_acc + dh_in + dy (all of
    it, or (1 - k) of it under zoneout, the rest k dh_t left in dh_acc for h_{t-1}); 0 at padded rows."""
    B = dh_acc.shape[0]
    for b in prange(B):
        if t < lengths[b]:
            dh = dh_acc[b]
            dh_row(dh, dh_in, b, dy[b], t + 1 < lengths[b])
            if zo_h is None:
                dh_new[b] = dh
                dh[:] = ZERO
            else:
                zoneout_split(dh, dh_new[b], zo_h, t, b)
        else:
            dh_new[b, :] = ZERO


@both
def lstm_backward_step(g, c, c_prev, dy, lengths, t, dh_in, dh_acc, dc_acc, dg, dgh, ln, acc, zo_h, zo_c, dm_in,
                       scratch):
    """g: (B, 4H) saved gates i, f, g, o; c, c_prev: (B, H) c_t, c_{t-1}; dc_acc: (B, H) dL/dc_t in, dL/dc_{t-1} out.
    dgh: (B, 4H), dg itself without ln. acc (ln): dgamma_ih, dgamma_hh, dbias (B, 4H), dgamma_c, dbeta_c (B, H).
    dm_in: None, or (B, H) dL/dm from the projection (h_backward_step and the dm GEMM ran; dh_acc is theirs).
    scratch: (B, 3H): c~ recomputed (zo_c), dL/dm (zo_h), dL/dc~ (zo_c)."""
    B, H = c.shape
    for b in prange(B):
        db = dg[b]
        if t < lengths[b]:
            gb, dc = g[b], dc_acc[b]
            i, f, gg, o = gb[:H], gb[H:2 * H], gb[2 * H:3 * H], gb[3 * H:]
            di, df, dgg, do = db[:H], db[H:2 * H], db[2 * H:3 * H], db[3 * H:]
            cb, cpb = c[b], c_prev[b]
            if dm_in is None:
                dm = dh_acc[b]
                dh_row(dm, dh_in, b, dy[b], t + 1 < lengths[b])
                if zo_h is not None:                        # h_t = k h_{t-1} + (1 - k) h~
                    zoneout_split(dm, scratch[b, H:2 * H], zo_h, t, b)
                    dm = scratch[b, H:2 * H]
            else:
                dm = dm_in[b]
            ct = cb
            dct = dc
            if zo_c is not None:                            # c_t = k c_{t-1} + (1 - k) c~: c~ recomputed
                ct = scratch[b, :H]
                for j in range(H):
                    ct[j] = f[j] * cpb[j] + i[j] * gg[j]
                dct = scratch[b, 2 * H:]
                zoneout_split(dc, dct, zo_c, t, b)          # dc~ = (1 - k) dc_t, k dc_t on to c_{t-1}
            if ln is None:
                for j in range(H):
                    tc = tanh(ct[j])
                    dct[j] += dm[j] * o[j] * (ONE - tc * tc)   # h~ = o tanh(c~): dc~ += dm o (1 - tanh^2 c~)
                    do[j] = dm[j] * tc * o[j] * (ONE - o[j])   # do = dm tanh(c~), times o'
            else:
                # u = gamma_c chat + beta_c, chat = (c~ - mean) rstd, h~ = o tanh(u): du = dm o (1 - tanh^2 u),
                # dbeta_c += du, dgamma_c += du chat, dc~ += LN's backward of du (di holds gamma_c du meanwhile)
                mean_c, rstd_c, gamma_c, beta_c = ln[4][b, 2], ln[4][b, 3], ln[5], ln[6]
                s1 = ZERO
                s2 = ZERO
                for j in range(H):
                    chat = (ct[j] - mean_c) * rstd_c
                    tu = tanh(gamma_c[j] * chat + beta_c[j])
                    du = dm[j] * o[j] * (ONE - tu * tu)
                    do[j] = dm[j] * tu * o[j] * (ONE - o[j])
                    acc[4][b, j] += du
                    acc[3][b, j] += du * chat
                    di[j] = gamma_c[j] * du
                    s1 += di[j]
                    s2 += di[j] * chat
                m1, m2 = s1 / F32(H), s2 / F32(H)
                for j in range(H):
                    dct[j] += rstd_c * (di[j] - m1 - (ct[j] - mean_c) * rstd_c * m2)
            # c~ = f c_prev + i g: di = dc~ g, df = dc~ c_prev, dg = dc~ i, dc_prev = dc~ f; times each gate's
            # derivative
            for j in range(H):
                di[j] = dct[j] * gg[j] * i[j] * (ONE - i[j])
            for j in range(H):
                df[j] = dct[j] * cpb[j] * f[j] * (ONE - f[j])
            for j in range(H):
                dgg[j] = dct[j] * i[j] * (ONE - gg[j] * gg[j])
            carry(dc, f, dct, zo_c)                         # dc_prev = f dc~ (+ k dc_t)
            if dm_in is None and zo_h is None:
                dh_acc[b, :] = ZERO
            if ln is not None:                              # a = LN(xw) + LN(h W_hh^T) + b: da -> raw rows
                for j in range(4 * H):
                    acc[2][b, j] += db[j]
                ln_backward(db, ln[3][b], ln[4][b, 1], ln[1], dgh[b], acc[1][b])
                ln_backward(db, ln[2][b], ln[4][b, 0], ln[0], db, acc[0][b])
        else:
            db[:] = ZERO
            if ln is not None:
                dgh[b, :] = ZERO


@both
def gru_backward_step(g, hn, h_prev, dy, lengths, t, dh_in, dh_acc, dgx, dgh, ln, acc, zo_h, scratch):
    """g: (B, 3H) saved r, z, n; hn: (B, H) saved h_prev W_hn^T + b_hn; dgh: (B, 3H) dgh[t]. acc (ln): dgamma_ih,
    dgamma_hh, dbias_ih, dbias_hh (B, 3H). scratch: (B, H) dL/dh~ under zo_h."""
    B, H = hn.shape
    for b in prange(B):
        dxb, dhb = dgx[b], dgh[b]
        if t < lengths[b]:
            gb, dh = g[b], dh_acc[b]
            r, z, n = gb[:H], gb[H:2 * H], gb[2 * H:]
            dr, dz, dn = dxb[:H], dxb[H:2 * H], dxb[2 * H:]
            hnb, hpb = hn[b], h_prev[b]
            dh_row(dh, dh_in, b, dy[b], t + 1 < lengths[b])
            dt = dh
            if zo_h is not None:                            # h_t = k h_{t-1} + (1 - k) h~
                dt = scratch[b]
                zoneout_split(dh, dt, zo_h, t, b)
            # h~ = (1 - z) n + z h_prev: dn = dh~ (1 - z), dz = dh~ (h_prev - n), dh_prev = dh~ z + GEMM
            for j in range(H):
                dn[j] = dt[j] * (ONE - z[j]) * (ONE - n[j] * n[j])
            for j in range(H):
                dz[j] = dt[j] * (hpb[j] - n[j]) * z[j] * (ONE - z[j])
            for j in range(H):
                dr[j] = dn[j] * hnb[j] * r[j] * (ONE - r[j])   # n = tanh(xn + r hn): dr = dn hn, d(hn) = dn r
            carry(dh, z, dt, zo_h)                          # dh_prev = z dh~ (+ k dh_t) + GEMM
            dhb[:2 * H] = dxb[:2 * H]
            for j in range(H):
                dhb[2 * H + j] = dn[j] * r[j]
            if ln is not None:                              # gi = LN(xw) + b_ih, gh = LN(h W_hh^T) + b_hh
                for j in range(3 * H):
                    acc[2][b, j] += dxb[j]
                    acc[3][b, j] += dhb[j]
                ln_backward(dhb, ln[3][b], ln[4][b, 1], ln[1], dhb, acc[1][b])
                ln_backward(dxb, ln[2][b], ln[4][b, 0], ln[0], dxb, acc[0][b])
        else:
            dxb[:] = ZERO
            dhb[:] = ZERO


@dataclass
class FusedCtx:
    cell: str
    lengths: np.ndarray     # (B,) int32
    w_hh: np.ndarray        # (G*H, P)
    h0: np.ndarray          # (B, P)
    y: np.ndarray           # (T, B, P)
    gates: np.ndarray       # (T, B, G*H) activated gates, the forward's xw buffer; None for Elman (y holds h)
    c0: np.ndarray = None   # (B, H) LSTM
    c: np.ndarray = None    # (T, B, H) LSTM cell state after each step
    hn: np.ndarray = None   # (T, B, H) GRU h_prev @ W_hn.T + b_hn
    workspace: object = None   # where backward takes its buffers, as forward did
    t0: int = 0             # the kernel step of step 0
    ln: tuple = None        # (gamma_ih, gamma_hh, vhat_ih, vhat_hh (T, B, G*H), stats (T, B, 4)[, gamma_c, beta_c])
    zo_h: tuple = None      # zoneout (training, seed, threshold, p) on h, on c
    zo_c: tuple = None
    w_hr: np.ndarray = None     # (P, H) projection
    m: np.ndarray = None        # (T, B, H) m = o tanh(.) before the projection


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


def zoneout_args(zoneout, cell, training):
    """(zo_h, zo_c) for the step kernels: None, or (training, seed, threshold, p); zo_c None unless an LSTM's p_c > 0
    (c~ is then c_t exactly)."""
    if zoneout is None:
        return None, None

    def args(p, seed):
        return (bool(training), np.uint64(seed & 0xFFFFFFFF), np.uint64(zoneout_threshold(p)), F32(p))
    return args(zoneout.p_h, zoneout.seed_h), (args(zoneout.p_c, zoneout.seed_c) if cell == "lstm" and
                                               zoneout.p_c else None)


def f32c(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def _allocator(workspace):
    return np.empty if workspace is None else workspace.empty


FEATURES = frozenset({"t0", "ln", "zoneout", "w_hr"})


def forward(cell, xw, w_hh, b_hh, state0, lengths, training=True, b_ih=None, t0=0, ln=None, zoneout=None, w_hr=None,
            workspace=None):
    if xw.dtype != np.float32:
        return numpy_ref.forward(cell, xw, w_hh, b_hh, state0, lengths, training, b_ih=b_ih, t0=t0, ln=ln,
                                 zoneout=zoneout, w_hr=w_hr)
    empty = _allocator(workspace)
    T, B, GH = xw.shape
    H = GH // GATES[cell]
    P = w_hh.shape[1]
    g = np.ascontiguousarray(xw)                           # (T, B, GH), becomes the gates
    w_hh = np.ascontiguousarray(w_hh)
    bias, b_hn = step_bias(cell, b_ih, b_hh)
    lengths = np.ascontiguousarray(lengths, dtype=np.int32)
    h = np.array(state0[0], np.float32)                    # (B, P) running state, a copy: state0 stays as it was
    gh = empty((GH, B), np.float32)                        # W_hh h^T, the GEMM's fast layout, read as it is
    gh_rows = empty((B, H), np.float32) if cell.startswith("rnn") else None   # Elman: its transpose
    y = empty((T, B, P), np.float32)
    code = ACT_CODE.get(cell[4:])                          # Elman's activation
    zo_h, zo_c = zoneout_args(zoneout, cell, training)
    saved = T if training else 1                           # steps of the buffers backward reads (1: scratch)
    if ln is not None:
        ln = tuple(f32c(p) for p in ln)
        ln = ln[:2] + (empty((saved, B, GH), np.float32), empty((saved, B, GH), np.float32),
                       empty((saved, B, 4), np.float32)) + ln[2:]
    ln_at = (lambda s: None) if ln is None else (lambda s: ln[:2] + (ln[2][s], ln[3][s], ln[4][s]) + ln[5:])
    c = cs = hn = m = hp = None
    if cell == "lstm":
        c = np.array(state0[1], np.float32)
        cs = empty((T, B, H), np.float32) if training else None
        scratch = np.empty((B, H), np.float32) if zo_c is not None else None
        if w_hr is not None:
            w_hr = f32c(w_hr)
            m = empty((saved, B, H), np.float32)
            hp = np.empty((B, P), np.float32)              # m W_hr^T
    elif cell == "gru":
        hn = empty((saved, B, H), np.float32)
    with kernel_threads() as par:
        for s in range(T):
            t = t0 + s
            k = s if training else 0
            np.matmul(w_hh, h.T, out=gh)
            if cell == "lstm":
                lstm_forward_step[par](g[s], gh, bias, lengths, t, c, cs[s] if training else c, h, y[s], ln_at(k),
                                       zo_h, zo_c, None if m is None else m[k], scratch)
                if m is not None:
                    np.matmul(m[k], w_hr.T, out=hp)
                    h_step[par](hp, lengths, t, h, y[s], zo_h)
            elif cell == "gru":
                gru_forward_step[par](g[s], gh, bias, b_hn, lengths, t, hn[k], h, y[s], ln_at(k), zo_h)
            else:
                np.copyto(gh_rows, gh.T)
                elman_forward_step[par](code, g[s], gh_rows, bias, lengths, t, h, y[s], zo_h)
    state_n = (h, c) if cell == "lstm" else (h,)
    if not training:
        return y, state_n, None
    ctx = FusedCtx(cell, lengths, w_hh, state0[0], y, None if cell.startswith("rnn") else g,
                   c0=state0[1] if cell == "lstm" else None, c=cs, hn=hn, workspace=workspace, t0=t0, ln=ln,
                   zo_h=zo_h, zo_c=zo_c, w_hr=w_hr, m=m)
    return y, state_n, ctx


def backward(ctx, dy, dstate_n, dparams=None):
    if not isinstance(ctx, FusedCtx):
        return numpy_ref.backward(ctx, dy, dstate_n, dparams)
    empty = _allocator(ctx.workspace)
    cell, lengths, w_t, ln = ctx.cell, ctx.lengths, ctx.w_hh.T, ctx.ln   # w_t: (P, GH) view
    T, B, P = ctx.y.shape
    GH = ctx.w_hh.shape[0]
    H = GH // GATES[cell]
    dy = np.ascontiguousarray(dy, dtype=np.float32)
    dgx = empty((T, B, GH), np.float32)
    dgh = empty((T, B, GH), np.float32) if cell == "gru" or ln is not None else dgx
    dh_acc = np.array(dstate_n[0], np.float32)             # (B, P)
    dc_acc = np.array(dstate_n[1], np.float32) if cell == "lstm" else None
    dh_in = np.zeros((P, B), np.float32)                   # W_hh^T dG^T, the GEMM's fast layout; 0 beyond step T-1
    code = ACT_CODE.get(cell[4:])                          # Elman's activation
    zo_h, zo_c = ctx.zo_h, ctx.zo_c
    acc = None if ln is None else tuple(np.zeros((B, n), np.float32) for n in (GH, GH, GH) + (
        (H, H) if cell == "lstm" else (GH,)))
    ln_at = (lambda s: None) if ln is None else (lambda s: ln[:2] + (ln[2][s], ln[3][s], ln[4][s]) + ln[5:])
    scratch = None
    if cell == "lstm" and (zo_h is not None or zo_c is not None):
        scratch = np.empty((B, 3 * H), np.float32)
    elif cell == "gru" and zo_h is not None:
        scratch = np.empty((B, H), np.float32)
    proj = ctx.w_hr is not None
    if proj:
        dh_new = empty((T, B, P), np.float32)             # dL/d(m W_hr^T) of every step
        dm = np.empty((B, H), np.float32)
    with kernel_threads() as par:
        for s in range(T - 1, -1, -1):
            t = ctx.t0 + s
            if cell == "lstm":
                c_prev = ctx.c[s - 1] if s > 0 else ctx.c0
                if proj:
                    h_backward_step[par](dy[s], lengths, t, dh_in, dh_acc, dh_new[s], zo_h)
                    np.matmul(dh_new[s], ctx.w_hr, out=dm)
                lstm_backward_step[par](ctx.gates[s], ctx.c[s], c_prev, dy[s], lengths, t, dh_in, dh_acc, dc_acc,
                                        dgx[s], dgh[s], ln_at(s), acc, None if proj else zo_h, zo_c,
                                        dm if proj else None, scratch)
            elif cell == "gru":
                h_prev = ctx.y[s - 1] if s > 0 else ctx.h0
                gru_backward_step[par](ctx.gates[s], ctx.hn[s], h_prev, dy[s], lengths, t, dh_in, dh_acc, dgx[s],
                                       dgh[s], ln_at(s), acc, zo_h, scratch)
            else:
                elman_backward_step[par](code, ctx.y[s], dy[s], lengths, t, dh_in, dh_acc, dgx[s], zo_h)
            np.matmul(w_t, dgh[s].T, out=dh_in)
    dh_acc += np.where((ctx.t0 < lengths)[:, None], dh_in.T, ZERO)   # a run's first step may be padded (t0 > 0)
    if dparams is not None:
        names = ("gamma_ih", "gamma_hh") + (("bias_ih", "gamma_c", "beta_c") if cell == "lstm" else
                                            ("bias_ih", "bias_hh"))
        if ln is not None:
            dparams.update({name: a.sum(axis=0) for name, a in zip(names, acc)})
            if cell == "lstm":                             # one sum serves both biases: both sit beside a
                dparams["bias_hh"] = dparams["bias_ih"]
        if proj:
            dparams["weight_hr"] = dh_new.reshape(T * B, P).T @ ctx.m.reshape(T * B, H)   # h~ = m W_hr^T
    return dgx, dgh, ((dh_acc, dc_acc) if cell == "lstm" else (dh_acc,))


jordan_forward = numpy_ref.jordan_forward
jordan_backward = numpy_ref.jordan_backward
