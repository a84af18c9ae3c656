"""Streams for the independent parts of a layer: the two directions of a bidirectional layer run on two CUDA streams.

    lane = Lanes(xp, n)
    for d in range(n):
        with lane(d):          # work queued here goes on lane d's stream
            ...

Lane 0's entry forks: every lane (a stream kept per device and reused) starts after the work queued so far on the
current stream. The last lane's exit joins: the current stream waits for every lane, so what follows sees their
results. Nothing waits on the host. Memory CuPy hands out inside a lane belongs to that lane's stream and is given
out again only to later work of that lane, which starts after the current stream's work at its next fork; so a
buffer read on the current stream after a join is not overwritten early. On NumPy (the CPU), or for one lane, the
lanes are no-ops.
"""
import contextlib

import numpy as np

_pools = {}      # (array module name, device id) -> streams


def _streams(xp, n):
    key = (xp.__name__, xp.cuda.Device().id)
    pool = _pools.setdefault(key, [])
    while len(pool) < n:
        pool.append(xp.cuda.Stream(non_blocking=True))
    return pool[:n]


class Lanes:
    def __init__(self, xp, n):
        self.xp, self.n = xp, n
        self.streams = None if xp is np or n < 2 else _streams(xp, n)

    @contextlib.contextmanager
    def __call__(self, d):
        if self.streams is None:
            yield
            return
        if d == 0:
            self.main = self.xp.cuda.get_current_stream()
            start = self.main.record()
            for s in self.streams:
                s.wait_event(start)
        with self.streams[d]:
            yield
        if d == self.n - 1:
            for s in self.streams:
                self.main.wait_event(s.record())
