"""The variants on the GPU backends' own kernels (the numba simulator and the CUDA C kernels on the CPU harness
without a GPU) against the float64 reference: LayerNormLSTM/GRU, zoneout, weight_drop and projections, in training
(the same generator draws, so the same masks) and evaluation, both memory modes (checkpoint: runs of steps from
t0 > 0), ragged, bidirectional, stacked; outputs, final states and every gradient."""
import numpy as np
import pytest

from gpurnn import backend as backends
from test_variants_reference import VARIANTS, make
from util import KERNEL_BACKENDS, device_of, layer_outputs, random_problem

GPU_BACKENDS = [b for b in KERNEL_BACKENDS if b != "numpy"]
TOL = {"float32": (3e-4, 3e-5), "float64": (1e-9, 1e-11)}


def outputs(layer, problem, training):
    """Everything a training step gives (layer_outputs), or an evaluation forward's y and final state."""
    if training:
        return layer_outputs(layer, *problem)
    x, state, lengths = problem[:3]
    move = lambda a: None if a is None else tuple(map(move, a)) if isinstance(a, tuple) else layer.xp.asarray(a)  # noqa: E731
    y, state_n, _ = layer.forward(move(x), move(state), lengths, training=False)
    parts = state_n if isinstance(state_n, tuple) else (state_n,)
    return {"y": backends.to_host(y), **{f"state_n[{k}]": backends.to_host(s) for k, s in enumerate(parts)}}


@pytest.mark.skipif(not GPU_BACKENDS, reason="no GPU backend runs its kernels here")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("num_layers,bidirectional,ragged,memory,training", [
    (1, False, False, "full", True), (2, True, True, "checkpoint", True), (1, True, True, "full", False)])
def test_gpu_variants_match_the_reference(backend, name, dtype, num_layers, bidirectional, ragged, memory, training):
    kwargs = dict(num_layers=num_layers, bidirectional=bidirectional, seed=3, memory=memory, segment_steps=2)
    ref = make(name, dtype="float64", **kwargs)
    gpu = make(name, dtype=dtype, backend=backend, **kwargs).to(device_of(backend))
    problem = random_problem(ref, T=5, B=3, rng=np.random.default_rng(num_layers), ragged=ragged)
    cast = lambda a: None if a is None else tuple(map(cast, a)) if isinstance(a, tuple) else a.astype(dtype)  # noqa: E731
    want = outputs(ref, problem, training)
    got = outputs(gpu, (cast(problem[0]), cast(problem[1]), problem[2], cast(problem[3]), cast(problem[4])),
                  training)
    rtol, atol = TOL[dtype]
    assert sorted(got) == sorted(want)
    for key, w in want.items():
        assert got[key].dtype == np.dtype(dtype), key
        np.testing.assert_allclose(got[key], w, rtol=rtol, atol=atol * max(1.0, float(np.abs(w).max())),
                                   err_msg=key)


@pytest.mark.skipif(not GPU_BACKENDS, reason="no GPU backend runs its kernels here")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("math", ["tf32", "bf16"])
def test_gpu_variants_in_low_precision_stay_near_the_reference(backend, math):
    """Every GEMM of the projection (forward, dL/dm and dW_hr) in the layer's math reads converted operands: the
    results stay near the float64 reference (a bf16 copy never converted holds garbage, far off)."""
    kwargs = dict(num_layers=1, bidirectional=True, seed=3, memory="checkpoint", segment_steps=2)
    ref = make("lstm_proj", dtype="float64", **kwargs)
    gpu = make("lstm_proj", dtype="float32", backend=backend, math=math, **kwargs).to(device_of(backend))
    problem = random_problem(ref, T=5, B=3, rng=np.random.default_rng(4), ragged=True)
    cast = lambda a: None if a is None else tuple(map(cast, a)) if isinstance(a, tuple) else a.astype("float32")  # noqa: E731
    want = outputs(ref, problem, True)
    got = outputs(gpu, (cast(problem[0]), cast(problem[1]), problem[2], cast(problem[3]), cast(problem[4])), True)
    for key, w in want.items():
        scale = max(1.0, float(np.abs(w).max()))
        assert np.abs(got[key] - w).max() < 0.1 * scale, key
