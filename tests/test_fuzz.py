"""Hypothesis over shapes: a padded batch behaves exactly like each sequence run alone at its own length."""
import numpy as np
from hypothesis import given, settings, strategies as st

from util import CELLS, make_layer


@st.composite
def problems(draw):
    cell = draw(st.sampled_from(CELLS))
    T, B = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    I, H = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    layers, bidirectional = draw(st.integers(1, 2)), draw(st.booleans())
    lengths = np.array(draw(st.lists(st.integers(1, T), min_size=B, max_size=B)))
    return cell, T, B, I, H, layers, bidirectional, lengths, draw(st.integers(0, 2**31))


def split(state, b):
    """The (L*D, 1, H) slice of sequence b of a state (h, or (h, c))."""
    return tuple(s[:, b:b + 1] for s in state) if isinstance(state, tuple) else state[:, b:b + 1]


@settings(max_examples=60, deadline=None)
@given(problems())
def test_padded_batch_equals_sequences_alone(problem):
    cell, T, B, I, H, layers, bidirectional, lengths, seed = problem
    rng = np.random.default_rng(seed)
    batch = make_layer(cell, I, H, num_layers=layers, bidirectional=bidirectional, dtype="float64", seed=seed)
    alone = make_layer(cell, I, H, num_layers=layers, bidirectional=bidirectional, dtype="float64", seed=seed)
    D = 2 if bidirectional else 1
    x = rng.standard_normal((T, B, I))
    shape = (layers * D, B, H)
    state = (rng.standard_normal(shape), rng.standard_normal(shape)) if cell == "lstm" else rng.standard_normal(shape)
    dy = rng.standard_normal((T, B, D * H))
    y, state_n, ctx = batch.forward(x, state, lengths)
    dx, dstate0 = batch.backward(ctx, dy)
    assert not y[np.arange(T)[:, None] >= lengths[None, :]].any(), "padded steps must output 0"
    for b, n in enumerate(lengths):
        y_b, s_b, ctx_b = alone.forward(x[:n, b:b + 1], split(state, b))
        dx_b, ds_b = alone.backward(ctx_b, dy[:n, b:b + 1])
        np.testing.assert_allclose(y[:n, b:b + 1], y_b, rtol=1e-10, atol=1e-12)
        for got, want in zip(*(v if isinstance(v, tuple) else (v,) for v in (split(state_n, b), s_b))):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dx[:n, b:b + 1], dx_b, rtol=1e-9, atol=1e-11)
        assert not dx[n:, b].any(), "padded steps take no gradient"
        for got, want in zip(*(v if isinstance(v, tuple) else (v,) for v in (split(dstate0, b), ds_b))):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)
    for k in batch.grads:   # the batch's weight gradients are the sum over its sequences
        np.testing.assert_allclose(batch.grads[k], alone.grads[k], rtol=1e-9, atol=1e-11, err_msg=k)
