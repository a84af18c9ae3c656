"""The seed tasks are learned: each test trains a small seeded model on the CPU and scores it on fresh data."""
import numpy as np
import pytest

from gpurnn import JordanRNN, models, nn, optim, tasks
from gpurnn.trainer import Trainer


def train(model, loss, data, steps, lr, **kwargs):
    modules = model.modules() if hasattr(model, "modules") else [model]
    trainer = Trainer(model, loss, optim.Adam(modules, lr=lr), progress=False, seed=0, **kwargs)
    trainer.fit(data, steps)
    return trainer


def test_bit_flip_generator():
    x, y = tasks.bit_flip(64, np.random.default_rng(0))
    assert x.shape == (1, 64, 1) and x.dtype == np.float32
    np.testing.assert_array_equal(y, 1 - x[0, :, 0])


@pytest.mark.parametrize("variable", [False, True])
def test_bit_vector_flip_generator_pads_with_minus_one(variable):
    v, y = tasks.bit_vector_flip(200, np.random.default_rng(0), variable=variable)
    assert v.shape == (200, 10) and y.shape == (10, 200)
    pad = v == tasks.PAD
    np.testing.assert_array_equal(pad, y.T == tasks.PAD)
    np.testing.assert_array_equal(y.T[~pad], 1 - v[~pad])
    lengths = (~pad).sum(1)
    assert pad.any() == variable and lengths.min() >= 1
    assert all(not pad[b, :n].any() for b, n in enumerate(lengths))     # padding only after the bits


def test_flip_if_previous_output_follows_its_rule():
    x, y = tasks.flip_if_previous_output(50, np.random.default_rng(0), length=12)
    prev = np.zeros_like(y[0])
    for t in range(12):
        np.testing.assert_array_equal(y[t], np.where(x[t] == prev, 1 - x[t], x[t]))
        prev = y[t]


def test_adding_problem_generator():
    x, y = tasks.adding_problem(500, np.random.default_rng(0), length=30)
    marks = x[:, :, 1]
    np.testing.assert_array_equal(marks.sum(0), 2)
    assert (marks[:15].sum(0) == 1).all()
    np.testing.assert_allclose(y[:, 0], (x[:, :, 0] * marks).sum(0), rtol=1e-6)
    # the mean predictor's MSE is the variance of a sum of two U(0, 1): 1/6
    x, y = tasks.adding_problem(20000, np.random.default_rng(1), length=30)
    np.testing.assert_allclose(((y - 1.0) ** 2).mean(), 1 / 6, rtol=0.03)


@pytest.mark.parametrize("bad", [dict(batch=0), dict(batch=2.5), dict(length=0)])
def test_generators_reject_bad_sizes(bad):
    args = dict(batch=4, rng=np.random.default_rng(0), length=5)
    args.update(bad)
    with pytest.raises(ValueError):
        tasks.bit_sequence_flip(**args)


def test_learns_bit_flip():
    model = models.Classifier(1, 4, 2, seed=0)
    train(model, nn.SoftmaxCrossEntropy(), lambda i, rng: tasks.bit_flip(32, rng), 60, 0.05)
    x, y = tasks.bit_flip(1000, np.random.default_rng(99))
    assert (model.forward(x, training=False)[0].argmax(-1) == y).mean() >= 0.99


def as_bit_sequence(v):
    """A vector batch v (B, n) read one bit per step: x (n, B, 1), lengths (B,) up to the first padding."""
    return np.ascontiguousarray(v.T[:, :, None]), (v != tasks.PAD).sum(1)


@pytest.mark.parametrize("variable", [False, True])
def test_learns_bit_vector_flip(variable):
    def data(i, rng):
        v, y = tasks.bit_vector_flip(32, rng, variable=variable)
        x, lengths = as_bit_sequence(v)
        return x, y, {"lengths": lengths}

    model = models.Tagger(1, 8, 2, seed=0)
    train(model, nn.SoftmaxCrossEntropy(ignore_index=tasks.PAD), data, 120, 0.05)
    v, y = tasks.bit_vector_flip(1000, np.random.default_rng(99), variable=variable)
    x, lengths = as_bit_sequence(v)
    pred = model.forward(x, lengths=lengths, training=False)[0].argmax(-1)
    valid = y != tasks.PAD
    assert (pred[valid] == y[valid]).mean() >= 0.99


def test_learns_bit_sequence_flip():
    model = models.Tagger(1, 8, 2, seed=0)
    train(model, nn.SoftmaxCrossEntropy(), lambda i, rng: tasks.bit_sequence_flip(32, rng), 100, 0.05)
    x, y = tasks.bit_sequence_flip(1000, np.random.default_rng(99))
    assert (model.forward(x, training=False)[0].argmax(-1) == y).mean() >= 0.99


def test_learns_flip_if_previous_output_with_a_jordan_network():
    model = JordanRNN(1, 8, 1, seed=0)          # its state is its previous output
    train(model, nn.MSELoss(), lambda i, rng: tasks.flip_if_previous_output(32, rng), 300, 0.05)
    x, y = tasks.flip_if_previous_output(1000, np.random.default_rng(99))
    assert ((model.forward(x, training=False)[0] > 0.5) == (y > 0.5)).mean() >= 0.99


def test_learns_hello():
    model = models.CharLM(tasks.HELLO_VOCAB, hidden_size=8, embedding_dim=4, seed=0)
    ids, targets = tasks.hello()
    train(model, nn.SoftmaxCrossEntropy(), lambda i, rng: (ids, targets), 100, 0.05)
    assert model.decode(ids) == "hell"
    assert model.decode(model.forward(ids, training=False)[0].argmax(-1)) == "ello"
    assert model.sample(4, temperature=1e-3, prime="h") == "ello"


def test_lstm_learns_adding_problem_ten_times_better_than_the_mean():
    model = models.Classifier(2, 32, 1, cell="lstm", seed=0)
    train(model, nn.MSELoss(), lambda i, rng: tasks.adding_problem(64, rng, length=20), 400, 0.01, clip_norm=1.0)
    x, y = tasks.adding_problem(2000, np.random.default_rng(99), length=20)
    mse = float(((model.forward(x, training=False)[0] - y) ** 2).mean())
    assert mse < 0.167 / 10
