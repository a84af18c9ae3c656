"""Weight initialisation options, each tested for its defining property."""
import math

import numpy as np
import pytest

import gpurnn
from util import CELLS, make_layer

GATES = {"lstm": 4, "gru": 3}


def test_uniform_is_the_torch_default_and_keeps_its_draws():
    layer = gpurnn.LSTM(3, 5, num_layers=2, bidirectional=True, seed=11)
    rng, bound = np.random.default_rng(11), 1 / math.sqrt(5)
    for name, p in layer.params.items():            # drawn in parameter order from the layer's seed, as before
        np.testing.assert_array_equal(p, rng.uniform(-bound, bound, p.shape).astype(np.float32), err_msg=name)


@pytest.mark.parametrize("cell", CELLS)
def test_xavier_uniform_bound_variance_and_zero_biases(cell):
    layer = make_layer(cell, 40, 48, num_layers=2, init="xavier_uniform", dtype="float64", seed=0)
    for name, p in layer.params.items():
        if name.startswith("bias"):
            assert not p.any(), name
            continue
        fan_out, fan_in = p.shape
        a = math.sqrt(6 / (fan_in + fan_out))
        assert np.abs(p).max() <= a, name
        # U(-a, a) has variance a^2/3; the sample variance of N draws has std (a^2/3) sqrt(0.8 / N)
        var = a * a / 3
        assert abs(p.var() - var) < 5 * var * math.sqrt(0.8 / p.size), name


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype, atol", [("float64", 1e-12), ("float32", 1e-5)])
def test_orthogonal_recurrent_blocks(cell, dtype, atol):
    H = 7
    layer = make_layer(cell, 3, H, num_layers=2, bidirectional=True, init="orthogonal", dtype=dtype, seed=1)
    G = GATES.get(cell, 1)
    blocks = []
    for name, p in layer.params.items():
        if name.startswith("weight_hh"):
            for g in range(G):
                q = p[g * H:(g + 1) * H].astype(np.float64)
                np.testing.assert_allclose(q @ q.T, np.eye(H), atol=atol, err_msg=f"{name} gate {g}")
                blocks.append(q)
        elif name.startswith("bias"):
            assert not p.any(), name
        else:
            assert np.abs(p).max() <= math.sqrt(6 / sum(p.shape)), name
    assert not np.allclose(blocks[0], blocks[1])                        # independent draws


@pytest.mark.parametrize("init", ["uniform", "orthogonal"])
def test_lstm_forget_bias(init):
    H = 4
    layer = gpurnn.LSTM(3, H, num_layers=2, init=init, forget_bias=1.0, dtype="float64", seed=0)
    plain = gpurnn.LSTM(3, H, num_layers=2, init=init, dtype="float64", seed=0)
    for name, p in layer.params.items():
        if name.startswith("bias"):
            gate = slice(H, 2 * H)
            np.testing.assert_array_equal(p[gate], 1.0 if name.startswith("bias_ih") else 0.0)
            rest = np.r_[0:H, 2 * H:4 * H]
            np.testing.assert_array_equal(p[rest], plain.params[name][rest])
    # with x = 0 and h = 0 the forget gate is sigmoid(b_f) = sigmoid(1): c_1 = f c_0 + i g, g = tanh(b_g)
    c0 = np.ones((2, 1, H))
    _, (_, c1), _ = layer.forward(np.zeros((1, 1, 3)), (np.zeros((2, 1, H)), c0), training=False)
    b = layer.params["bias_ih_l0"] + layer.params["bias_hh_l0"]
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    np.testing.assert_allclose(c1[0, 0], sig(b[H:2 * H]) * 1.0 + sig(b[:H]) * np.tanh(b[2 * H:3 * H]), rtol=1e-12)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(init="he"), ValueError, "init must be one of"),
    (dict(forget_bias=1.0, bias=False), ValueError, "forget_bias needs bias=True"),
    (dict(forget_bias=math.inf), ValueError, "forget_bias"),
    (dict(forget_bias="1"), TypeError, "forget_bias must be a number"),
])
def test_bad_init_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        gpurnn.LSTM(3, 4, **kwargs)
