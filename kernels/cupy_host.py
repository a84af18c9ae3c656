"""A NumPy stand-in for the CuPy calls the cupy backend makes, used when GPURNN_CUDA_HOST=1 (see cuda_host.py).

Only what ``cupy_raw`` calls, each with CuPy's meaning on NumPy arrays; its kernels come from ``cuda_host.RawModule``.
A CuPy call the backend starts to make that is missing here fails loudly (AttributeError) instead of running NumPy
code that CuPy lacks: add it here, with the same signature as CuPy's.
"""
from types import SimpleNamespace

import numpy as np

from .cuda_host import RawModule

ndarray = np.ndarray
ascontiguousarray = np.ascontiguousarray
array = np.array
empty = np.empty
empty_like = np.empty_like
zeros = np.zeros
matmul = np.matmul


class Device:
    """cupy.cuda.Device: the host is device 0, the only one."""

    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)
        if self.id != 0:
            raise ValueError(f"the CUDA host harness has one device, 0; got {device!r}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


cuda = SimpleNamespace(Device=Device)
__all__ = ["RawModule", "ndarray", "ascontiguousarray", "array", "empty", "empty_like", "zeros", "matmul", "cuda"]
