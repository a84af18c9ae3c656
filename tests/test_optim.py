"""The optimizers against torch.optim with the same hyper-parameters (float64, several steps, an lr change midway),
in-place updates, state_dict round trips, and the errors bad hyper-parameters raise."""
import pickle

import numpy as np
import pytest

from gpurnn import optim
from gpurnn.nn import Embedding, Linear
from util import BACKENDS, device_of, to_numpy

DEVICES = sorted({device_of(b) for b in BACKENDS})

CONFIGS = {
    "sgd": ("SGD", dict(lr=0.1)),
    "sgd_momentum_wd": ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    "sgd_nesterov": ("SGD", dict(lr=0.05, momentum=0.8, nesterov=True)),
    "adam": ("Adam", dict(lr=0.01)),
    "adam_wd": ("Adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    "adamw": ("AdamW", dict(lr=0.01, weight_decay=0.1)),
    "adagrad": ("Adagrad", dict(lr=0.1, weight_decay=0.05)),
    "rmsprop": ("RMSprop", dict(lr=0.01)),
    "rmsprop_momentum_wd": ("RMSprop", dict(lr=0.01, alpha=0.9, momentum=0.5, weight_decay=0.01)),
}


def make_modules(device="cpu", seed=0):
    return [Linear(4, 3, dtype="float64", seed=seed).to(device),
            Embedding(5, 2, dtype="float64", seed=seed + 1).to(device)]


def gradient_sequence(modules, steps, seed=1):
    """Per step, a dict (module index, name) -> NumPy gradient."""
    rng = np.random.default_rng(seed)
    return [{(i, k): rng.standard_normal(p.shape) for i, m in enumerate(modules) for k, p in m.params.items()}
            for _ in range(steps)]


def run_steps(opt, modules, grads, lr_after=None):
    """Set each step's gradients and step; at step 3 multiply lr by 0.5 (a schedule)."""
    for n, g in enumerate(grads):
        if n == 3 and lr_after:
            opt.lr = opt.lr * 0.5
        for (i, k), v in g.items():
            modules[i].grads[k][...] = modules[i].xp.asarray(v)
        opt.step()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_matches_torch(config, device):
    torch = pytest.importorskip("torch")
    name, kwargs = CONFIGS[config]
    modules = make_modules(device)
    tparams = {(i, k): torch.tensor(to_numpy(p), requires_grad=True)
               for i, m in enumerate(modules) for k, p in m.params.items()}
    opt = getattr(optim, name)(modules, **kwargs)
    topt = getattr(torch.optim, name)(list(tparams.values()), **kwargs)
    grads = gradient_sequence(modules, 6)
    run_steps(opt, modules, grads, lr_after=True)
    for n, g in enumerate(grads):
        if n == 3:
            topt.param_groups[0]["lr"] *= 0.5
        for key, t in tparams.items():
            t.grad = torch.tensor(g[key])
        topt.step()
    assert opt.step_count == 6
    for (i, k), t in tparams.items():
        np.testing.assert_allclose(to_numpy(modules[i].params[k]), t.detach().numpy(), rtol=1e-12, atol=1e-14,
                                   err_msg=f"{i}.{k}")


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_updates_in_place_and_resumes_from_state_dict(config):
    name, kwargs = CONFIGS[config]
    grads = gradient_sequence(make_modules(), 6)
    modules = make_modules()
    arrays = {(i, k): p for i, m in enumerate(modules) for k, p in m.params.items()}
    before = {key: p.copy() for key, p in arrays.items()}
    opt = getattr(optim, name)(modules, **kwargs)
    run_steps(opt, modules, grads[:3])
    assert all(modules[i].params[k] is p for (i, k), p in arrays.items())     # the same arrays, edited
    assert any(not np.array_equal(p, before[key]) for key, p in arrays.items())
    saved = pickle.loads(pickle.dumps(opt.state_dict()))
    copies = make_modules()
    for m, src in zip(copies, modules):
        m.load_state_dict(src.state_dict())
    resumed = getattr(optim, name)(copies, **{**kwargs, "lr": 123.0})
    resumed.load_state_dict(saved)
    assert resumed.lr == opt.lr and resumed.step_count == 3
    run_steps(opt, modules, grads[3:])
    run_steps(resumed, copies, grads[3:])
    for m, c in zip(modules, copies):
        for k in m.params:
            np.testing.assert_array_equal(c.params[k], m.params[k])


def test_zero_grad_clears_every_module():
    modules = make_modules()
    for m in modules:
        for g in m.grads.values():
            g[...] = 1
    optim.SGD(modules, lr=0.1).zero_grad()
    assert not any(g.any() for m in modules for g in m.grads.values())


def corrupt(sd, how):
    """A copy of an Adam state dict broken in one way."""
    sd = pickle.loads(pickle.dumps(sd))
    if how == "shape":
        sd["state"]["exp_avg"]["0.weight"] = np.zeros((2, 2))
    elif how == "missing":
        del sd["state"]["exp_avg_sq"]["1.weight"]
    elif how == "type":
        sd["type"] = "SGD"
    elif how == "hyper":
        sd["hyper"]["lr"] = -1.0
    return sd


@pytest.mark.parametrize("how, match", [("shape", r"exp_avg\[0.weight\]: expected shape \(3, 4\)"),
                                        ("missing", "missing.*1.weight"), ("type", "saved by SGD"),
                                        ("hyper", "lr must lie in")])
def test_load_state_dict_rejects_and_changes_nothing(how, match):
    modules = make_modules()
    opt = optim.Adam(modules, lr=0.01)
    run_steps(opt, modules, gradient_sequence(modules, 2))
    good = opt.state_dict()
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(corrupt(good, how))
    after = opt.state_dict()
    assert after["step"] == 2 and after["hyper"] == good["hyper"]
    for buf, arrays in good["state"].items():
        for k, v in arrays.items():
            np.testing.assert_array_equal(after["state"][buf][k], v)


@pytest.mark.parametrize("make, error, match", [
    (lambda m: optim.SGD(m, lr=-0.1), ValueError, "lr must lie in"),
    (lambda m: optim.SGD(m, lr="fast"), TypeError, "lr must be a number"),
    (lambda m: optim.SGD(m, lr=0.1, nesterov=True), ValueError, "nesterov=True needs momentum"),
    (lambda m: optim.Adam(m, betas=(0.9, 1.0)), ValueError, r"betas\[1\] must lie in"),
    (lambda m: optim.Adam(m, betas=0.9), TypeError, "betas must be a pair"),
    (lambda m: optim.Adagrad(m, eps=0.0), ValueError, "eps must lie in"),
    (lambda m: optim.RMSprop(m, momentum=-1), ValueError, "momentum must lie in"),
    (lambda m: optim.AdamW(m, weight_decay=float("nan")), ValueError, "weight_decay must lie in"),
    (lambda m: optim.Adam([object()]), TypeError, r"modules\[0\] must have dicts"),
    (lambda m: optim.Adam([]), ValueError, "at least one module"),
])
def test_bad_hyper_parameters(make, error, match):
    with pytest.raises(error, match=match):
        make(make_modules())


def test_lr_is_settable_and_checked():
    opt = optim.Adam(make_modules(), lr=0.01)
    opt.lr = 0.5
    assert opt.lr == 0.5 and opt.state_dict()["hyper"]["lr"] == 0.5
    with pytest.raises(ValueError, match="lr must lie in"):
        opt.lr = -1
    assert opt.lr == 0.5
