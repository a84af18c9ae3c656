"""Gradient clipping in place: one global norm over all gradients, or a clamp of every value (torch semantics).

`grads` may be a module (its `.grads`), a dict name -> array, an array, or an iterable of any of these.
On GPU arrays the norm stays on the device; the only host sync is the returned float.
"""
import math

import numpy as np

from .backend import array_module
from .checks import number


def is_array(a):
    return isinstance(a, np.ndarray) or type(a).__module__.split(".")[0] == "cupy"


def gradient_arrays(grads, name="grads"):
    """The arrays held by `grads` (module, dict, array, or an iterable of these), each a float array."""
    if is_array(grads):
        if grads.dtype.kind != "f":
            raise TypeError(f"{name} must hold float arrays, got dtype {grads.dtype.name}")
        return [grads]
    if isinstance(getattr(grads, "grads", None), dict):
        return gradient_arrays(list(grads.grads.values()), f"{name}.grads")
    if isinstance(grads, dict):
        return gradient_arrays(list(grads.values()), name)
    if isinstance(grads, (str, bytes)) or not hasattr(grads, "__iter__"):
        raise TypeError(f"{name} must be a module, a dict of arrays, an array or an iterable of these, "
                        f"got {type(grads).__name__}")
    return [a for i, item in enumerate(grads) for a in gradient_arrays(item, f"{name}[{i}]")]


def vector_norm(values, norm_type, xp):
    """||values||_p of a 1-D array; p = inf gives max |v|."""
    if norm_type == math.inf:
        return xp.abs(values).max()
    return xp.linalg.norm(values, norm_type)


def clip_grad_norm(grads, max_norm, norm_type=2.0, error_if_nonfinite=False):
    """Scale every gradient in place by min(1, max_norm / (total + 1e-6)); returns total (float), before clipping.

    total = || (||g_1||_p, ..., ||g_n||_p) ||_p, the p-norm of all gradients taken as one vector.
    error_if_nonfinite: raise ValueError (and leave the gradients as they were) when total is NaN or Inf.
    """
    max_norm = number(max_norm, "max_norm")
    norm_type = number(norm_type, "norm_type", low_open=True)
    arrays = [g for g in gradient_arrays(grads) if g.size]
    if not arrays:
        return 0.0
    groups = {}                                    # array module -> its arrays (one per device kind)
    for g in arrays:
        groups.setdefault(array_module(g), []).append(g)
    totals = {xp: vector_norm(xp.stack([vector_norm(g.ravel(), norm_type, xp) for g in gs]), norm_type, xp)
              for xp, gs in groups.items()}        # device scalars, no sync
    if len(totals) == 1:
        (total,) = totals.values()
    else:                                          # arrays on several devices: combine on the host
        total = vector_norm(np.array([float(t) for t in totals.values()]), norm_type, np)
    host_total = None
    if error_if_nonfinite:
        host_total = float(total)
        if not math.isfinite(host_total):
            raise ValueError(f"the total {norm_type}-norm of the gradients is {host_total}; "
                             f"pass error_if_nonfinite=False to scale them anyway")
    for gxp, gs in groups.items():
        coef = gxp.minimum(gxp.asarray(max_norm / (total + 1e-6)), 1.0)
        if gxp is np and coef >= 1:                 # nothing to do, and checking costs nothing on the CPU
            continue
        for g in gs:
            g *= coef
    return host_total if host_total is not None else float(total)


def clip_grad_value(grads, clip_value):
    """Clamp every gradient value in place to [-clip_value, clip_value]."""
    clip_value = number(clip_value, "clip_value", high_open=True)
    for g in gradient_arrays(grads):
        array_module(g).clip(g, -clip_value, clip_value, out=g)
