"""One layer and direction of a recurrent layer, run as a chain of segments of steps, forward and backward.

The steps 0..T-1 are cut into segments (``plan``); each segment gets its own input projection GEMM, kernel sweep
(started at the segment's first step, from the state the one before left), and in backward its own sweep back and
weight-gradient GEMMs, summed over the segments last to first. ``memory="full"`` keeps every segment's kernel ctx
from forward; ``memory="checkpoint"`` keeps only the state at each segment's start and, in backward, recomputes the
segment's input projection and forward sweep from it before sweeping back: O(T/k + k) saved steps instead of O(T)
for segments of k ~ sqrt(T) steps, for one more forward's work. Both modes run the very same operations in the same
order on the same operands (a recomputed sweep repeats the forward bit for bit), so their gradients are identical to
the last bit; a single GEMM over all T*B rows would sum in another order than per-segment GEMMs added together.
"""
import math
from dataclasses import dataclass, field

from .backend import array_module

MEMORY_MODES = ("full", "checkpoint")
MIN_SEGMENT_ROWS = 1024   # a segment's GEMMs get at least this many rows (steps x batch) when the plan chooses k


def plan(T, B, steps=None):
    """[(t0, t1), ...] covering 0..T-1 in order: segments of `steps` steps (the last one shorter), or, when None,
    of about max(ceil(sqrt(T)), ceil(MIN_SEGMENT_ROWS / B)) steps, evened out (sizes differ by at most one)."""
    if steps is not None:
        return [(t0, min(t0 + steps, T)) for t0 in range(0, T, steps)]
    k = max(math.isqrt(T - 1) + 1, -(-MIN_SEGMENT_ROWS // B))
    n = -(-T // min(k, T))
    bounds = [T * j // n for j in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class Rows:
    """The rows of a (T, B, ...) array that kernel steps t0..t1-1 of one direction read or write: time itself
    (forward direction), T-1-t (reverse, every length T) or each sequence's own reversal (reverse, ragged:
    `index` (T, B), from layers.reverse_index)."""

    def __init__(self, reverse, T, index=None):
        self.reverse, self.T, self.index = reverse, T, index

    def _where(self, t0, t1):
        if not self.reverse:
            return slice(t0, t1), False
        if self.index is None:
            return slice(self.T - t1, self.T - t0), True
        return (self.index[t0:t1], array_module(self.index).arange(self.index.shape[1])[None, :]), False

    def take(self, a, t0, t1):
        """(t1 - t0, B, ...) C-contiguous: the rows of steps t0..t1-1, in kernel order."""
        where, flip = self._where(t0, t1)
        rows = a[where]
        return array_module(rows).ascontiguousarray(rows[::-1] if flip else rows)

    def put(self, a, t0, t1, v, add=False):
        """a's rows of steps t0..t1-1 set to (or, with add, increased by) v (t1 - t0, B, ...)."""
        where, flip = self._where(t0, t1)
        v = v[::-1] if flip else v
        if add:
            a[where] += v
        else:
            a[where] = v


@dataclass
class Direction:
    """One layer and direction of one forward call: what its sweeps ran with, and what backward needs."""
    cell: str
    index: int              # layer * D + direction: its row of the (L*D, B, .) states
    rows: Rows
    w_ih: object            # (G*H, in)
    w_hh: object            # (G*H, P) as the sweeps saw it (W_hh * mask under weight_drop)
    b_ih: object            # (G*H,) or None
    b_hh: object            # (G*H,)
    variant: dict           # the kernel's variant arguments: ln, zoneout, w_hr (see kernels/__init__.py)
    drop_mask: object = None        # (G*H, P) weight_drop's mask (0 or 1 / (1 - p)), None without
    ctxs: list = field(default_factory=list)     # memory="full": each segment's kernel ctx
    states: list = field(default_factory=list)   # memory="checkpoint": the state at each segment's start

    def kernel_args(self, t0):
        return {**self.variant, **({"t0": t0} if t0 else {})}


def project(gx, math, workspace, d, inp, t0, t1):
    """(n, B, G*H): the input projection x W_ih^T of steps t0..t1-1 of direction d (n = t1 - t0), by the GEMMs of
    array module gx in precision math (layers.matmul)."""
    from .layers import matmul
    x = d.rows.take(inp, t0, t1)
    n, B = x.shape[:2]
    return matmul(gx, workspace, x.reshape(n * B, -1), d.w_ih.T, math).reshape(n, B, -1)


def forward(K, opts, d, inp, state0, lengths, segments, training, memory, out, check, gx, math, workspace):
    """Run direction d over every segment from state0, writing its outputs into `out` (T, B, P) (a view of the
    layer's output); keeps what backward needs in d. check(y, state_n) raises on non-finite outputs. gx, math: the
    GEMMs' array module and precision (layers.matmul). Returns the state after the last step."""
    state = state0
    for t0, t1 in segments:
        xw = project(gx, math, workspace, d, inp, t0, t1)
        y, state_next, kctx = K.forward(d.cell, xw, d.w_hh, d.b_hh, state, lengths, training, b_ih=d.b_ih,
                                        **d.kernel_args(t0), **opts)
        check(y, state_next)
        d.rows.put(out, t0, t1, y)
        if training:
            if memory == "full":
                d.ctxs.append(kctx)
            else:
                d.states.append(state)
        state = state_next
    return state


def add(grads, name, value):
    grads[name] = value if name not in grads else grads[name] + value


def backward(K, opts, d, inp, dout, dstate_n, lengths, segments, memory, dinp, first, bias, ones, gx, math,
             workspace):
    """Direction d's sweep back over the segments, last to first. dout: (T, B, P) its output's gradient (a view);
    dinp: (T, B, in) the layer input's gradient, set (first direction) or increased. Returns (grads, dstate0):
    grads maps "weight_ih", "weight_hh", "bias_ih", "bias_hh" (with `bias`) and the variant's parameters
    ("gamma_ih", ..., "weight_hr") to this direction's gradients. ones: (rows,) at least a segment's n*B. gx, math:
    the GEMMs' array module and precision (layers.matmul)."""
    from .layers import matmul
    grads, dstate = {}, dstate_n
    for j in reversed(range(len(segments))):
        t0, t1 = segments[j]
        if memory == "full":
            kctx = d.ctxs[j]
        else:
            xw = project(gx, math, workspace, d, inp, t0, t1)
            kctx = K.forward(d.cell, xw, d.w_hh, d.b_hh, d.states[j], lengths, True, b_ih=d.b_ih,
                             **d.kernel_args(t0), **opts)[2]
        dparams = {} if "ln" in d.variant or "w_hr" in d.variant else None
        dgx, dgh, dstate = K.backward(kctx, d.rows.take(dout, t0, t1), dstate,
                                      **({} if dparams is None else {"dparams": dparams}))
        n, B, GH = dgx.shape
        P = kctx.h0.shape[1]
        # W_hh sees h_prev: the segment's h0 at its first step, then y[t-1] (kernel time order); the GPU sweeps keep
        # them as one (n, B, P) buffer, so dW_hh is one GEMM over all n*B rows
        h_prev = getattr(kctx, "h_prev", None)
        if h_prev is not None:
            gw = matmul(gx, workspace, dgh.reshape(-1, GH).T, h_prev.reshape(-1, P), math)        # (G*H, P)
        else:
            gw = matmul(gx, workspace, dgh[0].T, kctx.h0, math)
            if n > 1:
                gw += matmul(gx, workspace, dgh[1:].reshape(-1, GH).T, kctx.y[:-1].reshape(-1, P), math)
        add(grads, "weight_hh", gw)
        x2d = d.rows.take(inp, t0, t1).reshape(n * B, -1)
        dgx2d = dgx.reshape(n * B, GH)
        add(grads, "weight_ih", matmul(gx, workspace, dgx2d.T, x2d, math))                # (G*H, in)
        d.rows.put(dinp, t0, t1, matmul(gx, workspace, dgx2d, d.w_ih, math).reshape(n, B, -1), add=not first)
        dparams = dparams or {}
        if bias and "bias_hh" not in dparams:          # with ln, the kernel sums the biases' gradients (after LN)
            dgh_sum = ones[:n * B] @ dgh.reshape(n * B, GH)                              # (G*H,)
            add(grads, "bias_hh", dgh_sum)
            add(grads, "bias_ih", dgh_sum if dgh is dgx else ones[:n * B] @ dgx2d)
        for name, g in dparams.items():
            if bias or not name.startswith("bias"):
                add(grads, name, g)
    if d.drop_mask is not None:                 # the sweeps ran with W_hh * mask
        grads["weight_hh"] = grads["weight_hh"] * d.drop_mask
    return grads, dstate
