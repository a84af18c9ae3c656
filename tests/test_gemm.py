"""kernels/gemm.py: cuBLAS GemmEx from row-major arrays of every layout the backends pass (C order, transposed views,
strided rows, a dimension of 1, accumulation into the output), in fp32, float64, tf32 and bf16, through the cuBLAS
stand-in of kernels/cupy_host.py (or cuBLAS itself on a GPU); the bfloat16 conversion kernel (kernels/bf16.cu) and
the stand-in's rounding against independent oracles (torch's bfloat16 cast, rounding by frexp in float64)."""
import numpy as np
import pytest

from gpurnn import backend
from gpurnn.kernels import cupy_host, gemm

pytestmark = pytest.mark.skipif(not (backend.gpu_available() or backend.cuda_host()),
                                reason="needs a GPU, or GPURNN_CUDA_HOST=1 for the cuBLAS stand-in")
GPU = backend.gpu_available()
xp = backend.xp_for("cuda") if GPU else cupy_host          # what gemm.py is given
dev = xp if GPU else np                                      # what builds arrays where the GEMMs read them


def host(a):
    return a.get() if hasattr(a, "get") else a


def round_to_bits(x, bits, rounding="nearest"):
    """x (float32) with `bits` explicit mantissa bits, by frexp in float64: an oracle independent of round_mantissa."""
    m, e = np.frexp(x.astype(np.float64))                        # x = m 2^e, 0.5 <= |m| < 1
    scaled = m * 2.0 ** (bits + 1)
    kept = np.round(scaled) if rounding == "nearest" else np.trunc(scaled)   # np.round: half to even
    return np.ldexp(kept / 2.0 ** (bits + 1), e).astype(np.float32)


def operands(rng, M, K, N, layout):
    """a (M, K), b (K, N) in one of the layouts the backends pass."""
    a, b = (dev.asarray(rng.standard_normal(s).astype(np.float32)) for s in ((M, K), (K, N)))
    if layout == "transposed":                                   # W.T views: column-ordered
        a, b = dev.ascontiguousarray(a.T).T, dev.ascontiguousarray(b.T).T
    elif layout == "strided":                                    # rows of a wider array
        a = dev.concatenate([a, dev.zeros((M, 3), np.float32)], axis=1)[:, :K]
        b = dev.concatenate([b, dev.zeros((K, 2), np.float32)], axis=1)[:, :N]
    return a, b


@pytest.mark.parametrize("layout", ["c", "transposed", "strided"])
@pytest.mark.parametrize("shape", [(3, 5, 4), (1, 7, 2), (4, 1, 3), (2, 3, 1)])
@pytest.mark.parametrize("math", gemm.MATH)
def test_matmul_of_every_layout(math, shape, layout):
    rng = np.random.default_rng(sum(shape))
    a, b = operands(rng, *shape, layout)
    bits = {"tf32": 10, "bf16": 7}.get(math)
    a_r, b_r = (host(a), host(b)) if bits is None else (round_to_bits(host(a), bits), round_to_bits(host(b), bits))
    want = a_r.astype(np.float64) @ b_r.astype(np.float64)
    np.testing.assert_allclose(host(gemm.matmul(xp, a, b, math)), want, rtol=1e-5, atol=1e-5)
    out = rng.standard_normal(want.shape).astype(np.float32)
    acc = gemm.matmul(xp, a, b, math, out=dev.array(out), beta=1.0)
    np.testing.assert_allclose(host(acc), want + out, rtol=1e-5, atol=1e-5)


def test_float64_and_the_rounding_really_happens():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 6)), rng.standard_normal((6, 3))
    np.testing.assert_allclose(host(gemm.matmul(xp, dev.asarray(a), dev.asarray(b))), a @ b, rtol=1e-14)
    a32, b32 = dev.asarray(a.astype(np.float32)), dev.asarray(b.astype(np.float32))
    exact = host(gemm.matmul(xp, a32, b32, "fp32"))
    for math in ("tf32", "bf16"):
        assert np.abs(host(gemm.matmul(xp, a32, b32, math)) - exact).max() > 1e-4


def test_bad_arguments_are_refused():
    a = dev.ones((4, 4), np.float32)
    with pytest.raises(ValueError, match="contiguous rows or columns"):
        gemm.Operand(xp, a[::2, ::2], "fp32")
    with pytest.raises(ValueError, match="do not agree"):
        gemm.Matmul(xp, a, a[:3], np.empty((4, 4), np.float32), "fp32")
    with pytest.raises(ValueError, match="float64 layers compute in 'fp32' only"):
        gemm.check_math("tf32", np.float64)
    a = np.ones((4, 4), np.float32)
    with pytest.raises(cupy_host.CublasError, match="INVALID_VALUE: lda"):
        scalars = np.array([1, 0], np.float32)
        cupy_host.gemm_ex(1, 0, 0, 4, 4, 4, scalars.ctypes.data, a.ctypes.data, 0, 2, a.ctypes.data, 0, 4,
                          scalars.ctypes.data + 4, a.ctypes.data, 0, 4, 68, -1)


def special_values():
    rng = np.random.default_rng(1)
    u = rng.integers(0, 2 ** 32, 20000, dtype=np.uint64).astype(np.uint32)
    ties = (rng.integers(0, 2 ** 15, 2000, dtype=np.uint32) << 16) | np.uint32(0x8000)    # exactly halfway
    odd_ties = ties | np.uint32(0x10000)
    edge = np.array([0, 0x80000000, 0x7f7fffff, 0xff7fffff, 0x7f800000, 0xff800000, 0x7fc00000, 0x7fffffff,
                     0x00000001, 0x807fffff, 0x3f800000, 0x3f808000, 0x3f818000], np.uint32)
    return np.concatenate([u, ties, odd_ties, edge]).view(np.float32)


def test_round_mantissa_matches_torch_and_frexp():
    torch = pytest.importorskip("torch")
    x = special_values()
    finite = np.isfinite(x) & (np.abs(x) < np.finfo(np.float32).max / 2) & (np.abs(x) >= np.finfo(np.float32).tiny)
    for bits in (7, 10):
        for rounding in ("nearest", "truncate"):
            np.testing.assert_array_equal(cupy_host.round_mantissa(x[finite], bits, rounding),
                                          round_to_bits(x[finite], bits, rounding))
    by_torch = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(cupy_host.round_mantissa(x, 7), by_torch)        # NaN == NaN here


def test_the_bf16_conversion_kernel_rounds_as_torch_does():
    torch = pytest.importorskip("torch")
    x = special_values()
    low = gemm.Operand(xp, dev.asarray(x[None, :]), "bf16")
    low.update()
    bits = host(low.array)[0]
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    finite = ~np.isnan(x)
    np.testing.assert_array_equal(bits[finite], want[finite])
    assert np.isnan((bits[~finite].astype(np.uint32) << np.uint32(16)).view(np.float32)).all()
