"""Linear, Embedding, Dropout, Sequential and the losses (softmax cross-entropy, MSE, BCE with logits):
forward/ctx/backward, no autograd.

Each `forward` returns its result and a ctx (None with training=False); `backward(ctx, d...)` returns the
gradient for the input and, for the modules, adds the parameter gradients into `grads`. Losses return a Python
float and need no parameters.
"""
from dataclasses import dataclass

import numpy as np

from . import checks
from .backend import array_device, array_module
from .module import Module, Parameter  # noqa: F401 (part of gpurnn.nn's API)
from .sequential import Sequential  # noqa: F401 (part of gpurnn.nn's API)


@dataclass
class SavedCtx:
    """What one `forward` call leaves for its `backward`: private arrays, never the caller's."""
    owner: object
    saved: tuple
    retain: bool = False    # backward may run on it more than once
    used: bool = False      # a backward has run on it


def saved(ctx, owner):
    """What `owner`'s forward saved in `ctx` (checked to be its own)."""
    return checks.check_ctx(ctx, owner, SavedCtx).saved


def float_input(a, name):
    """`a` as a float32/float64 array on its own device, checked for NaN/Inf."""
    if a is None:
        raise TypeError(f"{name} must be an array, got None")
    where = array_device(a)
    a = checks.convert(a, where, name)
    if a.dtype not in checks.FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got dtype {a.dtype.name}")
    return checks.array(a, name, where, a.dtype)


def integer_input(a, name, device):
    """`a` as an integer array on `device` (any shape)."""
    if a is None:
        raise TypeError(f"{name} must be an integer array, got None")
    where = array_device(a)
    if where != device:
        raise ValueError(f"{name} is on device '{where}' but must be on '{device}'")
    a = checks.convert(a, device, name)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer indices, got dtype {a.dtype.name}")
    return a


def scatter_add(target, index, values):
    """target[index[n]] += values[n], repeated indices summed.  target (V, E), index (N,), values (N, E)."""
    xp = array_module(target)
    if xp is np:
        np.add.at(target, index, values)
    else:
        import cupyx
        cupyx.scatter_add(target, index, values)


class Linear(Module):
    """y = x W^T + b.  weight (O, I), bias (O,), both U(-1/sqrt(I), 1/sqrt(I))."""

    def __init__(self, in_features, out_features, bias=True, dtype="float32", seed=None):
        I = checks.positive_int(in_features, "in_features")
        O = checks.positive_int(out_features, "out_features")
        bias = checks.flag(bias, "bias")
        checks.fits_in_memory(O * (I + bias), checks.float_dtype(dtype), f"Linear({I}, {O})")
        super().__init__(dtype, "auto", seed)
        self.in_features, self.out_features = I, O
        bound = 1.0 / np.sqrt(I)
        self.add_param("weight", (O, I), bound)
        if bias:
            self.add_param("bias", (O,), bound)

    @property
    def config(self):
        return dict(kind="Linear", in_features=self.in_features, out_features=self.out_features,
                    bias="bias" in self.params, dtype=self.dtype.name)

    def __repr__(self):
        return (f"Linear({self.in_features}, {self.out_features}, bias={'bias' in self.params}, "
                f"dtype={self.dtype.name}, device={self.device!r})")

    def forward(self, x, training=None, retain=False):
        """y (..., O), ctx. x: (..., I). The ctx keeps a copy of x; it serves one backward unless `retain`.
        NaN/Inf in x or the parameters, or an overflowing y, raise checks.NonFiniteError (see checks.CHECK_FINITE)."""
        training = self.is_training(training)
        x = checks.array(x, "x", self.device, self.dtype, finite=checks.finite_checks(self))
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (..., {self.in_features}) (in_features last), got {tuple(x.shape)}")
        checks.ensure_finite(self, self.params, lambda k: f"{k} contains NaN or Inf")
        y = x.reshape(-1, self.in_features) @ self.params["weight"].T       # (N, O)
        if "bias" in self.params:
            y += self.params["bias"]
        checks.ensure_finite(self, {"y": y}, lambda _: "the output of Linear is not finite: overflow")
        return y.reshape(x.shape[:-1] + (self.out_features,)), (SavedCtx(self, (x.copy(),), retain) if training
                                                                else None)

    @checks.consumes_ctx
    def backward(self, ctx, dy):
        """dx (..., I). dy: (..., O). Adds dW = dy^T x and db = sum dy into grads."""
        (x,) = saved(ctx, self)
        dy = checks.array(dy, "dy", self.device, self.dtype, x.shape[:-1] + (self.out_features,),
                          finite=checks.finite_checks(self))
        dy2d, x2d = dy.reshape(-1, self.out_features), x.reshape(-1, self.in_features)   # (N, O), (N, I)
        new_grads = {"weight": dy2d.T @ x2d}
        if "bias" in self.params:
            new_grads["bias"] = dy2d.sum(axis=0)
        dx = dy2d @ self.params["weight"]
        checks.ensure_finite(self, {**new_grads, "x": dx}, lambda k: f"the gradient of {k} is not finite: overflow")
        for k, g in new_grads.items():
            self.grads[k] += g
        return dx.reshape(x.shape)


class Embedding(Module):
    """y = weight[ids].  weight (V, E) ~ N(0, 1); the row `padding_idx` is zero and takes no gradient."""
    input_grad = False      # ids take no gradient: backward returns None

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, dtype="float32", seed=None):
        V = checks.positive_int(num_embeddings, "num_embeddings")
        E = checks.positive_int(embedding_dim, "embedding_dim")
        if padding_idx is not None:
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, (int, np.integer)) \
                    or not -V <= padding_idx < V:
                raise ValueError(f"padding_idx must be an integer in -{V}..{V - 1} or None, got {padding_idx!r}")
            padding_idx = int(padding_idx) % V
        checks.fits_in_memory(V * E, checks.float_dtype(dtype), f"Embedding({V}, {E})")
        super().__init__(dtype, "auto", seed)
        self.num_embeddings, self.embedding_dim = V, E
        self.padding_idx = padding_idx
        self.params["weight"] = self.rng.standard_normal((V, E)).astype(self.dtype)
        if padding_idx is not None:
            self.params["weight"][padding_idx] = 0
        self.grads["weight"] = np.zeros((V, E), self.dtype)

    @property
    def config(self):
        return dict(kind="Embedding", num_embeddings=self.num_embeddings, embedding_dim=self.embedding_dim,
                    padding_idx=self.padding_idx, dtype=self.dtype.name)

    def __repr__(self):
        return (f"Embedding({self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, "
                f"dtype={self.dtype.name}, device={self.device!r})")

    def forward(self, ids, training=None, retain=False):
        """y (..., E), ctx. ids: integer array of any shape, each in 0..V-1. The ctx keeps a copy of ids; it serves
        one backward unless `retain`. NaN/Inf in the rows looked up raise checks.NonFiniteError."""
        training = self.is_training(training)
        ids = integer_input(ids, "ids", self.device)
        bad = (ids < 0) | (ids >= self.num_embeddings)
        if bool(bad.any()):
            values = sorted({int(v) for v in ids[bad].ravel()[:5].tolist()})
            raise ValueError(f"ids must lie in 0..{self.num_embeddings - 1} (num_embeddings), "
                             f"got out-of-range ids {values}")
        y = self.params["weight"][ids]
        checks.ensure_finite(self, {"weight": y}, lambda k: f"{k} contains NaN or Inf (in the rows of ids)")
        return y, (SavedCtx(self, (ids.copy(),), retain) if training else None)

    @checks.consumes_ctx
    def backward(self, ctx, dy):
        """None (ids take no gradient). dy: (..., E). Adds dW[v] = sum of dy over the positions holding id v."""
        (ids,) = saved(ctx, self)
        dy = checks.array(dy, "dy", self.device, self.dtype, ids.shape + (self.embedding_dim,),
                          finite=checks.finite_checks(self))
        flat = ids.reshape(-1)                                   # (N,)
        dy2d = dy.reshape(-1, self.embedding_dim)                # (N, E)
        if self.padding_idx is not None:
            dy2d = self.xp.where((flat == self.padding_idx)[:, None], 0, dy2d).astype(self.dtype, copy=False)
        scatter_add(self.grads["weight"], flat, dy2d)     # finite dy: only a sum past float max could overflow
        return None


class Dropout(Module):
    """y = x * mask in training, mask = 0 with probability p, else 1 / (1 - p) (drawn per element on x's device:
    the module's seeded generator on the CPU, the array module's on a GPU), so E[y] = x; y = x in eval."""

    def __init__(self, p=0.5, seed=None):
        p = checks.number(p, "p", 0.0, 1.0)
        super().__init__(None, "auto", seed)
        self.p = p

    @property
    def config(self):
        return {"kind": "Dropout", "p": self.p}

    def __repr__(self):
        return f"Dropout(p={self.p})"

    def forward(self, x, training=None, retain=False):
        """y like x, ctx (serving one backward unless `retain`). x: a float array of any shape."""
        training = self.is_training(training)
        x = float_input(x, "x")
        if not training:
            return x, None
        mask = self.dropout_mask(x, self.p) if self.p else None
        return (x if mask is None else x * mask), SavedCtx(self, (x, mask), retain)   # backward reads x's shape

    @checks.consumes_ctx
    def backward(self, ctx, dy):
        """dx = dy * mask. dy: like x."""
        x, mask = saved(ctx, self)
        dy = checks.array(dy, "dy", array_device(x), x.dtype, tuple(x.shape))
        return dy if mask is None else dy * mask


class Loss:
    """Shared by the losses: `reduction` and backward = the gradient worked out in forward, times dloss.
    Calling a loss is its forward: `loss, ctx = criterion(pred, target)`."""

    def __init__(self, reduction="mean"):
        self.reduction = checks.choice(reduction, "reduction", ("mean", "sum"))

    def __call__(self, pred, target):
        return self.forward(pred, target)

    def __repr__(self):
        return f"{type(self).__name__}(reduction={self.reduction!r})"

    def backward(self, ctx, dloss=1.0):
        """dL/dpred, shaped like pred, for an upstream gradient `dloss` (a number) on the loss."""
        (dpred,) = saved(ctx, self)
        try:
            dloss = float(dloss)
        except (TypeError, ValueError):
            raise TypeError(f"dloss must be a number, got {type(dloss).__name__}") from None
        if not np.isfinite(dloss):
            raise ValueError(f"dloss must be finite, got {dloss}")
        return dpred * dloss


class SoftmaxCrossEntropy(Loss):
    """-log softmax(pred)[target], averaged over the targets that are not `ignore_index` (or summed).

    pred: (..., C) logits; target: (...) integer classes in 0..C-1 or ignore_index.
    With every target ignored the loss is 0 and its gradient is zero.
    """

    def __init__(self, ignore_index=-100, reduction="mean"):
        super().__init__(reduction)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
            raise TypeError(f"ignore_index must be an integer, got {ignore_index!r}")
        self.ignore_index = int(ignore_index)

    def __repr__(self):
        return f"SoftmaxCrossEntropy(ignore_index={self.ignore_index}, reduction={self.reduction!r})"

    def forward(self, pred, target):
        """loss (float), ctx."""
        pred = float_input(pred, "pred")
        if pred.ndim == 0 or pred.shape[-1] == 0:
            raise ValueError(f"pred must have shape (..., C) with C >= 1 classes, got {tuple(pred.shape)}")
        target = integer_input(target, "target", array_device(pred))
        if tuple(target.shape) != tuple(pred.shape[:-1]):
            raise ValueError(f"target must have shape {tuple(pred.shape[:-1])} (pred's without the class axis), "
                             f"got {tuple(target.shape)}")
        xp = array_module(pred)
        C = pred.shape[-1]
        z = pred.reshape(-1, C)                                       # (N, C)
        t = target.reshape(-1)                                        # (N,)
        keep = t != self.ignore_index                                 # (N,)
        bad = keep & ((t < 0) | (t >= C))
        if bool(bad.any()):
            values = sorted({int(v) for v in t[bad][:5].tolist()})
            raise ValueError(f"target must hold classes in 0..{C - 1} or ignore_index={self.ignore_index}, "
                             f"got {values}")
        rows = xp.arange(z.shape[0])
        t_safe = xp.where(keep, t, 0)
        # log softmax(z)_c = s_c - lse,  s = z - max z (exp cannot overflow),  lse = log sum_c exp(s_c)
        shifted = z - z.max(axis=1, keepdims=True)                     # (N, C) s
        lse = xp.log(xp.exp(shifted).sum(axis=1))                      # (N,)
        losses = xp.where(keep, lse - shifted[rows, t_safe], 0)        # (N,)
        count = int(keep.sum())
        scale = 1.0 / count if (self.reduction == "mean" and count) else 1.0
        # dL/dz_c = scale * (softmax_c - [c == t]) at kept rows, 0 at ignored ones
        dz = xp.exp(shifted - lse[:, None])
        dz[rows, t_safe] -= 1
        dz *= (keep * scale).astype(z.dtype)[:, None]
        return float(losses.sum()) * scale, SavedCtx(self, (dz.reshape(pred.shape),))


class ElementwiseLoss(Loss):
    """A loss that is a sum (or mean) over elements of f(pred, target); pred and target share one shape."""

    def forward(self, pred, target):
        """loss (float), ctx. pred: any shape, float; target: same shape, real numbers (cast to pred's dtype)."""
        pred = float_input(pred, "pred")
        if pred.size == 0:
            raise ValueError("pred must have at least one element")
        if target is None:
            raise TypeError("target must be an array, got None")
        target = checks.convert(target, array_device(target), "target")
        if target.dtype.kind not in "biuf":
            raise TypeError(f"target must hold real numbers, got dtype {target.dtype.name}")
        target = checks.array(target.astype(pred.dtype, copy=False), "target", array_device(pred), pred.dtype,
                              tuple(pred.shape))
        scale = 1.0 / pred.size if self.reduction == "mean" else 1.0
        losses, dpred = self.elementwise(pred, target)
        return float(losses.sum()) * scale, SavedCtx(self, (dpred * scale,))


class MSELoss(ElementwiseLoss):
    """(pred - target)^2, averaged over elements (or summed)."""

    @staticmethod
    def elementwise(x, y):
        diff = x - y
        return diff * diff, 2 * diff                                   # d/dx (x - y)^2 = 2 (x - y)


class BCEWithLogitsLoss(ElementwiseLoss):
    """Binary cross-entropy of sigmoid(pred) against target in [0, 1], averaged over elements (or summed).

    -[y log s(x) + (1 - y) log(1 - s(x))] = max(x, 0) - x y + log(1 + e^-|x|), finite for every x.
    """

    @staticmethod
    def elementwise(x, y):
        xp = array_module(x)
        e = xp.exp(-xp.abs(x))                                         # e^-|x| in (0, 1]: never overflows
        losses = xp.maximum(x, 0) - x * y + xp.log1p(e)
        # d/dx = s(x) - y,  s(x) = 1 / (1 + e) for x >= 0 and e / (1 + e) for x < 0: relatively accurate for every
        # x, also where s(x) is tiny (from 1 + tanh(x/2) it would keep only the digits that survive the cancellation)
        return losses, xp.where(x < 0, e, xp.ones_like(e)) / (1 + e) - y
