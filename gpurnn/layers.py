"""RNN / LSTM / GRU / LayerNormLSTM / LayerNormGRU / JordanRNN: parameters, stacking, directions, lengths and
GEMMs around the kernel sweeps.

Layouts follow PyTorch (gate order LSTM i, f, g, o; GRU r, z, n). Shapes: x (T, B, I), y (T, B, D*P),
h (L*D, B, P) with index layer*D + direction (P = proj_size or H), c (L*D, B, H). The per-element math lives in
gpurnn.kernels; gpurnn.segments runs each layer and direction as a chain of segments of steps.
"""
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import checks, init as inits, precision, segments
from .backend import array_module, kernels, resolve
from .kernels import GATES, Zoneout, gemm
from .module import Module
from .streams import Lanes
from .workspace import Workspace

BACKEND_NAMES = ("auto", "numpy", "numba", "cupy")
LN_PARAMS = {"lstm": ("gamma_ih", "gamma_hh", "gamma_c", "beta_c"), "gru": ("gamma_ih", "gamma_hh")}
@dataclass
class LayerCtx:
    """What `backward` needs from one `forward` call."""
    owner: object
    backend: str
    batch_first: bool
    shape: tuple            # (T, B) of the call
    segments: list          # [(t0, t1), ...]: the steps of each segment (gpurnn.segments.plan)
    memory: str             # "full" | "checkpoint"
    lengths: object         # (B,) int32
    inputs: list            # per layer: its input (T, B, in_l), never the caller's array
    sweeps: list = field(default_factory=list)   # per layer*D + direction: a segments.Direction (Jordan: its
                                                 # kernel ctx)
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
    """(T, B): step t of sequence b reads time lengths[b]-1-t when valid, t when padded."""
    t = xp.arange(T, dtype=np.int32)[:, None]
    return xp.where(t < lengths[None, :], lengths[None, :] - 1 - t, t)


class _Recurrent(Module):
    """Stacked, optionally bidirectional recurrent layer. dropout: on the outputs of every layer but the last, in
    training only (PyTorch's semantics). init: see gpurnn.init ("uniform", the default, is PyTorch's).

    zoneout: p in [0, 1) (the LSTM also takes a pair (p_h, p_c) for h and c): in training each unit of the state
    keeps its previous value with probability p, a fresh mask per step and unit (counter-based, reproducible from the
    layer's seeded generator); in evaluation h_t = p h_{t-1} + (1 - p) h~_t. weight_drop: p in [0, 1), DropConnect
    on every W_hh, one mask per forward call, kept entries scaled by 1 / (1 - p), in training only.
    memory: "full" keeps every step's activations for backward; "checkpoint" keeps the state every k ~ sqrt(T) steps
    and recomputes each segment in backward (O(sqrt(T)) memory for about one more forward), with gradients
    identical to "full" bit for bit. segment_steps: the segments' length k in steps (both modes run the same
    segments); None chooses max(ceil(sqrt(T)), ceil(1024 / B)), evened out (gpurnn.segments.plan)."""
    cell = None
    layer_norm = False
    stateful = True
    sweep = "auto"    # GPU backends: "auto" | "persistent" (one launch for all steps) | "step" (a launch per step)
    _workspace = None  # numpy backend: a Workspace the calls take their large buffers from (see workspace())

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, init="uniform", dtype="float32", backend="auto", seed=None, zoneout=0.0,
                 weight_drop=0.0, memory="full", segment_steps=None, proj_size=0, math=None):
        I = checks.positive_int(input_size, "input_size")
        H = checks.positive_int(hidden_size, "hidden_size")
        L = checks.positive_int(num_layers, "num_layers")
        bias, batch_first = checks.flag(bias, "bias"), checks.flag(batch_first, "batch_first")
        D = 2 if checks.flag(bidirectional, "bidirectional") else 1
        dropout = checks.number(dropout, "dropout", 0.0, 1.0)
        self.zoneout_h, self.zoneout_c = self._zoneout_pair(zoneout)
        weight_drop = checks.number(weight_drop, "weight_drop", 0.0, 1.0, high_open=True)
        checks.choice(memory, "memory", segments.MEMORY_MODES)
        if segment_steps is not None:
            segment_steps = checks.positive_int(segment_steps, "segment_steps")
        P = checks.positive_int(proj_size, "proj_size", minimum=0)
        if P and P >= H:
            raise ValueError(f"proj_size must be smaller than hidden_size ({H}), got {P}")
        checks.choice(init, "init", inits.INITS)
        checks.choice(backend, "backend", BACKEND_NAMES)
        self.math = precision.check(math, dtype)     # GEMM precision on a GPU; None: precision.DEFAULT_MATH
        G = GATES[self.cell]
        P = P or H
        per_direction = [G * H * (in_size + P + 2 * bias + 2 * self.layer_norm) + (P * H if P != H else 0)
                         for in_size in [I] + [D * P] * (L - 1)]
        checks.fits_in_memory(D * sum(per_direction), checks.float_dtype(dtype),
                              f"{type(self).__name__}({I}, {H}, num_layers={L})")
        if dropout and L == 1:
            warnings.warn(f"dropout={dropout} acts between stacked layers only, and num_layers=1", stacklevel=3)
        super().__init__(dtype, backend, seed)
        self.input_size, self.hidden_size, self.num_layers = I, H, L
        self.bias, self.batch_first, self.dropout, self.init = bias, batch_first, dropout, init
        self.num_directions = D
        self.proj_size = P if P != H else 0
        self.weight_drop, self.memory, self.segment_steps = weight_drop, memory, segment_steps
        for layer in range(L):
            in_size = I if layer == 0 else P * D
            for suffix in self._suffixes(layer):
                shapes = {f"weight_ih{suffix}": (G * H, in_size), f"weight_hh{suffix}": (G * H, P)}
                if bias:
                    shapes.update({f"bias_ih{suffix}": (G * H,), f"bias_hh{suffix}": (G * H,)})
                if self.proj_size:
                    shapes[f"weight_hr{suffix}"] = (P, H)
                for name, shape in shapes.items():
                    self.set_param(name, inits.draw(self.rng, init, name, shape, H))
                if self.layer_norm:        # gains 1 and shift 0: LN starts as plain normalisation
                    for name in LN_PARAMS[self.cell]:
                        size = H if name.endswith("_c") else G * H
                        self.set_param(f"{name}{suffix}", np.zeros(size) if name.startswith("beta") else np.ones(size))

    def _zoneout_pair(self, zoneout):
        """(p_h, p_c) from `zoneout`: a number for every cell, or a pair for the LSTM; each in [0, 1)."""
        if self.cell == "lstm" and isinstance(zoneout, (tuple, list)):
            if len(zoneout) != 2:
                raise ValueError(f"zoneout must be a number or a pair (p_h, p_c), got {zoneout!r}")
            return tuple(checks.number(p, f"zoneout[{k}]", 0.0, 1.0, high_open=True) for k, p in enumerate(zoneout))
        p = checks.number(zoneout, "zoneout", 0.0, 1.0, high_open=True)
        return p, (p if self.cell == "lstm" else 0.0)

    @property
    def zoneout(self):
        """p, or (p_h, p_c) for an LSTM whose two differ."""
        same = self.cell != "lstm" or self.zoneout_c == self.zoneout_h
        return self.zoneout_h if same else (self.zoneout_h, self.zoneout_c)

    @property
    def state_size(self):
        """The size of h (and of each direction's output): proj_size when set, else hidden_size."""
        return self.proj_size or self.hidden_size

    @property
    def config(self):
        zoneout = self.zoneout
        return dict(kind=type(self).__name__, input_size=self.input_size, hidden_size=self.hidden_size,
                    num_layers=self.num_layers, bias=self.bias, batch_first=self.batch_first, dropout=self.dropout,
                    bidirectional=self.num_directions == 2, init=self.init, dtype=self.dtype.name,
                    zoneout=list(zoneout) if isinstance(zoneout, tuple) else zoneout, weight_drop=self.weight_drop,
                    memory=self.memory, segment_steps=self.segment_steps, **({"math": self.math} if self.math else {}))

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
        defaults = dict(proj_size=0, zoneout=0.0, weight_drop=0.0, memory="full")
        options = "".join(f", {k}={getattr(self, k)!r}" for k, v in defaults.items() if getattr(self, k) != v)
        return (f"{type(self).__name__}({self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"cell={self.cell!r}, bidirectional={self.num_directions == 2}{options}, dtype={self.dtype.name}, "
                f"device={self.device!r})")

    def state_shapes(self, batch):
        """The (L*D, B, .) shapes of the state's parts: h (P wide), and c (H wide) for the LSTM."""
        LD = self.num_layers * self.num_directions
        return [(LD, batch, self.state_size)] + ([(LD, batch, self.hidden_size)] if self.cell == "lstm" else [])

    def _check_state(self, state, batch, name):
        """`state` as a tuple of (L*D, B, .) arrays (h, or h and c for the LSTM); zeros when None."""
        shapes = self.state_shapes(batch)
        parts = ("h", "c") if self.cell == "lstm" else ("h",)
        if state is None:
            return tuple(self.xp.zeros(shape, self.dtype) for shape in shapes)
        if self.cell == "lstm":
            if not isinstance(state, (tuple, list)) or len(state) != 2:
                raise TypeError(f"{name} for an LSTM must be a tuple (h, c), got {type(state).__name__}")
        else:
            state = (state,)
        return tuple(checks.array(s, f"{name}[{p}]" if len(parts) > 1 else name, self.device, self.dtype, shape,
                                  finite=checks.finite_checks(self)) for s, p, shape in zip(state, parts, shapes))

    def _time_major(self, a):
        return self.xp.ascontiguousarray(a.transpose(1, 0, 2)) if self.batch_first else a

    def _check_backend(self, name, K):
        """ValueError when backend `name` lacks a kernel feature this layer uses (see kernels/__init__.py)."""
        features = getattr(K, "FEATURES", frozenset())
        uses = {"ln": f"{type(self).__name__} (layer normalisation)", "zoneout": "zoneout",
                "w_hr": "proj_size", "t0": 'memory="checkpoint"'}
        wanted = {"ln": self.layer_norm, "zoneout": bool(self.zoneout_h or self.zoneout_c),
                  "w_hr": bool(self.proj_size), "t0": self.memory == "checkpoint"}
        for feature, used in wanted.items():
            if used and feature not in features:
                raise ValueError(f"{uses[feature]} is not implemented on backend {name!r} yet")
        return "t0" in features

    def _direction(self, layer, d, suffix, rows, training):
        """The segments.Direction of one layer and direction for this call: its weights as the kernel sees them
        (W_hh masked under weight_drop in training) and the kernel's variant arguments, masks and seeds drawn."""
        p, xp = self.params, self.xp
        w_hh, mask = p[f"weight_hh{suffix}"], None
        if training and self.weight_drop:
            mask = self._weight_mask(w_hh)
            w_hh = w_hh * mask
        variant = {}
        if self.layer_norm:
            variant["ln"] = tuple(p[f"{name}{suffix}"] for name in LN_PARAMS[self.cell])
        if self.zoneout_h or self.zoneout_c:
            seeds = self.rng.integers(2 ** 32, size=2) if training else (0, 0)
            variant["zoneout"] = Zoneout(self.zoneout_h, self.zoneout_c, int(seeds[0]), int(seeds[1]))
        if self.proj_size:
            variant["w_hr"] = p[f"weight_hr{suffix}"]
        b_hh = p[f"bias_hh{suffix}"] if self.bias else xp.zeros(p[f"weight_hh{suffix}"].shape[0], self.dtype)
        return segments.Direction(self.cell, layer * self.num_directions + d, rows, p[f"weight_ih{suffix}"], w_hh,
                                  p[f"bias_ih{suffix}"] if self.bias else None, b_hh, variant, mask)

    def _weight_mask(self, w):
        """weight_drop's mask shaped like w: 0 with probability p, else 1 / (1 - p); on the CPU drawn in float64
        (the same mask in float32 and float64), on a GPU by dropout_mask's device generator."""
        if array_module(w) is not np:
            return self.dropout_mask(w, self.weight_drop)
        keep = self.rng.random(w.shape) >= self.weight_drop
        return (keep * (1.0 / (1.0 - self.weight_drop))).astype(w.dtype)

    def forward(self, x, state=None, lengths=None, training=None, retain=False):
        """y, state_n, ctx. x: (T, B, I) or (B, T, I) with batch_first; state: h or (h, c), (L*D, B, .).
        training: save a ctx for backward and apply dropout, zoneout's masks and weight_drop (None: the module's
        train()/eval() mode).

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
        segmented = self._check_backend(name, K)
        gx = gemm_module(name)
        ws = self._workspace if name == "numpy" else None
        opts = {"workspace": ws} if name == "numpy" else {"sweep": self.sweep, "math": math}
        P, D = self.state_size, self.num_directions
        plan = segments.plan(T, B, self.segment_steps) if segmented else [(0, T)]
        rev = reverse_index(lens, T, xp) if (ragged and D == 2) else None
        ctx = LayerCtx(self, name, self.batch_first, (T, B), plan, self.memory, lens, [], retain=retain, math=math,
                       valid=valid)
        state_n = tuple(xp.empty_like(s) for s in state0)
        inp = x
        for layer in range(self.num_layers):
            ctx.inputs.append(inp)
            out = xp.empty((T, B, D * P), self.dtype)
            lane = Lanes(gx, D)                 # the directions on streams of their own (GPU)
            for d, suffix in enumerate(self._suffixes(layer)):
                with lane(d):
                    run = self._direction(layer, d, suffix, segments.Rows(d == 1, T, rev), training)

                    def check(y, s_n, layer=layer, d=d):
                        checks.ensure_finite(self, {"y": y, **dict(enumerate(s_n))},
                                             not_finite(f"the output of layer {layer} (direction {d})"))
                    s_n = segments.forward(K, opts, run, inp, tuple(s[run.index] for s in state0), lens, plan,
                                           training, self.memory, out[:, :, d * P:(d + 1) * P], check, gx, math, ws)
                    for dst, src in zip(state_n, s_n):
                        dst[run.index] = src
                    ctx.sweeps.append(run)
            inp = out
            if training and self.dropout and layer < self.num_layers - 1:
                ctx.masks.append(self.dropout_mask(out, self.dropout))    # (T, B, D*P)
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
        P, D = self.state_size, self.num_directions
        want = (B, T, D * P) if self.batch_first else (T, B, D * P)
        dy = self._time_major(checks.array(dy, "dy", self.device, self.dtype, want,
                                           finite=checks.finite_checks(self)))
        dstate_n = self._check_state(dstate, B, "dstate")
        K = kernels(ctx.backend)
        gx, math = gemm_module(ctx.backend), ctx.math
        ws = self._workspace if ctx.backend == "numpy" else None
        opts = {"workspace": ws} if ctx.backend == "numpy" else {"sweep": self.sweep, "math": math}
        new_grads = {}     # added to self.grads only once every GEMM has run
        rows = max(t1 - t0 for t0, t1 in ctx.segments) * B
        ones = xp.ones(rows, self.dtype)   # bias sums as GEMVs over a segment's rows: BLAS, several times numpy's sum
        dstate0 = tuple(xp.empty_like(s) for s in dstate_n)
        dout = dy
        for layer in reversed(range(self.num_layers)):
            inp = ctx.inputs[layer]
            lane = Lanes(gx, D)                 # the directions on streams of their own (GPU)
            # (T, B, in_l) the input's gradient: one buffer both directions add into on one stream; one each on
            # two streams (no two streams write one buffer), summed once they joined
            dinps = []
            for d, suffix in enumerate(self._suffixes(layer)):
                with lane(d):
                    own = d == 0 or lane.streams is not None
                    dinp = xp.empty_like(inp) if own else dinps[0]
                    run = ctx.sweeps[layer * D + d]
                    grads, ds0 = segments.backward(K, opts, run, inp, dout[:, :, d * P:(d + 1) * P],
                                                   tuple(s[run.index] for s in dstate_n), ctx.lengths, ctx.segments,
                                                   ctx.memory, dinp, own, self.bias, ones, gx, math, ws)
                    for dst, src in zip(dstate0, ds0):
                        dst[run.index] = src
                    new_grads.update({f"{k}{suffix}": g for k, g in grads.items()})
                    if own:
                        dinps.append(dinp)
            dout = dinps[0]
            for dinp in dinps[1:]:
                dout += dinp
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
        if kwargs.get("proj_size"):
            raise ValueError("proj_size is an LSTM option")
        super().__init__(input_size, hidden_size, num_layers, **kwargs)

    @property
    def config(self):
        return {**super().config, "nonlinearity": self.nonlinearity}


class LSTM(_Recurrent):
    """LSTM, gates i, f, g, o: c' = f c + i g, h' = o tanh(c').

    forget_bias: when a number, the forget gate's bias starts there (bias_ih's f slice = forget_bias, bias_hh's = 0,
    so b_f = forget_bias), after `init` drew the rest; a common choice is 1.0.
    proj_size: P > 0 projects h as torch's LSTM does: h' = W_hr (o tanh(c')) with weight_hr_l{k} (P, H), so h and the
    outputs are P wide and weight_hh_l{k} is (4H, P); c stays H wide."""
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
        return {**super().config, "forget_bias": self.forget_bias, "proj_size": self.proj_size}


class GRU(_Recurrent):
    """GRU, gates r, z, n: n = tanh(x W_in^T + b_in + r (h W_hn^T + b_hn)), h' = (1 - z) n + z h."""
    cell = "gru"

    def __init__(self, input_size, hidden_size, num_layers=1, **kwargs):
        if kwargs.get("proj_size"):
            raise ValueError("proj_size is an LSTM option")
        super().__init__(input_size, hidden_size, num_layers, **kwargs)


class LayerNormLSTM(LSTM):
    """LSTM with layer normalisation, LN(v; gamma) = gamma (v - mean v) / sqrt(var v + 1e-5) over each row's 4H
    gate pre-activations (biased variance) and over c:
        a = LN(x W_ih^T; gamma_ih) + LN(h W_hh^T; gamma_hh) + b_ih + b_hh,  gates i, f, g, o as the LSTM's,
        c' = f c + i g,  h' = o tanh(LN(c'; gamma_c) + beta_c).
    Parameters per layer and direction: the LSTM's, plus gamma_ih_l{k}, gamma_hh_l{k} (4H,) starting at 1 and
    gamma_c_l{k}, beta_c_l{k} (H,) at 1 and 0. Everything else as LSTM (zoneout, weight_drop, proj_size, memory)."""
    layer_norm = True


class LayerNormGRU(GRU):
    """GRU with layer normalisation of both projections (LN as in LayerNormLSTM, over each row's 3H entries):
        gi = LN(x W_ih^T; gamma_ih) + b_ih,  gh = LN(h W_hh^T; gamma_hh) + b_hh,
        r = sigmoid(gi_r + gh_r),  z = sigmoid(gi_z + gh_z),  n = tanh(gi_n + r gh_n),  h' = (1 - z) n + z h.
    Parameters: the GRU's, plus gamma_ih_l{k}, gamma_hh_l{k} (3H,) starting at 1."""
    layer_norm = True


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
        ctx = (LayerCtx(self, name, False, (T, B), None, None, lens, [x], [kctx], retain=retain, valid=valid)
               if training else None)
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
