"""Precision modes of the GPU layers' GEMMs (math="fp32" | "tf32" | "bf16", gpurnn.precision, kernels/gemm.py).

Without a GPU the cuBLAS stand-in of kernels/cupy_host.py rounds every GEMM operand as the tensor cores do (tf32:
10 mantissa bits, to nearest or truncated; bf16: 7, converted by the CUDA C kernel of kernels/bf16.cu on the CPU
harness) and sums in float32; on a GPU the same tests run cuBLAS itself. Over T = 200 steps of a layer, the relative
error ‖got − ref‖ / ‖ref‖ of the output and of every gradient against the float64 reference stays within the
bounds below (README, "Precision"), and each mode's error is above the previous one's (the rounding happened)."""
import numpy as np
import pytest

from gpurnn import backend, checks, precision
from gpurnn.kernels import cupy_host
from util import BACKENDS, device_of, make_layer, random_problem, to_device, to_numpy

BOUND = {"fp32": 1e-5, "tf32": 2e-3, "bf16": 1e-2}
GPU = [b for b in BACKENDS if b != "numpy"] + (["numba"] if backend.cuda_simulator() and "numba" not in BACKENDS
                                              else [])


def relative(got, ref):
    return float(np.linalg.norm(to_numpy(got).astype(np.float64) - ref) / np.linalg.norm(ref))


def errors(backend_name, cell, math, T, B, H, seed=0):
    """Relative errors of y, dx and every gradient of one training step against float64, largest first."""
    layer = make_layer(cell, H, H, backend=backend_name, seed=seed, math=math).to(device_of(backend_name))
    ref = make_layer(cell, H, H, dtype="float64", seed=seed)
    ref.load_state_dict(layer.state_dict())
    x, state, _, dy, dstate = random_problem(layer, T, B, np.random.default_rng(seed))
    y, _, ctx = layer.forward(to_device(x, backend_name), to_device(state, backend_name))
    dx, _ = layer.backward(ctx, to_device(dy, backend_name), to_device(dstate, backend_name))
    f64 = (lambda a: tuple(v.astype(np.float64) for v in a) if isinstance(a, tuple) else a.astype(np.float64))
    y_ref, _, ctx_ref = ref.forward(f64(x), f64(state))
    dx_ref, _ = ref.backward(ctx_ref, f64(dy), f64(dstate))
    errs = {"y": relative(y, y_ref), "dx": relative(dx, dx_ref)}
    errs.update({k: relative(layer.grads[k], ref.grads[k]) for k in ref.grads})
    return errs


@pytest.mark.parametrize("rounding", ["nearest", "truncate"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("backend_name", [b for b in GPU if b == "cupy"])
def test_error_over_200_steps_stays_within_the_bound(monkeypatch, backend_name, cell, rounding):
    monkeypatch.setattr(cupy_host, "TF32_ROUNDING", rounding)
    previous = 0.0
    for math in precision.MATH:
        errs = errors(backend_name, cell, math, T=200, B=4, H=32)
        worst = max(errs.values())
        assert worst < BOUND[math], (math, errs)
        assert errs["y"] > 2 * previous, (math, errs)        # each mode rounds more than the one before
        previous = errs["y"]


@pytest.mark.skipif("numba" not in GPU, reason="needs the numba backend (GPU or simulator)")
@pytest.mark.parametrize("math", ["tf32", "bf16"])
def test_numba_layers_round_their_gemms(math):
    """The numba backend's sweeps and layer GEMMs go through the same GEMMs (a few steps: the simulator is slow)."""
    fp32, low = (errors("numba", "lstm", m, T=6, B=2, H=8) for m in ("fp32", math))
    assert max(low.values()) < BOUND[math], low
    assert low["y"] > 4 * fp32["y"] and max(fp32.values()) < BOUND["fp32"], (fp32, low)


@pytest.mark.skipif(not (backend.cuda_simulator() and backend.cuda_host()), reason="counts the cuBLAS stand-in's calls")
@pytest.mark.parametrize("math", precision.MATH)
@pytest.mark.parametrize("backend_name", ["numba", "cupy"])
def test_every_gemm_of_a_training_step_runs_in_the_layers_math(monkeypatch, backend_name, math):
    """Per layer and direction: the input projection and T recurrent GEMMs forward; T recurrent GEMMs, then dW_hh
    (one GEMM over [h0; y[:T-1]]), dW_ih and dx backward: 2T + 4 GemmEx calls, each with the math's types."""
    from gpurnn.kernels import gemm, graphs
    monkeypatch.setattr(graphs, "ENABLED", False)               # one call per GEMM (a capture records them again)
    calls = []
    gemm_ex = cupy_host.gemm_ex

    def counted(*args):
        calls.append((args[8], args[11], args[17]))             # Atype, Btype, computeType
        gemm_ex(*args)
    monkeypatch.setattr(cupy_host.cublas, "gemmEx", counted)
    T, L, D = 3, 2, 2
    layer = make_layer("gru", 2, 3, backend=backend_name, math=math, num_layers=L, bidirectional=True, seed=0)
    layer.sweep = "step"
    x, state, lengths, dy, dstate = random_problem(layer, T, 2, np.random.default_rng(0), ragged=True)
    y, _, ctx = layer.forward(x, state, lengths)
    layer.backward(ctx, dy, dstate)
    low = gemm.CUDA_R_16BF if math == "bf16" else gemm.CUDA_R_32F
    compute = gemm.COMPUTE_32F_FAST_TF32 if math == "tf32" else gemm.COMPUTE_32F
    assert calls == [(low, low, compute)] * (L * D * (2 * T + 4))


def test_math_is_checked():
    with pytest.raises(ValueError, match="math must be one of 'fp32', 'tf32', 'bf16'; got 'fp16'"):
        make_layer("lstm", 2, 3, math="fp16")
    with pytest.raises(ValueError, match="float64 layer computes in 'fp32' only"):
        make_layer("gru", 2, 3, math="tf32", dtype="float64")
    assert make_layer("gru", 2, 3, math="bf16").config["math"] == "bf16"
    assert "math" not in make_layer("gru", 2, 3).config


@pytest.mark.parametrize("math", ["tf32", "bf16"])
def test_the_cpu_computes_in_fp32_only(math):
    layer = make_layer("lstm", 2, 3, math=math, seed=0)
    before = {k: v.copy() for k, v in layer.params.items()}
    x = np.ones((2, 1, 2), np.float32)
    with pytest.raises(ValueError, match=f"math='{math}' runs on a GPU backend .* computes in 'fp32' only"):
        layer.forward(x)
    assert all(np.array_equal(before[k], layer.params[k]) for k in before)
    layer.math = "fp32"
    layer.forward(x)


def test_the_default_math_applies_to_gpu_float32_layers_only(monkeypatch):
    monkeypatch.setattr(precision, "DEFAULT_MATH", precision.DEFAULT_MATH)
    assert precision.set_default_math("tf32") == "fp32"
    assert precision.resolve(None, "cupy", "float32") == "tf32"
    assert precision.resolve(None, "numba", "float64") == "fp32"
    assert precision.resolve(None, "numpy", "float32") == "fp32"
    assert precision.resolve("bf16", "numba", "float32") == "bf16"
    with pytest.raises(ValueError, match="math must be one of"):
        precision.set_default_math("half")


def test_finite_checks_default_off_on_a_gpu(monkeypatch):
    class OnGPU:
        device, check_finite = "cuda", None
    assert not checks.finite_checks(OnGPU()) and checks.finite_checks(None)
    monkeypatch.setattr(checks, "CHECK_FINITE", True)
    assert checks.finite_checks(OnGPU())
    OnGPU.check_finite = False
    assert not checks.finite_checks(OnGPU())
