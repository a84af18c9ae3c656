"""CUDA graphs of the GPU backends' per-step sweeps: the T GEMMs and T pointwise launches of a sweep (Jordan: 2T
each), each costing the host 5-20 us to issue, captured once into a graph that later calls launch in one call.

`run(xp, key, inputs, allocate, body, keep)` serves one sweep. A graph works on buffers of its own, allocated when it
is captured: each call copies its inputs into them, launches the graph, and copies the outputs it keeps out into
fresh arrays, all on the current stream, with nothing waiting on the host. The first call of a key runs the sweep
plainly on those buffers (compiling the kernels, creating the cuBLAS handle, and giving that call's results), then
captures it on a private stream; while capturing, device allocation is refused (a buffer of CuPy's pool taken and
given back during capture would be baked into the graph and later reused by someone else). If capture fails, that
key runs plainly from then on, after one warning.

Key: what fixes the launches and the buffers (backend, sweep, cell, T, B, H, dtype, training, math, device), plus
the current stream, so that each stream owns its graphs (the two directions of a bidirectional layer run on two
streams at once), and the names, shapes and dtypes of the inputs.

The cache holds at most MAX_ENTRIES graphs and MAX_BYTES of their buffers, least recently used dropped first; a
sweep whose buffers alone exceed MAX_BYTES runs plainly. `clear()` empties it (and forgets failures). ENABLED
(GPURNN_CUDA_GRAPHS=0 in the environment sets it False) turns graphs off: every sweep runs plainly.
"""
import collections
import contextlib
import os
import threading
import warnings
from dataclasses import dataclass

ENABLED = os.environ.get("GPURNN_CUDA_GRAPHS", "1") != "0"
MAX_ENTRIES = 16
MAX_BYTES = 2 << 30

stats = collections.Counter()      # "captured", "replayed", "plain", "failed": calls of each kind in this process
_cache = collections.OrderedDict()
_failed = set()
_lock = threading.Lock()


@dataclass
class Entry:
    graph: object
    buffers: dict          # name -> the graph's own array (inputs first)
    inputs: tuple          # names of the buffers each call copies in
    nbytes: int


def clear():
    """Drop every captured graph and its buffers, and forget which keys failed to capture."""
    with _lock:
        _cache.clear()
        _failed.clear()


def cached():
    """Number of graphs held."""
    return len(_cache)


def _run_plain(inputs, allocate, body, keep):
    buffers = {**inputs, **allocate(inputs)}
    body(buffers)
    return {k: buffers[k] for k in keep}


def _refuse(nbytes):
    raise MemoryError(f"device allocation of {nbytes} bytes while capturing a CUDA graph")


@contextlib.contextmanager
def _capture_guard(xp):
    """CuPy's pool refuses to allocate on this thread (the stand-in refuses by itself)."""
    using = getattr(xp.cuda, "using_allocator", None)
    with (using(_refuse) if using is not None else contextlib.nullcontext()):
        yield


def _capture(xp, body, buffers):
    stream = xp.cuda.Stream(non_blocking=True)
    with _capture_guard(xp), stream:
        stream.begin_capture()
        try:
            body(buffers)
        finally:
            graph = stream.end_capture()
    return graph


def run(xp, key, inputs, allocate, body, keep):
    """The arrays named in `keep` after `body` ran the sweep.

    inputs: name -> the caller's array (read, never written); allocate(inputs) -> name -> the sweep's other arrays
    (outputs, state, scratch), shaped from the inputs; body(buffers): the sweep's device work on inputs + allocated
    arrays, with no allocation, no host read of device memory and no synchronisation, so it can be captured.
    """
    if not ENABLED:
        return _run_plain(inputs, allocate, body, keep)
    key = (key, xp.cuda.get_current_stream().ptr,
           tuple((k, tuple(v.shape), str(v.dtype)) for k, v in inputs.items()))
    with _lock:
        entry = _cache.get(key)
        if entry is not None:
            _cache.move_to_end(key)
        failed = key in _failed
    if failed:
        stats["plain"] += 1
        return _run_plain(inputs, allocate, body, keep)
    if entry is not None:
        for name in entry.inputs:
            xp.copyto(entry.buffers[name], inputs[name])
        entry.graph.launch()
        stats["replayed"] += 1
        return {k: entry.buffers[k].copy() for k in keep}
    copies = {}
    for name, a in inputs.items():
        copies[name] = xp.empty_like(a)
        xp.copyto(copies[name], a)
    buffers = {**copies, **allocate(copies)}
    nbytes = sum(a.nbytes for a in buffers.values() if a is not None and a.base is None)     # views once
    if nbytes > MAX_BYTES:
        stats["plain"] += 1
        body(buffers)
        return {k: buffers[k] for k in keep}
    body(buffers)
    out = {k: buffers[k].copy() for k in keep}
    try:
        graph = _capture(xp, body, buffers)
    except Exception as e:   # noqa: BLE001 - whatever refused the capture, plain launches do the work
        with _lock:
            _failed.add(key)
        stats["failed"] += 1
        warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {e}); this sweep's launches run one by one",
                      RuntimeWarning, stacklevel=3)
        return out
    with _lock:
        _cache[key] = Entry(graph, buffers, tuple(inputs), nbytes)
        while len(_cache) > MAX_ENTRIES or sum(e.nbytes for e in _cache.values()) > MAX_BYTES:
            _cache.popitem(last=False)
    stats["captured"] += 1
    return out
