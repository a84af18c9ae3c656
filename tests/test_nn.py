"""Linear, Embedding and the losses: every backward against central finite differences (float64), the forwards
against torch where installed, and the errors bad input raises."""
import numpy as np
import pytest

from gpurnn.nn import BCEWithLogitsLoss, Embedding, Linear, MSELoss, SoftmaxCrossEntropy
from util import numeric_grad

LOSSES = {"mse": MSELoss, "bce": BCEWithLogitsLoss}


@pytest.mark.parametrize("shape", [(3,), (4, 3), (2, 5, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradients(shape, bias):
    rng = np.random.default_rng(0)
    lin = Linear(3, 2, bias=bias, dtype="float64", seed=1)
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape[:-1] + (2,))

    def loss():
        return float((lin.forward(x)[0] * dy).sum())

    y, ctx = lin.forward(x)
    assert y.shape == shape[:-1] + (2,)
    dx = lin.backward(ctx, dy)
    for name, p in lin.params.items():
        np.testing.assert_allclose(lin.grads[name], numeric_grad(loss, p), rtol=1e-6, atol=1e-8, err_msg=name)
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-6, atol=1e-8)


def test_linear_accumulates_and_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    lin = Linear(5, 3, dtype="float64", seed=2)
    bound = 1 / np.sqrt(5)
    assert all(np.abs(p).max() <= bound for p in lin.params.values())
    x, dy = rng.standard_normal((4, 5)), rng.standard_normal((4, 3))
    y, ctx = lin.forward(x, retain=True)
    want = torch.nn.functional.linear(torch.tensor(x), torch.tensor(lin.params["weight"]),
                                      torch.tensor(lin.params["bias"]))
    np.testing.assert_allclose(y, want.numpy(), rtol=1e-12)
    lin.backward(ctx, dy)
    once = lin.grads["weight"].copy()
    lin.backward(ctx, dy)
    np.testing.assert_allclose(lin.grads["weight"], 2 * once, rtol=1e-12)
    lin.zero_grad()
    assert not lin.grads["weight"].any()


@pytest.mark.parametrize("padding_idx", [None, 2, -1])
def test_embedding_gradients(padding_idx):
    rng = np.random.default_rng(2)
    emb = Embedding(6, 3, padding_idx=padding_idx, dtype="float64", seed=3)
    ids = np.array([[0, 2, 5, 2], [5, 5, 1, 0]])          # repeats, padding 2 (or 5 for -1)
    dy = rng.standard_normal((2, 4, 3))

    def loss():
        return float((emb.forward(ids)[0] * dy).sum())

    y, ctx = emb.forward(ids)
    np.testing.assert_array_equal(y, emb.params["weight"][ids])
    assert emb.backward(ctx, dy) is None
    want = numeric_grad(loss, emb.params["weight"])
    if padding_idx is not None:
        pad = padding_idx % 6
        assert not emb.params["weight"][pad].any()
        want[pad] = 0                                       # the padding row takes no gradient
    np.testing.assert_allclose(emb.grads["weight"], want, rtol=1e-6, atol=1e-8)


def test_embedding_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    emb = Embedding(7, 4, padding_idx=0, dtype="float64", seed=4)
    ids = rng.integers(0, 7, (5, 6))
    dy = rng.standard_normal((5, 6, 4))
    y, ctx = emb.forward(ids)
    emb.backward(ctx, dy)
    w = torch.tensor(emb.params["weight"], requires_grad=True)
    yt = torch.nn.functional.embedding(torch.tensor(ids), w, padding_idx=0)
    (yt * torch.tensor(dy)).sum().backward()
    np.testing.assert_allclose(y, yt.detach().numpy())
    np.testing.assert_allclose(emb.grads["weight"], w.grad.numpy(), rtol=1e-12)


def cross_entropy_problem(shape, C, ignore_frac, rng, ignore_index=-100):
    logits = 3 * rng.standard_normal(shape + (C,))
    target = rng.integers(0, C, shape)
    target[rng.random(shape) < ignore_frac] = ignore_index
    return logits, target


@pytest.mark.parametrize("shape", [(5,), (2, 3)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ignore_frac", [0.0, 0.4])
def test_cross_entropy_gradients(shape, reduction, ignore_frac):
    rng = np.random.default_rng(4)
    logits, target = cross_entropy_problem(shape, 4, ignore_frac, rng)
    ce = SoftmaxCrossEntropy(reduction=reduction)
    loss, ctx = ce.forward(logits, target)
    assert isinstance(loss, float)
    dlogits = ce.backward(ctx, 0.7)
    np.testing.assert_allclose(dlogits, numeric_grad(lambda: 0.7 * ce.forward(logits, target)[0], logits),
                               rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("ignore_index", [-100, 1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_matches_torch(ignore_index, reduction):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    logits, target = cross_entropy_problem((3, 7), 5, 0.3, rng, ignore_index)
    logits[0, 0] = [1000.0, -1000.0, 0.0, 500.0, 3.0]      # far outside exp's range
    ce = SoftmaxCrossEntropy(ignore_index=ignore_index, reduction=reduction)
    loss, ctx = ce.forward(logits, target)
    zt = torch.tensor(logits.reshape(-1, 5), requires_grad=True)
    lt = torch.nn.functional.cross_entropy(zt, torch.tensor(target.reshape(-1)), ignore_index=ignore_index,
                                           reduction=reduction)
    lt.backward()
    np.testing.assert_allclose(loss, lt.item(), rtol=1e-12)
    np.testing.assert_allclose(ce.backward(ctx).reshape(-1, 5), zt.grad.numpy(), rtol=1e-10, atol=1e-15)


def test_cross_entropy_all_ignored_is_zero():
    ce = SoftmaxCrossEntropy(ignore_index=-1)
    loss, ctx = ce.forward(np.ones((3, 4), np.float32), np.full(3, -1))
    assert loss == 0.0
    grad = ce.backward(ctx)
    assert grad.dtype == np.float32 and grad.shape == (3, 4) and not grad.any()


@pytest.mark.parametrize("kind", sorted(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_elementwise_loss_gradients(kind, reduction):
    rng = np.random.default_rng(6)
    pred = 2 * rng.standard_normal((3, 4))
    target = rng.random((3, 4)) if kind == "bce" else rng.standard_normal((3, 4))
    loss_fn = LOSSES[kind](reduction=reduction)
    _, ctx = loss_fn.forward(pred, target)
    np.testing.assert_allclose(loss_fn.backward(ctx, 1.5),
                               numeric_grad(lambda: 1.5 * loss_fn.forward(pred, target)[0], pred),
                               rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", sorted(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_elementwise_loss_matches_torch(kind, reduction):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    pred = 2 * rng.standard_normal((2, 3, 5))
    pred[0, 0, :3] = [800.0, -800.0, 0.0]                   # exp(-x) overflows there without the stable form
    target = (rng.random(pred.shape) > 0.5).astype(np.int64) if kind == "bce" else rng.standard_normal(pred.shape)
    torch_fn = {"mse": torch.nn.functional.mse_loss,
                "bce": torch.nn.functional.binary_cross_entropy_with_logits}[kind]
    loss_fn = LOSSES[kind](reduction=reduction)
    loss, ctx = loss_fn.forward(pred, target)               # integer 0/1 targets are accepted as numbers
    pt = torch.tensor(pred, requires_grad=True)
    lt = torch_fn(pt, torch.tensor(target, dtype=torch.float64), reduction=reduction)
    lt.backward()
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss, lt.item(), rtol=1e-12)
    np.testing.assert_allclose(loss_fn.backward(ctx), pt.grad.numpy(), rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bce_gradient_is_relatively_accurate_at_large_logits(dtype):
    """Target 0: the gradient is sigmoid(x) itself, tiny for large negative x; it matches torch's to a few ulp of
    its own size (not of 1) from |x| = 1e-3 to where sigmoid underflows, and the loss matches too. Targets in
    (0, 1): sigmoid(x) - y, to an ulp of 1."""
    torch = pytest.importorskip("torch")
    eps = float(np.finfo(dtype).eps)
    big = {"float32": 87.0, "float64": 700.0}[dtype]     # sigmoid(-big) is still a normal number
    mags = np.geomspace(1e-3, big, 400)
    x = np.concatenate([-mags[::-1], [0.0], mags]).astype(dtype)
    rng = np.random.default_rng(9)
    for target, atol in ((np.zeros_like(x), 0.0), (rng.random(x.shape).astype(dtype), 2 * eps)):
        loss_fn = BCEWithLogitsLoss(reduction="sum")
        loss, ctx = loss_fn.forward(x, target)
        xt = torch.tensor(x, requires_grad=True)
        lt = torch.nn.functional.binary_cross_entropy_with_logits(xt, torch.tensor(target), reduction="sum")
        lt.backward()
        np.testing.assert_allclose(loss, lt.item(), rtol=1e-6 if dtype == "float32" else 1e-12)
        np.testing.assert_allclose(loss_fn.backward(ctx), xt.grad.numpy(), rtol=4 * eps, atol=atol)


@pytest.mark.parametrize("make", [lambda: SoftmaxCrossEntropy(), MSELoss, BCEWithLogitsLoss])
def test_float32_losses_follow_float64(make):
    rng = np.random.default_rng(8)
    pred = rng.standard_normal((6, 3))
    target = rng.integers(0, 3, 6) if isinstance(make(), SoftmaxCrossEntropy) else rng.random((6, 3))
    results = {}
    for dt in (np.float32, np.float64):
        fn = make()
        loss, ctx = fn.forward(pred.astype(dt), target)
        grad = fn.backward(ctx)
        assert grad.dtype == dt
        results[dt] = loss, grad
    np.testing.assert_allclose(results[np.float32][0], results[np.float64][0], rtol=1e-5)
    np.testing.assert_allclose(results[np.float32][1], results[np.float64][1], rtol=1e-4, atol=1e-6)


BAD_INPUTS = [
    ("linear x shape", lambda: Linear(3, 2).forward(np.ones((4, 5), np.float32)), ValueError, "x must have shape"),
    ("linear x dtype", lambda: Linear(3, 2).forward(np.ones((4, 3))), TypeError, "x must have dtype float32"),
    ("linear x nan", lambda: Linear(3, 2).forward(np.full((1, 3), np.nan, np.float32)), ValueError, "x contains"),
    ("linear dy shape", lambda: (lambda lin: lin.backward(lin.forward(np.ones((4, 3), np.float32))[1],
                                                          np.ones((4, 3), np.float32)))(Linear(3, 2)),
     ValueError, "dy must have shape"),
    ("linear foreign ctx", lambda: Linear(3, 2).backward(Linear(3, 2).forward(np.ones((1, 3), np.float32))[1],
                                                         np.ones((1, 2), np.float32)), ValueError, "another"),
    ("linear in_features", lambda: Linear(0, 2), ValueError, "in_features"),
    ("embedding range", lambda: Embedding(5, 2).forward(np.array([1, 7, -1])), ValueError, r"\[-1, 7\]"),
    ("embedding ids dtype", lambda: Embedding(5, 2).forward(np.array([1.0])), TypeError, "ids must hold integer"),
    ("embedding padding", lambda: Embedding(5, 2, padding_idx=5), ValueError, "padding_idx"),
    ("ce target range", lambda: SoftmaxCrossEntropy().forward(np.zeros((2, 3)), np.array([0, 3])),
     ValueError, r"target must hold classes in 0..2.*\[3\]"),
    ("ce target dtype", lambda: SoftmaxCrossEntropy().forward(np.zeros((2, 3)), np.zeros(2)), TypeError,
     "target must hold integer"),
    ("ce target shape", lambda: SoftmaxCrossEntropy().forward(np.zeros((2, 3)), np.zeros(3, int)), ValueError,
     r"target must have shape \(2,\)"),
    ("ce pred dtype", lambda: SoftmaxCrossEntropy().forward(np.zeros((2, 3), np.float16), np.zeros(2, int)),
     TypeError, "pred must be float32 or float64"),
    ("ce pred nan", lambda: SoftmaxCrossEntropy().forward(np.full((2, 3), np.nan), np.zeros(2, int)), ValueError,
     "pred contains NaN"),
    ("ce reduction", lambda: SoftmaxCrossEntropy(reduction="none"), ValueError, "reduction"),
    ("mse shape", lambda: MSELoss().forward(np.zeros((2, 3)), np.zeros((3, 2))), ValueError,
     r"target must have shape \(2, 3\)"),
    ("mse target nan", lambda: MSELoss().forward(np.zeros(2), np.array([0.0, np.nan])), ValueError,
     "target contains NaN"),
    ("bce target strings", lambda: BCEWithLogitsLoss().forward(np.zeros(2), np.array(["a", "b"])), TypeError,
     "target must hold real numbers"),
    ("loss foreign ctx", lambda: BCEWithLogitsLoss().backward(BCEWithLogitsLoss().forward(np.zeros(2), np.zeros(2))[1]),
     ValueError, "another"),
]


@pytest.mark.parametrize("call, error, match", [case[1:] for case in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_bad_dloss_names_the_argument():
    mse = MSELoss()
    _, ctx = mse.forward(np.zeros(2), np.ones(2))
    with pytest.raises(TypeError, match="dloss must be a number"):
        mse.backward(ctx, "one")
    with pytest.raises(ValueError, match="dloss must be finite"):
        mse.backward(ctx, float("nan"))
