"""Global-norm and value clipping against torch.nn.utils.clip_grad_norm_ / clip_grad_value_, every accepted form of
`grads`, the non-finite policy, and the errors bad arguments raise."""
import math

import numpy as np
import pytest

from gpurnn.clip import clip_grad_norm, clip_grad_value, gradient_arrays
from gpurnn.nn import Linear
from util import BACKENDS, device_of, to_device, to_numpy

DEVICES = sorted({device_of(b) for b in BACKENDS})


def gradients(dtype, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return [np.asarray(scale * rng.standard_normal(s), dtype) for s in [(3, 4), (5,), (), (0, 2), (2, 3, 2)]]


def torch_twins(arrays):
    torch = pytest.importorskip("torch")
    twins = []
    for a in arrays:
        t = torch.zeros(a.shape, dtype=getattr(torch, a.dtype.name), requires_grad=True)
        t.grad = torch.tensor(a)
        twins.append(t)
    return torch, twins


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.5, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])          # clipping, and not
def test_clip_grad_norm_matches_torch(max_norm, norm_type, dtype, device):
    host = gradients(dtype)
    torch, twins = torch_twins([a for a in host if a.size])    # torch's inf-norm rejects empty tensors
    want = torch.nn.utils.clip_grad_norm_(twins, max_norm, norm_type=norm_type).item()
    grads = [to_device(a, "cupy" if device == "cuda" else "numpy") for a in host]
    total = clip_grad_norm(grads, max_norm, norm_type=norm_type)
    assert isinstance(total, float)
    rtol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(total, want, rtol=rtol)
    for g, t in zip([g for g in grads if g.size], twins):
        assert g.dtype == dtype
        np.testing.assert_allclose(to_numpy(g), t.grad.numpy(), rtol=rtol, atol=1e-30)


def as_module(arrays):
    """A Linear whose grads dict holds copies of `arrays` under its own names."""
    lin = Linear(1, 1, bias=False, dtype="float64")
    lin.grads = {f"g{i}": a.copy() for i, a in enumerate(arrays)}
    return lin


FORMS = {
    "list": lambda a: [x.copy() for x in a],
    "dict": lambda a: {f"g{i}": x.copy() for i, x in enumerate(a)},
    "module": as_module,
    "modules and dicts": lambda a: [as_module(a[:2]), {"x": a[2].copy()}, [x.copy() for x in a[3:]]],
    "generator": lambda a: (x for x in [y.copy() for y in a]),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_form_clips_all_gradients(form):
    host = gradients("float64", scale=3.0)
    want = math.sqrt(sum(float((a * a).sum()) for a in host))
    grads = FORMS[form](host)
    kept = grads if form != "generator" else None
    assert clip_grad_norm(grads, 1.0) == pytest.approx(want, rel=1e-12)
    if kept is not None:
        clipped = gradient_arrays(kept)
        assert math.sqrt(sum(float((a * a).sum()) for a in clipped)) == pytest.approx(1.0, rel=1e-5)


def test_single_array_is_one_gradient():
    g = np.array([[3.0, 4.0]])
    assert clip_grad_norm(g, 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(g, [[0.6, 0.8]], rtol=1e-5)


def test_no_gradients_give_zero():
    assert clip_grad_norm([], 1.0) == 0.0
    assert clip_grad_norm({}, 1.0) == 0.0


def test_nonfinite_total():
    grads = gradients("float64")
    grads[0][1, 1] = np.nan
    kept = [g.copy() for g in grads]
    with pytest.raises(ValueError, match="nan"):
        clip_grad_norm(grads, 1.0, error_if_nonfinite=True)
    for g, k in zip(grads, kept):
        np.testing.assert_array_equal(g, k)                  # left as they were
    assert math.isnan(clip_grad_norm(grads, 1.0))          # torch's behaviour without the flag: scale by NaN
    assert np.isnan(grads[1]).all()
    inf = [np.array([np.inf, 1.0])]
    with pytest.raises(ValueError, match="inf"):
        clip_grad_norm(inf, 1.0, norm_type=math.inf, error_if_nonfinite=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clip_value", [0.0, 0.3, 10.0])
def test_clip_grad_value_matches_torch(clip_value, device):
    host = gradients("float32", seed=2)
    torch, twins = torch_twins(host)
    torch.nn.utils.clip_grad_value_(twins, clip_value)
    grads = [to_device(a, "cupy" if device == "cuda" else "numpy") for a in host]
    assert clip_grad_value({"a": grads[0], "rest": grads[1:]}, clip_value) is None
    for g, t in zip(grads, twins):
        np.testing.assert_array_equal(to_numpy(g), t.grad.numpy())


@pytest.mark.parametrize("call, error, match", [
    (lambda: clip_grad_norm([np.ones(2)], -1.0), ValueError, "max_norm must lie in"),
    (lambda: clip_grad_norm([np.ones(2)], 1.0, norm_type=0), ValueError, "norm_type must lie in"),
    (lambda: clip_grad_norm([np.ones(2)], "big"), TypeError, "max_norm must be a number"),
    (lambda: clip_grad_norm([np.ones(2, int)], 1.0), TypeError, r"grads\[0\] must hold float arrays"),
    (lambda: clip_grad_norm("grads", 1.0), TypeError, "grads must be a module"),
    (lambda: clip_grad_norm([np.ones(2), 3.0], 1.0), TypeError, r"grads\[1\] must be a module"),
    (lambda: clip_grad_value([np.ones(2)], float("nan")), ValueError, "clip_value must lie in"),
])
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
