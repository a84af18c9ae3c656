"""The Module API: the tree (children, named parameters and modules), live Parameter handles, __call__,
train()/eval(), Sequential against the models and finite differences, configs and build_model for every kind."""
import json

import numpy as np
import pytest

import gpurnn
from gpurnn import models, nn
from gpurnn.module import Module, Parameter
from util import numeric_grad


def charlm(**kwargs):
    return models.CharLM("abcde", hidden_size=3, num_layers=2, embedding_dim=2, dtype="float64", seed=1, **kwargs)


def test_named_parameters_and_modules_of_a_model():
    model = charlm()
    names = [n for n, _ in model.named_parameters()]
    assert names == ["embedding.weight"] + [f"rnn.{k}" for k in model.rnn.params] + ["head.weight", "head.bias"]
    assert "rnn.weight_ih_l0" in names and names == list(model.state_dict())
    assert [n for n, _ in model.named_modules()] == ["", "embedding", "rnn", "head"]
    assert model.modules()[1:] == model.children() == [model.embedding, model.rnn, model.head]
    assert model.num_parameters() == sum(p.size for p in model.parameters()) == \
        sum(int(np.prod(v.shape)) for v in model.state_dict().values())


def test_parameters_are_live_handles():
    model = charlm()
    p = dict(model.named_parameters())["rnn.weight_hh_l1"]
    assert isinstance(p, Parameter) and p.data is model.rnn.params["weight_hh_l1"]
    assert p.grad is model.rnn.grads["weight_hh_l1"] and p.shape == (12, 3) and p.dtype == np.float64
    np.testing.assert_array_equal(np.asarray(p), p.data)
    p.data[...] = 0.25                   # in place: the model computes with it
    assert (model.rnn.params["weight_hh_l1"] == 0.25).all()


def test_call_is_forward_and_losses_are_callable():
    model = charlm()
    ids = np.array([[0, 1], [2, 3], [4, 0]])
    np.testing.assert_array_equal(model(ids, training=False)[0], model.forward(ids, training=False)[0])
    loss = nn.SoftmaxCrossEntropy()
    logits = model(ids)[0]
    assert loss(logits, ids)[0] == loss.forward(logits, ids)[0]


@pytest.mark.parametrize("make", [charlm, lambda: gpurnn.LSTM(3, 4, dropout=0.5, num_layers=2, dtype="float64"),
                                  lambda: nn.Sequential(nn.Linear(3, 4, dtype="float64"), nn.Dropout(0.5))])
def test_eval_mode_is_followed_and_training_argument_overrides(make):
    module = make()
    x = np.array([[0, 1], [2, 3]]) if isinstance(module, models.CharLM) else np.ones((2, 2, 3))
    assert module.training and all(m.training for m in module.modules())
    assert module(x)[-1] is not None
    assert module.eval() is module and not any(m.training for m in module.modules())
    out = module(x)
    assert out[-1] is None                                       # eval: nothing saved for backward
    np.testing.assert_array_equal(module(x)[0], out[0])          # and deterministic (no dropout)
    assert module(x, training=True)[-1] is not None
    module.train()
    assert all(m.training for m in module.modules())
    with pytest.raises(TypeError, match="training must be True or False"):
        module(x, training="no")
    with pytest.raises(TypeError, match="mode must be True or False"):
        module.train("False")


def test_user_modules_register_children_by_attribute():
    class Net(Module):
        def __init__(self):
            super().__init__()
            self.rnn = gpurnn.GRU(2, 3, seed=0)
            self.head = nn.Linear(3, 1, seed=0)
            self.scale = 2.0

    net = Net()
    assert [n for n, _ in net.named_parameters()][:2] == ["rnn.weight_ih_l0", "rnn.weight_hh_l0"]
    assert net.dtype == np.float32 and net.config == {"kind": "Net"}
    net.head = None                                            # no longer a child
    assert [n for n, _ in net.named_children()] == ["rnn"]
    optimizer = gpurnn.optim.SGD(net, lr=1.0)
    net.rnn.grads["bias_hh_l0"][...] = 1
    before = net.rnn.params["bias_hh_l0"].copy()
    optimizer.step()
    np.testing.assert_allclose(net.rnn.params["bias_hh_l0"], before - 1)

    class Early(Module):
        def __init__(self):
            self.rnn = gpurnn.GRU(2, 3)

    with pytest.raises(AttributeError, match="before Module.__init__"):
        Early()


def test_zero_grad_and_to_cover_the_whole_tree():
    model = charlm()
    for _, p in model.named_parameters():
        p.grad[...] = 1
    model.zero_grad()
    assert not any(p.grad.any() for p in model.parameters())
    assert model.to("cpu") is model and all(m.device == "cpu" for m in model.modules())


# --- Sequential ---

def copy_weights(dst, src):
    dst.load_state_dict(src.state_dict())


def test_sequential_equals_the_tagger_it_spells_out():
    rng = np.random.default_rng(0)
    tagger = models.Tagger(5, 4, 3, cell="gru", num_layers=2, embedding_dim=2, dtype="float64", seed=0)
    seq = nn.Sequential({"embedding": nn.Embedding(5, 2, dtype="float64"),
                         "rnn": gpurnn.GRU(2, 4, num_layers=2, dtype="float64"),
                         "head": nn.Linear(4, 3, dtype="float64")})
    copy_weights(seq, tagger)
    ids, lengths = rng.integers(0, 5, (6, 3)), np.array([6, 2, 4])
    h0, dout, dh = rng.standard_normal((2, 3, 4)), rng.standard_normal((6, 3, 3)), rng.standard_normal((2, 3, 4))
    out_t, h_t, ctx_t = tagger(ids, h0, lengths)
    out_s, h_s, ctx_s = seq(ids, h0, lengths)
    np.testing.assert_array_equal(out_s, out_t)
    np.testing.assert_array_equal(h_s, h_t)
    dx_t, dh0_t = tagger.backward(ctx_t, dout, dh)
    dx_s, dh0_s = seq.backward(ctx_s, dout, dh)
    assert dx_s is None and dx_t is None
    np.testing.assert_array_equal(dh0_s, dh0_t)
    for name, value in tagger.named_parameters():
        np.testing.assert_array_equal(dict(seq.named_parameters())[name].grad, value.grad, err_msg=name)
    assert models.build_model(seq.config).config == seq.config


def test_sequential_of_two_recurrent_layers_matches_finite_differences():
    rng = np.random.default_rng(1)
    seq = nn.Sequential(nn.Linear(3, 4, dtype="float64", seed=0), gpurnn.LSTM(4, 3, dtype="float64", seed=1),
                        gpurnn.RNN(3, 2, nonlinearity="relu", bidirectional=True, dtype="float64", seed=2),
                        nn.Linear(4, 2, dtype="float64", seed=3))
    x = rng.standard_normal((4, 2, 3))
    state = [(rng.standard_normal((1, 2, 3)), rng.standard_normal((1, 2, 3))), rng.standard_normal((2, 2, 2))]
    dy = rng.standard_normal((4, 2, 2))
    dstate = [(rng.standard_normal((1, 2, 3)), rng.standard_normal((1, 2, 3))), rng.standard_normal((2, 2, 2))]
    lengths = np.array([4, 3])

    def flat(s):
        return [a for part in s for a in (part if isinstance(part, tuple) else (part,))]

    def loss():
        y, state_n, _ = seq(x, state, lengths, training=False)
        return float((y * dy).sum() + sum((a * b).sum() for a, b in zip(flat(state_n), flat(dstate))))

    y, state_n, ctx = seq(x, state, lengths)
    assert isinstance(state_n, list) and len(state_n) == 2
    dx, dstate0 = seq.backward(ctx, dy, dstate)
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-5, atol=1e-8)
    for i, (s, ds) in enumerate(zip(flat(state), flat(dstate0))):
        np.testing.assert_allclose(ds, numeric_grad(loss, s), rtol=1e-5, atol=1e-8, err_msg=f"state {i}")
    for name, p in seq.named_parameters():
        np.testing.assert_allclose(p.grad, numeric_grad(loss, p.data), rtol=1e-5, atol=1e-8, err_msg=name)


def test_sequential_trains_with_the_trainer():
    from gpurnn.trainer import Trainer
    rng = np.random.default_rng(0)
    seq = nn.Sequential(nn.Embedding(4, 3, seed=0), gpurnn.LSTM(3, 8, seed=1), nn.Linear(8, 4, seed=2))
    ids = rng.integers(0, 4, (12, 8))

    def data(step, rng):                     # predict the current token: learnable at once
        return ids, ids

    trainer = Trainer(seq, nn.SoftmaxCrossEntropy(), gpurnn.optim.Adam(seq, lr=0.05), tbptt=(4, 4), progress=False)
    history = trainer.fit(data, 40)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]


@pytest.mark.parametrize("make, error, match", [
    (lambda: nn.Sequential(), ValueError, "at least one module"),
    (lambda: nn.Sequential(nn.Linear(2, 2), "relu"), TypeError, "module '1' must be a gpurnn Module"),
    (lambda: nn.Sequential(nn.Linear(2, 2), nn.Embedding(3, 2)), ValueError, "takes ids, so it can only come first"),
    (lambda: nn.Sequential({"a.b": nn.Linear(2, 2)}), ValueError, "without '.'"),
])
def test_bad_sequential(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_sequential_state_errors():
    x = np.ones((2, 1, 2), np.float32)
    two = nn.Sequential(gpurnn.GRU(2, 2), gpurnn.GRU(2, 2))
    with pytest.raises(TypeError, match="list with one entry per recurrent module"):
        two(x, np.zeros((1, 1, 2), np.float32))
    plain = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="state must be None"):
        plain(x, np.zeros((1, 1, 2), np.float32))
    with pytest.raises(ValueError, match="lengths needs a recurrent module"):
        plain(x, lengths=np.array([2]))
    y, state_n, ctx = plain(x)
    assert state_n is None and plain.backward(ctx, np.ones_like(y))[1] is None


# --- configs and build_model ---

class Scaled(Module):
    """A user module: a Linear whose output is multiplied by `factor`."""

    def __init__(self, size, factor=2.0, seed=None):
        super().__init__()
        self.size, self.factor = size, factor
        self.linear = nn.Linear(size, size, dtype="float64", seed=seed)

    @property
    def config(self):
        return {"kind": "Scaled", "size": self.size, "factor": self.factor}

    def forward(self, x, training=None):
        y, ctx = self.linear(x, training=training)
        return y * self.factor, ctx


KINDS = {
    "RNN": lambda: gpurnn.RNN(3, 4, num_layers=2, nonlinearity="relu", dropout=0.2, init="orthogonal"),
    "LSTM": lambda: gpurnn.LSTM(3, 4, bidirectional=True, batch_first=True, forget_bias=1.0, dtype="float64"),
    "GRU": lambda: gpurnn.GRU(3, 4, bias=False, init="xavier_uniform"),
    "JordanRNN": lambda: gpurnn.JordanRNN(3, 4, 2, output_nonlinearity="identity"),
    "Linear": lambda: nn.Linear(3, 2, bias=False),
    "Embedding": lambda: nn.Embedding(6, 3, padding_idx=0),
    "Dropout": lambda: nn.Dropout(0.3),
    "Sequential": lambda: nn.Sequential(nn.Embedding(5, 3), nn.Dropout(0.1),
                                        nn.Sequential(gpurnn.LSTM(3, 4), nn.Linear(4, 4)), nn.Linear(4, 5)),
    "Tagger": lambda: models.Tagger(3, 4, 2, num_layers=2, dropout=0.25, batch_first=True),
    "CharLM": lambda: models.CharLM("xyz", hidden_size=4, embedding_dim=2, dropout=0.1, cell="gru"),
    "Classifier": lambda: models.Classifier(3, 4, 2, embedding_dim=None, batch_first=True, dropout=0.5),
    "Generator": lambda: models.Generator(2, 3, 4, num_layers=2, cell="rnn_tanh"),
    "Seq2Seq": lambda: models.Seq2Seq(5, 4, 3, embedding_dim=2),
    "Scaled": lambda: Scaled(3, factor=0.5),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_config_is_json_and_rebuilds_the_same_module(kind):
    models.register(Scaled)
    module = KINDS[kind]()
    config = module.config
    assert config["kind"] == kind
    text = json.dumps(config)
    clone = models.build_model(json.loads(text), seed=123)
    assert type(clone) is type(module) and clone.config == config
    assert [n for n, _ in clone.named_parameters()] == [n for n, _ in module.named_parameters()]
    for (name, p), (_, q) in zip(module.named_parameters(), clone.named_parameters()):
        assert p.shape == q.shape and p.dtype == q.dtype, name
    clone.load_state_dict(module.state_dict())
    for name, v in module.state_dict().items():
        np.testing.assert_array_equal(clone.state_dict()[name], v)


@pytest.mark.parametrize("bad, error, match", [
    ({"kind": "Nope"}, ValueError, "kind in"),
    ("LSTM", ValueError, "config must be"),
    ({"kind": "Sequential", "modules": "x"}, ValueError, "list of \\[name, config\\] pairs"),
    ({"kind": "Linear", "in_features": 2, "out_features": 2, "colour": "red"}, TypeError, "colour"),
])
def test_build_model_rejects_bad_configs(bad, error, match):
    with pytest.raises(error, match=match):
        models.build_model(bad)


def test_register_takes_module_classes_only():
    with pytest.raises(TypeError, match="Module subclass"):
        models.register(dict)
