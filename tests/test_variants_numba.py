"""The numba backend's variant kernels (numba_variant_kernels.py, numba_variants.py) beyond the layer-level comparison
of test_variants_gpu.py: the zoneout generator bit for bit, each call's seeds through a replayed CUDA graph, launches
per sweep, the planner's choice, t0 on the persistent path, no host reads; against the float64 reference."""
import numpy as np
import pytest
from numba import cuda

import fake_device
import gpurnn
from gpurnn.kernels import Zoneout, cpu_fused, numba_cuda as N, numba_plan, numpy_ref
from gpurnn.kernels.numba_variant_kernels import generator
from test_sync_free import gpu, run  # noqa: F401  (gpu: the fake GPU fixture)

pytestmark = pytest.mark.skipif(not N.simulator(), reason="runs the kernels in the simulator")


@cuda.jit
def bits_kernel(seed, t, out):
    """out (B, n) uint64: the generator's bits of (seed, t, b, j), as the row kernels draw them."""
    idx = cuda.grid(1)
    b = idx // out.shape[1]
    j = idx - b * out.shape[1]
    if b < out.shape[0]:
        key = generator().row_key(seed, t, b)
        out[b, j] = generator().mix32((key + np.uint64(j)) & cpu_fused.MASK32)


@pytest.mark.parametrize("seed,t", [(0, 0), (1, 7), (2 ** 32 - 1, 123456), (987654321, 2 ** 31 - 1)])
def test_kernel_generator_is_the_reference_bit_for_bit(seed, t):
    B, n = 3, 40
    out = np.zeros((B, n), np.uint64)
    bits_kernel[(B * n + 31) // 32, 32](np.uint64(seed), np.uint64(t), out)
    np.testing.assert_array_equal(out, numpy_ref.zoneout_bits(seed, t, B, n))


def sweep_problem(cell, T=4, B=3, H=3, P=None, seed=0):
    """xw, w_hh, b_hh, b_ih, state0, lengths (ragged) of one float64 sweep; P: h's width (projection)."""
    rng = np.random.default_rng(seed)
    G = {"lstm": 4, "gru": 3}.get(cell, 1)
    P = P or H
    xw, w_hh = rng.standard_normal((T, B, G * H)), rng.standard_normal((G * H, P)) * 0.5
    b_hh, b_ih = rng.standard_normal(G * H), rng.standard_normal(G * H)
    state0 = (rng.standard_normal((B, P)),) + ((rng.standard_normal((B, H)),) if cell == "lstm" else ())
    return xw, w_hh, b_hh, b_ih, state0, np.array([T, 2, T - 1], np.int32)[:B]


def assert_sweeps_agree(got, want):
    y, state_n = got[:2]
    np.testing.assert_allclose(y, want[0], rtol=1e-10, atol=1e-12)
    for g, w in zip(state_n, want[1]):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def test_each_call_draws_its_own_masks_through_the_replayed_graph():
    """The second call of a shape replays the captured graph: its masks must be those of its own seeds."""
    xw, w_hh, b_hh, b_ih, state0, lengths = sweep_problem("gru")
    for seed_h in (11, 2 ** 32 - 5):
        zoneout = Zoneout(0.5, 0.0, seed_h, 0)
        args = ("gru", xw, w_hh, b_hh, state0, lengths, True)
        got = N.forward(*args, b_ih=b_ih, t0=1, zoneout=zoneout, sweep="step")
        assert_sweeps_agree(got, numpy_ref.forward(*args, b_ih=b_ih, t0=1, zoneout=zoneout))


LN_LSTM = dict(ln=tuple(np.random.default_rng(1).uniform(0.5, 1.5, n) for n in (12, 12, 3, 3)))


@pytest.mark.parametrize("variant,forward,backward", [
    (LN_LSTM, {"row_forward": 4}, {"row_backward": 4}),
    ({"w_hr": np.full((2, 3), 0.3), "zoneout": Zoneout(0.3, 0.4, 5, 6)},
     {"row_forward": 4, "proj_forward": 4}, {"proj_backward": 4, "row_backward": 4})])
def test_a_variant_sweep_is_one_row_launch_per_step(launches, variant, forward, backward):
    """Forward: the row kernel per step (+ the projection's); backward likewise; the GEMMs are cuBLAS's."""
    P = variant["w_hr"].shape[0] if "w_hr" in variant else None
    xw, w_hh, b_hh, b_ih, state0, lengths = sweep_problem("lstm", P=P)
    y, state_n, ctx = N.forward("lstm", xw, w_hh, b_hh, state0, lengths, True, b_ih=b_ih, sweep="auto", **variant)
    assert ctx.sweep == "step"
    assert launches == forward
    launches.clear()
    dparams = {}
    N.backward(ctx, np.ones_like(y), tuple(np.ones_like(s) for s in state_n), dparams)
    assert launches == backward
    want = {}
    ref = numpy_ref.forward("lstm", xw, w_hh, b_hh, state0, lengths, True, b_ih=b_ih, **variant)
    numpy_ref.backward(ref[2], np.ones_like(y), tuple(np.ones_like(s) for s in state_n), want)
    assert sorted(dparams) == sorted(want)
    for name, w in want.items():
        np.testing.assert_allclose(dparams[name], w, rtol=1e-9, atol=1e-11, err_msg=name)


@pytest.mark.parametrize("variant,name", [({"ln": LN_LSTM["ln"]}, "ln"), ({"w_hr": np.ones((2, 3))}, "w_hr"),
                                          ({"zoneout": Zoneout(0.2)}, "zoneout")])
def test_persistent_sweep_refuses_a_variant_it_lacks(variant, name):
    P = variant["w_hr"].shape[0] if "w_hr" in variant else None
    xw, w_hh, b_hh, b_ih, state0, lengths = sweep_problem("lstm", P=P)
    with pytest.raises(ValueError, match=f"sweep='persistent' does not implement {name}"):
        N.forward("lstm", xw, w_hh, b_hh, state0, lengths, True, b_ih=b_ih, sweep="persistent", **variant)


@pytest.mark.parametrize("device", [numba_plan.H100_SXM, numba_plan.SIMULATOR])
def test_planner_takes_the_step_path_for_variants(device):
    assert numba_plan.plan("auto", 4, 64, 4, 4, device).sweep == "persistent"      # without a variant
    plan = numba_plan.plan("auto", 4, 64, 4, 4, device, ("ln", "zoneout"))
    assert plan.sweep == "step" and "ln, zoneout" in plan.reason


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_t0_offsets_validity_on_the_persistent_path(cell):
    """t0 needs no kernel of its own: lengths shifted by t0 (here a run starting at step 2 of ragged sequences)."""
    xw, w_hh, b_hh, b_ih, state0, lengths = sweep_problem(cell, T=3)
    lengths = np.array([5, 2, 3], np.int32)
    args = (cell, xw, w_hh, b_hh, state0, lengths, True)
    got = N.forward(*args, b_ih=b_ih, t0=2, sweep="persistent")
    assert got[2].sweep == "persistent"
    assert_sweeps_agree(got, numpy_ref.forward(*args, b_ih=b_ih, t0=2))


def test_variant_sweeps_read_nothing_on_the_host(gpu):  # noqa: F811  (the fixture)
    """Every variant at once, in segments (t0 > 0), both directions, on the fake GPU of test_sync_free: capture and
    replay read no device memory on the host (the seeds and t0 go up in `keys`, nothing comes down)."""
    layer = gpurnn.LayerNormLSTM(3, 5, zoneout=(0.3, 0.2), proj_size=2, bidirectional=True, memory="checkpoint",
                                 segment_steps=2, backend="numba", seed=0).to("cuda")
    layer.sweep = "step"
    for call in range(2):                          # the first call captures its graphs, the second replays
        run(gpu, layer, lengths=np.array([4, 2, 3]))
        assert fake_device.READS == [], call
