"""The learning-rate schedules against torch.optim.lr_scheduler (20 steps), state_dict resume, bad arguments."""
import json
import math

import numpy as np
import pytest

from gpurnn import optim
from gpurnn.nn import Linear

SCHEDULES = {
    "step": ("StepLR", dict(step_size=3, gamma=0.5)),
    "step_default_gamma": ("StepLR", dict(step_size=4)),
    "exponential": ("ExponentialLR", dict(gamma=0.9)),
    "cosine": ("CosineAnnealingLR", dict(T_max=7, eta_min=0.001)),     # 20 steps: past T_max, a wave
    "cosine_default": ("CosineAnnealingLR", dict(T_max=20)),
    "lambda": ("LambdaLR", dict(lr_lambda=lambda epoch: 0.95 ** epoch / (1 + epoch % 4))),
}


def optimizer(lr=0.1):
    return optim.SGD(Linear(2, 2, seed=0), lr=lr, momentum=0.9)


def lrs(scheduler, opt, steps):
    out = []
    for _ in range(steps):
        opt.step()
        scheduler.step()
        assert scheduler.get_last_lr() == [opt.lr]
        out.append(opt.lr)
    return out


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_matches_torch_over_20_steps(schedule):
    torch = pytest.importorskip("torch")
    name, kwargs = SCHEDULES[schedule]
    opt = optimizer()
    ours = lrs(getattr(optim, name)(opt, **kwargs), opt, 20)
    topt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
    tsched = getattr(torch.optim.lr_scheduler, name)(topt, **kwargs)
    theirs = []
    for _ in range(20):
        topt.step()
        tsched.step()
        theirs.append(topt.param_groups[0]["lr"])
    np.testing.assert_allclose(ours, theirs, rtol=1e-14, atol=1e-17)
    assert len(set(np.round(ours, 12))) > 1


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_state_dict_resumes_exactly(schedule):
    name, kwargs = SCHEDULES[schedule]
    opt = optimizer()
    sched = getattr(optim, name)(opt, **kwargs)
    lrs(sched, opt, 8)
    saved_opt, saved_sched = opt.state_dict(), json.loads(json.dumps(sched.state_dict()))
    expect = lrs(sched, opt, 12)
    opt2 = optimizer(lr=5.0)
    sched2 = getattr(optim, name)(opt2, **{**kwargs, **({"gamma": 0.2} if "gamma" in kwargs else {})})
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert lrs(sched2, opt2, 12) == expect


@pytest.mark.parametrize("make, error, match", [
    (lambda o: optim.StepLR(o, step_size=0), ValueError, "step_size"),
    (lambda o: optim.StepLR(o, step_size=2.5), ValueError, "step_size"),
    (lambda o: optim.StepLR(o, step_size=2, gamma=-1), ValueError, "gamma must lie in"),
    (lambda o: optim.ExponentialLR(o, gamma=math.inf), ValueError, "gamma must lie in"),
    (lambda o: optim.ExponentialLR(o, gamma="x"), TypeError, "gamma must be a number"),
    (lambda o: optim.CosineAnnealingLR(o, T_max=0), ValueError, "T_max"),
    (lambda o: optim.CosineAnnealingLR(o, T_max=5, eta_min=math.nan), ValueError, "eta_min"),
    (lambda o: optim.LambdaLR(o, lr_lambda=3), TypeError, "lr_lambda must be a function"),
    (lambda o: optim.StepLR(object(), step_size=2), TypeError, "optimizer must be a gpurnn.optim optimizer"),
])
def test_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make(optimizer())


def test_bad_lambda_value_and_state_dict_change_nothing():
    opt = optimizer()
    sched = optim.LambdaLR(opt, lambda epoch: -1.0 if epoch == 2 else 1.0)
    lrs(sched, opt, 1)
    with pytest.raises(ValueError, match=r"lr_lambda\(2\) must lie in"):
        sched.step()
    assert opt.lr == 0.1 and sched.last_epoch == 1
    step = optim.StepLR(opt, step_size=2)
    good = step.state_dict()
    for bad in ({**good, "last_epoch": -1}, {**good, "type": "ExponentialLR"}, {**good, "gamma": math.inf},
                {k: v for k, v in good.items() if k != "base_lr"}):
        with pytest.raises(ValueError):
            step.load_state_dict(bad)
        assert step.state_dict() == good
