"""The GPU sweeps' own buffers: every element of every array a sweep allocates is written before it is read (no
zero-filled gradient buffers: padded steps write their zero rows themselves), shown by poisoning each allocation with
NaN and matching the float64 reference, with ragged and full lengths, graphs on (the replayed buffers too); and
[h0; y[:T-1]], which dW_hh's single GEMM reads, shares its buffer with y."""
import numpy as np
import pytest

from gpurnn import backend
from gpurnn.kernels import cupy_host, graphs
from util import make_layer, random_problem

pytestmark = pytest.mark.skipif(not (backend.cuda_simulator() and backend.cuda_host()),
                                reason="needs NUMBA_ENABLE_CUDASIM=1 and GPURNN_CUDA_HOST=1 (no GPU)")


@pytest.fixture
def poisoned(monkeypatch):
    """cupy_host.empty and empty_like return NaN-filled arrays (integers: -1)."""
    def poison(a):
        a.fill(np.nan if a.dtype.kind == "f" else -1)
        return a
    empty, empty_like = cupy_host.empty, cupy_host.empty_like
    monkeypatch.setattr(cupy_host, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(cupy_host, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
    graphs.clear()
    yield
    graphs.clear()


@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("backend_name,sweep", [("numba", "step"), ("numba", "persistent"), ("cupy", "step")])
def test_poisoned_buffers_change_nothing(poisoned, backend_name, sweep, cell, ragged):
    layer = make_layer(cell, 3, 5, backend=backend_name, seed=2, dtype="float64", bidirectional=True)
    layer.sweep = sweep
    oracle = make_layer(cell, 3, 5, seed=2, dtype="float64", bidirectional=True)
    rng = np.random.default_rng(3)
    for _ in range(2):                                           # capture, then replay
        x, state, lengths, dy, dstate = random_problem(layer, 4, 3, rng, ragged=ragged)
        got = layer.forward(x, state, lengths)
        want = oracle.forward(x, state, lengths)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-10, atol=1e-12)
        dx, _ = layer.backward(got[2], dy, dstate)
        dx_ref, _ = oracle.backward(want[2], dy, dstate)
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-10, atol=1e-12)
    for k in oracle.grads:
        np.testing.assert_allclose(layer.grads[k], oracle.grads[k], rtol=1e-10, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("backend_name", ["numba", "cupy"])
def test_h_prev_is_h0_then_y_in_one_buffer(backend_name):
    layer = make_layer("gru", 3, 4, backend=backend_name, seed=0)
    layer.sweep = "step"
    x, state, _, _, _ = random_problem(layer, 5, 2, np.random.default_rng(0))
    _, _, ctx = layer.forward(x, state)
    sweep = ctx.sweeps[0].ctxs[0]          # the kernel ctx of the first (only) segment
    assert np.shares_memory(sweep.h_prev, sweep.y)
    np.testing.assert_array_equal(sweep.h_prev[0], state[0])
    np.testing.assert_array_equal(sweep.h_prev[1:], sweep.y[:-1])
