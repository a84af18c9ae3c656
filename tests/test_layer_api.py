"""The layer API: live params, accumulating grads, state dicts, dtypes, init, and the cells' equations."""
import numpy as np
import pytest

import gpurnn
from util import CELLS, make_layer, random_problem


def sigmoid(v):
    return 1 / (1 + np.exp(-v))


@pytest.mark.parametrize("cell", CELLS)
def test_params_are_live(cell):
    layer = make_layer(cell, 3, 4, seed=0)
    x = np.random.default_rng(0).standard_normal((4, 2, 3)).astype(np.float32)
    y0, _, _ = layer.forward(x)
    layer.params["weight_hh_l0"] *= 0.5
    y1, _, _ = layer.forward(x)
    assert np.abs(y1 - y0).max() > 1e-3
    twin = make_layer(cell, 3, 4, seed=1)
    twin.load_state_dict(layer.state_dict())
    np.testing.assert_array_equal(twin.forward(x)[0], y1)


@pytest.mark.parametrize("cell", CELLS)
def test_backward_accumulates(cell):
    layer = make_layer(cell, 3, 4, num_layers=2, seed=0, dtype="float64")
    x, state, lengths, dy, dstate = random_problem(layer, 5, 3, np.random.default_rng(1), ragged=True)
    _, _, ctx = layer.forward(x, state, lengths, retain=True)
    layer.backward(ctx, dy, dstate)
    once = {k: g.copy() for k, g in layer.grads.items()}
    layer.backward(ctx, dy, dstate)
    for k, g in layer.grads.items():
        np.testing.assert_allclose(g, 2 * once[k], rtol=1e-12, err_msg=k)
    layer.zero_grad()
    assert all(not g.any() for g in layer.grads.values())


@pytest.mark.parametrize("cell", CELLS)
def test_init_and_shapes(cell):
    layer = make_layer(cell, 5, 6, num_layers=2, bidirectional=True, seed=0)
    G = {"lstm": 4, "gru": 3}.get(cell, 1)
    assert layer.params["weight_ih_l0"].shape == (G * 6, 5)
    assert layer.params["weight_ih_l1_reverse"].shape == (G * 6, 12)
    assert layer.params["bias_hh_l1_reverse"].shape == (G * 6,)
    bound = 1 / np.sqrt(6)
    for k, p in layer.params.items():
        assert p.dtype == np.float32 and np.abs(p).max() <= bound, k
        assert layer.grads[k].shape == p.shape
    x = np.zeros((3, 2, 5), np.float32)
    batch_first = make_layer(cell, 5, 6, num_layers=2, bidirectional=True, batch_first=True, seed=0)
    y_tm, h_tm, _ = layer.forward(x + 0.5)
    y_bf, h_bf, _ = batch_first.forward((x + 0.5).transpose(1, 0, 2))
    assert y_tm.shape == (3, 2, 12) and y_bf.shape == (2, 3, 12)
    np.testing.assert_array_equal(y_bf, y_tm.transpose(1, 0, 2))


@pytest.mark.parametrize("cell", CELLS)
def test_float32_tracks_float64(cell):
    rng = np.random.default_rng(3)
    single = make_layer(cell, 6, 9, num_layers=2, bidirectional=True, seed=4)
    double = make_layer(cell, 6, 9, num_layers=2, bidirectional=True, seed=4, dtype="float64")
    x, state, lengths, dy, dstate = random_problem(double, 12, 5, rng, ragged=True)
    cast = lambda a: tuple(v.astype(np.float32) for v in a) if isinstance(a, tuple) else a.astype(np.float32)  # noqa: E731
    y32, _, ctx32 = single.forward(cast(x), cast(state), lengths)
    y64, _, ctx64 = double.forward(x, state, lengths)
    dx32, _ = single.backward(ctx32, cast(dy), cast(dstate))
    dx64, _ = double.backward(ctx64, dy, dstate)
    np.testing.assert_allclose(y32, y64, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dx32, dx64, rtol=1e-4, atol=1e-4)
    for k in double.grads:
        np.testing.assert_allclose(single.grads[k], double.grads[k], rtol=1e-4, atol=1e-4, err_msg=k)


def test_sigmoid_elman_equation():
    layer = gpurnn.RNN(3, 4, nonlinearity="sigmoid", dtype="float64", seed=0)
    p = layer.params
    x = np.random.default_rng(0).standard_normal((6, 2, 3))
    h = np.zeros((2, 4))
    y, h_n, _ = layer.forward(x)
    for t in range(6):
        h = sigmoid(x[t] @ p["weight_ih_l0"].T + p["bias_ih_l0"] + h @ p["weight_hh_l0"].T + p["bias_hh_l0"])
        np.testing.assert_allclose(y[t], h, rtol=1e-12)
    np.testing.assert_allclose(h_n[0], h, rtol=1e-12)


@pytest.mark.parametrize("output_nonlinearity", ["sigmoid", "identity", "relu"])
def test_jordan_equation(output_nonlinearity):
    layer = gpurnn.JordanRNN(3, 5, 2, output_nonlinearity=output_nonlinearity, dtype="float64", seed=0)
    p = layer.params
    out_act = {"sigmoid": sigmoid, "identity": lambda v: v, "relu": lambda v: np.maximum(v, 0)}[output_nonlinearity]
    rng = np.random.default_rng(1)
    x, y_prev = rng.standard_normal((7, 2, 3)), rng.standard_normal((1, 2, 2))
    y, y_n, _ = layer.forward(x, y_prev)
    state = y_prev[0]
    for t in range(7):
        h = np.tanh(x[t] @ p["weight_ih"].T + state @ p["weight_yh"].T + p["bias_h"])
        state = out_act(h @ p["weight_hy"].T + p["bias_y"])
        np.testing.assert_allclose(y[t], state, rtol=1e-12)
    np.testing.assert_allclose(y_n[0], state, rtol=1e-12)


def test_inference_returns_no_ctx():
    layer = gpurnn.GRU(3, 4, seed=0)
    x = np.ones((2, 1, 3), np.float32)
    y, h, ctx = layer.forward(x, training=False)
    assert ctx is None
    np.testing.assert_array_equal(y, layer.forward(x)[0])
