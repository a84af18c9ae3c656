"""Workspace: host arrays a layer reuses across calls, so a training loop stops paying page faults for fresh ones.

A fresh (T, B, 4H) buffer per step is memory the C library may hand back to the kernel between steps, and the next
step faults it in again page by page. A workspace keeps the large buffers and hands one out again only when nothing
outside the workspace refers to it any more (no ctx, no returned y or dx, no view of either): reuse never changes a
result, two forwards may be in flight, and a ctx can go through backward any number of times. What it costs is
memory: the largest set of buffers that were alive at once stays allocated between calls, until the workspace is
dropped (``layer.workspace(False)``) or ``clear()``-ed.
"""
import sys
import threading

import numpy as np


def _refcount(arrays, k):
    return sys.getrefcount(arrays[k])


_FREE = _refcount([np.empty(1)], 0)   # what _refcount reads for a buffer only its list holds


class Workspace:
    """Reusable NumPy buffers, by size. ``empty(shape, dtype)`` is np.empty, served from the pool when it can be.

    min_bytes: smaller requests go to np.empty (malloc reuses small blocks without faults).
    max_buffers: at most this many buffers are kept; past it, the least recently used free one is dropped.
    """

    def __init__(self, min_bytes=1 << 16, max_buffers=32):
        self.min_bytes, self.max_buffers = int(min_bytes), int(max_buffers)
        self._buffers = []           # 1-D uint8 arrays, least recently handed out first
        self._lock = threading.Lock()

    def empty(self, shape, dtype):
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes < self.min_bytes:
            return np.empty(shape, dtype)
        with self._lock:
            free = [k for k in range(len(self._buffers)) if _refcount(self._buffers, k) <= _FREE]
            match = next((k for k in free if self._buffers[k].nbytes == nbytes), None)
            if match is None:
                buf = np.empty(nbytes, np.uint8)
                if len(self._buffers) >= self.max_buffers and free:
                    del self._buffers[free[0]]
                if len(self._buffers) < self.max_buffers:
                    self._buffers.append(buf)
            else:
                buf = self._buffers.pop(match)
                self._buffers.append(buf)
            return buf.view(dtype).reshape(shape)

    @property
    def nbytes(self):
        """Bytes the workspace holds, in use or free."""
        return sum(b.nbytes for b in self._buffers)

    def clear(self):
        """Forget every buffer (those still in use live on with their users)."""
        with self._lock:
            self._buffers = []
