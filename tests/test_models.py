"""The sequence models: every gradient against central finite differences (float64), state dicts, configs,
and inference paths (greedy decoding, sampling) against the training-time forward."""
import numpy as np
import pytest

from gpurnn import models
from util import numeric_grad

CELLS = ["lstm", "gru", "rnn_tanh"]


def problem(kind, cell, rng):
    """model, forward args, kwargs: a tiny float64 instance of each model with random data."""
    T, B = 4, 3
    ids = rng.integers(0, 5, (T, B))
    x = rng.standard_normal((T, B, 3))
    lengths = np.array([4, 2, 3])
    if kind == "Tagger":
        return models.Tagger(3, 3, 2, cell=cell, num_layers=2, dtype="float64", seed=1), (x,), {"lengths": lengths}
    if kind == "CharLM":
        return models.CharLM("abcde", hidden_size=3, cell=cell, embedding_dim=2, dtype="float64", seed=1), (ids,), {}
    if kind == "Classifier":
        return models.Classifier(3, 3, 2, cell=cell, dtype="float64", seed=1), (x,), {"lengths": lengths}
    if kind == "Generator":
        targets = rng.integers(0, 4, (T, B))
        targets[3, 1] = -1
        return (models.Generator(2, 3, 4, cell=cell, num_layers=2, embedding_dim=2, dtype="float64", seed=1),
                (rng.standard_normal((B, 2)), targets), {})
    src = rng.integers(0, 5, (5, B))
    return (models.Seq2Seq(5, 4, 3, cell=cell, embedding_dim=2, dtype="float64", seed=1),
            (src, rng.integers(0, 4, (T, B))), {"src_lengths": np.array([5, 3, 1])})


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("kind", ["Tagger", "CharLM", "Classifier", "Generator", "Seq2Seq"])
def test_gradients_match_finite_differences(kind, cell):
    rng = np.random.default_rng(3)
    model, args, kwargs = problem(kind, cell, rng)
    out, _, ctx = model.forward(*args, **kwargs)
    dout = rng.standard_normal(out.shape)

    def loss():
        return float((model.forward(*args, **kwargs, training=False)[0] * dout).sum())

    model.zero_grad()
    dx, _ = model.backward(ctx, dout)
    for part, m in model.parts.items():
        for name, p in m.params.items():
            np.testing.assert_allclose(m.grads[name], numeric_grad(loss, p), rtol=1e-5, atol=1e-8,
                                       err_msg=f"{part}.{name}")
    if args[0].dtype.kind == "f":
        np.testing.assert_allclose(dx, numeric_grad(loss, args[0]), rtol=1e-5, atol=1e-8, err_msg="input")
    else:
        assert dx is None


def test_classifier_reads_each_sequences_last_valid_step():
    rng = np.random.default_rng(0)
    model = models.Classifier(3, 4, 2, dtype="float64", seed=0)
    x, lengths = rng.standard_normal((5, 3, 3)), np.array([5, 1, 3])
    out, _, _ = model.forward(x, lengths=lengths)
    for b, n in enumerate(lengths):
        y, _, _ = model.rnn.forward(x[:n, b:b + 1], training=False)
        head = model.parts["head"]
        expect = y[-1, 0] @ head.params["weight"].T + head.params["bias"]
        np.testing.assert_allclose(out[b], expect, rtol=1e-12)


@pytest.mark.parametrize("kind", ["Generator", "Seq2Seq"])
def test_greedy_decoding_equals_teacher_forcing_on_its_own_output(kind):
    rng = np.random.default_rng(5)
    model, args, kwargs = problem(kind, "lstm", rng)
    ids = model.generate(args[0], steps=6, **kwargs)
    logits, _, _ = model.forward(args[0], ids, **kwargs, training=False)
    np.testing.assert_array_equal(logits.argmax(-1), ids)


def test_charlm_sample_is_reproducible_and_continues_the_prime():
    model = models.CharLM("helo", hidden_size=8, embedding_dim=4, seed=2)
    a = model.sample(30, temperature=0.8, prime="he", seed=9)
    b = model.sample(30, temperature=0.8, prime="he", seed=9)
    assert a == b and len(a) == 30 and set(a) <= set("helo")
    # the first drawn character follows softmax(logits after "he"): with a tiny temperature it is the argmax
    logits, _, _ = model.forward(model.encode("he")[:, None], training=False)
    assert model.sample(1, temperature=1e-3, prime="he", seed=1) == "helo"[int(logits[-1, 0].argmax())]
    assert model.sample(0, prime="h") == ""


@pytest.mark.parametrize("bad", [dict(temperature=0), dict(temperature=-1.0), dict(prime="hex"), dict(n=-1)])
def test_charlm_sample_rejects_bad_arguments(bad):
    model = models.CharLM("helo", hidden_size=4, embedding_dim=2, seed=0)
    args = dict(n=5, temperature=1.0, prime="")
    args.update(bad)
    with pytest.raises(ValueError):
        model.sample(**args)


@pytest.mark.parametrize("kind", ["Tagger", "CharLM", "Classifier", "Generator", "Seq2Seq"])
def test_state_dict_round_trips_through_build_model(kind):
    model, args, kwargs = problem(kind, "gru", np.random.default_rng(1))
    clone = models.build_model(model.config, seed=123)
    clone.load_state_dict(model.state_dict())
    np.testing.assert_array_equal(clone.forward(*args, **kwargs, training=False)[0],
                                  model.forward(*args, **kwargs, training=False)[0])
    assert set(model.state_dict()) == {f"{n}.{k}" for n, m in model.parts.items() for k in m.params}


def test_load_state_dict_rejects_another_model_and_changes_nothing():
    small = models.CharLM("abc", hidden_size=4, embedding_dim=2, seed=0)
    big = models.CharLM("abc", hidden_size=5, embedding_dim=2, seed=1)
    before = big.state_dict()
    with pytest.raises(ValueError, match="expected shape"):
        big.load_state_dict(small.state_dict())
    with pytest.raises(ValueError, match="missing keys"):
        big.load_state_dict({})
    for k, v in big.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


@pytest.mark.parametrize("bad", [dict(kind="Nope"), "CharLM", None])
def test_build_model_rejects_unknown_configs(bad):
    with pytest.raises(ValueError, match="config"):
        models.build_model(bad)


@pytest.mark.parametrize("bad", [dict(vocab="a"), dict(vocab="aab"), dict(vocab=["a", "b"]), dict(cell="tcn")])
def test_charlm_rejects_bad_arguments(bad):
    kwargs = dict(vocab="abc", hidden_size=4)
    kwargs.update(bad)
    with pytest.raises(ValueError):
        models.CharLM(**kwargs)


@pytest.mark.parametrize("kind", ["Tagger", "Classifier"])
def test_batch_first_equals_time_major(kind):
    rng = np.random.default_rng(2)
    cls = getattr(models, kind)
    time_major = cls(3, 4, 2, num_layers=2, dtype="float64", seed=0)
    batch_first = cls(3, 4, 2, num_layers=2, batch_first=True, dtype="float64", seed=5)
    batch_first.load_state_dict(time_major.state_dict())
    x, lengths = rng.standard_normal((5, 3, 3)), np.array([5, 2, 4])
    out_t, h_t, ctx_t = time_major(x, lengths=lengths)
    out_b, h_b, ctx_b = batch_first(x.transpose(1, 0, 2), lengths=lengths)
    np.testing.assert_allclose(out_b, out_t.transpose(1, 0, 2) if kind == "Tagger" else out_t, rtol=1e-12)
    dout = rng.standard_normal(out_t.shape)
    dx_t, _ = time_major.backward(ctx_t, dout)
    dx_b, _ = batch_first.backward(ctx_b, dout.transpose(1, 0, 2) if kind == "Tagger" else dout)
    np.testing.assert_allclose(dx_b, dx_t.transpose(1, 0, 2), rtol=1e-12)
    for (name, p), (_, q) in zip(time_major.named_parameters(), batch_first.named_parameters()):
        np.testing.assert_allclose(q.grad, p.grad, rtol=1e-12, atol=1e-15, err_msg=name)
