"""Which backends a machine offers, and where arrays are taken to live."""
import numpy as np
import pytest

from gpurnn import backend


@pytest.mark.parametrize("gpu, numba_usable, simulator, want", [
    (True, True, False, ["numba", "cupy", "numpy"]),
    (True, False, False, ["cupy", "numpy"]),
    (False, False, True, ["numba", "numpy"]),
    (False, False, False, ["numpy"]),
])
def test_available_lists_each_backend_once(monkeypatch, gpu, numba_usable, simulator, want):
    monkeypatch.setattr(backend, "GPU_DEFAULT", "numba")
    monkeypatch.setattr(backend, "gpu_available", lambda: gpu)
    monkeypatch.setattr(backend, "numba_cuda_usable", lambda: numba_usable)
    monkeypatch.setattr(backend, "cuda_simulator", lambda: simulator)
    assert backend.available() == want


def test_to_host_copies_only_when_asked():
    a = np.arange(6.0).reshape(2, 3)
    assert backend.to_host(a) is a
    copied = backend.to_host(a, copy=True)
    assert copied is not a and np.array_equal(copied, a)
    assert backend.to_host([1, 2]).tolist() == [1, 2]
