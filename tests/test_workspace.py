"""Workspace: buffers are reused only once nothing refers to them, so results, ctxs in flight and re-entrant
backward are the same as without one (compared bit for bit with fresh allocations)."""
import numpy as np
import pytest

from gpurnn.workspace import Workspace
from util import CELLS, make_layer, random_problem

BIG = (64, 1024)    # 256 KiB of float32: pooled


def test_a_free_buffer_is_handed_out_again():
    ws = Workspace()
    a = ws.empty(BIG, np.float32)
    ptr = a.ctypes.data
    del a
    b = ws.empty(BIG, np.float32)
    assert b.ctypes.data == ptr and b.shape == BIG and b.dtype == np.float32
    c = ws.empty((BIG[0] * 2, BIG[1] // 2), np.float32)       # same size, another shape: a fresh buffer (b is held)
    assert c.ctypes.data != ptr and ws.nbytes == 2 * b.nbytes


@pytest.mark.parametrize("hold", ["array", "view", "container"])
def test_a_referenced_buffer_is_not_reused(hold):
    ws = Workspace()
    a = ws.empty(BIG, np.float32)
    a[...] = 7
    keep = {"array": a, "view": a[1:, ::2], "container": [a.T]}[hold]
    ptr = a.ctypes.data
    del a
    b = ws.empty(BIG, np.float32)
    b[...] = 0
    assert b.ctypes.data != ptr
    held = keep[0] if hold == "container" else keep
    assert (held == 7).all()


def test_small_requests_and_the_buffer_limit():
    ws = Workspace(min_bytes=1 << 16, max_buffers=2)
    small = ws.empty((10,), np.float64)
    assert small.shape == (10,) and ws.nbytes == 0
    held = [ws.empty(BIG, np.float32) for _ in range(3)]     # the third is not kept: the pool is full and in use
    assert ws.nbytes == 2 * held[0].nbytes
    del held
    other = ws.empty((BIG[0], BIG[1] * 2), np.float32)       # a new size evicts a free one
    assert ws.nbytes == other.nbytes + BIG[0] * BIG[1] * 4
    ws.clear()
    assert ws.nbytes == 0


def run(layer, problem, ctx=None):
    x, state, lengths, dy, dstate = problem
    y, s_n, ctx = layer.forward(x, state, lengths) if ctx is None else ctx
    dx, ds0 = layer.backward(ctx, dy, dstate)
    flat = lambda s: s if isinstance(s, tuple) else (s,)   # noqa: E731
    return [a.copy() for a in (y,) + flat(s_n) + (dx,) + flat(ds0)]


def grads(layer):
    return [layer.grads[k].copy() for k in sorted(layer.grads)]


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("layout", [dict(), dict(num_layers=2, bidirectional=True)])
@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("cell", CELLS)
def test_layer_with_workspace_matches_fresh_buffers(cell, ragged, layout):
    """Same outputs and grads bit for bit, step after step, with the buffers recycled between steps."""
    T, B, I, H = 7, 5, 6, 40
    plain = make_layer(cell, I, H, seed=1, **layout)
    pooled = make_layer(cell, I, H, seed=1, **layout).workspace(Workspace(min_bytes=0))
    rng = np.random.default_rng(2)
    problems = [random_problem(plain, T, B, rng, ragged=ragged) for _ in range(3)]
    for problem in problems:
        assert_same(run(pooled, problem), run(plain, problem))
        assert_same(grads(pooled), grads(plain))
    size = pooled._workspace.nbytes
    assert size > 0
    for problem in problems:                       # steady state: nothing new is allocated
        run(pooled, problem)
    assert pooled._workspace.nbytes == size


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_two_forwards_in_flight(cell):
    T, B, I, H = 6, 4, 5, 48
    plain = make_layer(cell, I, H, seed=3)
    pooled = make_layer(cell, I, H, seed=3).workspace(Workspace(min_bytes=0))
    rng = np.random.default_rng(4)
    p1, p2 = (random_problem(plain, T, B, rng, ragged=True) for _ in range(2))
    want1, want2 = run(plain, p1), run(plain, p2)
    out1 = pooled.forward(*p1[:3])
    y1 = out1[0].copy()
    out2 = pooled.forward(*p2[:3])                 # while the first ctx is alive
    np.testing.assert_array_equal(out1[0], y1)     # the first y is intact
    assert_same(run(pooled, p2, out2), want2)
    assert_same(run(pooled, p1, out1), want1)
    assert_same(grads(pooled), grads(plain))


def test_returned_arrays_survive_later_calls():
    layer = make_layer("lstm", 5, 64, seed=0).workspace(Workspace(min_bytes=0))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 5)).astype(np.float32)
    dy = rng.standard_normal((8, 3, 64)).astype(np.float32)
    y, _, ctx = layer.forward(x)
    dx, _ = layer.backward(ctx, dy)
    keep_y, keep_dx = y.copy(), dx.copy()
    for _ in range(3):
        y2, _, ctx2 = layer.forward(x * 2)
        layer.backward(ctx2, dy)
    np.testing.assert_array_equal(y, keep_y)
    np.testing.assert_array_equal(dx, keep_dx)


def test_workspace_on_off_and_shared():
    shared = Workspace(min_bytes=0)
    a, b = make_layer("gru", 4, 64).workspace(shared), make_layer("lstm", 4, 64).workspace(shared)
    x = np.ones((5, 2, 4), np.float32)
    a.forward(x)
    b.forward(x)
    assert a._workspace is b._workspace is shared and shared.nbytes > 0
    assert a.workspace()._workspace is shared              # kept when already on
    assert a.workspace(False)._workspace is None
    assert isinstance(a.workspace()._workspace, Workspace) and a._workspace is not shared
