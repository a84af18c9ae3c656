"""The optimizers against torch.optim with the same options (20 steps, float32 and float64, an lr change midway),
the ways to pass parameters, in-place updates, state_dict round trips mid-run, and the errors bad
hyper-parameters raise (changing nothing)."""
import json
import math
import pickle

import numpy as np
import pytest

import gpurnn
from gpurnn import optim
from gpurnn.nn import Embedding, Linear
from util import BACKENDS, device_of, to_numpy

DEVICES = sorted({device_of(b) for b in BACKENDS})
STEPS = 20

CONFIGS = {
    "sgd_default": ("SGD", dict()),
    "sgd": ("SGD", dict(lr=0.1)),
    "sgd_momentum": ("SGD", dict(lr=0.1, momentum=0.9)),
    "sgd_momentum_dampening": ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.5)),
    "sgd_nesterov": ("SGD", dict(lr=0.05, momentum=0.8, nesterov=True)),
    "sgd_nesterov_wd_maximize": ("SGD", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1,
                                             maximize=True)),
    "sgd_wd_maximize": ("SGD", dict(lr=0.1, weight_decay=0.01, maximize=True)),
    "sgd_all": ("SGD", dict(lr=0.1, momentum=0.7, dampening=0.3, weight_decay=0.05, maximize=True)),
    "adam_default": ("Adam", dict()),
    "adam": ("Adam", dict(lr=0.01)),
    "adam_wd": ("Adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    "adam_low_beta1": ("Adam", dict(lr=0.01, betas=(0.3, 0.9))),
    "adam_amsgrad": ("Adam", dict(lr=0.01, amsgrad=True)),
    "adam_amsgrad_wd_maximize": ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1, maximize=True)),
    "adamw_default": ("AdamW", dict()),
    "adamw": ("AdamW", dict(lr=0.01, weight_decay=0.1)),
    "adamw_amsgrad_maximize": ("AdamW", dict(lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True)),
    "adagrad_default": ("Adagrad", dict()),
    "adagrad_wd": ("Adagrad", dict(lr=0.1, weight_decay=0.05)),
    "adagrad_lr_decay": ("Adagrad", dict(lr=0.1, lr_decay=0.1)),
    "adagrad_initial_accumulator": ("Adagrad", dict(lr=0.1, initial_accumulator_value=0.5)),
    "adagrad_all": ("Adagrad", dict(lr=0.1, lr_decay=0.05, weight_decay=0.05, initial_accumulator_value=0.2,
                                    eps=1e-6, maximize=True)),
    "rmsprop_default": ("RMSprop", dict()),
    "rmsprop_momentum_wd": ("RMSprop", dict(lr=0.01, alpha=0.9, momentum=0.5, weight_decay=0.01)),
    "rmsprop_centered": ("RMSprop", dict(lr=0.01, centered=True)),
    "rmsprop_centered_momentum": ("RMSprop", dict(lr=0.01, alpha=0.3, centered=True, momentum=0.9)),
    "rmsprop_maximize": ("RMSprop", dict(lr=0.01, maximize=True, weight_decay=0.1)),
}
TOLERANCE = {"float64": dict(rtol=1e-12, atol=1e-14), "float32": dict(rtol=2e-6, atol=2e-6)}


def make_modules(device="cpu", seed=0, dtype="float64"):
    return [Linear(4, 3, dtype=dtype, seed=seed).to(device), Embedding(5, 2, dtype=dtype, seed=seed + 1).to(device)]


def gradient_sequence(modules, steps, seed=1):
    """Per step, a dict (module index, name) -> NumPy gradient in the modules' dtype."""
    rng = np.random.default_rng(seed)
    return [{(i, k): rng.standard_normal(p.shape).astype(p.dtype) for i, m in enumerate(modules)
             for k, p in m.params.items()} for _ in range(steps)]


def run_steps(opt, modules, grads, first=0):
    """Set each step's gradients and step; before step 10 halve lr (a schedule)."""
    for n, g in enumerate(grads, start=first):
        if n == 10:
            opt.lr = opt.lr * 0.5
        for (i, k), v in g.items():
            modules[i].grads[k][...] = modules[i].xp.asarray(v)
        opt.step()


def torch_run(name, kwargs, modules, grads):
    """The same run through torch.optim (single-tensor path): the final parameters, keyed (module index, name)."""
    torch = pytest.importorskip("torch")
    tparams = {(i, k): torch.tensor(to_numpy(p), requires_grad=True)
               for i, m in enumerate(modules) for k, p in m.params.items()}
    topt = getattr(torch.optim, name)(list(tparams.values()), **kwargs, foreach=False)
    for n, g in enumerate(grads):
        if n == 10:
            topt.param_groups[0]["lr"] *= 0.5
        for key, t in tparams.items():
            t.grad = torch.tensor(g[key])
        topt.step()
    return {key: t.detach().numpy() for key, t in tparams.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_matches_torch(config, dtype, device):
    name, kwargs = CONFIGS[config]
    modules = make_modules(device, dtype=dtype)
    grads = gradient_sequence(modules, STEPS)
    expect = torch_run(name, kwargs, modules, grads)
    opt = getattr(optim, name)(modules, **kwargs)
    run_steps(opt, modules, grads)
    assert opt.step_count == STEPS
    for (i, k), t in expect.items():
        np.testing.assert_allclose(to_numpy(modules[i].params[k]), t, **TOLERANCE[dtype], err_msg=f"{i}.{k}")


def test_defaults_are_torchs():
    torch = pytest.importorskip("torch")
    for name in ("SGD", "Adam", "AdamW", "Adagrad", "RMSprop"):
        ours = getattr(optim, name)(make_modules())
        theirs = getattr(torch.optim, name)([torch.zeros(1, requires_grad=True)]).defaults
        for k, v in ours.hyper.items():
            assert theirs[k] == v, f"{name}.{k}: {v} vs torch {theirs[k]}"


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_state_dict_mid_run_continues_identically(config):
    name, kwargs = CONFIGS[config]
    grads = gradient_sequence(make_modules(), STEPS)
    modules = make_modules()
    arrays = {(i, k): p for i, m in enumerate(modules) for k, p in m.params.items()}
    opt = getattr(optim, name)(modules, **kwargs)
    run_steps(opt, modules, grads[:10])
    assert all(modules[i].params[k] is p for (i, k), p in arrays.items())     # the same arrays, edited
    sd = opt.state_dict()
    json.dumps({k: v for k, v in sd.items() if k != "state"})                 # the header is JSON-able
    saved = pickle.loads(pickle.dumps(sd))
    copies = make_modules(seed=7)
    for m, src in zip(copies, modules):
        m.load_state_dict(src.state_dict())
    resumed = getattr(optim, name)(copies, **{**kwargs, "lr": 123.0})
    resumed.load_state_dict(saved)
    assert resumed.hyper == opt.hyper and resumed.step_count == 10
    run_steps(opt, modules, grads[10:], first=10)
    run_steps(resumed, copies, grads[10:], first=10)
    for m, c in zip(modules, copies):
        for k in m.params:
            np.testing.assert_array_equal(c.params[k], m.params[k])
    for buf, values in opt.state_dict()["state"].items():
        for k, v in values.items():
            np.testing.assert_array_equal(resumed.state_dict()["state"][buf][k], v, err_msg=f"{buf}[{k}]")


def tagger():
    return gpurnn.models.Tagger(3, 4, 2, embedding_dim=None, seed=0, dtype="float64")


@pytest.mark.parametrize("form", ["model", "parameters", "named_parameters", "modules", "children"])
def test_every_way_to_pass_parameters_updates_the_same(form):
    reference, model = tagger(), tagger()
    for m in (reference, model):
        for name, p in m.named_parameters():
            p.grad[...] = np.random.default_rng(len(name)).standard_normal(p.shape)
    params = {"model": model, "parameters": model.parameters(), "named_parameters": model.named_parameters(),
              "modules": model.modules(), "children": model.children()}[form]
    opt = optim.Adam(params, lr=0.1)
    optim.Adam([reference.rnn, reference.head], lr=0.1).step()
    opt.step()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)
    keys = list(opt.state_dict()["state"]["exp_avg"])
    assert len(keys) == len(model.parameters())
    if form in ("model", "parameters", "named_parameters"):
        assert keys == [name for name, _ in model.named_parameters()]


def test_a_parameter_listed_twice_is_updated_once():
    layer = Linear(2, 2, dtype="float64", seed=0)
    layer.grads["weight"][...] = 1.0
    before = layer.params["weight"].copy()
    optim.SGD([layer, layer], lr=0.5).step()
    np.testing.assert_allclose(layer.params["weight"], before - 0.5)


def test_zero_grad_clears_every_parameter():
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
    elif how == "hyper_key":
        del sd["hyper"]["amsgrad"]
    elif how == "nan":
        sd["state"]["exp_avg"]["0.bias"][1] = np.nan
    elif how == "step":
        sd["step"] = -1
    return sd


@pytest.mark.parametrize("how, match", [("shape", r"exp_avg\[0.weight\]: expected shape \(3, 4\)"),
                                        ("missing", "missing.*1.weight"), ("type", "saved by SGD"),
                                        ("hyper", "lr must lie in"), ("hyper_key", "must have keys"),
                                        ("nan", r"exp_avg\[0.bias\]: holds NaN"), ("step", "step")])
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


BAD = [
    ("SGD", dict(lr=-0.1), ValueError, r"lr must lie in \[0.0, inf\)"),
    ("SGD", dict(lr=math.inf), ValueError, "lr must lie in"),
    ("SGD", dict(lr=math.nan), ValueError, "lr must lie in"),
    ("SGD", dict(lr="fast"), TypeError, "lr must be a number"),
    ("SGD", dict(weight_decay=math.inf), ValueError, "weight_decay must lie in"),
    ("SGD", dict(momentum=-1), ValueError, "momentum must lie in"),
    ("SGD", dict(momentum=math.inf), ValueError, "momentum must lie in"),
    ("SGD", dict(dampening=1.5), ValueError, "dampening must lie in"),
    ("SGD", dict(nesterov=True), ValueError, "nesterov=True needs momentum > 0"),
    ("SGD", dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError, "dampening = 0"),
    ("SGD", dict(nesterov="yes", momentum=0.9), TypeError, "nesterov must be True or False"),
    ("SGD", dict(maximize=1), TypeError, "maximize must be True or False"),
    ("Adam", dict(lr=math.inf), ValueError, "lr must lie in"),
    ("Adam", dict(eps=math.inf), ValueError, "eps must lie in"),
    ("Adam", dict(eps=0.0), ValueError, "eps must lie in"),
    ("Adam", dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\] must lie in"),
    ("Adam", dict(betas=(-0.1, 0.9)), ValueError, r"betas\[0\] must lie in"),
    ("Adam", dict(betas=0.9), TypeError, "betas must be a pair"),
    ("Adam", dict(amsgrad="no"), TypeError, "amsgrad must be True or False"),
    ("AdamW", dict(weight_decay=math.nan), ValueError, "weight_decay must lie in"),
    ("RMSprop", dict(alpha=1.5), ValueError, r"alpha must lie in \[0.0, 1.0\)"),
    ("RMSprop", dict(alpha=1.0), ValueError, "alpha must lie in"),
    ("RMSprop", dict(momentum=-1), ValueError, "momentum must lie in"),
    ("RMSprop", dict(centered="False"), TypeError, "centered must be True or False"),
    ("Adagrad", dict(eps=0.0), ValueError, "eps must lie in"),
    ("Adagrad", dict(lr_decay=-1), ValueError, "lr_decay must lie in"),
    ("Adagrad", dict(initial_accumulator_value=-0.5), ValueError, "initial_accumulator_value must lie in"),
]


@pytest.mark.parametrize("name, kwargs, error, match", BAD)
def test_bad_hyper_parameters(name, kwargs, error, match):
    with pytest.raises(error, match=match):
        getattr(optim, name)(make_modules(), **kwargs)


@pytest.mark.parametrize("params, error, match", [
    ([object()], TypeError, r"params\[0\] must be a Module, a Parameter"),
    ([{"params": []}], TypeError, "parameter groups are not supported"),
    ([], ValueError, "at least one parameter"),
    ("model", TypeError, "params must be a model"),
    (None, TypeError, "params must be a model"),
])
def test_bad_params(params, error, match):
    with pytest.raises(error, match=match):
        optim.Adam(params)


@pytest.mark.parametrize("attr, value", [("lr", -1), ("lr", math.inf), ("betas", (0.9, 1.5)), ("amsgrad", "yes")])
def test_hyper_parameters_are_settable_and_checked(attr, value):
    opt = optim.Adam(make_modules(), lr=0.01)
    before = dict(opt.hyper)
    opt.lr = 0.5
    assert opt.lr == 0.5 and opt.state_dict()["hyper"]["lr"] == 0.5
    with pytest.raises((ValueError, TypeError), match=attr):
        setattr(opt, attr, value)
    assert opt.hyper == {**before, "lr": 0.5}
