"""Which backends exist and which one a call gets, from where its arrays live. Imports nothing heavy.

| name  | arrays (xp)                                   | kernels                      |
| numpy | NumPy                                         | gpurnn.kernels.cpu_fused (float32), numpy_ref (float64) |
| numba | CuPy on a GPU; NumPy under NUMBA_ENABLE_CUDASIM=1 | gpurnn.kernels.numba_cuda |
| cupy  | CuPy; NumPy under GPURNN_CUDA_HOST=1          | gpurnn.kernels.cupy_raw       |

GPURNN_CUDA_HOST=1 is to the cupy backend what NUMBA_ENABLE_CUDASIM=1 is to the numba backend: its CUDA C kernels
run on the CPU (compiled for the host, gpurnn.kernels.cuda_host) on device "cpu" arrays, for tests without a GPU.
"""
import functools
import importlib
import os

import numpy as np

BACKENDS = ("numpy", "numba", "cupy")
KERNEL_MODULES = {"numpy": "gpurnn.kernels.cpu_fused",
                  "numba": "gpurnn.kernels.numba_cuda",
                  "cupy": "gpurnn.kernels.cupy_raw"}
GPU_DEFAULT = "numba"   # what "auto" picks for GPU data


def cuda_simulator():
    """True when Numba's CUDA simulator is on: the numba backend then runs on NumPy arrays."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"


def cuda_host():
    """True when GPURNN_CUDA_HOST=1: the cupy backend runs its CUDA C on the CPU, on NumPy arrays. Read once."""
    from .kernels.cuda_host import enabled
    return enabled()


@functools.lru_cache(maxsize=None)
def cupy_or_none():
    """The cupy module if it imports and sees a device, else None. Probed once, on first use."""
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:
        pass
    return None


def gpu_available():
    return cupy_or_none() is not None


@functools.lru_cache(maxsize=None)
def numba_cuda_usable():
    """True when numba.cuda can launch kernels: a real GPU, or the simulator."""
    if cuda_simulator():
        return True
    try:
        from numba import cuda
        return bool(cuda.is_available())
    except Exception:
        return False


def available():
    """Names of the backends that can run here, the default first for its device."""
    if gpu_available():
        gpu = [b for b in dict.fromkeys((GPU_DEFAULT, "cupy", "numba")) if b != "numba" or numba_cuda_usable()]
    else:
        gpu = (["numba"] if cuda_simulator() else []) + (["cupy"] if cuda_host() else [])
    return gpu + ["numpy"]


def array_device(a):
    """"cuda" for arrays in GPU memory (CuPy, __cuda_array_interface__, CUDA DLPack), else "cpu"."""
    if hasattr(a, "__cuda_array_interface__"):
        return "cuda"
    if isinstance(a, np.ndarray):
        return "cpu"
    if hasattr(a, "__dlpack_device__"):
        kind = int(a.__dlpack_device__()[0])
        return "cuda" if kind in (2, 3, 13) else "cpu"    # kDLCUDA, kDLCUDAHost, kDLCUDAManaged
    return "cpu"


def xp_for(device):
    """The array module for a device."""
    if device == "cpu":
        return np
    cupy = cupy_or_none()
    if cupy is None:
        raise RuntimeError("no CUDA device with CuPy is available; install gpurnn[cuda] on a machine with a GPU")
    return cupy


def array_module(a):
    """cupy for arrays in GPU memory, else numpy."""
    return xp_for("cuda") if array_device(a) == "cuda" else np


def to_host(a, copy=False):
    """A NumPy array of `a`'s values: CuPy arrays are copied to the host, anything else goes through NumPy
    (a copy only when `copy`)."""
    if hasattr(a, "get"):
        return a.get()
    return np.array(a) if copy else np.asarray(a)


def as_array(a, device, name):
    """`a` as an xp array on `device`, zero-copy for GPU arrays of any library."""
    if device == "cpu":
        if not isinstance(a, np.ndarray):
            if hasattr(a, "__dlpack__") and array_device(a) == "cpu" and not isinstance(a, (list, tuple)):
                try:
                    return np.from_dlpack(a)
                except (TypeError, BufferError):
                    pass
            return np.asarray(a)
        return a
    cupy = xp_for(device)
    if isinstance(a, cupy.ndarray):
        return a
    if hasattr(a, "__cuda_array_interface__"):
        return cupy.asarray(a)
    if hasattr(a, "__dlpack__"):
        return cupy.from_dlpack(a)
    raise TypeError(f"{name} must be a GPU array on device 'cuda', got {type(a).__name__}")


def resolve(requested, device):
    """The backend a call gets: `requested` ("auto" or a name) for data on `device`."""
    if requested == "auto":
        if device == "cpu":
            return "numpy"
        return GPU_DEFAULT if numba_cuda_usable() else "cupy"
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {requested!r}")
    if device == "cpu" and requested == "cupy" and not cuda_host():
        raise ValueError("backend='cupy' needs GPU arrays (or GPURNN_CUDA_HOST=1); "
                         "move the layer with layer.to('cuda')")
    if device == "cuda" and requested == "cupy" and cuda_host():
        raise ValueError("GPURNN_CUDA_HOST=1 runs backend='cupy' on the CPU: keep the layer on 'cpu'")
    if device == "cpu" and requested == "numba" and not cuda_simulator():
        raise ValueError("backend='numba' needs GPU arrays (or NUMBA_ENABLE_CUDASIM=1); "
                         "move the layer with layer.to('cuda')")
    if device == "cuda" and requested == "numpy":
        raise ValueError("backend='numpy' needs CPU arrays; move the layer with layer.to('cpu')")
    return requested


def kernels(name):
    """The kernel module of a backend, imported on first use."""
    return importlib.import_module(KERNEL_MODULES[name])
