"""CUDA graphs of the per-step sweeps (kernels/graphs.py), on the numba and cupy backends: on a GPU, and without one
on the simulator and the CPU harness, whose stand-in records a capture and replays it as CUDA does
(kernels/cupy_host.py). A replayed graph with new inputs copied in gives what plain launches give (exactly, on the
stand-in), forward and backward, and no capture fails. On the stand-in: the cache is bounded and clears; a capture
that fails runs plainly after one warning; and the replay-versus-plain check catches a sweep that reads device
memory on the host while capturing."""
import warnings

import numpy as np
import pytest

import gpurnn
from gpurnn import backend
from gpurnn.kernels import cupy_host, graphs
from util import device_of, make_layer, random_problem, to_device, to_numpy

STAND_IN = backend.cuda_simulator() and backend.cuda_host()
stand_in_only = pytest.mark.skipif(not STAND_IN, reason="the CUDA stand-in's capture (no GPU)")
pytestmark = pytest.mark.skipif(not (STAND_IN or backend.gpu_available()),
                                reason="needs a GPU, or NUMBA_ENABLE_CUDASIM=1 and GPURNN_CUDA_HOST=1")


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    graphs.clear()
    graphs.stats.clear()
    yield
    graphs.clear()


def training_step(layer, problem):
    x, state, lengths, dy, dstate = (to_device(a, layer.backend) for a in problem)
    layer.zero_grad()
    y, state_n, ctx = layer.forward(x, state, lengths)
    dx, dstate0 = layer.backward(ctx, dy, dstate)
    flat = (lambda s: list(s) if isinstance(s, tuple) else [s])
    return to_numpy((y, *flat(state_n), dx, *flat(dstate0), *(layer.grads[k].copy() for k in sorted(layer.grads))))


def assert_same(a, b):
    """Exactly on the stand-in; on a GPU within float32 rounding (cuBLAS may order a sum differently)."""
    if STAND_IN:
        np.testing.assert_array_equal(a, b)
    else:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def graphed_and_plain(monkeypatch, layer, problems):
    """Results of one training step per problem with graphs on (the first captures, the others replay), then the
    same steps with graphs off."""
    graphed = [training_step(layer, p) for p in problems]
    monkeypatch.setattr(graphs, "ENABLED", False)
    return graphed, [training_step(layer, p) for p in problems]


def problems(layer, T, B, n=3, ragged=True):
    rng = np.random.default_rng(4)
    return [random_problem(layer, T, B, rng, ragged=ragged) for _ in range(n)]


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_relu"])
@pytest.mark.parametrize("backend_name", ["numba", "cupy"])
def test_replayed_graph_gives_what_plain_launches_give(monkeypatch, backend_name, cell, bidirectional):
    layer = make_layer(cell, 3, 6, backend=backend_name, seed=1, bidirectional=bidirectional, num_layers=2)
    layer.to(device_of(backend_name)).sweep = "step"
    graphed, plain = graphed_and_plain(monkeypatch, layer, problems(layer, 5, 3))
    for g, p in zip(graphed, plain):
        for a, b in zip(g, p):
            assert_same(a, b)
    assert graphs.stats["failed"] == 0
    sweeps = 2 * layer.num_layers * layer.num_directions          # forward and backward
    assert graphs.stats["captured"] == 2 * layer.num_directions  # (forward, backward) per stream; layers share them
    assert graphs.stats["replayed"] == 3 * sweeps - graphs.stats["captured"]


@pytest.mark.parametrize("backend_name", ["numba", "cupy"])
def test_jordan_replay_gives_what_plain_launches_give(monkeypatch, backend_name):
    layer = gpurnn.JordanRNN(3, 5, 2, backend=backend_name, seed=0).to(device_of(backend_name))
    rng = np.random.default_rng(0)
    data = [(rng.standard_normal((4, 3, 3)).astype(np.float32), None, np.array([4, 2, 3]),
             rng.standard_normal((4, 3, 2)).astype(np.float32), None) for _ in range(2)]
    if backend_name == "numba":                                  # its planner would take the persistent sweep
        monkeypatch.setattr(gpurnn.kernels.numba_cuda.numba_plan, "jordan_plan",
                            lambda *a: gpurnn.kernels.numba_cuda.numba_plan.Plan("step"))
    graphed, plain = graphed_and_plain(monkeypatch, layer, data)
    for g, p in zip(graphed, plain):
        for a, b in zip(g, p):
            assert_same(a, b)
    assert graphs.stats["captured"] == 2 and graphs.stats["replayed"] == 2 and graphs.stats["failed"] == 0


def toy(xp, a):
    """y = 2 x, as device work (copyto, matmul)."""
    xp.copyto(a["y"], a["x"])
    xp.matmul(a["x"], a["two"], out=a["y"])


def toy_run(x, body=toy, key="toy"):
    xp = cupy_host
    inputs = dict(x=x, two=np.eye(x.shape[1], dtype=x.dtype) * 2)
    return graphs.run(xp, key, inputs, lambda a: dict(y=xp.empty(a["x"].shape, a["x"].dtype)),
                      lambda a: body(xp, a), ("y",))["y"]


@stand_in_only
def test_the_cache_is_bounded_and_clears(monkeypatch):
    monkeypatch.setattr(graphs, "MAX_ENTRIES", 2)
    for n in (1, 2, 3):
        np.testing.assert_array_equal(toy_run(np.ones((2, n))), 2 * np.ones((2, n)))
    assert graphs.cached() == 2 and graphs.stats["captured"] == 3
    toy_run(np.ones((2, 1)))                                      # dropped: captured again
    assert graphs.stats["captured"] == 4
    monkeypatch.setattr(graphs, "MAX_BYTES", 100)                 # 2 * 2 * 20 floats: too large to keep
    np.testing.assert_array_equal(toy_run(np.ones((2, 20))), 2 * np.ones((2, 20)))
    assert graphs.stats["plain"] == 1
    graphs.clear()
    assert graphs.cached() == 0


@stand_in_only
def test_a_failed_capture_warns_once_and_runs_plainly():
    def allocating(xp, a):                                        # CUDA cannot allocate while capturing
        xp.copyto(a["y"], xp.matmul(a["x"], a["two"]))
    with pytest.warns(RuntimeWarning, match="capture failed.*allocates device memory"):
        np.testing.assert_array_equal(toy_run(np.ones((2, 2)), allocating), 2 * np.ones((2, 2)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(toy_run(3 * np.ones((2, 2)), allocating), 6 * np.ones((2, 2)))
    assert graphs.stats["failed"] == 1 and graphs.stats["plain"] == 1 and graphs.cached() == 0


@stand_in_only
def test_replay_versus_plain_catches_a_host_read_in_the_captured_loop():
    """A sweep that decides on the host from device data (here: doubles only if x[0, 0] > 0) is captured with the
    decision of the capture's inputs; replayed with other inputs it is wrong, which the comparison sees."""
    def deciding(xp, a):
        if a["x"][0, 0] > 0:                                      # a host read of device memory
            xp.matmul(a["x"], a["two"], out=a["y"])
        else:
            xp.copyto(a["y"], a["x"])
    np.testing.assert_array_equal(toy_run(np.ones((2, 2)), deciding, "deciding"), 2 * np.ones((2, 2)))
    replayed = toy_run(-np.ones((2, 2)), deciding, "deciding")
    assert graphs.stats["replayed"] == 1
    assert not np.array_equal(replayed, -np.ones((2, 2)))          # plain launches would give -1


@stand_in_only
def test_the_stand_in_refuses_what_a_capturing_stream_refuses():
    stream = cupy_host.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        with pytest.raises(cupy_host.CaptureError):
            cupy_host.empty((2,), np.float32)
        with pytest.raises(cupy_host.CaptureError):
            stream.synchronize()
        a = np.zeros(2)
        cupy_host.copyto(a, 1.0)
        assert not a.any()                                        # recorded, not run
        graph = stream.end_capture()
    graph.launch()
    np.testing.assert_array_equal(a, 1.0)
    with pytest.raises(cupy_host.CaptureError):
        cupy_host.cuda.Stream.null.begin_capture()
