"""The variants of the recurrent cells on the float64 reference: LayerNormLSTM/GRU, zoneout, weight_drop (DropConnect)
and the LSTM's projection, each gradient against central finite differences (training mode, with the masks fixed by
re-seeding the layer's generator), evaluation mode against the formula built from the plain cell, p = 0 against the
plain cell."""
import numpy as np
import pytest

import gpurnn
from gpurnn.kernels import Zoneout, cpu_fused, numpy_ref
from util import as_tuple, check_layer_gradients, random_problem

# (class, options): every variant, alone and together, on the cells that take it
VARIANTS = {
    "lnlstm": (gpurnn.LayerNormLSTM, {}),
    "lngru": (gpurnn.LayerNormGRU, {}),
    "lstm_zoneout": (gpurnn.LSTM, {"zoneout": (0.3, 0.6)}),
    "gru_zoneout": (gpurnn.GRU, {"zoneout": 0.4}),
    "rnn_zoneout": (gpurnn.RNN, {"zoneout": 0.4}),
    "lstm_weight_drop": (gpurnn.LSTM, {"weight_drop": 0.3}),
    "rnn_weight_drop": (gpurnn.RNN, {"weight_drop": 0.3, "nonlinearity": "relu"}),
    "lstm_proj": (gpurnn.LSTM, {"proj_size": 2}),
    "lnlstm_all": (gpurnn.LayerNormLSTM, {"zoneout": 0.3, "weight_drop": 0.2, "proj_size": 2}),
    "lngru_all": (gpurnn.LayerNormGRU, {"zoneout": 0.3, "weight_drop": 0.2}),
}


def make(name, **kwargs):
    cls, options = VARIANTS[name]
    return cls(3, 3, **{**options, **kwargs})


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("num_layers,bidirectional,ragged,memory", [
    (1, False, False, "full"), (2, True, True, "full"), (2, True, True, "checkpoint")])
def test_gradients_match_finite_differences(name, num_layers, bidirectional, ragged, memory):
    layer = make(name, num_layers=num_layers, bidirectional=bidirectional, dtype="float64", seed=3, memory=memory,
                 segment_steps=2)
    check_layer_gradients(layer, *random_problem(layer, T=5, B=3, rng=np.random.default_rng(7), ragged=ragged))


@pytest.mark.parametrize("batch_first", [False, True])
def test_layer_norm_gradients_without_bias(batch_first):
    layer = gpurnn.LayerNormGRU(3, 4, bias=False, batch_first=batch_first, dtype="float64", seed=1)
    for p in layer.params.values():          # gains away from 1, so a wrong gamma gradient cannot hide
        p += np.random.default_rng(2).uniform(-0.5, 0.5, p.shape)
    check_layer_gradients(layer, *random_problem(layer, T=4, B=2, rng=np.random.default_rng(5), ragged=True))


def one_step(plain, x_t, state):
    """The plain cell's new state (h~, c~) from `state` (L=1 layer): one step of `plain`."""
    _, state_n, _ = plain.forward(x_t[None], state, training=False)
    return state_n


@pytest.mark.parametrize("name,p", [("lstm", (0.3, 0.7)), ("lstm", 0.5), ("gru", 0.4), ("rnn_tanh", 0.6),
                                    ("lnlstm", 0.25), ("lngru", 0.5)])
def test_evaluation_mode_blends_with_p(name, p):
    """Evaluation: h_t = p h_{t-1} + (1 - p) h~_t (c likewise), h~_t the plain cell's step from the zoned state."""
    cls = {"lstm": gpurnn.LSTM, "gru": gpurnn.GRU, "rnn_tanh": gpurnn.RNN, "lnlstm": gpurnn.LayerNormLSTM,
           "lngru": gpurnn.LayerNormGRU}[name]
    layer = cls(3, 4, zoneout=p, dtype="float64", seed=2)
    plain = cls(3, 4, dtype="float64", seed=9)
    plain.load_state_dict(layer.state_dict())
    p_h, p_c = p if isinstance(p, tuple) else (p, p)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 2, 3))
    lstm = layer.cell == "lstm"
    state = (rng.standard_normal((1, 2, 4)), rng.standard_normal((1, 2, 4))) if lstm else rng.standard_normal((1, 2, 4))
    y, state_n, ctx = layer.eval()(x, state)
    assert ctx is None
    for t in range(6):
        new = one_step(plain, x[t], state)
        if lstm:
            state = (p_h * state[0] + (1 - p_h) * new[0], p_c * state[1] + (1 - p_c) * new[1])
        else:
            state = p_h * state + (1 - p_h) * new
        np.testing.assert_allclose(y[t], as_tuple(state)[0][0], rtol=1e-12, atol=1e-14)
    for got, want in zip(as_tuple(state_n), as_tuple(state)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("module", [numpy_ref, cpu_fused])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("training", [True, False])
def test_zoneout_zero_is_the_plain_cell(module, cell, training):
    """zoneout with p = 0 (a seed given) runs exactly the plain sweep, forward and backward."""
    rng = np.random.default_rng(4)
    G, H, B, T = {"lstm": 4, "gru": 3}.get(cell, 1), 5, 3, 4
    dt = np.float32 if module is cpu_fused else np.float64
    xw = rng.standard_normal((T, B, G * H)).astype(dt)
    w_hh, b_hh = rng.uniform(-0.5, 0.5, (G * H, H)).astype(dt), rng.uniform(-0.5, 0.5, G * H).astype(dt)
    state0 = tuple(rng.standard_normal((B, H)).astype(dt) for _ in range(2 if cell == "lstm" else 1))
    lengths = np.array([4, 2, 3], np.int32)
    dy = rng.standard_normal((T, B, H)).astype(dt)
    plain = module.forward(cell, xw.copy(), w_hh, b_hh, state0, lengths, training)
    zoned = module.forward(cell, xw.copy(), w_hh, b_hh, state0, lengths, training, zoneout=Zoneout(0.0, 0.0, 11, 12))
    for a, b in zip((plain[0],) + plain[1], (zoned[0],) + zoned[1]):
        np.testing.assert_array_equal(a, b)
    if training:
        for a, b in zip(module.backward(plain[2], dy, state0), module.backward(zoned[2], dy, state0)):
            for u, v in zip(as_tuple(a), as_tuple(b)):
                np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("cls", [gpurnn.LSTM, gpurnn.GRU, gpurnn.LayerNormLSTM])
def test_zero_probabilities_are_the_plain_layer(cls):
    rng = np.random.default_rng(1)
    plain, zero = cls(3, 4, seed=5), cls(3, 4, zoneout=0.0, weight_drop=0.0, seed=5)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    (y0, _, c0), (y1, _, c1) = plain(x), zero(x)
    np.testing.assert_array_equal(y0, y1)
    for a, b in zip(plain.backward(c0, np.ones_like(y0))[:1], zero.backward(c1, np.ones_like(y1))[:1]):
        np.testing.assert_array_equal(a, b)
    for k in plain.grads:
        np.testing.assert_array_equal(plain.grads[k], zero.grads[k])


def test_zoneout_bits_are_uniform_and_fresh_per_step():
    """The generator's bits: a fraction p below zoneout_threshold(p), no correlation between steps, rows, units."""
    bits = np.stack([numpy_ref.zoneout_bits(1234, t, 64, 256) for t in range(16)])      # (T, B, n)
    n = bits.size
    for p in (0.1, 0.5, 0.9):
        kept = bits < gpurnn.kernels.zoneout_threshold(p)
        assert abs(kept.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
    u = bits.astype(np.float64) / 2 ** 32 - 0.5
    for a, b in ((u[1:], u[:-1]), (u[:, 1:], u[:, :-1]), (u[:, :, 1:], u[:, :, :-1])):
        assert abs((a * b).mean() / (1 / 12)) < 5 / np.sqrt(a.size)        # neighbours uncorrelated
    assert not np.array_equal(numpy_ref.zoneout_bits(1, 0, 4, 8), numpy_ref.zoneout_bits(2, 0, 4, 8))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("p", [0.2, 0.7])
def test_training_masks_keep_a_fraction_p(dtype, p):
    """In training a unit of h is exactly its previous value with probability p (an Elman unit never is by chance),
    the same for the same seed and different for another."""
    layer = gpurnn.RNN(8, 64, zoneout=p, dtype=dtype, seed=0)
    x = np.random.default_rng(0).standard_normal((50, 16, 8)).astype(dtype)
    y, _, _ = layer.forward(x, training=True)
    kept = (y[1:] == y[:-1]).mean()
    assert abs(kept - p) < 5 * np.sqrt(p * (1 - p) / y[1:].size)
    np.testing.assert_array_equal(y, gpurnn.RNN(8, 64, zoneout=p, dtype=dtype, seed=0).forward(x, training=True)[0])
    assert not np.array_equal(y, layer.forward(x, training=True)[0])             # fresh seeds for the next call
