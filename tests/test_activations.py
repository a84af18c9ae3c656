"""float32 activations against float64 oracles: ulp error, monotonicity, exact saturation, NaN/Inf semantics.

Implementations: the fused CPU kernels' scalar functions (kernels/cpu_fused.py), the NumPy reference
(kernels/numpy_ref.py), the CUDA C activations of kernels/common.cuh compiled for the CPU by the host harness
(kernels/cuda_host.py; float32: the CPU kernels' operations in CUDA C, IEEE operations only, so the host build is
bit-identical to the GPU's and both must equal cpu_fused bit for bit; float64: the host's libm in place of CUDA's)
and the Numba CUDA device functions (float32: cpu_fused's own source compiled for CUDA; their PTX is read here for
approximate or fused operations; the simulator evaluates them with NumPy scalars, so only their semantics are
checked there, not their ulp error). The inputs: every float32 in
[-LIMIT, LIMIT] at a fixed stride of bit patterns, plus every float32 near each point where an implementation
switches formula or the result saturates, and near 0. GPURNN_EXHAUSTIVE=1 also runs the checks over all 2^32
float32 values (minutes).
"""
import ast
import functools
import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections import Counter

import numpy as np
import pytest
from numba import cuda, njit

from gpurnn.kernels import cpu_fused, cuda_host, cupy_raw, numpy_ref

EXHAUSTIVE = os.environ.get("GPURNN_EXHAUSTIVE") == "1"
ULP_BOUND = 1.5     # cpu_fused float32 tanh, sigmoid: 1.35, 1.32 measured over every float32 (2 promised)
LN2 = float(np.log(2))
WINDOW = 1 << 12                     # float32 values taken on each side of every special point
STRIDE = 613                         # odd, so the strided samples fall on every low-bit pattern


def tanh64(x):
    return np.tanh(x)


def sigmoid64(x):
    e = np.exp(-np.abs(x))
    return np.where(x < 0, e, 1.0) / (1.0 + e)


ORACLE = {"tanh": tanh64, "sigmoid": sigmoid64}
CODE = {"tanh": 0, "relu": 1, "sigmoid": 2}


@njit(fastmath=cpu_fused.FAST)        # the step kernels' flags: act and act_backward are inlined under them
def fused_act(code, x, out):
    for i in range(x.size):
        out[i] = cpu_fused.act(code, x[i])


@njit(fastmath=cpu_fused.FAST)
def fused_act_backward(code, dy, y, out):
    for i in range(y.size):
        out[i] = cpu_fused.act_backward(code, dy[i], y[i])


def run_fused(name, x):
    out = np.empty_like(x)
    fused_act(CODE[name], x, out)
    return out


def run_reference(name, x):
    return numpy_ref.ACT[name](x)


CUDA_C = """
template <typename Act, typename T>
__global__ void apply(const T* x, T* y, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)    // grid-stride
        y[i] = Act::fwd(x[i]);
}

template <typename Act, typename T>
__global__ void backward(const T* dy, const T* y, T* dp, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        dp[i] = Act::backward(dy[i], y[i]);
}
"""


@functools.lru_cache(maxsize=None)
def cuda_c_module():
    """common.cuh's activations (after their constants, as cupy_raw assembles them) behind one kernel per
    activation, direction and type, built by the CUDA host harness."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("the CUDA host harness needs a C++17 compiler (g++ or $CXX)")
    names = [f"{kernel}<{act}, {t}>" for kernel in ("apply", "backward") for act in cupy_raw.ACTIVATION_TYPES.values()
             for t in ("float", "double")]
    return cuda_host.RawModule(code=cupy_raw.header() + CUDA_C, options=cupy_raw.OPTIONS, name_expressions=names)


def cuda_c_kernel(kernel, name, dtype):
    return cuda_c_module().get_function(f"{kernel}<{cupy_raw.ACTIVATION_TYPES[name]}, {cupy_raw.FLOAT_TYPES[dtype]}>")


def run_cuda_c(name, x):
    """The CUDA C activation of every element of x."""
    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    cuda_c_kernel("apply", name, x.dtype)((16,), (64,), (x, y, np.int32(x.size)))
    return y


def backward_cuda_c(name, dy, y):
    dy, y = np.ascontiguousarray(dy), np.ascontiguousarray(y)
    dp = np.empty_like(y)
    cuda_c_kernel("backward", name, y.dtype)((16,), (64,), (dy, y, dp, np.int32(y.size)))
    return dp


def backward_fused(name, dy, y):
    dp = np.empty_like(y)
    fused_act_backward(CODE[name], dy, y, dp)
    return dp


IMPLEMENTATIONS = {"cpu_fused": run_fused, "numpy_ref": run_reference, "cuda_c_host": run_cuda_c}
BACKWARD = {"cpu_fused": backward_fused, "numpy_ref": numpy_ref.act_backward, "cuda_c_host": backward_cuda_c}
EXACT = list(IMPLEMENTATIONS)           # float32: within 2 ulp and monotone
# numpy_ref rounds a float64 result; CUDA C's float32 is cpu_fused's bit for bit (test_cuda_c_float32_is_cpu_fused)
BOUND = {"numpy_ref": 0.5 + 2.0 ** -20, "cpu_fused": ULP_BOUND, "cuda_c_host": ULP_BOUND}


def ulps(got, exact):
    """|got - exact| in units of the float32 spacing at `exact` (float64), subnormal spacing 2^-149 included."""
    _, e = np.frexp(exact)
    spacing = np.maximum(np.ldexp(1.0, e - 24), 2.0 ** -149)
    return np.abs(got.astype(np.float64) - exact) / spacing


def bits(x):
    return int(np.float32(x).view(np.uint32))


def around(x, width=WINDOW):
    """Every float32 within `width` representable values of x (both signs of x's neighbourhood if x is 0)."""
    b = bits(abs(x))
    lo, hi = max(b - width, 0), b + width
    v = np.arange(lo, hi, dtype=np.uint32).view(np.float32)
    return np.concatenate([v, -v]) if x == 0 else np.copysign(v, np.float32(x))


def first_rounding_to(name, target, lo, hi):
    """The float32 x in [lo, hi] where float32(oracle(x)) first equals `target` (bisection on bit patterns,
    walking toward +Inf on the positive axis and toward -Inf on the negative one)."""
    sign = 1.0 if hi > 0 else -1.0
    a, b = bits(abs(lo)), bits(abs(hi))
    hit = lambda k: np.float32(ORACLE[name](sign * float(np.uint32(k).view(np.float32)))) == target  # noqa: E731
    assert not hit(a) and hit(b)
    while b - a > 1:
        m = (a + b) // 2
        a, b = (a, m) if hit(m) else (m, b)
    return sign * float(np.uint32(b).view(np.float32))


SATURATION = {"tanh": [(1.0, first_rounding_to("tanh", 1.0, 5.0, 20.0))],
              "sigmoid": [(1.0, first_rounding_to("sigmoid", 1.0, 10.0, 40.0)),
                          (0.0, first_rounding_to("sigmoid", 0.0, -90.0, -120.0))]}
LIMIT = {"tanh": 40.0, "sigmoid": 120.0}
# points where an implementation changes formula: an exp range reduction steps n at multiples of ln2 or half-way
# between them, in a = 2|x| (tanh) or |x| (sigmoid); cpu_fused's tanh switches to its polynomial below TANH_SMALL
BREAKS = {"tanh": [float(cpu_fused.TANH_SMALL)] + [k * LN2 / 4 for k in range(1, 60)],
          "sigmoid": [k * LN2 / 2 for k in range(1, 320)]}


def sweep(name):
    """Sorted float32 inputs: the strided range, windows around 0, saturation and formula breaks, +-Inf, NaN last."""
    strided = np.concatenate([np.arange(0, bits(LIMIT[name]), STRIDE, dtype=np.uint32),          # dense
                              np.arange(bits(LIMIT[name]), bits(np.inf), STRIDE << 8, dtype=np.uint32)])  # beyond
    strided = strided.view(np.float32)
    points = [0.0, np.float32(2.0 ** -12)] + [t for _, t in SATURATION[name]] + BREAKS[name]
    parts = [strided, -strided, np.float32([np.inf, -np.inf])]
    parts += [around(p) for p in points] + [around(-p) for p in points if p > 0]
    x = np.unique(np.concatenate(parts))
    return np.concatenate([x, [np.float32(np.nan)]])


@pytest.fixture(scope="module", params=["tanh", "sigmoid"])
def case(request):
    """(name, x, exact) shared by the tests of one activation: inputs sorted, NaN last."""
    name = request.param
    x = sweep(name)
    return name, x, ORACLE[name](x.astype(np.float64))


def check_ulp_and_monotone(impl, name, x, got, exact, before=None):
    """x sorted, no NaN; `before`: the output just below x[0], if any. Returns the largest error in ulp."""
    err = ulps(got, exact)
    bound = BOUND[impl]
    worst = int(np.argmax(err))
    assert err[worst] <= bound, f"{impl} {name}({x[worst]!r}) = {got[worst]!r}: {err[worst]:.3f} ulp"
    drops = np.flatnonzero(np.diff(got if before is None else np.concatenate([[before], got])) < 0)
    assert drops.size == 0, f"{impl} {name} decreases {drops.size} times, first near x = {x[drops[0]]!r}"
    return float(err[worst])


def check_saturation(impl, name, x, got, exact):
    """got equals the correctly rounded value wherever that is a limit (+-1 for tanh, 0 or 1 for sigmoid), and the
    derivative written from the output is exactly 0 there."""
    rounded = exact.astype(np.float32)
    at = np.isin(rounded, [-1.0, 1.0] if name == "tanh" else [0.0, 1.0]) & (x != 0)
    np.testing.assert_array_equal(got[at], rounded[at], err_msg=f"{impl} {name} where it rounds to a limit")
    grad = BACKWARD[impl](name, np.ones_like(got), got)
    assert not grad[at].any()
    return at


@pytest.mark.parametrize("impl", EXACT)
def test_ulp_error_and_monotone(case, impl):
    name, x, exact = case
    got = IMPLEMENTATIONS[impl](name, x)
    assert got.dtype == np.float32
    check_ulp_and_monotone(impl, name, x[:-1], got[:-1], exact[:-1])


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_exact_where_correctly_rounded_saturates(case, impl):
    name, x, exact = case
    at = check_saturation(impl, name, x[:-1], IMPLEMENTATIONS[impl](name, x[:-1]), exact[:-1])
    assert at.any()


def assert_same_bits(got, want):
    """Equal bit for bit (the sign of 0 too), NaN where NaN (whose sign and payload no operation here defines)."""
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def test_cuda_c_float32_is_cpu_fused_bit_for_bit(case):
    """common.cuh's float32 tanh and sigmoid are cpu_fused's operations in CUDA C (IEEE operations only, the host
    build without contraction), so they carry its bounds, measured over every float32: equal bit for bit over the
    sweep (GPURNN_EXHAUSTIVE=1: over every float32)."""
    name, x, _ = case
    assert_same_bits(run_cuda_c(name, x), run_fused(name, x))


def all_float32(chunk=1 << 24):
    """Every float32 but NaN, in increasing order, in chunks: -Inf .. -0, then +0 .. +Inf."""
    top = bits(np.inf)
    for end in range(top + 1, 0, -chunk):
        yield -np.arange(max(end - chunk, 0), end, dtype=np.uint32)[::-1].view(np.float32)
    for start in range(0, top + 1, chunk):
        yield np.arange(start, min(start + chunk, top + 1), dtype=np.uint32).view(np.float32)


@pytest.mark.skipif(not EXHAUSTIVE, reason="GPURNN_EXHAUSTIVE=1 checks all 2^32 float32 inputs (minutes)")
@pytest.mark.parametrize("impl", ["cpu_fused", "numpy_ref"])
@pytest.mark.parametrize("name", ["tanh", "sigmoid"])
def test_every_float32(impl, name):
    worst, before = 0.0, None
    for x in all_float32():
        got = IMPLEMENTATIONS[impl](name, x)
        exact = ORACLE[name](x.astype(np.float64))
        worst = max(worst, check_ulp_and_monotone(impl, name, x, got, exact, before))
        check_saturation(impl, name, x, got, exact)
        before = got[-1]
    print(f"{impl} {name}: max {worst:.3f} ulp over every float32, monotone")


@pytest.mark.skipif(not EXHAUSTIVE, reason="GPURNN_EXHAUSTIVE=1 checks all 2^32 float32 inputs (minutes)")
@pytest.mark.parametrize("name", ["tanh", "sigmoid"])
def test_every_float32_cuda_c_is_cpu_fused(name):
    for x in all_float32():
        assert_same_bits(run_cuda_c(name, x), run_fused(name, x))


@pytest.mark.parametrize("name", ["tanh", "sigmoid"])
def test_saturation_points_are_where_float32_rounds(name):
    """The oracle's saturation points sit where the float32 result first rounds to its limit (tanh 9.01, sigmoid
    17.33 and -103.97), and the fused kernel reaches the limit exactly there and not one float32 earlier."""
    expect = {"tanh": [9.01], "sigmoid": [17.33, -103.97]}[name]
    for (value, at), want in zip(SATURATION[name], expect):
        assert abs(at - want) < 0.01
        before = np.nextafter(np.float32(at), np.float32(0))
        assert run_fused(name, np.float32([at]))[0] == value
        assert run_fused(name, np.float32([before]))[0] != value


def nonfinite_inputs(dtype):
    return np.array([np.nan, np.inf, -np.inf, -0.0, 0.0], dtype)


EXPECTED = {"tanh": [np.nan, 1.0, -1.0, -0.0, 0.0], "sigmoid": [np.nan, 1.0, 0.0, 0.5, 0.5],
            "relu": [np.nan, np.inf, 0.0, 0.0, 0.0]}


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "relu"])
@pytest.mark.parametrize("impl,dtype", [("cpu_fused", np.float32), ("numpy_ref", np.float32),
                                        ("numpy_ref", np.float64), ("cuda_c_host", np.float32),
                                        ("cuda_c_host", np.float64)])
def test_nan_and_inf(name, impl, dtype):
    got = IMPLEMENTATIONS[impl](name, nonfinite_inputs(dtype))
    np.testing.assert_array_equal(got, np.array(EXPECTED[name], dtype))
    assert got.dtype == dtype


RELU_Y = [np.nan, -0.0, 0.0, 2.0, -np.inf, 3.0, -1.0]
RELU_DY = [5.0, np.nan, np.inf, 7.0, np.nan, np.nan, -np.inf]
RELU_DP = [5.0, 0.0, 0.0, 7.0, 0.0, np.nan, 0.0]     # torch's threshold_backward: y <= 0 ? 0 : dy


@pytest.mark.parametrize("impl,dtype", [("cpu_fused", np.float32), ("numpy_ref", np.float32),
                                        ("numpy_ref", np.float64), ("cuda_c_host", np.float32),
                                        ("cuda_c_host", np.float64)])
def test_relu_backward_selects_like_torch(impl, dtype):
    """relu's backward is a select, not dy times relu': 0 where y <= 0 whatever dy is (NaN * 0 would be NaN), dy
    where y > 0 or y is NaN (torch's threshold backward passes the gradient where y <= 0 is False)."""
    got = BACKWARD[impl]("relu", np.array(RELU_DY, dtype), np.array(RELU_Y, dtype))
    np.testing.assert_array_equal(got, np.array(RELU_DP, dtype))


def test_relu_backward_is_torchs():
    """The expected values above are torch's."""
    torch = pytest.importorskip("torch")
    x = torch.tensor(RELU_Y, dtype=torch.float64, requires_grad=True)
    torch.relu(x).backward(torch.tensor(RELU_DY, dtype=torch.float64))
    np.testing.assert_array_equal(x.grad.numpy(), RELU_DP)


def test_reference_sigmoid_float64_is_relatively_accurate_for_large_negative_x():
    """float64 sigmoid against a long double oracle, down to where e^x leaves the subnormals."""
    if np.finfo(np.longdouble).nmant <= np.finfo(np.float64).nmant:
        pytest.skip("long double is no wider than float64 here")
    x = np.concatenate([np.linspace(-708, 40, 200001), -np.geomspace(1e-300, 1, 1001)])
    xl = x.astype(np.longdouble)
    exact = np.where(xl < 0, np.exp(xl) / (1 + np.exp(xl)), 1 / (1 + np.exp(-xl)))
    rel = np.abs((numpy_ref.sigmoid(x) - exact) / exact).astype(np.float64)
    assert rel.max() <= 4 * np.finfo(np.float64).eps


@pytest.fixture(scope="module")
def numba_activations():
    """The Numba CUDA device functions behind a one-thread-per-element kernel (the simulator without a GPU)."""
    from gpurnn.kernels.numba_cuda_kernels import ACT_CODES, build

    def make(dtype):
        K = build(dtype)

        @cuda.jit
        def apply(act, backward, dy, x, out):
            i = cuda.grid(1)
            if i < x.size:
                out[i] = K.activate_backward(act, dy[i], x[i]) if backward else K.activate(act, x[i])
        return apply

    kernels = {dt: make(dt) for dt in (np.float32, np.float64)}

    def run(name, x, dy=None):
        """act(x), or with dy its backward from dy and the output x."""
        out = np.empty_like(x)
        kernels[x.dtype.type][1, x.size](ACT_CODES[name], dy is not None, x if dy is None else dy, x, out)
        return out
    return run


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "relu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_cuda_activation_semantics(numba_activations, name, dtype):
    """NaN in, NaN out; +-Inf give the limits; exact saturation far out, and derivative 0 there."""
    np.testing.assert_array_equal(numba_activations(name, nonfinite_inputs(dtype)), np.array(EXPECTED[name], dtype))
    far = np.array([-800.0, -750.0, 750.0, 800.0], dtype)     # past saturation in float64 too
    y = numba_activations(name, far)
    want = {"tanh": [-1, -1, 1, 1], "sigmoid": [0, 0, 1, 1], "relu": [0, 0, 750, 800]}[name]
    np.testing.assert_array_equal(y, np.array(want, dtype))
    grad = numba_activations(name, y, dy=np.ones_like(y))
    np.testing.assert_array_equal(grad, np.array([0, 0, 1, 1] if name == "relu" else [0, 0, 0, 0], dtype))
    if name == "sigmoid":   # relatively accurate tiny results: e^x, not 0, well before the underflow
        tiny = numba_activations(name, np.array([-50.0, -80.0], dtype))
        np.testing.assert_allclose(tiny, np.exp(np.array([-50.0, -80.0])), rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_cuda_relu_backward_selects_like_torch(numba_activations, dtype):
    got = numba_activations("relu", np.array(RELU_Y, dtype), dy=np.array(RELU_DY, dtype))
    np.testing.assert_array_equal(got, np.array(RELU_DP, dtype))


@pytest.mark.parametrize("name", ["tanh", "sigmoid"])
def test_numba_cuda_float32_runs_cpu_fused_source(numba_activations, name):
    """The simulated float32 device functions (cpu_fused's source with the simulator's operations: fma rounded
    twice) within 1 ulp of cpu_fused at inputs across every formula's range."""
    x = np.float32(np.concatenate([np.linspace(-LIMIT[name], LIMIT[name], 397), BREAKS[name][:20],
                                   [t for _, t in SATURATION[name]], [2.0 ** -12, 1e-30, 0.3]]))
    np.testing.assert_array_max_ulp(numba_activations(name, x), run_fused(name, x), maxulp=1)


def source_ops(name):
    """How many fma, mul and / cpu_fused's float32 `name` writes, exp_parts included: {"fma": n, "mul": n, "div": n}."""
    counts = Counter()
    for fn in (cpu_fused.exp_parts, getattr(cpu_fused, name)):
        for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(fn.py_func)))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("fma", "mul"):
                counts[node.func.id] += 1
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
                counts["div"] += 1
    return counts


def check_ptx_operations(ptx, name):
    """The float instructions of a PTX kernel applying one float32 activation are the source's operations: as many
    correctly rounded fma, mul and div as cpu_fused writes; no approximate, flush-to-zero or transcendental
    instruction, no min/max (NaN would become a number), no float64, and no plain mul that ptxas may fuse with an
    add (mul.rn / add without .rn are exempt from contraction only in that pairing)."""
    ops = Counter()
    for line in ptx.splitlines():
        words = line.split()
        if words and words[0].startswith("@"):
            words = words[1:]
        if words and (".f32" in words[0] or ".f64" in words[0]):
            ops[words[0]] += 1
    kinds = {op.split(".")[0] for op in ops}
    assert not [op for op in ops if ".f64" in op or "approx" in op or "ftz" in op or "full" in op], ops
    assert not kinds & {"ex2", "lg2", "rcp", "rsqrt", "sqrt", "sin", "cos", "tanh", "min", "max", "mad"}, ops
    assert {op for op in ops if op.split(".")[0] in ("fma", "mul", "div")} <= {"fma.rn.f32", "mul.rn.f32",
                                                                                "div.rn.f32"}, ops
    want = source_ops(name)
    assert (ops["fma.rn.f32"], ops["mul.rn.f32"], ops["div.rn.f32"]) == (want["fma"], want["mul"], want["div"]), ops


@functools.lru_cache(maxsize=None)
def numba_activation_ptx():
    """{name: PTX} of the Numba CUDA float32 activations for sm_90, compiled without the simulator."""
    code = ("import json; from gpurnn.kernels.numba_cuda_ptx import activation_ptx; "
            "print(json.dumps(activation_ptx((9, 0))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, NUMBA_ENABLE_CUDASIM="0"))
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize("name", ["tanh", "sigmoid"])
def test_numba_cuda_float32_ptx_is_the_source_operations(name):
    check_ptx_operations(numba_activation_ptx()[name], name)


NVRTC_KERNEL = """
template <typename Act> __global__ void apply(const float* x, float* y) { y[threadIdx.x] = Act::fwd(x[threadIdx.x]); }
"""


@pytest.mark.parametrize("name", ["tanh", "sigmoid"])
def test_cuda_c_float32_ptx_is_the_source_operations(name):
    """NVRTC with the backend's options (its defaults: -fmad=true, -prec-div=true, -ftz=false) keeps common.cuh's
    operations: what the host harness proves bit-identical to cpu_fused is what the GPU runs."""
    from test_cuda_compile import nvrtc_build, nvrtc_or_none
    if nvrtc_or_none() is None:
        pytest.skip("NVRTC is not installed (pip install nvidia-cuda-nvrtc cuda-bindings)")
    kernel = f"apply<{cupy_raw.ACTIVATION_TYPES[name]}>"
    ptx, _ = nvrtc_build(cupy_raw.header() + NVRTC_KERNEL, [kernel], "compute_90", ptx=True)
    check_ptx_operations(ptx.decode().rstrip("\0 "), name)
