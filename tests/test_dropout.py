"""Dropout between stacked layers, the Dropout block and the models' dropout: gradients against finite
differences with the masks held fixed, eval mode equal to dropout=0, the masks' statistics (the mean preserved),
and the same masks and results on the Numba backend."""
import json
import math

import numpy as np
import pytest

import gpurnn
from gpurnn import models, nn
from util import CELLS, make_layer, numeric_grad, random_problem


def freeze_masks(module, run):
    """Run `run()` once recording every dropout mask the module tree draws, then make each module replay its masks
    in the same order on every later forward (so a loss is a fixed function of the parameters)."""
    logs = {}
    for m in module.modules():
        draw, log = m.dropout_mask, logs.setdefault(id(m), [])
        m.dropout_mask = lambda like, p, draw=draw, log=log: log.append(draw(like, p)) or log[-1]
    run()
    for m in module.modules():
        log, position = logs[id(m)], [0]

        def replay(like, p, log=log, position=position):
            mask = log[position[0] % len(log)]
            position[0] += 1
            return mask
        m.dropout_mask = replay
    return [mask for log in logs.values() for mask in log]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_layer_dropout_gradients_with_fixed_masks(cell, bidirectional):
    layer = make_layer(cell, 3, 3, num_layers=3, bidirectional=bidirectional, dropout=0.5, dtype="float64",
                       seed=2)
    x, state, lengths, dy, dstate = random_problem(layer, 4, 3, np.random.default_rng(5), ragged=True)
    masks = freeze_masks(layer, lambda: layer.forward(x, state, lengths))
    D = 2 if bidirectional else 1
    assert len(masks) == 2 and all(m.shape == (4, 3, D * 3) for m in masks)
    assert all(set(np.unique(m)) == {0.0, 2.0} for m in masks)

    def parts(s):
        return s if isinstance(s, tuple) else (s,)

    def loss():
        y, state_n, _ = layer.forward(x, state, lengths, training=True)
        return float((y * dy).sum() + sum((a * b).sum() for a, b in zip(parts(state_n), parts(dstate))))

    _, _, ctx = layer.forward(x, state, lengths)
    dx, _ = layer.backward(ctx, dy, dstate)
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-5, atol=1e-8, err_msg="x")
    for name, p in layer.params.items():
        np.testing.assert_allclose(layer.grads[name], numeric_grad(loss, p), rtol=1e-5, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("kind", ["Tagger", "Classifier", "Seq2Seq"])
def test_model_dropout_gradients_with_fixed_masks(kind):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3, 3))
    if kind == "Tagger":
        model, args = models.Tagger(3, 3, 2, num_layers=2, dropout=0.4, dtype="float64", seed=1), (x,)
    elif kind == "Classifier":
        model, args = models.Classifier(5, 3, 2, embedding_dim=2, num_layers=2, dropout=0.4, batch_first=True,
                                        dtype="float64", seed=1), (rng.integers(0, 5, (3, 4)),)
    else:
        model = models.Seq2Seq(5, 4, 3, cell="gru", num_layers=2, embedding_dim=2, dropout=0.4, dtype="float64",
                               seed=1)
        args = (rng.integers(0, 5, (5, 3)), rng.integers(0, 4, (4, 3)))
    masks = freeze_masks(model, lambda: model(*args))
    assert len(masks) >= 2 and any((m == 0).any() for m in masks)
    out, _, ctx = model(*args)
    dout = rng.standard_normal(out.shape)

    def loss():
        return float((model(*args, training=True)[0] * dout).sum())

    model.backward(ctx, dout)
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, numeric_grad(loss, p.data), rtol=1e-5, atol=1e-8, err_msg=name)


def test_dropout_block_gradient_and_identity_cases():
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((50, 4)), rng.standard_normal((50, 4))
    block = nn.Dropout(0.3, seed=0)
    y, ctx = block(x)
    mask = y / np.where(x == 0, 1, x)
    np.testing.assert_allclose(block.backward(ctx, dy), dy * mask, rtol=1e-12)
    assert set(np.round(np.unique(mask), 12)) == {0.0, round(1 / 0.7, 12)}
    assert nn.Dropout(0.3).eval()(x)[0] is x                          # eval: the input itself
    keep, drop_all = nn.Dropout(0.0), nn.Dropout(1.0)
    y0, ctx0 = keep(x)
    assert y0 is x and keep.backward(ctx0, dy) is dy
    y1, ctx1 = drop_all(x)
    assert not y1.any() and not drop_all.backward(ctx1, dy).any()
    with pytest.raises(ValueError, match="another Dropout"):
        nn.Dropout(0.3).backward(ctx, dy)


@pytest.mark.parametrize("cell", CELLS)
def test_eval_mode_equals_dropout_zero(cell):
    dropping = make_layer(cell, 3, 4, num_layers=3, dropout=0.6, seed=0)
    plain = make_layer(cell, 3, 4, num_layers=3, dropout=0.0, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    trained = dropping.forward(x)[0]
    expect = plain.forward(x)[0]
    assert not np.allclose(trained, expect)                            # training: the masks act
    np.testing.assert_array_equal(dropping.eval().forward(x)[0], expect)
    np.testing.assert_array_equal(dropping.forward(x, training=False)[0], expect)


@pytest.mark.parametrize("kind", ["Tagger", "CharLM", "Classifier", "Generator", "Seq2Seq"])
def test_model_eval_mode_equals_dropout_zero(kind):
    rng = np.random.default_rng(0)
    make = {"Tagger": lambda d: models.Tagger(3, 4, 2, num_layers=2, dropout=d, seed=0),
            "CharLM": lambda d: models.CharLM("abcd", hidden_size=4, num_layers=2, embedding_dim=3, dropout=d,
                                              seed=0),
            "Classifier": lambda d: models.Classifier(3, 4, 2, num_layers=2, dropout=d, seed=0),
            "Generator": lambda d: models.Generator(2, 4, 3, num_layers=2, dropout=d, seed=0),
            "Seq2Seq": lambda d: models.Seq2Seq(5, 3, 4, num_layers=2, dropout=d, seed=0)}[kind]
    args = {"Tagger": (rng.standard_normal((5, 2, 3)).astype(np.float32),),
            "CharLM": (rng.integers(0, 4, (5, 2)),),
            "Classifier": (rng.standard_normal((5, 2, 3)).astype(np.float32),),
            "Generator": (rng.standard_normal((2, 2)).astype(np.float32), rng.integers(0, 3, (5, 2))),
            "Seq2Seq": (rng.integers(0, 5, (4, 2)), rng.integers(0, 3, (5, 2)))}[kind]
    dropping, plain = make(0.5), make(0.0)
    assert "dropout" in dict(dropping.named_children()) and "dropout" not in dict(plain.named_children())
    assert not np.allclose(dropping(*args)[0], plain(*args)[0])
    np.testing.assert_array_equal(dropping.eval()(*args)[0], plain(*args, training=False)[0])


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_masks_drop_a_fraction_p_and_preserve_the_mean(p):
    n = 200_000
    x = np.ones(n, np.float32)
    y, _ = nn.Dropout(p, seed=1)(x)
    dropped = float((y == 0).mean())
    # binomial count of drops: std sqrt(p (1-p) / n); y's mean: std sqrt(p / (1-p) / n) around 1
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert abs(float(y.mean(dtype=np.float64)) - 1.0) < 5 * math.sqrt(p / (1 - p) / n)
    np.testing.assert_allclose(np.unique(y[y != 0]), [1 / (1 - p)], rtol=1e-6)


def test_layer_masks_preserve_the_mean_of_each_layers_output():
    layer = gpurnn.GRU(4, 50, num_layers=3, dropout=0.3, seed=0)
    x = np.random.default_rng(0).standard_normal((40, 25, 4)).astype(np.float32)
    _, _, ctx = layer.forward(x)
    n = 40 * 25 * 50
    for mask in ctx.masks:
        assert abs(float(mask.mean(dtype=np.float64)) - 1.0) < 5 * math.sqrt(0.3 / 0.7 / n)
    # the next layer reads output * mask: inputs[l + 1] == outputs of layer l (its segments' sweeps' y) * mask
    for layer_index, mask in enumerate(ctx.masks):
        y = np.concatenate([kctx.y for kctx in ctx.sweeps[layer_index].ctxs])
        np.testing.assert_array_equal(ctx.inputs[layer_index + 1], y * mask)


def test_masks_are_seeded():
    x = np.random.default_rng(0).standard_normal((6, 2, 3)).astype(np.float32)
    first = gpurnn.LSTM(3, 4, num_layers=2, dropout=0.5, seed=7).forward(x)[0]
    again = gpurnn.LSTM(3, 4, num_layers=2, dropout=0.5, seed=7).forward(x)[0]
    np.testing.assert_array_equal(first, again)


def test_numba_backend_applies_the_same_masks():
    if not gpurnn.backend.cuda_simulator():
        pytest.skip("the numba backend on NumPy arrays needs the CUDA simulator")
    x = np.random.default_rng(0).standard_normal((3, 2, 3))
    dy = np.random.default_rng(1).standard_normal((3, 2, 3))
    results = []
    for backend in ("numpy", "numba"):
        layer = gpurnn.GRU(3, 3, num_layers=2, dropout=0.5, dtype="float64", backend=backend, seed=4)
        y, _, ctx = layer.forward(x)
        dx, _ = layer.backward(ctx, dy)
        results.append((y, dx, ctx.masks[0], layer.grads["weight_ih_l1"].copy()))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    assert (results[0][2] == 0).any()


def test_one_layer_dropout_warns_like_torch():
    with pytest.warns(UserWarning, match="between stacked layers"):
        gpurnn.LSTM(3, 4, dropout=0.5)


def test_rng_state_resumes_dropout_exactly():
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 6, (7, 4)), rng.integers(0, 6, (7, 4))) for _ in range(4)]
    loss = nn.SoftmaxCrossEntropy()

    def train(model, opt, data):
        outs = []
        for ids, target in data:
            model.zero_grad()
            out, _, ctx = model(ids)
            value, lctx = loss(out, target)
            model.backward(ctx, loss.backward(lctx))
            opt.step()
            outs.append(out)
        return outs

    model = models.CharLM("abcdef", hidden_size=5, num_layers=2, embedding_dim=3, dropout=0.5, seed=0)
    opt = gpurnn.optim.Adam(model, lr=0.01)
    train(model, opt, batches[:2])
    saved = (model.config, model.state_dict(), opt.state_dict(), json.loads(json.dumps(model.rng_state())))
    expect = train(model, opt, batches[2:])
    clone = models.build_model(saved[0], seed=99)
    clone.load_state_dict(saved[1])
    clone_opt = gpurnn.optim.Adam(clone)
    clone_opt.load_state_dict(saved[2])
    clone.load_rng_state(saved[3])
    for a, b in zip(train(clone, clone_opt, batches[2:]), expect):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="keys"):
        clone.load_rng_state({"": saved[3][""]})
    with pytest.raises(ValueError, match=r"states\['rnn'\] is not a PCG64 state"):
        clone.load_rng_state({**saved[3], "rnn": {"bit_generator": "MT19937"}})
