"""Precision of the recurrent layers' GEMMs on a GPU: ``math="fp32" | "tf32" | "bf16"`` per layer, DEFAULT_MATH for
layers that leave it None. States, activations, pointwise kernels and every sum stay float32 (see
gpurnn.kernels.gemm for what each mode does to the GEMM operands); the CPU computes in "fp32" only."""
from . import checks

MATH = ("fp32", "tf32", "bf16")
DEFAULT_MATH = "fp32"
"""The math of GPU layers whose own `math` is None (float32 layers; CPU and float64 layers compute in fp32)."""


def set_default_math(math):
    """Set DEFAULT_MATH; returns the previous value."""
    global DEFAULT_MATH
    previous, DEFAULT_MATH = DEFAULT_MATH, checks.choice(math, "math", MATH)
    return previous


def check(math, dtype):
    """A layer's `math` argument: None or one of MATH, and "fp32" for float64 layers."""
    if math is None:
        return None
    checks.choice(math, "math", MATH)
    if math != "fp32" and checks.float_dtype(dtype).name != "float32":
        raise ValueError(f"math={math!r} rounds float32 GEMM operands; a {checks.float_dtype(dtype).name} layer "
                         "computes in 'fp32' only")
    return math


def resolve(math, backend, dtype):
    """The math one call runs in: the layer's `math`, else DEFAULT_MATH on a GPU backend for float32, else "fp32".
    ValueError for tf32/bf16 asked of the numpy backend (the CPU computes in fp32 only)."""
    if math is None:
        return DEFAULT_MATH if backend != "numpy" and checks.float_dtype(dtype).name == "float32" else "fp32"
    if math != "fp32" and backend == "numpy":
        raise ValueError(f"math={math!r} runs on a GPU backend (numba or cupy); the numpy backend computes in "
                         "'fp32' only: use math='fp32' or move the layer with layer.to('cuda')")
    return math
