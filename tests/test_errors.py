"""Bad input raises ValueError/TypeError naming what was wrong, and changes nothing."""
import math
import pickle

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
    with pytest.raises(ValueError, match=r"made by the forward of another (LSTM|GRU|RNN) "):
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


# --- the audit's inputs: every one refused with an error naming the argument, changing nothing ---

def state_of(objs):
    """Bytes of everything the objects hold: each module's params, grads and RNG state; optimizers' state dicts."""
    out = []
    for o in objs:
        if isinstance(o, gpurnn.module.Module):
            for _, m in o.named_modules():
                out.append((m.params, m.grads, m.rng.bit_generator.state))
        else:
            out.append(o.state_dict())
    return pickle.dumps(out)


def charlm(seed=0):
    return gpurnn.models.CharLM("abcd", hidden_size=4, embedding_dim=3, seed=seed)


def with_nan(model, key):
    sd = model.state_dict()
    sd[key][0] = np.nan
    return sd


def lm_ctx(model):
    return model(np.zeros((3, 2), np.int64))


AUDIT = [
    # accepted before, each silently doing something else
    ("bidirectional='no'", lambda: (), lambda: gpurnn.LSTM(4, 8, bidirectional="no"), TypeError,
     "bidirectional must be True or False, got 'no'"),
    ("batch_first='False'", lambda: (), lambda: gpurnn.GRU(4, 8, batch_first="False"), TypeError, "batch_first"),
    ("bias='False'", lambda: (), lambda: gpurnn.RNN(4, 8, bias="False"), TypeError, "bias must be True or False"),
    ("SGD lr=inf", lambda: (charlm(),), lambda m: gpurnn.optim.SGD(m, lr=math.inf), ValueError, "lr must lie in"),
    ("Adam lr=inf", lambda: (charlm(),), lambda m: gpurnn.optim.Adam(m, lr=math.inf), ValueError, "lr must lie in"),
    ("SGD weight_decay=inf", lambda: (charlm(),), lambda m: gpurnn.optim.SGD(m, weight_decay=math.inf), ValueError,
     "weight_decay must lie in"),
    ("RMSprop alpha=1.5", lambda: (charlm(),), lambda m: gpurnn.optim.RMSprop(m, alpha=1.5), ValueError,
     r"alpha must lie in \[0.0, 1.0\)"),
    ("Adam eps=inf", lambda: (charlm(),), lambda m: gpurnn.optim.Adam(m, eps=math.inf), ValueError,
     "eps must lie in"),
    ("CharLM NaN weights", lambda: (charlm(),), lambda m: m.load_state_dict(with_nan(m, "rnn.weight_hh_l0")),
     ValueError, "rnn.weight_hh_l0: holds NaN or Inf"),
    ("layer Inf weights", lambda: (gpurnn.GRU(2, 3),),
     lambda m: m.load_state_dict({**m.state_dict(), "bias_ih_l0": np.full(9, np.inf)}), ValueError,
     "bias_ih_l0: holds NaN or Inf"),
    ("Seq2Seq tgt == tgt_vocab", lambda: (gpurnn.models.Seq2Seq(5, 4, 3, seed=0),),
     lambda m: m(np.zeros((2, 1), np.int64), np.array([[1], [4]])), ValueError,
     r"tgt must hold ids in 0..3 \(negative for padding\), got 4"),
    ("Generator target == vocab", lambda: (gpurnn.models.Generator(2, 3, 4, seed=0),),
     lambda m: m(np.zeros((1, 2), np.float32), np.array([[4]])), ValueError, "targets must hold ids in 0..3"),
    ("optimizer negative step", lambda: (gpurnn.optim.SGD(charlm()),),
     lambda o: o.load_state_dict({**o.state_dict(), "step": -1}), ValueError, "step"),
    ("dropout='0.5'", lambda: (), lambda: gpurnn.LSTM(4, 8, num_layers=2, dropout="0.5"), TypeError,
     "dropout must be a number"),
    ("dropout=1.5", lambda: (), lambda: gpurnn.nn.Dropout(1.5), ValueError, r"p must lie in \[0.0, 1.0\]"),
    ("Linear bias='no'", lambda: (), lambda: gpurnn.nn.Linear(2, 3, bias="no"), TypeError, "bias"),
    ("Classifier batch_first=1", lambda: (), lambda: gpurnn.models.Classifier(2, 3, 2, batch_first=1), TypeError,
     "batch_first must be True or False"),
    ("training='yes'", lambda: (gpurnn.GRU(2, 3),), lambda m: m(np.zeros((1, 1, 2), np.float32), training="yes"),
     TypeError, "training must be True or False"),
    ("hidden_size=10**9", lambda: (), lambda: gpurnn.LSTM(4, 10 ** 9), ValueError,
     r"LSTM\(4, 1000000000, num_layers=1\) would need .* GiB"),
    ("embedding 10**9", lambda: (), lambda: gpurnn.nn.Embedding(10 ** 9, 10 ** 9), ValueError,
     "Embedding.* would need"),
    # unclear before
    ("seed=-1", lambda: (), lambda: gpurnn.GRU(2, 3, seed=-1), ValueError, "seed must be None or an integer >= 0"),
    ("seed='abc'", lambda: (), lambda: gpurnn.nn.Linear(2, 3, seed="abc"), TypeError, "seed must be None or an"),
    ("seed=1.5", lambda: (), lambda: gpurnn.models.CharLM("ab", seed=1.5), TypeError, "seed must be None or an"),
    ("sample seed=-1", lambda: (charlm(),), lambda m: m.sample(3, seed=-1), ValueError, "seed must be None"),
    ("ragged x", lambda: (gpurnn.GRU(2, 3),), lambda m: m([[[1.0, 2.0]], [[1.0]]]), ValueError,
     "x must be an array or nested lists of equal lengths"),
    ("CharLM 1-D ids", lambda: (charlm(),), lambda m: m(np.array([0, 1, 2])), ValueError,
     r"x must be token ids of shape \(T, B\) \(time, batch\), got shape \(3,\)"),
    ("another model's ctx", lambda: (charlm(0), charlm(1)), lambda a, b: a.backward(lm_ctx(b)[2], np.zeros((3, 2, 4))),
     ValueError, r"made by the forward of another CharLM \(CharLM\(.*\)\), not of this CharLM"),
    ("a Tagger's ctx to a Classifier", lambda: (gpurnn.models.Classifier(2, 3, 2), gpurnn.models.Tagger(2, 3, 2)),
     lambda c, t: c.backward(t(np.zeros((2, 1, 2), np.float32))[2], np.zeros((1, 2), np.float32)), ValueError,
     "another Tagger .*not of this Classifier"),
]


@pytest.mark.parametrize("make, act, error, match", [row[1:] for row in AUDIT], ids=[row[0] for row in AUDIT])
def test_audit_inputs_are_refused_and_change_nothing(make, act, error, match):
    objs = make()
    before = state_of(objs)
    with pytest.raises(error, match=match):
        act(*objs)
    assert state_of(objs) == before
