"""The GPU backends' GEMMs in a precision mode: cuBLAS GemmEx through CuPy's low-level bindings, on CuPy's current
stream, with every argument prepared once (a prepared product costs one C call each time it runs: a step of a sweep).

Modes (`math`), for float32 arrays; outputs and accumulation stay float32 in all three, and so does every state and
pointwise kernel (only GEMM operands are rounded):
    "fp32"  CUBLAS_COMPUTE_32F, the handle's TF32 math off for the call: plain float32
    "tf32"  CUBLAS_COMPUTE_32F_FAST_TF32: tensor cores, each operand rounded to tf32 (10 mantissa bits)
    "bf16"  each operand converted to a bfloat16 copy (7 mantissa bits, to nearest even: f32_to_bf16 in bf16.cu),
            CUBLAS_COMPUTE_32F: products and sums in float32
float64 arrays take "fp32" (CUBLAS_COMPUTE_64F). Only the calls made here change: nothing process-wide (CuPy's own
matmul keeps what CUPY_TF32 says).

Row-major arrays seen by column-major cuBLAS: out (M, N) = a (M, K) @ b (K, N) is out^T = b^T a^T, so cuBLAS gets
b first; an operand stored row by row (C order, rows possibly strided) is, read column-major, its own transpose
(op N, ld = its row stride), one stored column by column (a transposed view such as W.T) is op T.

Under the CUDA simulator and the CPU harness `xp` is kernels.cupy_host, whose gemmEx does the same arithmetic on the
host from the same arguments (operands rounded as the tensor cores round them).
"""
from pathlib import Path

import numpy as np

MATH = ("fp32", "tf32", "bf16")
CUDA_R_32F, CUDA_R_64F, CUDA_R_16BF = 0, 1, 14
COMPUTE_32F, COMPUTE_64F, COMPUTE_32F_FAST_TF32 = 68, 70, 77
OP_N, OP_T = 0, 1
GEMM_DEFAULT = -1
DEFAULT_MATH_MODE = 0           # CUBLAS_DEFAULT_MATH (no TF32 for COMPUTE_32F)
THREADS = 256


def check_math(math, dtype):
    """`math` for arrays of `dtype`; ValueError naming what fits otherwise."""
    if math not in MATH:
        raise ValueError(f"math must be one of {', '.join(map(repr, MATH))}; got {math!r}")
    if math != "fp32" and np.dtype(dtype) != np.float32:
        raise ValueError(f"math={math!r} rounds float32 GEMM operands; float64 layers compute in 'fp32' only")
    return math


def pointer(a):
    """The device address of `a`'s first element (a host address under the stand-in)."""
    data = a.data
    return data.ptr if hasattr(data, "ptr") else a.ctypes.data


def layout(a):
    """(op, ld) of a 2-D array for cuBLAS (see the module docstring); None when neither rows nor columns are
    contiguous."""
    rows, cols = a.shape
    s0, s1 = (s // a.itemsize for s in a.strides)
    if (cols == 1 or s1 == 1) and (rows == 1 or s0 >= cols):
        return OP_N, max(cols, s0 if rows > 1 else cols, 1)
    if (rows == 1 or s0 == 1) and (cols == 1 or s1 >= rows):
        return OP_T, max(rows, s1 if cols > 1 else rows, 1)
    return None


_converters = {}


def _converter(xp):
    """f32_to_bf16 of bf16.cu, compiled once per array module and device."""
    key = (xp.__name__, xp.cuda.Device().id)
    if key not in _converters:
        source = (Path(__file__).parent / "bf16.cu").read_text()
        module = xp.RawModule(code=source, options=("--std=c++17",), name_expressions=["f32_to_bf16"])
        _converters[key] = module.get_function("f32_to_bf16")
    return _converters[key]


class Operand:
    """What cuBLAS reads for the 2-D array `a` in `math`: `a` itself, or for "bf16" a bfloat16 copy of the same shape
    and order (`array`, uint16 bits; `low` when given, from Operand.buffer) that update() refreshes from `a`
    (device work: one launch, prepared here)."""

    def __init__(self, xp, a, math, low=None):
        if layout(a) is None:
            raise ValueError(f"a GEMM operand must have contiguous rows or columns, got strides {a.strides}")
        self.source, self.array, self.bf16 = a, a, math == "bf16"
        if self.bf16:
            self.array = Operand.buffer(xp, a, math) if low is None else low
            c_order = a.flags.c_contiguous
            if self.array.shape != a.shape or not (self.array.flags.c_contiguous if c_order
                                                   else self.array.flags.f_contiguous):
                raise ValueError("a bf16 operand buffer must have the shape and order of its operand")
            flat = (lambda v: v if c_order else v.T)                     # C-contiguous views of the same memory
            self._launch = (_converter(xp), ((a.size + THREADS - 1) // THREADS,), (THREADS,),
                            (flat(a), flat(self.array), np.int64(a.size)))

    @staticmethod
    def buffer(xp, a, math):
        """A bfloat16 copy buffer for operand `a` (same shape and order) when math is "bf16", else None."""
        if math != "bf16":
            return None
        if not (a.flags.c_contiguous or a.flags.f_contiguous):
            raise ValueError("a bf16 GEMM operand must be contiguous")
        return xp.empty(a.shape, xp.uint16, order="C" if a.flags.c_contiguous else "F")

    def update(self):
        if self.bf16:
            kernel, grid, block, args = self._launch
            kernel(grid, block, args)


class Matmul:
    """out = a @ b in `math`, prepared: calling it is one cublasGemmEx (plus setStream) on the current stream.
    a, b: Operands or 2-D arrays (M, K), (K, N); out: (M, N) with contiguous rows, float32 (float64 for float64
    operands in "fp32"); out = a @ b + beta * out when `beta`. A bf16 Operand is converted by its own update()."""

    def __init__(self, xp, a, b, out, math, beta=0.0):
        a, b = (x if isinstance(x, Operand) else Operand(xp, x, math) for x in (a, b))
        (M, K), (K2, N) = a.array.shape, b.array.shape
        if K != K2 or out.shape != (M, N):
            raise ValueError(f"GEMM shapes {a.array.shape} @ {b.array.shape} -> {out.shape} do not agree")
        op_c, ldc = layout(out)
        if op_c != OP_N and M > 1:
            raise ValueError("a GEMM output must have contiguous rows")
        wide = np.dtype(out.dtype) == np.float64
        storage = CUDA_R_64F if wide else CUDA_R_32F
        low = CUDA_R_16BF if math == "bf16" else storage
        compute = COMPUTE_64F if wide else COMPUTE_32F_FAST_TF32 if math == "tf32" else COMPUTE_32F
        scalar = np.float64 if wide else np.float32
        self._scalars = np.array([1.0, beta], scalar)            # host alpha, beta: read when cuBLAS is called
        op_b, ldb = layout(b.array)
        op_a, lda = layout(a.array)
        alpha, beta_ = (self._scalars.ctypes.data + i * self._scalars.itemsize for i in (0, 1))
        self._args = (op_b, op_a, N, M, K, alpha, pointer(b.array), low, ldb, pointer(a.array), low, lda, beta_,
                      pointer(out), storage, ldc, compute, GEMM_DEFAULT)
        self._cublas = xp.cuda.cublas
        self._handle = xp.cuda.get_cublas_handle()
        self._stream = xp.cuda.get_current_stream().ptr
        self._math_mode = self._cublas.getMathMode(self._handle)
        self.operands, self.out = (a, b), out

    def __call__(self):
        cublas, handle = self._cublas, self._handle
        cublas.setStream(handle, self._stream)
        if self._math_mode != DEFAULT_MATH_MODE:
            cublas.setMathMode(handle, DEFAULT_MATH_MODE)
        cublas.gemmEx(handle, *self._args)
        if self._math_mode != DEFAULT_MATH_MODE:
            cublas.setMathMode(handle, self._math_mode)
        return self.out


def matmul(xp, a, b, math="fp32", out=None, beta=0.0):
    """a @ b (2-D) in `math`, once: on NumPy arrays np.matmul (the CPU computes in fp32 only), else a Matmul after
    converting both operands (bf16). `out`: written when given (+= beta * out first), else allocated."""
    if xp is np:
        if beta:
            out += np.matmul(a, b)
            return out
        return np.matmul(a, b, out=out)
    usable = (lambda x: layout(x) is not None and (math != "bf16" or x.flags.c_contiguous or x.flags.f_contiguous))
    a, b = (x if usable(x) else xp.ascontiguousarray(x) for x in (a, b))
    out = xp.empty((a.shape[0], b.shape[1]), np.result_type(a.dtype, b.dtype)) if out is None else out
    a, b = Operand(xp, a, math), Operand(xp, b, math)
    a.update()
    b.update()
    return Matmul(xp, a, b, out, math, beta)()


def constant(xp, a, math, low=None):
    """The Operand of a GEMM operand fixed for a whole sweep (a weight), converted once here (bf16)."""
    operand = Operand(xp, a, math, low)
    operand.update()
    return operand


def per_step(xp, T, rows, w, out, math, low=None, into=None):
    """T prepared products, one per step t: rows[t] @ w (rows: (T, M, K), or (1, M, K) serving every step; w: an
    Operand or array (K, N)) into out[t] (out: (T, M, N)) or into out (M, N), rows[t] converted first (bf16, into the
    buffer `low`). `into`: step 0's product goes there instead, added to what it holds. Returns T callables."""
    def product(t):
        operand = Operand(xp, rows[t % rows.shape[0]], math, low)
        target = into if (t == 0 and into is not None) else out[t] if out.ndim == 3 else out
        matmul = Matmul(xp, operand, w, target, math, beta=1.0 if target is into else 0.0)
        return lambda: (operand.update(), matmul())
    return [product(t) for t in range(T)]
