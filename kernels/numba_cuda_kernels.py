"""The @cuda.jit kernels of the numba backend, built once per float dtype by `build(dtype)`.

Literal constants are cast to the array dtype (`F(1)`), so float32 kernels never promote to float64.
Codes passed as kernel arguments: `cell` ELMAN | LSTM | GRU, `act` TANH | RELU | SIGMOID | IDENTITY.
Layout: every (B, G*H) row holds gate g of hidden unit j at g*H + j; one thread serves one (b, j) with
idx = b*H + j, so consecutive threads touch consecutive addresses in every gate slice (coalesced).
Padded steps (t >= lengths[b]) output 0, keep the state, and their gradient rows stay 0.
"""
import functools
import math
from types import SimpleNamespace

import numpy as np
from numba import cuda

from . import cpu_fused

ELMAN, LSTM, GRU = 0, 1, 2
TANH, RELU, SIGMOID, IDENTITY = 0, 1, 2, 3
CELL_CODES = {"rnn_tanh": ELMAN, "rnn_relu": ELMAN, "rnn_sigmoid": ELMAN, "lstm": LSTM, "gru": GRU}
ACT_CODES = {"tanh": TANH, "relu": RELU, "sigmoid": SIGMOID, "identity": IDENTITY}


def simulated_fma(a, b, c):
    """The simulator's a * b + c: the float32 product is exact in float64, the sum rounded twice (semantics only);
    beyond float32's range it is +-Inf, as on the GPU, without a warning."""
    with np.errstate(over="ignore"):
        return np.float32(np.float64(a) * np.float64(b) + np.float64(c))


@functools.lru_cache(maxsize=None)
def float32_activations():
    """SimpleNamespace(sigmoid, tanh): cpu_fused's float32 functions compiled as device functions, the same
    operations: each fma a `fma.rn.f32`, each product `libdevice.fmul_rn` (`mul.rn.f32`, which NVVM's and ptxas's
    contraction, on by default, leave alone), `/` IEEE division (no fast math), bit casts through libdevice. So the
    results equal the CPU's bit for bit, with its bounds: tanh within 1.35 ulp, sigmoid within 1.32 ulp of the exact
    value over every float32, monotone, exactly +-1 / 0 / 1 wherever the correctly rounded value is.
    tests/test_activations.py reads the PTX. The simulator evaluates them with NumPy scalars (fma rounded twice),
    close to but not exactly the GPU's."""
    if cuda.config.ENABLE_CUDASIM:
        ops = dict(fma=simulated_fma, mul=lambda a, b: a * b,
                   float32_bits=lambda x: np.float32(x).view(np.int32),
                   bits_float32=lambda i: np.uint32(int(i) & 0xFFFFFFFF).view(np.float32))
    else:
        from numba.cuda import libdevice
        ops = dict(fma=cuda.jit(device=True)(lambda a, b, c: cuda.fma(a, b, c)), mul=libdevice.fmul_rn,
                   float32_bits=libdevice.float_as_int, bits_float32=libdevice.int_as_float)
    return cpu_fused.compile_activations(cuda.jit(device=True), **ops)


@functools.lru_cache(maxsize=None)
def build(dtype):
    """SimpleNamespace of kernels for float dtype `dtype` (np.float32 or np.float64), and the activation device
    functions `activate` / `activate_backward` (for tests to launch)."""
    F = np.dtype(dtype).type

    @cuda.jit(device=True)
    def element(cols):
        """(b, j) of this thread in a row-major (rows, cols) array, idx = b*cols + j; b >= rows: no element."""
        idx = cuda.grid(1)
        b = idx // cols
        return b, idx - b * cols

    # Activations. float32: cpu_fused's (float32_activations), bounds there. float64: the CUDA math API's tanh
    # (1 ulp) and the sigmoid below, <= 2 ulp for x >= 0, <= 3.5 ulp for x < 0 (exp 1 ulp; + and / correctly
    # rounded: Numba compiles without fast math, so no approximate intrinsics and no flush to zero): an exp error of
    # k ulp moves 1 / (1 + e) by <= k/2 ulp and e / (1 + e) by <= 2k ulp, plus 1 ulp for rounding 1 + e and 1/2 for
    # the division. relu is exact, and NaN-propagating like both.
    @cuda.jit(device=True)
    def sigmoid64(x):
        """1 / (1 + e^-x), relatively accurate also for tiny results: e = e^-|x| in [0, 1] never overflows;
        1 / (1 + e) for x >= 0, e / (1 + e) for x < 0."""
        e = math.exp(x if x < F(0) else -x)
        return (e if x < F(0) else F(1)) / (F(1) + e)

    @cuda.jit(device=True)
    def tanh64(x):
        return math.tanh(x)

    if F is np.float32:
        sigmoid, tanh = float32_activations().sigmoid, float32_activations().tanh
    else:
        sigmoid, tanh = sigmoid64, tanh64

    @cuda.jit(device=True)
    def activate(act, x):
        if act == TANH:
            return tanh(x)
        if act == RELU:
            return F(0) if x <= F(0) else x            # not max(x, 0): fmax would turn NaN into 0
        if act == SIGMOID:
            return sigmoid(x)
        return x

    @cuda.jit(device=True)
    def activate_backward(act, dy, y):
        """dL/d pre-activation from dL/dy and the output y: dy act', act' written from y (tanh' = 1 - y^2, sigmoid' =
        y (1 - y)). relu selects, as torch's threshold backward: 0 where y <= 0 (a NaN dy stops there), else dy."""
        if act == TANH:
            return dy * (F(1) - y * y)
        if act == SIGMOID:
            return dy * (y * (F(1) - y))
        if act == RELU:
            return F(0) if y <= F(0) else dy
        return dy

    @cuda.jit(device=True)
    def inputs(xw, b_ih, t, b, j, G):
        """x0..x3 = xw[t, b, g*H + j] + b_ih[g*H + j] for gates g < G, 0 for the others: the input projection
        and its bias, added here rather than in a pass of its own. xw: (T, B, G*H)  b_ih: (G*H,)."""
        H = xw.shape[2] // G
        x1 = xw[t, b, H + j] + b_ih[H + j] if G > 1 else F(0)
        x2 = xw[t, b, 2 * H + j] + b_ih[2 * H + j] if G > 2 else F(0)
        x3 = xw[t, b, 3 * H + j] + b_ih[3 * H + j] if G > 3 else F(0)
        return xw[t, b, j] + b_ih[j], x1, x2, x3

    @cuda.jit(device=True)
    def unit_forward(cell, act, t, b, j, valid, x0, x1, x2, x3, b_hh, r0, r1, r2, r3, h_prev, c, y, gates, cs,
                     hns):
        """One step of hidden unit (b, j); returns the state h after step t.

        x0..x3: xw[t, b, g*H + j] + b_ih[g*H + j] (`inputs`), r0..r3: (h_prev @ W_hh.T)[b, g*H + j] for gate g
        (no bias); unused gates pass 0. b_hh: (G*H,)  h_prev: the scalar h[b, j] before the step
        c: (B, H) LSTM cell state, updated in place  y: (T, B, H)
        gates: (T, B, G*H) activated gates (Elman: y itself)  cs: (T, B, H) LSTM c after each step
        hns: (T, B, H) GRU h_prev @ W_hn.T + b_hn
        """
        H = y.shape[2]
        if cell == LSTM:
            i = sigmoid(x0 + r0 + b_hh[j])
            f = sigmoid(x1 + r1 + b_hh[H + j])
            g = tanh(x2 + r2 + b_hh[2 * H + j])
            o = sigmoid(x3 + r3 + b_hh[3 * H + j])
            c_new = f * c[b, j] + i * g
            h_new = o * tanh(c_new)
            gates[t, b, j] = i
            gates[t, b, H + j] = f
            gates[t, b, 2 * H + j] = g
            gates[t, b, 3 * H + j] = o
            if valid:
                c[b, j] = c_new
            cs[t, b, j] = c[b, j]
        elif cell == GRU:
            hn = r2 + b_hh[2 * H + j]
            r = sigmoid(x0 + r0 + b_hh[j])
            z = sigmoid(x1 + r1 + b_hh[H + j])
            n = tanh(x2 + r * hn)
            h_new = (F(1) - z) * n + z * h_prev
            gates[t, b, j] = r
            gates[t, b, H + j] = z
            gates[t, b, 2 * H + j] = n
            hns[t, b, j] = hn
        else:
            h_new = activate(act, x0 + r0 + b_hh[j])
            gates[t, b, j] = h_new
        y[t, b, j] = h_new if valid else F(0)
        return h_new if valid else h_prev

    @cuda.jit(device=True)
    def gru_backward(t, b, j, H, dh, y, h0, gates, hns, dgx, dgh):
        """The GRU's gate gradients of unit (b, j) at step t from dh = dL/dh~ into dgx, dgh (T, B, 3H); returns
        dh z, what reaches h_{t-1} directly. y: (T, B, H) the states;  h0: (B, H);  hns: (T, B, H) gh_n + b_hn."""
        r = gates[t, b, j]
        z = gates[t, b, H + j]
        n = gates[t, b, 2 * H + j]
        h_prev = y[t - 1, b, j] if t > 0 else h0[b, j]
        # h~ = (1 - z) n + z h_prev:  dn = dh (1 - z),  dz = dh (h_prev - n),  dh_prev gets dh z directly
        dn = dh * (F(1) - z) * (F(1) - n * n)
        dz = dh * (h_prev - n) * z * (F(1) - z)
        # n = tanh(xn + r hn):  dr = dn_pre hn,  d(hn) = dn_pre r  (hn = h_prev W_hn^T + b_hn)
        dr = dn * hns[t, b, j] * r * (F(1) - r)
        dgx[t, b, j] = dr
        dgx[t, b, H + j] = dz
        dgx[t, b, 2 * H + j] = dn
        dgh[t, b, j] = dr
        dgh[t, b, H + j] = dz
        dgh[t, b, 2 * H + j] = dn * r
        return dh * z

    @cuda.jit(device=True)
    def unit_backward(cell, act, t, b, j, valid, dh_in, dy, y, h0, gates, cs, c0, hns, dc, dgx, dgh):
        """Backward of step t for hidden unit (b, j); returns the part of dL/dh_{t-1} not routed through W_hh.

        dh_in: dL/dh_t from later steps (carried part + (dG_{t+1} @ W_hh)[b, j])
        dy: (T, B, H)  y: (T, B, H)  h0, c0: (B, H)  gates, dgx, dgh: (T, B, G*H)  cs, hns: (T, B, H)
        dc: (B, H) LSTM dL/dc carried backwards, updated in place
        Padded steps write 0 to their rows of dgx (and dgh) and pass dh, dc through.
        """
        H = y.shape[2]
        if not valid:
            G = dgx.shape[2] // H
            for g in range(G):
                dgx[t, b, g * H + j] = F(0)
                dgh[t, b, g * H + j] = F(0)
            return dh_in
        dh = dh_in + dy[t, b, j]
        if cell == LSTM:
            i = gates[t, b, j]
            f = gates[t, b, H + j]
            g = gates[t, b, 2 * H + j]
            o = gates[t, b, 3 * H + j]
            c_prev = cs[t - 1, b, j] if t > 0 else c0[b, j]
            tc = tanh(cs[t, b, j])
            # h = o tanh(c):  d(o_pre) = dh tanh(c) o (1 - o);  dc += dh o (1 - tanh^2 c)
            dct = dc[b, j] + dh * o * (F(1) - tc * tc)
            # c = f c_prev + i g:  di = dc g,  df = dc c_prev,  dg = dc i,  dc_prev = dc f
            dgx[t, b, j] = dct * g * i * (F(1) - i)
            dgx[t, b, H + j] = dct * c_prev * f * (F(1) - f)
            dgx[t, b, 2 * H + j] = dct * i * (F(1) - g * g)
            dgx[t, b, 3 * H + j] = dh * tc * o * (F(1) - o)
            dc[b, j] = dct * f
            return F(0)
        if cell == GRU:
            return gru_backward(t, b, j, H, dh, y, h0, gates, hns, dgx, dgh)
        # h = act(p):  dp = dh act'(p), written from h = y[t]
        dgx[t, b, j] = activate_backward(act, dh, y[t, b, j])
        return F(0)

    @cuda.jit
    def step_forward(cell, act, t, xw, gh, b_hh, b_ih, lengths, h, c, y, gates, cs, hns):
        """Step t for every (b, j). gh: (B, G*H) h @ W_hh.T, computed by the GEMM before this launch;
        b_ih: (G*H,) (see `inputs`); h: (B, H) state, updated in place; lengths: (B,) int32; other arguments as in
        unit_forward."""
        B, H = h.shape
        b, j = element(H)
        if b >= B:
            return
        G = gh.shape[1] // H
        r1 = gh[b, H + j] if G > 1 else F(0)
        r2 = gh[b, 2 * H + j] if G > 2 else F(0)
        r3 = gh[b, 3 * H + j] if G > 3 else F(0)
        x0, x1, x2, x3 = inputs(xw, b_ih, t, b, j, G)
        h[b, j] = unit_forward(cell, act, t, b, j, t < lengths[b], x0, x1, x2, x3, b_hh, gh[b, j], r1, r2, r3,
                               h[b, j], c, y, gates, cs, hns)

    @cuda.jit
    def step_backward(cell, act, t, dhg, dh, dy, y, h0, gates, cs, c0, hns, lengths, dc, dgx, dgh):
        """Pointwise backward of step t. dhg: (B, H) dG_{t+1} @ W_hh from the GEMM after step t+1 (0 at t = T-1);
        dh: (B, H) the carried part of dL/dh, updated in place; other arguments as in unit_backward."""
        B, H = dh.shape
        b, j = element(H)
        if b >= B:
            return
        dh[b, j] = unit_backward(cell, act, t, b, j, t < lengths[b], dh[b, j] + dhg[b, j], dy, y, h0, gates,
                                 cs, c0, hns, dc, dgx, dgh)

    @cuda.jit
    def jordan_hidden(act, t, xw, hy, lengths, h):
        """h[t] = act(xw[t] + hy), 0 at padded steps. xw, h: (T, B, H);  hy: (B, H) y_{t-1} @ W_yh.T."""
        B, H = hy.shape
        b, j = element(H)
        if b < B:
            h[t, b, j] = activate(act, xw[t, b, j] + hy[b, j]) if t < lengths[b] else F(0)

    @cuda.jit
    def jordan_output(act, t, py, b_y, lengths, y, state):
        """y[t] = out_act(py + b_y), 0 at padded steps; state (B, O) takes y[t] at valid steps.
        py: (B, O) h[t] @ W_hy.T;  b_y: (O,);  y: (T, B, O)."""
        B, O = py.shape
        b, o = element(O)
        if b < B:
            valid = t < lengths[b]
            v = activate(act, py[b, o] + b_y[o])
            y[t, b, o] = v if valid else F(0)
            if valid:
                state[b, o] = v

    @cuda.jit
    def jordan_output_backward(act, t, dy, y, lengths, carry, dsum, dpy):
        """dpy[t] = dL/d(y pre-activation); y_t feeds the loss (dy[t]) and step t+1 (dsum + carry).
        dy, y, dpy: (T, B, O);  dsum: (B, O) dph[t+1] @ W_yh (0 rows where step t+1 was padded);
        carry: (B, O) dL/dy_state held across padded steps, updated in place. Padded steps write dpy 0."""
        B, O = dsum.shape
        b, o = element(O)
        if b < B:
            s = carry[b, o] + dsum[b, o]
            if t < lengths[b]:
                # y = out_act(py):  dpy = (ds + dy) out_act'(py), written from y
                dpy[t, b, o] = activate_backward(act, s + dy[t, b, o], y[t, b, o])
                carry[b, o] = F(0)
            else:
                dpy[t, b, o] = F(0)
                carry[b, o] = s

    @cuda.jit
    def jordan_hidden_backward(act, t, dhh, h, dph):
        """dph[t] = dhh * act'(h[t]):  ph = xw + y_prev W_yh^T,  h = act(ph).
        dhh: (B, H) dpy[t] @ W_hy (0 rows at padded steps);  h, dph: (T, B, H)."""
        B, H = dhh.shape
        b, j = element(H)
        if b < B:
            dph[t, b, j] = activate_backward(act, dhh[b, j], h[t, b, j])

    return SimpleNamespace(sigmoid=sigmoid, tanh=tanh, activate=activate, activate_backward=activate_backward,
                           gru_backward=gru_backward,
                           inputs=inputs, unit_forward=unit_forward, unit_backward=unit_backward,
                           step_forward=step_forward, step_backward=step_backward,
                           jordan_hidden=jordan_hidden, jordan_output=jordan_output,
                           jordan_output_backward=jordan_output_backward,
                           jordan_hidden_backward=jordan_hidden_backward)
