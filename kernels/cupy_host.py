"""A NumPy stand-in for the CuPy calls the GPU backends make: the cupy backend's under GPURNN_CUDA_HOST=1 (its kernels
from ``cuda_host.RawModule``), and the numba backend's under NUMBA_ENABLE_CUDASIM=1 (arrays, GEMMs, copies).

Only what the backends call, each with CuPy's meaning on NumPy arrays. A CuPy call the backends start to make that is
missing here fails loudly (AttributeError) instead of running NumPy code that CuPy lacks: add it here, with the same
signature as CuPy's.

Device work (kernel launches, GEMMs, ``copyto``) runs at once, in call order, unless the current stream is capturing
a CUDA graph: then it is recorded, as CUDA records it, and runs each time the graph is launched, with the arguments it
was captured with (scalars by value, arrays by address: what they hold is read when the graph runs). So a captured
sweep behaves here as on a GPU: a value read on the host while capturing is stale, an allocation while capturing is
refused (RuntimeError, as the capture guard of ``kernels.graphs`` makes CuPy's pool refuse it), and a synchronize of
a capturing stream is an error. Streams run their work in call order (one host thread does it all), so work on
several streams is correct here whenever the events between them are placed where CUDA needs them.

``cuda.cublas.gemmEx`` is cuBLAS's GemmEx on host addresses: column-major operands with leading dimensions, checked
as cuBLAS checks them, float32/float64/bfloat16 storage, and the compute types the backends use; tf32 rounds each
operand to 10 mantissa bits (to nearest even; ``TF32_ROUNDING = "truncate"`` drops the bits instead), bfloat16
operands arrive rounded by the caller's conversion kernel, and sums are float32 (float64 for COMPUTE_64F).
"""
import ctypes
import threading
from types import SimpleNamespace

import numpy as np

from . import cuda_host

ndarray = np.ndarray
uint16 = np.uint16
TF32_ROUNDING = "nearest"      # how the tf32 stand-in rounds operands: "nearest" (even) or "truncate"

_local = threading.local()     # .streams: the stack of current streams of this thread


class CaptureError(RuntimeError):
    """What CUDA refuses while a stream captures (an allocation, a synchronize)."""


def get_current_stream():
    stack = getattr(_local, "streams", None)
    return stack[-1] if stack else Stream.null


def capturing():
    return get_current_stream()._captured is not None


def enqueue(work):
    """Run `work` (no arguments) now, or record it when the current stream captures; device work goes through here."""
    captured = get_current_stream()._captured
    if captured is None:
        work()
    else:
        captured.append(work)


def _allocating(what):
    if capturing():
        raise CaptureError(f"{what} allocates device memory while a stream captures a CUDA graph")


class Stream:
    """cupy.cuda.Stream: a context manager that makes it current; begin_capture / end_capture record a Graph."""
    null = None
    _next = 1

    def __init__(self, null=False, non_blocking=False, ptds=False):
        self.ptr = 0 if null else Stream._next
        Stream._next += int(not null)
        self._captured = None

    def __enter__(self):
        if not hasattr(_local, "streams"):
            _local.streams = []
        _local.streams.append(self)
        return self

    def __exit__(self, *exc):
        _local.streams.pop()
        return False

    def begin_capture(self, mode=None):
        if self.ptr == 0:
            raise CaptureError("the legacy default stream cannot capture")
        if self._captured is not None:
            raise CaptureError("the stream is already capturing")
        self._captured = []

    def end_capture(self):
        if self._captured is None:
            raise CaptureError("the stream is not capturing")
        work, self._captured = self._captured, None
        return Graph(work)

    def is_capturing(self):
        return self._captured is not None

    def synchronize(self):
        if self._captured is not None:
            raise CaptureError("a capturing stream cannot be synchronized")

    def record(self, event=None):
        event = Event() if event is None else event
        event.record(self)
        return event

    def wait_event(self, event):
        """Work runs in call order here: nothing to wait for."""


Stream.null = Stream(null=True)


class Event:
    """cupy.cuda.Event: recorded in call order, so always complete."""

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.recorded = False

    def record(self, stream=None):
        self.recorded = True

    def synchronize(self):
        if capturing():
            raise CaptureError("an event cannot be waited on by the host while a stream captures")

    @property
    def done(self):
        return True


class Graph:
    """cupy.cuda.Graph: the recorded device work; launch() runs it (or records it, on a capturing stream)."""

    def __init__(self, work):
        self.work = tuple(work)

    def launch(self, stream=None):
        def run():
            for work in self.work:
                work()
        if stream is None:
            enqueue(run)
        else:
            with stream:
                enqueue(run)


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

    def synchronize(self):
        if capturing():
            raise CaptureError("the device cannot be synchronized while a stream captures")


# --- arrays: allocation is refused while capturing, copies are device work ---
def empty(shape, dtype=float, order="C"):
    _allocating("empty")
    return np.empty(shape, dtype, order=order)


def empty_like(a, dtype=None):
    _allocating("empty_like")
    return np.empty_like(a, dtype=dtype)


def zeros(shape, dtype=float):
    _allocating("zeros")
    return np.zeros(shape, dtype)


def ascontiguousarray(a, dtype=None):
    if isinstance(a, np.ndarray) and a.flags.c_contiguous and (dtype is None or a.dtype == dtype):
        return a
    _allocating("ascontiguousarray")
    return np.ascontiguousarray(a, dtype=dtype)


def array(a, dtype=None, copy=True):
    _allocating("array")
    return np.array(a, dtype=dtype, copy=copy)


def copyto(dst, src):
    enqueue(lambda: np.copyto(dst, src))


def matmul(a, b, out=None):
    if out is None:
        _allocating("matmul without out=")
        return np.matmul(a, b)
    enqueue(lambda: np.matmul(a, b, out=out))
    return out


# --- kernels: cuda_host's, their launches device work ---
class RawModule(cuda_host.RawModule):
    """cupy.RawModule: cuda_host's, whose kernels' launches go through `enqueue`."""

    def get_function(self, name):
        return RecordedKernel(super().get_function(name))


class RecordedKernel:
    """A cuda_host.HostKernel whose launches are device work: arguments checked at the call, the launch run now or
    when the captured graph runs."""

    def __init__(self, kernel):
        object.__setattr__(self, "kernel", kernel)

    def __call__(self, grid, block, args, **kwargs):
        self.kernel._values(args)
        enqueue(lambda: self.kernel(grid, block, args, **kwargs))

    def __getattr__(self, name):
        return getattr(self.kernel, name)

    def __setattr__(self, name, value):
        setattr(self.kernel, name, value)


# --- cuBLAS GemmEx on host addresses ---
_STORAGE = {0: np.float32, 1: np.float64, 14: np.uint16}     # CUDA_R_32F, CUDA_R_64F, CUDA_R_16BF
COMPUTE_32F, COMPUTE_64F, COMPUTE_32F_FAST_TF32 = 68, 70, 77
_SCALAR = {COMPUTE_32F: np.float32, COMPUTE_32F_FAST_TF32: np.float32, COMPUTE_64F: np.float64}


class CublasError(RuntimeError):
    pass


def round_mantissa(a, bits, rounding="nearest"):
    """float32 `a` with `bits` explicit mantissa bits (tf32: 10, bfloat16: 7): to nearest even, or truncated;
    NaN stays NaN, and rounding up past the largest finite value gives Inf, as the hardware does."""
    a = np.ascontiguousarray(a, np.float32)
    u = a.view(np.uint32)
    drop = np.uint32(23 - bits)
    keep = ~np.uint32((1 << int(drop)) - 1)
    if rounding == "truncate":
        r = u & keep
    else:
        lsb = (u >> drop) & np.uint32(1)
        r = (u + np.uint32((1 << (int(drop) - 1)) - 1) + lsb) & keep
    return np.where(np.isnan(a), a, r.view(np.float32))


def _column_major(ptr, dtype, rows, cols, ld, name):
    """The (rows, cols) column-major matrix at host address `ptr` with leading dimension `ld`."""
    if ld < max(1, rows):
        raise CublasError(f"CUBLAS_STATUS_INVALID_VALUE: ld{name} = {ld} < max(1, {rows})")
    itemsize = np.dtype(dtype).itemsize
    extent = ld * (cols - 1) + rows
    base = np.frombuffer((ctypes.c_char * (extent * itemsize)).from_address(ptr), dtype, count=extent)
    return np.lib.stride_tricks.as_strided(base, (rows, cols), (itemsize, ld * itemsize))


def _operand(ptr, type_, op, rows, cols, ld, name, compute):
    """op(X) as float32/float64 values, X stored column-major (rows, cols) before op."""
    shape = (rows, cols) if op == 0 else (cols, rows)
    x = _column_major(ptr, _STORAGE[type_], *shape, ld, name)
    if type_ == 14:
        x = (x.astype(np.uint32) << np.uint32(16)).view(np.float32)
    x = x if op == 0 else x.T
    if compute == COMPUTE_32F_FAST_TF32:
        x = round_mantissa(x, 10, TF32_ROUNDING)
    return x.astype(_SCALAR[compute], copy=False)


def gemm_ex(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc,
            computeType, algo):
    """C = alpha op(A) op(B) + beta C, column-major, as cublasGemmEx; alpha, beta: host addresses (read now, as in
    CUBLAS_POINTER_MODE_HOST). Only the types and compute types the backends use."""
    if computeType not in _SCALAR or {Atype, Btype, Ctype} - set(_STORAGE) or Ctype == 14:
        raise CublasError(f"CUBLAS_STATUS_NOT_SUPPORTED: types {Atype}, {Btype}, {Ctype}, compute {computeType}")
    if min(m, n, k) < 0 or transa not in (0, 1) or transb not in (0, 1):
        raise CublasError("CUBLAS_STATUS_INVALID_VALUE: sizes or operations")
    scalar = _SCALAR[computeType]
    alpha_, beta_ = (scalar(np.frombuffer((ctypes.c_char * np.dtype(scalar).itemsize).from_address(p), scalar)[0])
                     for p in (alpha, beta))

    def run():
        a = _operand(A, Atype, transa, m, k, lda, "a", computeType)
        b = _operand(B, Btype, transb, k, n, ldb, "b", computeType)
        c = _column_major(C, _STORAGE[Ctype], m, n, ldc, "c")
        prod = np.matmul(a, b) * alpha_
        if beta_ != 0:
            prod += beta_ * c.astype(scalar)
        c[...] = prod
    enqueue(run)


cublas = SimpleNamespace(gemmEx=gemm_ex, setStream=lambda handle, stream: None, getMathMode=lambda handle: 0,
                         setMathMode=lambda handle, mode: None, setPointerMode=lambda handle, mode: None)
cuda = SimpleNamespace(Device=Device, Stream=Stream, Event=Event, Graph=Graph, get_current_stream=get_current_stream,
                       get_cublas_handle=lambda: 1, cublas=cublas)
__all__ = ["RawModule", "ndarray", "uint16", "ascontiguousarray", "array", "copyto", "empty", "empty_like", "zeros",
           "matmul", "cuda"]
