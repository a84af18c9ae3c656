"""The fused CPU kernels' variants (float32) against the float64 reference: LayerNormLSTM/GRU, zoneout, weight_drop
and projections; outputs, final states and every gradient, in training (same masks: the same seeds) and evaluation;
segments (t0 > 0), ragged lengths, bidirectional, stacked. And the zoneout generator of the kernels bit for bit
against the reference's."""
import numba
import numpy as np
import pytest

from gpurnn.kernels import cpu_fused, numpy_ref
from test_variants_reference import VARIANTS, make
from util import as_tuple, random_problem

RTOL, ATOL = 3e-4, 3e-5


def run(layer, problem, training):
    x, state, lengths, dy, dstate = problem
    dt = layer.dtype

    def cast(a):
        return None if a is None else tuple(v.astype(dt) for v in a) if isinstance(a, tuple) else a.astype(dt)
    y, state_n, ctx = layer.forward(cast(x), cast(state), lengths, training=training)
    if not training:
        return [y] + list(as_tuple(state_n))
    dx, dstate0 = layer.backward(ctx, cast(dy), cast(dstate))
    return [y, dx] + list(as_tuple(state_n)) + list(as_tuple(dstate0)) + [layer.grads[k] for k in sorted(layer.grads)]


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("num_layers,bidirectional,ragged,batch_first", [
    (1, False, False, False), (2, True, True, False), (1, True, True, True)])
@pytest.mark.parametrize("training", [True, False])
def test_fused_matches_reference(name, num_layers, bidirectional, ragged, batch_first, training):
    kwargs = dict(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, seed=3,
                  segment_steps=3)
    ref, fused = make(name, dtype="float64", **kwargs), make(name, dtype="float32", **kwargs)
    problem = random_problem(ref, T=7, B=4, rng=np.random.default_rng(num_layers), ragged=ragged)
    want, got = run(ref, problem, training), run(fused, problem, training)
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL * max(1.0, float(np.abs(w).max())), err_msg=str(k))


@pytest.mark.parametrize("H", [1, 33])
@pytest.mark.parametrize("cls_name", ["lnlstm_all", "lngru_all"])
def test_fused_sizes(H, cls_name):
    cls, options = VARIANTS[cls_name]
    options = {**options, "proj_size": 0} if "proj_size" in options else options
    kwargs = dict(seed=1, segment_steps=2, **options)
    ref, fused = cls(4, H, dtype="float64", **kwargs), cls(4, H, dtype="float32", **kwargs)
    problem = random_problem(ref, T=5, B=3, rng=np.random.default_rng(H), ragged=True)
    for g, w in zip(run(fused, problem, True), run(ref, problem, True)):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL * max(1.0, float(np.abs(w).max())))


@numba.njit
def fused_bits(seed, t, B, n):
    out = np.empty((B, n), np.uint64)
    for b in range(B):
        key = cpu_fused.row_key(np.uint64(seed), t, b)
        for j in range(n):
            out[b, j] = cpu_fused.mix32((key + np.uint64(j)) & cpu_fused.MASK32)
    return out


@pytest.mark.parametrize("seed,t", [(0, 0), (1, 7), (2 ** 32 - 1, 123456), (987654321, 2 ** 31 - 1)])
def test_kernel_generator_is_the_reference_bit_for_bit(seed, t):
    np.testing.assert_array_equal(fused_bits(seed, t, 5, 300), numpy_ref.zoneout_bits(seed, t, 5, 300))
