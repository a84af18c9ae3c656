"""NaN and Inf from parameters or from overflow: caught like NaN in x, named, in forward and backward, on every
backend that runs here; a failed call changes nothing; the trainer's nan_policy applies; the checks switch off."""
import numpy as np
import pytest

import gpurnn
from gpurnn import checks, models, nn, optim
from gpurnn.backend import to_host
from gpurnn.checks import NonFiniteError
from gpurnn.trainer import Trainer
from util import CELLS, KERNEL_BACKENDS as BACKENDS, device_of, make_layer

DTYPES = ["float32", "float64"]
T, B, I, H = 3, 2, 3, 3
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:overflow encountered")


def build(cell, backend, dtype, **kwargs):
    return make_layer(cell, I, H, backend=backend, dtype=dtype, seed=0, **kwargs).to(device_of(backend))


def data(layer, scale=1.0, seed=1):
    """x (T, B, I), state (h or (h, c)), dy (T, B, D*H) in the layer's dtype and on its device."""
    rng = np.random.default_rng(seed)
    x, dy = (scale * rng.standard_normal(s) for s in ((T, B, I), (T, B, layer.num_directions * H)))
    shape = (layer.num_layers * layer.num_directions, B, H)
    state = tuple(rng.standard_normal(shape) for _ in range(2 if layer.cell == "lstm" else 1))
    move = lambda a: layer.xp.asarray(a.astype(layer.dtype))  # noqa: E731
    return move(x), tuple(map(move, state)) if layer.cell == "lstm" else move(state[0]), move(dy)


def snapshot(module):
    return {k: (to_host(module.params[k], copy=True), to_host(module.grads[k], copy=True)) for k in module.params}


def assert_unchanged(module, before):
    for k, (p, g) in before.items():
        np.testing.assert_array_equal(to_host(module.params[k]), p, err_msg=f"params[{k}] changed")
        np.testing.assert_array_equal(to_host(module.grads[k]), g, err_msg=f"grads[{k}] changed")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,value", [("weight_hh_l0", np.nan), ("weight_ih_l0", np.inf),
                                        ("bias_hh_l0", -np.inf)])
def test_nonfinite_parameter_raises_at_forward(backend, cell, dtype, name, value):
    layer = build(cell, backend, dtype)
    layer.params[name][0] = value
    x, state, _ = data(layer)
    for training in (True, False):
        with pytest.raises(NonFiniteError, match=f"{name} contains NaN or Inf"):
            layer.forward(x, state, training=training)
    if np.isnan(value):     # unchecked, it reaches the output through every kernel (relu and the clamps pass it on)
        layer.check_finite = False
        y, _, _ = layer.forward(x, state)
        assert np.isnan(to_host(y)).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_overflow_in_forward_raises(backend, dtype):
    """relu's state grows without bound: with sqrt(max) weights in layer 1, step 1 overflows to Inf. (The other
    cells' outputs are bounded, whatever x W_ih^T overflows to.)"""
    layer = build("rnn_relu", backend, dtype, num_layers=2, bidirectional=True)
    for name in ("weight_ih_l1", "weight_hh_l1"):
        layer.params[name][...] = np.sqrt(np.finfo(dtype).max)
    x, state, _ = data(layer)
    with pytest.raises(NonFiniteError, match=r"the output of layer 1 \(direction 0\) is not finite: overflow"):
        layer.forward(x, abs(state))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_overflow_in_backward_raises_before_accumulating(backend, cell, dtype):
    """dW_ih = dG^T x overflows (x = dy = sqrt(max)); nothing is accumulated and the ctx stays usable."""
    layer = build(cell, backend, dtype)
    scale = float(np.sqrt(np.finfo(dtype).max))
    layer.params["weight_ih_l0"][...] /= scale            # the forward stays in range
    _, state, dy = data(layer)
    x, dy = layer.xp.full((T, B, I), scale, layer.dtype), layer.xp.full_like(dy, scale)
    _, _, ctx = layer.forward(x, state)
    before = snapshot(layer)
    with pytest.raises(NonFiniteError, match="the gradient of weight_ih_l0 is not finite: overflow"):
        layer.backward(ctx, dy)
    assert_unchanged(layer, before)
    layer.backward(ctx, dy / scale)                       # the same ctx, a gradient in range
    assert all(np.isfinite(to_host(g)).all() for g in layer.grads.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_jordan(backend):
    layer = gpurnn.JordanRNN(I, H, 2, nonlinearity="relu", output_nonlinearity="identity", backend=backend,
                             seed=0).to(device_of(backend))
    p, x = layer.params, layer.xp.ones((T, B, I), np.float32)
    p["weight_yh"][0, 0] = np.nan
    with pytest.raises(NonFiniteError, match="weight_yh contains NaN or Inf"):
        layer.forward(x)
    big = np.sqrt(np.finfo(np.float32).max)
    p["weight_yh"][...], p["bias_h"][...], p["weight_ih"][...] = 0, 0, big / I      # h = sqrt(max)
    p["weight_hy"][...] = big                                                          # y = H max: overflow
    with pytest.raises(NonFiniteError, match="the output of the Jordan layer is not finite: overflow"):
        layer.forward(x)
    p["weight_hy"][...] = 1e-3
    y, _, ctx = layer.forward(x)
    before = snapshot(layer)
    with pytest.raises(NonFiniteError, match="the gradient of weight_hy is not finite: overflow"):
        layer.backward(ctx, layer.xp.full(y.shape, big, np.float32))                   # dW_hy = T B max
    assert_unchanged(layer, before)


def test_linear_and_embedding():
    lin = nn.Linear(3, 2, seed=0)
    x = np.ones((4, 3), np.float32)
    lin.params["bias"][1] = np.inf
    with pytest.raises(NonFiniteError, match="bias contains NaN or Inf"):
        lin.forward(x)
    lin.params["bias"][1] = 0
    lin.params["weight"][:, 0] = np.finfo(np.float32).max
    with pytest.raises(NonFiniteError, match="the output of Linear is not finite: overflow"):
        lin.forward(x * 10)
    lin.params["weight"][:, 0] = 1
    _, ctx = lin.forward(x * 1e30)
    before = snapshot(lin)
    with pytest.raises(NonFiniteError, match="the gradient of weight is not finite: overflow"):
        lin.backward(ctx, np.full((4, 2), 1e30, np.float32))
    assert_unchanged(lin, before)

    emb = nn.Embedding(5, 2, seed=0)
    emb.params["weight"][3, 1] = np.nan
    emb.forward(np.array([0, 1, 4]))                      # the NaN row is not looked up
    with pytest.raises(NonFiniteError, match=r"weight contains NaN or Inf \(in the rows of ids\)"):
        emb.forward(np.array([[0, 3]]))


def test_switch(monkeypatch):
    """checks.CHECK_FINITE is the default; a module's check_finite overrides it either way."""
    layer = build("lstm", "numpy", "float32")
    layer.params["weight_hh_l0"][0, 0] = np.nan
    x, state, _ = data(layer)
    monkeypatch.setattr(checks, "CHECK_FINITE", False)
    y, _, _ = layer.forward(x, state)
    assert np.isnan(y).any()
    x[0, 0, 0] = np.nan
    layer.forward(x, state)                               # nor is x checked
    layer.check_finite = True
    with pytest.raises(NonFiniteError, match="x contains NaN"):
        layer.forward(x, state)
    monkeypatch.setattr(checks, "CHECK_FINITE", True)
    layer.check_finite = False
    layer.forward(x, state)
    layer.check_finite = None
    with pytest.raises(NonFiniteError):
        layer.forward(x, state)


def tree_equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(tree_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tree_equal(x, y) for x, y in zip(a, b))
    return np.array_equal(np.asarray(a), np.asarray(b), equal_nan=np.asarray(a).dtype.kind == "f")


@pytest.mark.parametrize("policy", ["skip", "raise"])
@pytest.mark.parametrize("cell", ["lstm", "rnn_relu"])
def test_trainer_applies_nan_policy_to_a_nan_weight(policy, cell):
    model = models.Tagger(2, 4, 1, cell=cell, seed=0)
    opt = optim.Adam(model.modules(), lr=0.01)
    trainer = Trainer(model, nn.MSELoss(), opt, nan_policy=policy, progress=False)
    rng = np.random.default_rng(0)
    batch = (rng.standard_normal((5, 3, 2)).astype(np.float32), rng.standard_normal((5, 3, 1)).astype(np.float32))
    trainer.train_batch(batch)                            # one clean update: the optimizer has state
    model.rnn.params["weight_hh_l0"][1, 2] = np.nan
    params, opt_state = model.state_dict(), opt.state_dict()
    if policy == "raise":
        with pytest.raises(NonFiniteError, match="weight_hh_l0 contains NaN or Inf"):
            trainer.train_batch(batch)
    else:
        stats = trainer.train_batch(batch)
        assert trainer.skipped == 1 and stats["skipped"] == 1 and trainer.updates == 1
        assert all(not g.any() for m in model.modules() for g in m.grads.values())
    assert tree_equal(model.state_dict(), params) and tree_equal(opt.state_dict(), opt_state)
