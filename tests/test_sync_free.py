"""No host synchronisation inside forward/backward on a GPU: the numba backend (simulator) and the cupy backend (CPU
harness) run whole layers, forward and backward, on a fake GPU array module that records every host read of device
memory (tests/fake_device.py); a run with the GPU defaults reads nothing. The same counter catches the reads a NaN/Inf
check makes when switched on. Lengths given on the GPU are checked on the device and reported at the next sync point
(checks.raise_deferred); lengths given on the host are checked on the host at once. The two directions of a
bidirectional layer run on two streams."""
import numpy as np
import pytest

from gpurnn import backend, checks
from gpurnn.kernels import cupy_host, cupy_raw, graphs, numba_cuda
from util import make_layer, random_problem
import fake_device

pytestmark = pytest.mark.skipif(not (backend.cuda_simulator() and backend.cuda_host()),
                                reason="needs NUMBA_ENABLE_CUDASIM=1 and GPURNN_CUDA_HOST=1 (no GPU)")
SWEEPS = [("numba", "step"), ("numba", "persistent"), ("cupy", "step")]


@pytest.fixture
def gpu(monkeypatch):
    """The fake GPU module in place of CuPy for the layers and both GPU backends; READS emptied."""
    fake = fake_device.FakeGPU()
    monkeypatch.setattr(backend, "cupy_or_none", lambda: fake)
    monkeypatch.setattr(backend, "cuda_host", lambda: False)
    monkeypatch.setattr(numba_cuda, "array_module", lambda: fake)
    monkeypatch.setattr(cupy_raw, "_cupy", lambda: fake)
    fake_device.READS.clear()
    yield fake
    graphs.clear()        # its graphs hold fake arrays


def on_gpu(fake, a):
    return tuple(on_gpu(fake, x) for x in a) if isinstance(a, tuple) else None if a is None else fake.asarray(a)


def layer_on_gpu(fake, cell, backend_name, sweep, **kwargs):
    layer = make_layer(cell, 3, 5, backend=backend_name, seed=0, **kwargs).to("cuda")
    layer.sweep = sweep
    return layer


def run(fake, layer, lengths=None, T=4, B=3):
    x, state, _, dy, dstate = random_problem(layer, T, B, np.random.default_rng(0))
    x, state, dy, dstate = (on_gpu(fake, a) for a in (x, state, dy, dstate))
    fake_device.READS.clear()
    y, state_n, ctx = layer.forward(x, state, lengths)
    dx, dstate0 = layer.backward(ctx, dy, dstate)
    return y, dx


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("backend_name,sweep", SWEEPS)
def test_forward_and_backward_read_nothing_on_the_host(gpu, backend_name, sweep, cell):
    layer = layer_on_gpu(gpu, cell, backend_name, sweep, num_layers=2, bidirectional=True)
    assert not checks.finite_checks(layer)                       # the GPU default
    for call in range(2):                          # the first call captures its graphs, the second replays
        run(gpu, layer, lengths=np.array([4, 2, 3]))
        assert fake_device.READS == [], call
    device_lengths = gpu.asarray(np.array([4, 1, 3], np.int32))
    run(gpu, layer, lengths=device_lengths)
    assert fake_device.READS == []
    if backend_name == "numba" and sweep == "step":
        assert graphs.stats["replayed"] > 0


def test_the_counter_sees_the_reads_of_nan_checks(gpu):
    """The detector is live: switched on, the NaN/Inf checks read device memory on the host."""
    layer = layer_on_gpu(gpu, "lstm", "numba", "step")
    layer.check_finite = True
    run(gpu, layer)
    assert any("bool()" in r or ".get()" in r for r in fake_device.READS)


def test_device_lengths_are_checked_on_the_device(gpu):
    layer = layer_on_gpu(gpu, "gru", "cupy", "step", bidirectional=True)
    bad = gpu.asarray(np.array([4, 0, 9], np.int32))
    checks.raise_deferred()
    y, _ = run(gpu, layer, lengths=bad)
    assert fake_device.READS == []                               # nothing read while the layer ran
    with pytest.raises(ValueError, match=r"lengths given on the GPU must lie in 1\.\.4"):
        checks.raise_deferred()
    checks.raise_deferred()                                      # reported once
    assert np.isfinite(y.view(np.ndarray)).all()                 # clipped: every step ran within bounds
    assert not y.view(np.ndarray)[:, 1].any()                    # length 0: zeros out


def test_host_lengths_are_checked_at_once(gpu):
    layer = layer_on_gpu(gpu, "lstm", "cupy", "step")
    with pytest.raises(ValueError, match=r"lengths must lie in 1\.\.4"):
        run(gpu, layer, lengths=np.array([4, 0, 3]))


def test_directions_run_on_two_streams(gpu, monkeypatch):
    """Device work that runs (not what a graph capture records) goes on the null stream and on two lanes."""
    streams = []
    enqueue = cupy_host.enqueue

    def logged(work):
        if not cupy_host.capturing():
            streams.append(cupy_host.get_current_stream().ptr)
        enqueue(work)
    monkeypatch.setattr(cupy_host, "enqueue", logged)
    layer = layer_on_gpu(gpu, "lstm", "cupy", "step", bidirectional=True)
    run(gpu, layer)
    assert len(set(streams) - {0}) == 2, streams
