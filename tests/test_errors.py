"""Bad input raises ValueError/TypeError naming what was wrong, and changes nothing."""
import numpy as np
import pytest

import gpurnn
from util import make_layer


@pytest.fixture(params=["lstm", "gru", "rnn_tanh"])
def trained(request):
    """A layer with non-zero accumulated gradients, its snapshot, and a valid forward ctx."""
    layer = make_layer(request.param, 3, 4, num_layers=2, bidirectional=True, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    y, _, ctx = layer.forward(x)
    layer.backward(ctx, np.ones_like(y))
    snapshot = {k: (layer.params[k].copy(), layer.grads[k].copy()) for k in layer.params}
    yield layer, x, ctx, y
    for k, (p, g) in snapshot.items():
        np.testing.assert_array_equal(layer.params[k], p, err_msg=f"params[{k}] changed")
        np.testing.assert_array_equal(layer.grads[k], g, err_msg=f"grads[{k}] changed")


def state_like(layer, B, fill=0.0, dtype=np.float32, shape=None):
    h = np.full(shape or (layer.num_layers * layer.num_directions, B, layer.hidden_size), fill, dtype)
    return (h, h.copy()) if layer.cell == "lstm" else h


@pytest.mark.parametrize("make_x, error, words", [
    (lambda x: x[0], ValueError, "x must have 3 dimensions"),
    (lambda x: x[..., :2], ValueError, "input_size is 3"),
    (lambda x: x.astype(np.int64), TypeError, "integer"),
    (lambda x: x.astype(np.float16), TypeError, "float16"),
    (lambda x: x.astype(np.float64), TypeError, "float32"),
    (lambda x: np.where(np.arange(3) == 1, np.nan, x).astype(np.float32), ValueError, "NaN"),
    (lambda x: np.where(np.arange(3) == 1, np.inf, x).astype(np.float32), ValueError, "x contains NaN or Inf"),
    (lambda x: x[:, :0], ValueError, "at least one step and one batch"),
    (lambda x: x[:0], ValueError, "at least one step and one batch"),
    (lambda x: None, TypeError, "x must be an array"),
])
def test_bad_x(trained, make_x, error, words):
    layer, x, _, _ = trained
    with pytest.raises(error, match=words):
        layer.forward(make_x(x))


@pytest.mark.parametrize("lengths, error, words", [
    ([5, 0], ValueError, "lengths must lie in 1..5"),
    ([6, 2], ValueError, "lengths must lie in 1..5"),
    ([5, 2, 1], ValueError, r"lengths must have shape \(2,\)"),
    ([[5, 2]], ValueError, "lengths must have shape"),
    ([5.0, 2.0], TypeError, "lengths must be integers"),
])
def test_bad_lengths(trained, lengths, error, words):
    layer, x, _, _ = trained
    with pytest.raises(error, match=words):
        layer.forward(x, lengths=np.array(lengths))


def test_bad_state(trained):
    layer, x, _, _ = trained
    with pytest.raises(ValueError, match=r"must have shape \(4, 2, 4\)"):
        layer.forward(x, state_like(layer, 2, shape=(2, 2, 4)))
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.forward(x, state_like(layer, 2, fill=np.nan))
    with pytest.raises(TypeError, match="float32"):
        layer.forward(x, state_like(layer, 2, dtype=np.float64))
    if layer.cell == "lstm":
        with pytest.raises(TypeError, match=r"tuple \(h, c\)"):
            layer.forward(x, np.zeros((4, 2, 4), np.float32))


def test_bad_backward(trained):
    layer, x, ctx, y = trained
    with pytest.raises(ValueError, match=r"dy must have shape \(5, 2, 8\)"):
        layer.backward(ctx, y[:, :1])
    with pytest.raises(ValueError, match="dy contains NaN"):
        layer.backward(ctx, np.full_like(y, np.nan))
    with pytest.raises(ValueError, match="dstate"):
        layer.backward(ctx, y, state_like(layer, 2, shape=(4, 3, 4)))
    with pytest.raises(TypeError, match="ctx must be the ctx"):
        layer.backward(None, y)
    other = make_layer(layer.cell, 3, 4, num_layers=2, bidirectional=True, seed=0)
    _, _, other_ctx = other.forward(x)
    with pytest.raises(ValueError, match="another layer"):
        layer.backward(other_ctx, y)


def test_bad_state_dict(trained):
    layer = trained[0]
    sd = layer.state_dict()
    sd.pop("weight_hh_l1")
    sd["weight_ih_l0"] = sd["weight_ih_l0"][:, :2] + 1
    sd["extra"] = np.zeros(3)
    with pytest.raises(ValueError) as err:
        layer.load_state_dict(sd)
    want = tuple(layer.params["weight_ih_l0"].shape)
    for words in ("missing keys: weight_hh_l1", "unexpected keys: extra",
                  f"weight_ih_l0: expected shape {want}, got {(want[0], 2)}"):
        assert words in str(err.value)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"hidden_size": 0}, ValueError, "hidden_size"),
    ({"input_size": 2.5}, ValueError, "input_size"),
    ({"num_layers": 0}, ValueError, "num_layers"),
    ({"dtype": "float16"}, TypeError, "dtype must be"),
    ({"dtype": "int32"}, TypeError, "dtype must be"),
    ({"backend": "tpu"}, ValueError, "backend must be one of"),
])
def test_bad_constructor(kwargs, error, words):
    args = {"input_size": 3, "hidden_size": 4, **kwargs}
    with pytest.raises(error, match=words):
        gpurnn.LSTM(**args)


def test_bad_nonlinearity():
    with pytest.raises(ValueError, match="nonlinearity"):
        gpurnn.RNN(3, 4, nonlinearity="gelu")
    with pytest.raises(ValueError, match="output_nonlinearity"):
        gpurnn.JordanRNN(3, 4, 2, output_nonlinearity="softmax")


def test_gpu_backend_without_gpu_data(monkeypatch):
    monkeypatch.setattr(gpurnn.backend, "cuda_host", lambda: False)    # not the CPU harness: cupy needs a GPU
    layer = gpurnn.GRU(3, 4, backend="cupy")
    with pytest.raises(ValueError, match="backend='cupy' needs GPU arrays"):
        layer.forward(np.zeros((2, 1, 3), np.float32))


def test_jordan_bad_input():
    layer = gpurnn.JordanRNN(3, 4, 2)
    x = np.zeros((5, 2, 3), np.float32)
    with pytest.raises(ValueError, match=r"state must have shape \(1, 2, 2\)"):
        layer.forward(x, np.zeros((1, 2, 4), np.float32))
    y, _, ctx = layer.forward(x)
    with pytest.raises(ValueError, match=r"dy must have shape \(5, 2, 2\)"):
        layer.backward(ctx, np.zeros((5, 2, 4), np.float32))


class FakeCudaArray:
    """Looks like a GPU array to the layer (it exposes __cuda_array_interface__); no GPU needed."""
    __cuda_array_interface__ = {"shape": (5, 2, 3), "typestr": "<f4", "data": (0, False), "version": 3}


def test_mixed_devices_is_an_error(trained):
    layer, _, _, _ = trained
    with pytest.raises(ValueError, match="x is on device 'cuda' but the parameters are on 'cpu'"):
        layer.forward(FakeCudaArray())


def test_cpu_dlpack_input_is_accepted():
    torch = pytest.importorskip("torch")
    layer = gpurnn.GRU(3, 4, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    np.testing.assert_array_equal(layer.forward(torch.from_numpy(x))[0], layer.forward(x)[0])
