"""Validation of user input: every error names the argument and what was expected. Nothing here mutates."""
import functools
import math
import os

import numpy as np

from .backend import array_device, array_module, as_array, to_host, xp_for

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class NonFiniteError(ValueError):
    """An array holds NaN or Inf: bad input from a user, or a diverged value mid-training."""


CHECK_FINITE = None
"""Whether layers check for NaN and Inf, unless a module's own `check_finite` attribute says otherwise (None: follow
this). None (the default): on for data on the CPU, off on a GPU, where each check would make the host wait for the
device (a synchronisation per call, which also stops the two directions of a bidirectional layer from overlapping).
True / False: on / off everywhere. On: inputs, states and upstream gradients (named), parameters at forward
(named), each sweep's output and every gradient before it is added into `grads` raise NonFiniteError, and a failed
call changes nothing. Off: NaN and Inf flow through to the loss unchecked. Losses follow this default."""


def default_finite(device):
    """What CHECK_FINITE means for data on `device`."""
    return device == "cpu" if CHECK_FINITE is None else bool(CHECK_FINITE)


def finite_checks(module=None):
    """True when `module` (None: no module, on the CPU) checks for NaN/Inf: its `check_finite`, else CHECK_FINITE
    for the module's device."""
    own = getattr(module, "check_finite", None)
    return default_finite(getattr(module, "device", "cpu")) if own is None else bool(own)


def ensure_finite(module, arrays, message):
    """NonFiniteError(message(name)) for the first of `arrays` (name -> array or None) holding NaN or Inf, when
    `module` checks (see finite_checks). All arrays are tested on their device and read back in one transfer."""
    if not finite_checks(module):
        return
    raise_deferred()
    named = [(k, a) for k, a in arrays.items() if a is not None and a.size]
    if not named:
        return
    xp = array_module(named[0][1])
    ok = to_host(xp.stack([xp.isfinite(a).all() for _, a in named]))
    for (name, _), good in zip(named, ok):
        if not good:
            raise NonFiniteError(message(name))


def float_dtype(dtype):
    """np.dtype for a layer's `dtype` argument; only float32 and float64 are supported."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be 'float32' or 'float64', got {dtype!r}") from None
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be 'float32' or 'float64', got {dt.name}")
    return dt


def positive_int(value, name, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def flag(value, name):
    """`value` as a bool: only True/False (or numpy.bool_), never a string or a number."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def seed(value, name="seed"):
    """A random seed: None (fresh entropy) or an integer >= 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be None or an integer >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be None or an integer >= 0, got {value!r}")
    return int(value)


def fits_in_memory(count, dtype, what):
    """ValueError when `count` parameters of `dtype` (and as many gradients) exceed this machine's memory."""
    need = 2 * int(count) * np.dtype(dtype).itemsize
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        have = None
    if have is not None and need > have:
        raise ValueError(f"{what} would need {count:,} parameters: {need / 2 ** 30:,.1f} GiB with their gradients, "
                         f"more than this machine's {have / 2 ** 30:,.1f} GiB of memory; choose smaller sizes")


def number(value, name, low=0.0, high=math.inf, low_open=False, high_open=False):
    """`value` as a float in [low, high] (ends open where asked); ValueError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if math.isnan(value) or too_low or too_high:
        bounds = ("(" if low_open else "[") + f"{low}, {high}" + (")" if high_open else "]")
        raise ValueError(f"{name} must lie in {bounds}, got {value}")
    return value


def nonnegative(value, name):
    """A finite number >= 0 (learning rates, weight decay, momentum, ...)."""
    return number(value, name, 0.0, math.inf, high_open=True)


def choice(value, name, options):
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value


def convert(a, device, name):
    """as_array, with one clear line for what NumPy cannot make an array of (ragged nested lists)."""
    try:
        a = as_array(a, device, name)
    except ValueError as err:
        raise ValueError(f"{name} must be an array or nested lists of equal lengths (rectangular); "
                         f"NumPy could not convert it: {err}") from None
    if a.dtype == object:
        raise TypeError(f"{name} must hold numbers, got dtype object (a ragged nested list or mixed types?)")
    return a


def array(a, name, device, dtype, shape=None, ndim=None, finite=None):
    """`a` as an xp array on `device` with `dtype`, checked for shape (None entries match any size) and, when
    `finite` (None: default_finite(device)), for NaN/Inf."""
    if a is None:
        raise TypeError(f"{name} must be an array, got None")
    where = array_device(a)
    if where != device:
        raise ValueError(f"{name} is on device '{where}' but the parameters are on '{device}'; "
                         f"move the data or call layer.to('{where}')")
    a = convert(a, device, name)
    if a.dtype != dtype:
        kind = "integer" if a.dtype.kind in "iub" else a.dtype.name
        raise TypeError(f"{name} must have dtype {dtype.name}, got {kind} ({a.dtype.name})")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(a.shape)}")
    if shape is not None:
        if len(shape) != a.ndim or any(s is not None and s != d for s, d in zip(shape, a.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(a.shape)}")
    if (default_finite(device) if finite is None else finite) and a.size and \
            not bool(xp_for(device).isfinite(a).all()):
        raise NonFiniteError(f"{name} contains NaN or Inf")
    return a


def lengths(lengths, batch, steps, device):
    """(`lengths` (B,) as int32 on `device`, each in 1..T; whether any is below T). None: every sequence has T steps.

    Host lengths (NumPy, lists) are checked on the host and copied to the device. Lengths already on the GPU are not
    read back (that would wait for the device): their dtype and shape are checked on the host, their range on the
    device, by a check that `raise_deferred` reads at the next point where the host waits anyway; until then an
    out-of-range value is clipped into 0..T (0: the sequence keeps its state and outputs zeros), and the whole
    batch counts as ragged (any length may be below T)."""
    xp = xp_for(device)
    if lengths is None:
        return xp.full((batch,), steps, dtype=np.int32), False
    if device == "cuda" and array_device(lengths) == "cuda":
        return device_lengths(xp.asarray(lengths), batch, steps), True
    host = to_host(lengths)
    if host.dtype.kind not in "iu":
        raise TypeError(f"lengths must be integers, got dtype {host.dtype.name}")
    if host.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},) (one per batch entry), got {host.shape}")
    if host.min() < 1 or host.max() > steps:
        raise ValueError(f"lengths must lie in 1..{steps} (T), got min {host.min()} and max {host.max()}")
    return xp.asarray(host.astype(np.int32)), bool((host < steps).any())


def device_lengths(lengths, batch, steps):
    """GPU `lengths` checked without a host read: see `lengths`."""
    if lengths.dtype.kind not in "iu":
        raise TypeError(f"lengths must be integers, got dtype {lengths.dtype.name}")
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},) (one per batch entry), got {lengths.shape}")
    xp = array_module(lengths)
    defer(xp.logical_or(lengths < 1, lengths > steps).any(),
          f"lengths given on the GPU must lie in 1..{steps} (T); some did not (they ran clipped into 0..{steps})")
    return xp.clip(lengths, 0, steps).astype(np.int32)


_deferred = []   # (0-d device bool: the check failed, message), oldest first
MAX_DEFERRED = 64


def defer(failed, message):
    """Queue a check computed on the device: `failed` a 0-d device bool, `message` the ValueError's text."""
    _deferred.append((failed, message))
    del _deferred[:-MAX_DEFERRED]


def raise_deferred():
    """Read the queued device-side checks in one transfer (a host synchronisation) and raise ValueError for the
    first that failed; the queue is then empty. Layers call it only where they synchronise anyway (a NaN/Inf check
    that is on); call it yourself where your loop waits for the device (after reading the loss, say)."""
    if not _deferred:
        return
    pending, _deferred[:] = list(_deferred), []
    xp = array_module(pending[0][0])
    failed = to_host(xp.stack([f for f, _ in pending]))
    for (_, message), bad in zip(pending, failed):
        if bad:
            raise ValueError(message)


def check_ctx(ctx, owner, kind):
    """`ctx` when it is a `kind` made by `owner`'s forward and not yet used by a backward (unless made with
    retain=True); TypeError or ValueError saying what it is instead. The backward marks it used (`ctx.used = True`)
    once it has succeeded, so a backward that raised leaves it usable."""
    name = type(owner).__name__
    if not isinstance(ctx, kind):
        raise TypeError(f"ctx must be the ctx returned by this {name}'s forward(training=True), "
                        f"got {type(ctx).__name__}")
    if ctx.owner is not owner:
        raise ValueError(f"ctx was made by the forward of another {type(ctx.owner).__name__} ({ctx.owner!r}), "
                         f"not of this {name} ({owner!r}); pass the ctx that this {name}'s forward returned")
    if ctx.used and not ctx.retain:
        raise ValueError("this ctx was already used by backward; pass retain=True to forward to backpropagate "
                         "through it again")
    return ctx


def consumes_ctx(backward):
    """Decorates a backward(self, ctx, ...) whose ctx has `retain` and `used` (checked by check_ctx): marks the
    ctx used once backward has returned, so it serves one backward unless made with retain=True, and one that
    raised leaves it usable."""
    @functools.wraps(backward)
    def run(self, ctx, *args, **kwargs):
        out = backward(self, ctx, *args, **kwargs)
        ctx.used = True
        return out
    return run


def mapping_problems(expected, mapping, label=None):
    """Each way `mapping` (name -> array-like) misses `expected` (name -> array): missing keys, unexpected keys,
    entries of another shape; [] when it matches. `label` names the mapping in every line."""
    head, entry = (f"{label}: ", lambda k: f"{label}[{k}]") if label else ("", str)
    missing = [k for k in expected if k not in mapping]
    unexpected = [k for k in mapping if k not in expected]
    return ([f"{head}missing keys: {', '.join(missing)}"] if missing else []) + \
        ([f"{head}unexpected keys: {', '.join(unexpected)}"] if unexpected else []) + \
        [f"{entry(k)}: expected shape {tuple(p.shape)}, got {tuple(np.shape(mapping[k]))}"
         for k, p in expected.items() if k in mapping and tuple(np.shape(mapping[k])) != tuple(p.shape)]
