"""A ctx cannot be corrupted: editing the caller's arrays in place after forward leaves backward's gradients as
they were, and a ctx serves one backward unless forward had retain=True (a backward that raised leaves it usable)."""
import numpy as np
import pytest

import gpurnn
from gpurnn import models, nn
from gpurnn.backend import to_host
from util import CELLS, KERNEL_BACKENDS as BACKENDS, device_of, make_layer

T, B, I, H = 3, 2, 3, 4
USED = "this ctx was already used by backward; pass retain=True to forward"


def on(module, backend):
    return module.to(device_of(backend))


def problem(module, x_shape, y_shape, state_shapes=(), seed=0):
    """Fresh inputs on the module's device: x, dy and the states (tuple)."""
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(s).astype(module.dtype) for s in (x_shape, y_shape) + tuple(state_shapes)]
    return [module.xp.asarray(a) for a in arrays]


def grads(module):
    return {k: to_host(g, copy=True) for k, g in module.grads.items()}


def scribble(*arrays):
    for a in arrays:
        a[...] = 7.0


def layer_case(kind, backend, batch_first=False):
    """A module, its forward inputs (what the caller may edit) and dy."""
    if kind == "jordan":
        layer = on(gpurnn.JordanRNN(I, H, 2, backend=backend, seed=0), backend)
        x, dy, y0 = problem(layer, (T, B, I), (T, B, 2), [(1, B, 2)])
        return layer, [x, y0], dy
    layer = on(make_layer(kind, I, H, num_layers=2, bidirectional=True, batch_first=batch_first, backend=backend,
                          seed=0), backend)
    xs, ys = ((B, T, I), (B, T, 2 * H)) if batch_first else ((T, B, I), (T, B, 2 * H))
    x, dy, *state = problem(layer, xs, ys, [(4, B, H)] * (2 if kind == "lstm" else 1))
    return layer, [x, tuple(state) if kind == "lstm" else state[0]], dy


def flat(arrays):
    return [b for a in arrays for b in (a if isinstance(a, tuple) else (a,))]


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kind", list(CELLS) + ["jordan"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_edits_after_forward_leave_gradients_alone(backend, kind, batch_first):
    if batch_first and (kind == "jordan" or backend != "numpy"):
        pytest.skip("JordanRNN is time-major only; the batch-first copy is the layer's, whatever the backend")
    want_layer, inputs, dy = layer_case(kind, backend, batch_first)
    _, _, ctx = want_layer.forward(*inputs)
    want_dx, want_ds = want_layer.backward(ctx, dy)
    layer, inputs, dy = layer_case(kind, backend, batch_first)
    y, _, ctx = layer.forward(*inputs)
    scribble(*flat(inputs), y)                  # x, h0, c0 and the returned output
    dx, ds = layer.backward(ctx, dy)
    for name, g in grads(layer).items():
        np.testing.assert_array_equal(g, grads(want_layer)[name], err_msg=name)
    for got, want in zip(flat([dx, ds]), flat([want_dx, want_ds])):
        np.testing.assert_array_equal(to_host(got), to_host(want))


def test_batch_first_single_sequence_is_copied_too():
    """(1, T, I) batch-first is already time-major contiguous after the transpose: still a private copy."""
    layer = make_layer("gru", I, H, batch_first=True, seed=0)
    twin = make_layer("gru", I, H, batch_first=True, seed=0)
    x, dy = problem(layer, (1, T, I), (1, T, H))
    _, _, ctx = twin.forward(x.copy())
    twin.backward(ctx, dy)
    _, _, ctx = layer.forward(x)
    x[...] = 7.0
    layer.backward(ctx, dy)
    for name, g in grads(layer).items():
        np.testing.assert_array_equal(g, grads(twin)[name], err_msg=name)


def nn_case(kind):
    if kind in ("linear", "dropout"):
        module = nn.Linear(3, 2, seed=0) if kind == "linear" else nn.Dropout(0.5, seed=0)
        x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    else:
        module = nn.Embedding(5, 2, seed=0)
        x = np.array([[0, 3], [3, 4]])
    return module, x, np.random.default_rng(1).standard_normal(module.forward(x)[0].shape).astype(np.float32)


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_nn_blocks_keep_private_inputs(kind):
    twin, x, dy = nn_case(kind)
    twin.backward(twin.forward(x.copy())[1], dy)
    module, x, dy = nn_case(kind)
    _, ctx = module.forward(x)
    x[...] = 1
    module.backward(ctx, dy)
    for name, g in grads(module).items():
        np.testing.assert_array_equal(g, grads(twin)[name], err_msg=name)


def model_case(kind):
    rng = np.random.default_rng(0)
    if kind == "Tagger":
        model = models.Tagger(3, 4, 2, cell="lstm", seed=1)
        args = (rng.standard_normal((T, B, 3)).astype(np.float32),)
        dout = rng.standard_normal((T, B, 2)).astype(np.float32)
    elif kind == "Classifier":
        model = models.Classifier(3, 4, 2, cell="gru", seed=1)
        args = (rng.standard_normal((T, B, 3)).astype(np.float32),)
        dout = rng.standard_normal((B, 2)).astype(np.float32)
    elif kind == "Generator":
        model = models.Generator(3, 4, 5, cell="gru", seed=1)
        args = (rng.standard_normal((B, 3)).astype(np.float32), rng.integers(0, 5, (T, B)))
        dout = rng.standard_normal((T, B, 5)).astype(np.float32)
    elif kind == "Sequential":
        model = nn.Sequential(nn.Linear(3, 4, seed=1), nn.Dropout(0.0), gpurnn.LSTM(4, 4, seed=3),
                              nn.Linear(4, 2, seed=4))
        args = (rng.standard_normal((T, B, 3)).astype(np.float32),)
        dout = rng.standard_normal((T, B, 2)).astype(np.float32)
    else:
        model = models.Seq2Seq(5, 6, 4, cell="rnn_tanh", seed=1)
        args = (rng.integers(0, 5, (T, B)), rng.integers(0, 6, (T, B)))
        dout = rng.standard_normal((T, B, 6)).astype(np.float32)
    return model, args, dout


def model_grads(model):
    return {f"{i}.{k}": g for i, m in enumerate(model.modules()) for k, g in grads(m).items()}


MODELS = ["Tagger", "Classifier", "Generator", "Seq2Seq", "Sequential"]


@pytest.mark.parametrize("kind", MODELS)
def test_models_keep_private_inputs(kind):
    twin, args, dout = model_case(kind)
    twin.backward(twin.forward(*(a.copy() for a in args))[2], dout)
    model, args, dout = model_case(kind)
    _, _, ctx = model.forward(*args)
    for a in args:
        a[...] = 1
    model.backward(ctx, dout)
    for name, g in model_grads(model).items():
        np.testing.assert_array_equal(g, model_grads(twin)[name], err_msg=name)


def runs(kind, backend="numpy"):
    """(module, forward(retain) -> ctx, backward(ctx), bad_backward(ctx), grads()) for every kind of module."""
    if kind in CELLS or kind == "jordan":
        module, inputs, dy = layer_case(kind, backend)
        return (module, lambda retain: module.forward(*inputs, retain=retain)[2],
                lambda ctx: module.backward(ctx, dy), lambda ctx: module.backward(ctx, dy[:1]),
                lambda: grads(module))
    if kind in ("linear", "embedding", "dropout"):
        module, x, dy = nn_case(kind)
        return (module, lambda retain: module.forward(x, retain=retain)[1], lambda ctx: module.backward(ctx, dy),
                lambda ctx: module.backward(ctx, dy[:1]), lambda: grads(module))
    model, args, dout = model_case(kind)
    return (model, lambda retain: model.forward(*args, retain=retain)[2], lambda ctx: model.backward(ctx, dout),
            lambda ctx: model.backward(ctx, dout[:1]), lambda: model_grads(model))


KINDS = list(CELLS) + ["jordan", "linear", "embedding", "dropout"] + MODELS


@pytest.mark.parametrize("kind", KINDS)
def test_second_backward_raises_unless_retained(kind):
    module, forward, backward, _, current = runs(kind)
    ctx = forward(False)
    backward(ctx)
    once = current()
    with pytest.raises(ValueError, match=USED):
        backward(ctx)
    for name, g in current().items():                    # the refused call added nothing
        np.testing.assert_array_equal(g, once[name], err_msg=name)
    ctx = forward(True)
    backward(ctx)
    backward(ctx)
    for name, g in current().items():                    # once from the first ctx, twice from the retained one
        np.testing.assert_allclose(g, 3 * once[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_backward_that_raised_leaves_the_ctx_usable(kind):
    module, forward, backward, bad_backward, current = runs(kind)
    ctx = forward(False)
    with pytest.raises(ValueError):
        bad_backward(ctx)                                # dy of the wrong shape
    backward(ctx)
    assert any(g.any() for g in current().values()) or not current()     # (Dropout has no parameters)
    with pytest.raises(ValueError, match=USED):
        backward(ctx)
