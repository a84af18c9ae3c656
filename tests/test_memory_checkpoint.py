"""memory="checkpoint" (O(sqrt T) BPTT: the state every k steps, each segment recomputed in backward) against
memory="full": outputs, states and every gradient identical to the last bit, for every cell and variant, ragged,
bidirectional, stacked, float32 (fused kernels) and float64 (reference); and what the ctx keeps (measured with
tracemalloc, which counts NumPy's buffers)."""
import tracemalloc

import numpy as np
import pytest

import gpurnn
from gpurnn import segments
from test_variants_reference import VARIANTS
from util import as_tuple, make_layer, random_problem

CASES = {**{cell: (None, {}) for cell in ("lstm", "gru", "rnn_tanh")}, **VARIANTS}


def build(name, **kwargs):
    cls, options = CASES[name]
    if cls is None:
        return make_layer(name, 3, 5, **kwargs)
    return cls(3, 5, **{**options, **kwargs})


def step(layer, problem, retain=False):
    x, state, lengths, dy, dstate = problem
    layer.zero_grad()
    y, state_n, ctx = layer.forward(x, state, lengths, training=True, retain=retain)
    dx, dstate0 = layer.backward(ctx, dy, dstate)
    return [y, dx, *as_tuple(state_n), *as_tuple(dstate0)] + [layer.grads[k].copy() for k in sorted(layer.grads)]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("num_layers,bidirectional,ragged,steps", [(1, False, False, 2), (2, True, True, 3)])
def test_checkpointed_gradients_are_bit_identical(name, dtype, num_layers, bidirectional, ragged, steps):
    kwargs = dict(num_layers=num_layers, bidirectional=bidirectional, dtype=dtype, seed=4, segment_steps=steps,
                  dropout=0.3 if num_layers > 1 else 0.0)
    full, ckpt = build(name, memory="full", **kwargs), build(name, memory="checkpoint", **kwargs)
    problem = random_problem(full, T=7, B=3, rng=np.random.default_rng(steps), ragged=ragged)
    for k, (a, b) in enumerate(zip(step(full, problem), step(ckpt, problem))):
        np.testing.assert_array_equal(a, b, err_msg=str(k))


def test_default_plan_has_several_segments_and_is_bit_identical():
    full, ckpt, probe = (gpurnn.LayerNormLSTM(3, 4, zoneout=0.2, memory=m, seed=1)
                         for m in ("full", "checkpoint", "checkpoint"))
    problem = random_problem(full, T=300, B=8, rng=np.random.default_rng(0), ragged=True)
    _, _, ctx = probe.forward(*problem[:3])
    assert len(ctx.segments) == 3 and ctx.sweeps[0].ctxs == [] and len(ctx.sweeps[0].states) == 3
    for a, b in zip(step(full, problem), step(ckpt, problem)):
        np.testing.assert_array_equal(a, b)


def test_retained_ctx_recomputes_alike_twice():
    layer = gpurnn.GRU(3, 5, zoneout=0.3, memory="checkpoint", segment_steps=2, seed=0)
    x, state, lengths, dy, dstate = random_problem(layer, T=6, B=2, rng=np.random.default_rng(1), ragged=True)
    _, _, ctx = layer.forward(x, state, lengths, retain=True)
    first = layer.backward(ctx, dy, dstate)
    grads = {k: g.copy() for k, g in layer.grads.items()}
    second = layer.backward(ctx, dy, dstate)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    for k, g in layer.grads.items():
        np.testing.assert_array_equal(g, 2 * grads[k])


@pytest.mark.parametrize("T,B,steps,want", [(1, 5, None, [(0, 1)]), (10, 1, 3, [(0, 3), (3, 6), (6, 9), (9, 10)]),
                                            (100, 1000, None, [(0, 10), (10, 20), (20, 30), (30, 40), (40, 50),
                                                               (50, 60), (60, 70), (70, 80), (80, 90), (90, 100)]),
                                            (4096, 16, None, [(64 * j, 64 * j + 64) for j in range(64)]),
                                            (100, 32, None, [(0, 25), (25, 50), (50, 75), (75, 100)])])
def test_plan(T, B, steps, want):
    assert segments.plan(T, B, steps) == want


def peak_bytes(layer, problem):
    """Peak NumPy/Python memory (bytes) of one training step beyond what was allocated before it."""
    x, state, lengths, dy, dstate = problem
    layer.forward(x[:2], None, None)                    # warm: compiled kernels, lazy imports
    tracemalloc.start()
    try:
        y, _, ctx = layer.forward(x, state, lengths)
        layer.backward(ctx, dy, dstate)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("cls", [gpurnn.LSTM, gpurnn.LayerNormGRU])
def test_checkpoint_keeps_a_fraction_of_the_activations(cls):
    """T = 2048: full keeps every step's gates (and LN's rows); checkpoint keeps a state every 32 steps and one
    segment's activations at a time. Beyond what any step holds (the ctx's private copy of x, y and dx) it needs
    under a tenth of what full needs."""
    problem = random_problem(cls(16, 32), T=2048, B=4, rng=np.random.default_rng(0))
    full, ckpt = (peak_bytes(cls(16, 32, memory=m, segment_steps=32, seed=0), problem) for m in ("full", "checkpoint"))
    floor = 2 * problem[0].nbytes + 2048 * 4 * 32 * 4           # x's copy and dx, y
    assert ckpt - floor < 0.1 * (full - floor), (full, ckpt, floor)
