"""RNN / LSTM / GRU / JordanRNN: parameters, stacking, directions, lengths and GEMMs around the kernel sweeps.

Layouts follow PyTorch (gate order LSTM i, f, g, o; GRU r, z, n). Shapes: x (T, B, I), y (T, B, D*H),
h (L*D, B, H) with index layer*D + direction. The per-element math lives in gpurnn.kernels.
"""
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import checks, init as inits, precision
from .backend import array_module, kernels, resolve
from .kernels import GATES, gemm
from .module import Module
from .streams import Lanes
from .workspace import Workspace

BACKEND_NAMES = ("auto", "numpy", "numba", "cupy")


@dataclass
class LayerCtx:
    """What `backward` needs from one `forward` call."""
    owner: object
    backend: str
    batch_first: bool
    shape: tuple            # (T, B) of the call
    rev_index: object       # (T, B, 1) time gather for the reverse direction, None when every length is T
    inputs: list            # per layer: its input (T, B, in_l), never the caller's array
    sweeps: list = field(default_factory=list)   # per layer*D + direction: the kernel ctx
    masks: list = field(default_factory=list)    # dropout: per layer but the last, (T, B, D*H) in {0, 1/(1-p)}
    retain: bool = False    # backward may run on it more than once
    used: bool = False      # a backward has run on it
    math: str = "fp32"      # the GEMMs' precision (gpurnn.precision)
    valid: object = None    # (T, B, 1) bool, step t of sequence b is inside its length; None when every length is T


def private(a, caller, training):
    """`a` when it shares no memory with the caller's array `caller` (or nothing is kept: not `training`), else a
    copy: what a ctx keeps must not change when the caller edits its own arrays in place."""
    return a.copy() if training and array_module(a).may_share_memory(a, caller) else a


def not_finite(what):
    return lambda name: f"{what.format(name)} is not finite: overflow"


def reverse_time(a, rev_index):
    """a (T, B, F) with each sequence's valid steps reversed in place of time (padded steps stay put)."""
    xp = array_module(a)
    if rev_index is None:
        return xp.ascontiguousarray(a[::-1])
    return xp.take_along_axis(a, rev_index, axis=0)


def matmul(xp, workspace, a, b, math="fp32", out=None):
    """a @ b (2-D). NumPy: written into a workspace buffer when there is one. A GPU backend's array module (CuPy,
    or its stand-in under the simulator and the CPU harness): cuBLAS in `math` (kernels/gemm.py), into `out`
    plus what it holds when given."""
    if xp is np:
        if out is not None:
            out += a @ b
            return out
        return xp.matmul(a, b, out=None if workspace is None else workspace.empty((a.shape[0], b.shape[1]), a.dtype))
    return gemm.matmul(xp, a, b, math, out=out, beta=0.0 if out is None else 1.0)


def gemm_module(name):
    """The array module a backend's GEMMs go through: NumPy for numpy, else the GPU backend's own."""
    return np if name == "numpy" else kernels(name).array_module()


def valid_steps(lengths, T, xp):
    """(T, B, 1) bool: step t of sequence b is inside its length."""
    return (xp.arange(T)[:, None] < lengths[None, :])[:, :, None]


def only_valid_steps(a, valid):
    """a (T, B, F) with 0 at padded steps, so a NaN or Inf there reaches no gradient (torch's packed sequences never
    read padded steps); a itself when valid is None (every length is T)."""
    return a if valid is None else array_module(a).where(valid, a, a.dtype.type(0))


def reverse_index(lengths, T, xp):
    """(T, B, 1): step t of sequence b reads time lengths[b]-1-t when valid, t when padded."""
    t = xp.arange(T, dtype=np.int32)[:, None]
    return xp.where(t < lengths[None, :], lengths[None, :] - 1 - t, t)[:, :, None]


class _Recurrent(Module):
    """Stacked, optionally bidirectional recurrent layer. dropout: on the outputs of every layer but the last, in
    training only (PyTorch's semantics). init: see gpurnn.init ("uniform", the default, is PyTorch's)."""
    cell = None
    stateful = True
    sweep = "auto"    # GPU backends: "auto" | "persistent" (one launch for all steps) | "step" (a launch per step)
    _workspace = None  # numpy backend: a Workspace the calls take their large buffers from (see workspace())

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, init="uniform", dtype="float32", backend="auto", seed=None, math=None):
        I = checks.positive_int(input_size, "input_size")
        H = checks.positive_int(hidden_size, "hidden_size")
        L = checks.positive_int(num_layers, "num_layers")
        bias, batch_first = checks.flag(bias, "bias"), checks.flag(batch_first, "batch_first")
        D = 2 if checks.flag(bidirectional, "bidirectional") else 1
        dropout = checks.number(dropout, "dropout", 0.0, 1.0)
        checks.choice(init, "init", inits.INITS)
        checks.choice(backend, "backend", BACKEND_NAMES)
        self.math = precision.check(math, dtype)     # GEMM precision on a GPU; None: precision.DEFAULT_MATH
        checks.fits_in_memory(D * GATES[self.cell] * H * (I + (L - 1) * D * H + L * H + 2 * L * bias),
                              checks.float_dtype(dtype), f"{type(self).__name__}({I}, {H}, num_layers={L})")
        if dropout and L == 1:
            warnings.warn(f"dropout={dropout} acts between stacked layers only, and num_layers=1", stacklevel=3)
        super().__init__(dtype, backend, seed)
        self.input_size, self.hidden_size, self.num_layers = I, H, L
        self.bias, self.batch_first, self.dropout, self.init = bias, batch_first, dropout, init
        self.num_directions = D
        G = GATES[self.cell]
        for layer in range(L):
            in_size = I if layer == 0 else H * D
            for suffix in self._suffixes(layer):
                shapes = {f"weight_ih{suffix}": (G * H, in_size), f"weight_hh{suffix}": (G * H, H)}
                if bias:
                    shapes.update({f"bias_ih{suffix}": (G * H,), f"bias_hh{suffix}": (G * H,)})
                for name, shape in shapes.items():
                    self.set_param(name, inits.draw(self.rng, init, name, shape, H))

    @property
    def config(self):
        return dict(kind=type(self).__name__, input_size=self.input_size, hidden_size=self.hidden_size,
                    num_layers=self.num_layers, bias=self.bias, batch_first=self.batch_first, dropout=self.dropout,
                    bidirectional=self.num_directions == 2, init=self.init, dtype=self.dtype.name,
                    **({"math": self.math} if self.math else {}))

    def workspace(self, enabled=True):
        """Reuse the large host buffers of forward and backward across calls (numpy backend), so a training loop
        takes no page faults per step. Results are unchanged, ctxs may be in flight and backward stays
        re-entrant: a buffer is reused only once nothing refers to it. The cost: the buffers of the largest set
        of calls alive at once stay allocated between calls (one LSTM layer, T=100, B=32, H=256: about 37 MiB
        when each ctx is dropped before the next forward, ~19 MiB more per ctx kept across it).
        `enabled`: True (a Workspace of its own, kept if there is one), False (none, the buffers are freed), or
        a `gpurnn.workspace.Workspace` (several layers may share one). Returns self."""
        if isinstance(enabled, Workspace):
            self._workspace = enabled
        elif not enabled:
            self._workspace = None
        elif self._workspace is None:
            self._workspace = Workspace()
        return self

    def _suffixes(self, layer):
        return [f"_l{layer}"] + ([f"_l{layer}_reverse"] if self.num_directions == 2 else [])

    def __repr__(self):
        return (f"{type(self).__name__}({self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"cell={self.cell!r}, bidirectional={self.num_directions == 2}, dtype={self.dtype.name}, "
                f"device={self.device!r})")

    def _state_shape(self, batch):
        return (self.num_layers * self.num_directions, batch, self.hidden_size)

    def _check_state(self, state, batch, name):
        """`state` as a tuple of (L*D, B, H) arrays (h, or h and c for the LSTM); zeros when None."""
        shape = self._state_shape(batch)
        parts = ("h", "c") if self.cell == "lstm" else ("h",)
        if state is None:
            return tuple(self.xp.zeros(shape, self.dtype) for _ in parts)
        if self.cell == "lstm":
            if not isinstance(state, (tuple, list)) or len(state) != 2:
                raise TypeError(f"{name} for an LSTM must be a tuple (h, c), got {type(state).__name__}")
        else:
            state = (state,)
        return tuple(checks.array(s, f"{name}[{p}]" if len(parts) > 1 else name, self.device, self.dtype, shape,
                                  finite=checks.finite_checks(self)) for s, p in zip(state, parts))

    def _time_major(self, a):
        return self.xp.ascontiguousarray(a.transpose(1, 0, 2)) if self.batch_first else a

    def forward(self, x, state=None, lengths=None, training=None, retain=False):
        """y, state_n, ctx. x: (T, B, I) or (B, T, I) with batch_first; state: h or (h, c), (L*D, B, H).
        training: save a ctx for backward and apply dropout (None: the module's train()/eval() mode).

        The ctx keeps private copies of x and state where it would otherwise keep the caller's arrays, so editing
        them in place after forward does not change what backward computes. It serves one backward unless
        `retain`. NaN/Inf in x, state or a parameter, or an output that overflows, raise checks.NonFiniteError
        (see checks.CHECK_FINITE and the layer's `check_finite`).
        """
        training = self.is_training(training)
        xp = self.xp
        x_in = x = checks.array(x, "x", self.device, self.dtype, ndim=3, finite=checks.finite_checks(self))
        x = private(self._time_major(x), x_in, training)
        T, B, I = x.shape
        if T == 0 or B == 0:
            raise ValueError(f"x must have at least one step and one batch entry, got shape {tuple(x.shape)}")
        if I != self.input_size:
            raise ValueError(f"x has {I} features but the layer's input_size is {self.input_size}")
        state0 = self._check_state(state, B, "state")
        if state is not None and training:
            state0 = tuple(s.copy() for s in state0)
        lens, ragged = checks.lengths(lengths, B, T, self.device)
        checks.ensure_finite(self, self.params, lambda k: f"{k} contains NaN or Inf")
        valid = valid_steps(lens, T, xp) if ragged else None
        x = only_valid_steps(x, valid)          # the layer's input, and what dW_ih is formed from
        name = resolve(self.backend, self.device)
        math = precision.resolve(self.math, name, self.dtype)
        K = kernels(name)
        gx = gemm_module(name)
        ws = self._workspace if name == "numpy" else None
        opts = {"workspace": ws} if name == "numpy" else {"sweep": self.sweep, "math": math}
        H, D, G = self.hidden_size, self.num_directions, GATES[self.cell]
        rev_index = reverse_index(lens, T, xp) if (ragged and D == 2) else None
        ctx = LayerCtx(self, name, self.batch_first, (T, B), rev_index, [], retain=retain, math=math,
                       valid=valid)
        state_n = tuple(xp.empty_like(s) for s in state0)
        inp = x
        for layer in range(self.num_layers):
            ctx.inputs.append(inp)
            out = xp.empty((T, B, D * H), self.dtype) if D == 2 else None
            lane = Lanes(gx, D)                 # the directions on streams of their own (GPU)
            for d, suffix in enumerate(self._suffixes(layer)):
                with lane(d):
                    p = self.params
                    xw = matmul(gx, ws, inp.reshape(T * B, -1), p[f"weight_ih{suffix}"].T, math).reshape(T, B, G * H)
                    b_ih = p[f"bias_ih{suffix}"] if self.bias else None      # the sweep adds it, with b_hh
                    b_hh = p[f"bias_hh{suffix}"] if self.bias else xp.zeros(G * H, self.dtype)
                    if d == 1:
                        xw = reverse_time(xw, rev_index)
                    k = layer * D + d
                    y, s_n, kctx = K.forward(self.cell, xw, p[f"weight_hh{suffix}"], b_hh,
                                             tuple(s[k] for s in state0), lens, training, b_ih=b_ih, **opts)
                    checks.ensure_finite(self, {"y": y, **dict(enumerate(s_n))},
                                         not_finite(f"the output of layer {layer} (direction {d})"))
                    if D == 1:         # (T, B, H); a copy when training, since backward reads the sweep's own y
                        out = y.copy() if training else y
                    else:
                        out[:, :, d * H:(d + 1) * H] = reverse_time(y, rev_index) if d == 1 else y
                    for dst, src in zip(state_n, s_n):
                        dst[k] = src
                    ctx.sweeps.append(kctx)
            inp = out
            if training and self.dropout and layer < self.num_layers - 1:
                ctx.masks.append(self.dropout_mask(out, self.dropout))    # (T, B, D*H)
                inp = out * ctx.masks[-1]
        y = self._time_major(inp)
        h_n = state_n if self.cell == "lstm" else state_n[0]
        return y, h_n, (ctx if training else None)

    @checks.consumes_ctx
    def backward(self, ctx, dy, dstate=None):
        """dx, dstate0. Accumulates into self.grads. dy like y; dstate like the returned state, or None."""
        checks.check_ctx(ctx, self, LayerCtx)
        xp = self.xp
        T, B = ctx.shape
        H, D = self.hidden_size, self.num_directions
        want = (B, T, D * H) if self.batch_first else (T, B, D * H)
        dy = self._time_major(checks.array(dy, "dy", self.device, self.dtype, want,
                                           finite=checks.finite_checks(self)))
        dstate_n = self._check_state(dstate, B, "dstate")
        K = kernels(ctx.backend)
        gx, math = gemm_module(ctx.backend), ctx.math
        ws = self._workspace if ctx.backend == "numpy" else None
        p = self.params
        new_grads = {}     # added to self.grads only once every GEMM has run
        ones = xp.ones(T * B, self.dtype)   # bias sums as GEMVs over the T*B rows: BLAS, several times numpy's sum
        dstate0 = tuple(xp.empty_like(s) for s in dstate_n)
        dout = dy
        for layer in reversed(range(self.num_layers)):
            inp = ctx.inputs[layer]
            inp2d = inp.reshape(T * B, -1)
            dgx2ds = []
            lane = Lanes(gx, D)                 # the directions on streams of their own (GPU)
            for d, suffix in enumerate(self._suffixes(layer)):
                with lane(d):
                    k = layer * D + d
                    kctx = ctx.sweeps[k]
                    dy_d = dout if D == 1 else xp.ascontiguousarray(dout[:, :, d * H:(d + 1) * H])
                    if d == 1:
                        dy_d = reverse_time(dy_d, ctx.rev_index)
                    dgx, dgh, ds0 = K.backward(kctx, dy_d, tuple(s[k] for s in dstate_n))
                    for dst, src in zip(dstate0, ds0):
                        dst[k] = src
                    GH = dgx.shape[2]
                    shared = dgh is dgx        # every cell but the GRU: dL/d(xw) = dL/d(h W_hh^T)
                    # W_hh sees h_prev: h0 at step 0, then y[t-1] (kernel time order); the GPU sweeps keep them as
                    # one (T, B, H) buffer, so dW_hh is one GEMM over all T*B rows
                    h_prev = getattr(kctx, "h_prev", None)
                    if h_prev is not None:
                        gw = matmul(gx, ws, dgh.reshape(-1, GH).T, h_prev.reshape(-1, H), math)    # (GH, H)
                    else:
                        gw = matmul(xp, ws, dgh[0].T, kctx.h0)
                        if T > 1:
                            gw += matmul(xp, ws, dgh[1:].reshape(-1, GH).T, kctx.y[:-1].reshape(-1, H))
                    new_grads[f"weight_hh{suffix}"] = gw
                    dgh_sum = ones @ dgh.reshape(T * B, GH) if self.bias else None      # (GH,)
                    if d == 1:
                        dgx = reverse_time(dgx, ctx.rev_index)
                    dgx2d = dgx.reshape(T * B, GH)
                    new_grads[f"weight_ih{suffix}"] = matmul(gx, ws, dgx2d.T, inp2d, math)    # (GH, in_l)
                    dgx2ds.append(dgx2d)
                    if self.bias:
                        new_grads[f"bias_hh{suffix}"] = dgh_sum
                        new_grads[f"bias_ih{suffix}"] = dgh_sum if shared else ones @ dgx2d
            dinp = None          # (T*B, in_l): the directions' shares, summed by the GEMMs after the lanes joined
            for dgx2d, suffix in zip(dgx2ds, self._suffixes(layer)):
                dinp = matmul(gx, ws, dgx2d, p[f"weight_ih{suffix}"], math, out=dinp)
            dout = dinp.reshape(T, B, -1)
            if layer and ctx.masks:           # layer's input was out_{layer-1} * mask: d out = d input * mask
                dout = dout * ctx.masks[layer - 1]
        dout = only_valid_steps(dout, ctx.valid)      # 0 at padded steps, even where W_ih holds NaN or Inf
        checks.ensure_finite(self, {**new_grads, "x": dout, **{f"state[{part}]": g for part, g in zip("hc", dstate0)}},
                             not_finite("the gradient of {}"))
        for k, g in new_grads.items():
            self.grads[k] += g
        dx = self._time_major(dout)
        return dx, (dstate0 if self.cell == "lstm" else dstate0[0])


class RNN(_Recurrent):
    """Elman network: h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh), act in tanh, relu, sigmoid."""

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", **kwargs):
        self.nonlinearity = checks.choice(nonlinearity, "nonlinearity", ("tanh", "relu", "sigmoid"))
        self.cell = f"rnn_{nonlinearity}"
        super().__init__(input_size, hidden_size, num_layers, **kwargs)

    @property
    def config(self):
        return {**super().config, "nonlinearity": self.nonlinearity}


class LSTM(_Recurrent):
    """LSTM, gates i, f, g, o: c' = f c + i g, h' = o tanh(c').

    forget_bias: when a number, the forget gate's bias starts there (bias_ih's f slice = forget_bias, bias_hh's = 0,
    so b_f = forget_bias), after `init` drew the rest; a common choice is 1.0."""
    cell = "lstm"

    def __init__(self, input_size, hidden_size, num_layers=1, *args, forget_bias=None, **kwargs):
        if forget_bias is not None:
            forget_bias = checks.number(forget_bias, "forget_bias", -np.inf, np.inf, low_open=True, high_open=True)
            if not kwargs.get("bias", args[0] if args else True):
                raise ValueError("forget_bias needs bias=True")
        super().__init__(input_size, hidden_size, num_layers, *args, **kwargs)
        self.forget_bias = forget_bias
        if forget_bias is not None:
            H = self.hidden_size
            for name, p in self.params.items():
                if name.startswith("bias"):
                    p[H:2 * H] = forget_bias if name.startswith("bias_ih") else 0

    @property
    def config(self):
        return {**super().config, "forget_bias": self.forget_bias}


class GRU(_Recurrent):
    """GRU, gates r, z, n: n = tanh(x W_in^T + b_in + r (h W_hn^T + b_hn)), h' = (1 - z) n + z h."""
    cell = "gru"


class JordanRNN(Module):
    """Jordan network: h_t = act(x_t W_ih^T + y_{t-1} W_yh^T + b_h), y_t = out_act(h_t W_hy^T + b_y).

    The state is the previous output y_{t-1}, shape (1, B, O). Parameters: weight_ih (H, I), weight_yh (H, O),
    bias_h (H,), weight_hy (O, H), bias_y (O,).
    """
    num_layers = num_directions = 1
    batch_first = False
    stateful = True

    def __init__(self, input_size, hidden_size, output_size, nonlinearity="tanh", output_nonlinearity="sigmoid",
                 dtype="float32", backend="auto", seed=None):
        I = checks.positive_int(input_size, "input_size")
        H = checks.positive_int(hidden_size, "hidden_size")
        O = checks.positive_int(output_size, "output_size")
        checks.choice(nonlinearity, "nonlinearity", ("tanh", "relu", "sigmoid"))
        checks.choice(output_nonlinearity, "output_nonlinearity", ("tanh", "relu", "sigmoid", "identity"))
        checks.choice(backend, "backend", BACKEND_NAMES)
        checks.fits_in_memory(H * (I + 2 * O + 1) + O, checks.float_dtype(dtype), f"JordanRNN({I}, {H}, {O})")
        super().__init__(dtype, backend, seed)
        self.input_size, self.hidden_size, self.output_size = I, H, O
        self.nonlinearity, self.output_nonlinearity = nonlinearity, output_nonlinearity
        bh, bo = 1.0 / np.sqrt(H), 1.0 / np.sqrt(O)
        self.add_param("weight_ih", (H, self.input_size), bh)
        self.add_param("weight_yh", (H, O), bh)
        self.add_param("bias_h", (H,), bh)
        self.add_param("weight_hy", (O, H), bh)
        self.add_param("bias_y", (O,), bo)

    @property
    def config(self):
        return dict(kind="JordanRNN", input_size=self.input_size, hidden_size=self.hidden_size,
                    output_size=self.output_size, nonlinearity=self.nonlinearity,
                    output_nonlinearity=self.output_nonlinearity, dtype=self.dtype.name)

    def __repr__(self):
        return (f"JordanRNN({self.input_size}, {self.hidden_size}, {self.output_size}, "
                f"nonlinearity={self.nonlinearity!r}, output_nonlinearity={self.output_nonlinearity!r}, "
                f"dtype={self.dtype.name}, device={self.device!r})")

    def forward(self, x, state=None, lengths=None, training=None, retain=False):
        """y (T, B, O), state_n (1, B, O), ctx. `state` is y_{-1} (1, B, O), zeros when None.
        Private copies, `retain` and NaN/Inf checks as in RNN.forward."""
        training = self.is_training(training)
        xp, p = self.xp, self.params
        finite = checks.finite_checks(self)
        x_in = x = checks.array(x, "x", self.device, self.dtype, ndim=3, finite=finite)
        x = private(x, x_in, training)
        T, B, I = x.shape
        if T == 0 or B == 0:
            raise ValueError(f"x must have at least one step and one batch entry, got shape {tuple(x.shape)}")
        if I != self.input_size:
            raise ValueError(f"x has {I} features but the layer's input_size is {self.input_size}")
        shape = (1, B, self.output_size)
        y0 = xp.zeros(shape, self.dtype) if state is None else checks.array(state, "state", self.device,
                                                                               self.dtype, shape, finite=finite)
        y0 = y0.copy() if state is not None and training else y0
        lens, ragged = checks.lengths(lengths, B, T, self.device)
        checks.ensure_finite(self, p, lambda k: f"{k} contains NaN or Inf")
        valid = valid_steps(lens, T, xp) if ragged else None
        x = only_valid_steps(x, valid)
        name = resolve(self.backend, self.device)
        xw = xp.matmul(x.reshape(T * B, I), p["weight_ih"].T).reshape(T, B, -1) + p["bias_h"]
        y, y_n, kctx = kernels(name).jordan_forward(xw, p["weight_yh"], p["weight_hy"], p["bias_y"], y0[0], lens,
                                                    self.nonlinearity, self.output_nonlinearity, training)
        checks.ensure_finite(self, {"y": y}, not_finite("the output of the Jordan layer"))
        ctx = LayerCtx(self, name, False, (T, B), None, [x], [kctx], retain=retain, valid=valid) if training else None
        return (y.copy() if training else y), y_n[None], ctx          # the sweep's y stays the ctx's own

    @checks.consumes_ctx
    def backward(self, ctx, dy, dstate=None):
        """dx (T, B, I), dstate0 (1, B, O). Accumulates into self.grads."""
        checks.check_ctx(ctx, self, LayerCtx)
        xp, p = self.xp, self.params
        T, B = ctx.shape
        O, H = self.output_size, self.hidden_size
        finite = checks.finite_checks(self)
        dy = checks.array(dy, "dy", self.device, self.dtype, (T, B, O), finite=finite)
        dy_n = (xp.zeros((B, O), self.dtype) if dstate is None
                else checks.array(dstate, "dstate", self.device, self.dtype, (1, B, O), finite=finite)[0])
        x, kctx = ctx.inputs[0], ctx.sweeps[0]
        dph, dpy, dy0 = kernels(ctx.backend).jordan_backward(kctx, dy, dy_n)
        dph2d, dpy2d = dph.reshape(T * B, H), dpy.reshape(T * B, O)
        y_prev = xp.concatenate([kctx.y0[None], kctx.y[:-1]], axis=0).reshape(T * B, O)
        new_grads = {"weight_ih": dph2d.T @ x.reshape(T * B, -1), "weight_yh": dph2d.T @ y_prev,
                     "bias_h": dph2d.sum(axis=0), "weight_hy": dpy2d.T @ kctx.h.reshape(T * B, H),
                     "bias_y": dpy2d.sum(axis=0)}
        dx = only_valid_steps((dph2d @ p["weight_ih"]).reshape(T, B, -1), ctx.valid)
        checks.ensure_finite(self, {**new_grads, "x": dx, "state": dy0}, not_finite("the gradient of {}"))
        for k, g in new_grads.items():
            self.grads[k] += g
        return dx, dy0[None]
