"""A GPU array module for tests without a GPU that counts every host read of device memory.

`FakeGPU` is CuPy as the GPU backends see it: its arrays (`DeviceArray`, NumPy arrays that say they live on the
device through __cuda_array_interface__) come from every constructor and every NumPy function; its `cuda`, `copyto`,
`matmul` and `RawModule` are kernels.cupy_host's (streams, graph capture, cuBLAS stand-in, the CUDA C kernels on the
CPU). A host read is what makes CuPy wait for the device: `.get()`, `asnumpy`, `bool()`, `float()`, `int()`,
`operator.index()`, `.item()`, `.tolist()`, printing, and an element read that yields a Python or NumPy scalar. Each
is appended to READS with the line that made it. Not seen: `np.asarray(device_array)` (CuPy refuses it; NumPy hands a
subclass through without a hook). Kernels read the plain ndarray (numba_cuda.device_view, cuda_host pointers), so
device reads are not counted.
"""
import traceback
import types

import numpy as np

from gpurnn.kernels import cupy_host

READS = []


def _read(kind):
    frame = next((f for f in reversed(traceback.extract_stack()[:-2]) if "fake_device" not in f.filename), None)
    READS.append(f"{kind} at {frame.filename}:{frame.lineno} {frame.line}" if frame else kind)


def _device(a):
    return a.view(DeviceArray) if type(a) is np.ndarray else a


class DeviceArray(np.ndarray):
    __array_priority__ = 100

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ctypes.data, False), "version": 3,
                "strides": self.strides}

    def __array_wrap__(self, array, context=None, return_scalar=False):
        return _device(np.asarray(array)) if not isinstance(array, DeviceArray) else array

    def __getitem__(self, index):
        out = super().__getitem__(index)
        if not isinstance(out, np.ndarray):
            _read("element read")
        return out

    def get(self, stream=None, out=None):
        _read(".get()")
        return self.view(np.ndarray).copy()

    def __bool__(self):
        _read("bool()")
        return bool(self.view(np.ndarray))

    def __float__(self):
        _read("float()")
        return float(self.view(np.ndarray))

    def __int__(self):
        _read("int()")
        return int(self.view(np.ndarray))

    def __index__(self):
        _read("index")
        return self.view(np.ndarray).__index__()

    def item(self, *args):
        _read(".item()")
        return self.view(np.ndarray).item(*args)

    def tolist(self):
        _read(".tolist()")
        return self.view(np.ndarray).tolist()

    def __repr__(self):
        _read("repr()")
        return repr(self.view(np.ndarray))

    __str__ = __repr__


def _wrap(fn):
    def call(*args, **kwargs):
        out = fn(*args, **kwargs)
        return tuple(map(_device, out)) if isinstance(out, tuple) else _device(out)
    return call


class FakeGPU(types.ModuleType):
    """CuPy's surface for the backends: cupy_host's where it has the name, else NumPy's, results as DeviceArrays."""
    ndarray = DeviceArray

    def __init__(self):
        super().__init__("fake_gpu")
        self.cuda = cupy_host.cuda
        self.RawModule = cupy_host.RawModule

    def __getattr__(self, name):
        fn = getattr(cupy_host, name, None)
        fn = getattr(np, name) if fn is None or name == "ndarray" else fn
        return _wrap(fn) if callable(fn) and not isinstance(fn, type) else fn

    @staticmethod
    def asnumpy(a):
        _read("asnumpy")
        return np.array(a.view(np.ndarray))
