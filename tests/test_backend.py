"""Which backends a machine offers, and where arrays are taken to live."""
import numpy as np
import pytest

from gpurnn import backend


@pytest.mark.parametrize("gpu, numba_usable, simulator, host, want", [
    (True, True, False, False, ["numba", "cupy", "numpy"]),
    (True, False, False, False, ["cupy", "numpy"]),
    (False, False, True, False, ["numba", "numpy"]),
    (False, False, False, False, ["numpy"]),
    (False, False, False, True, ["cupy", "numpy"]),
    (False, False, True, True, ["numba", "cupy", "numpy"]),
])
def test_available_lists_each_backend_once(monkeypatch, gpu, numba_usable, simulator, host, want):
    monkeypatch.setattr(backend, "GPU_DEFAULT", "numba")
    monkeypatch.setattr(backend, "gpu_available", lambda: gpu)
    monkeypatch.setattr(backend, "numba_cuda_usable", lambda: numba_usable)
    monkeypatch.setattr(backend, "cuda_simulator", lambda: simulator)
    monkeypatch.setattr(backend, "cuda_host", lambda: host)
    assert backend.available() == want


@pytest.mark.parametrize("host", [False, True])
def test_cupy_on_cpu_arrays_only_on_the_cuda_host_harness(monkeypatch, host):
    """GPURNN_CUDA_HOST=1 runs backend="cupy" on CPU arrays, and only there; "auto" on the CPU stays numpy."""
    monkeypatch.setattr(backend, "cuda_host", lambda: host)
    assert backend.resolve("auto", "cpu") == "numpy"
    on, off = ("cpu", "cuda") if host else ("cuda", "cpu")
    assert backend.resolve("cupy", on) == "cupy"
    with pytest.raises(ValueError, match="GPURNN_CUDA_HOST"):
        backend.resolve("cupy", off)


def test_to_host_copies_only_when_asked():
    a = np.arange(6.0).reshape(2, 3)
    assert backend.to_host(a) is a
    copied = backend.to_host(a, copy=True)
    assert copied is not a and np.array_equal(copied, a)
    assert backend.to_host([1, 2]).tolist() == [1, 2]
