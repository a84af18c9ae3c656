"""Optimizers with torch.optim's options, defaults and update rules: SGD, Adam, AdamW, Adagrad, RMSprop.

An optimizer takes a model (`Adam(model)`), its parameters (`Adam(model.parameters())`, or `named_parameters()`),
or a list of modules (`Adam([embedding, lstm, head])`), and updates the arrays of `module.params` in place
(never rebinding them), so layers and their ctxs keep seeing the live values. Each rule runs on whatever array
module holds the parameter: NumPy on the CPU, CuPy on a GPU. Every hyper-parameter is an attribute that may be
changed between steps (`opt.lr = 0.01`; the schedulers of gpurnn.lr_scheduler do that), checked on assignment.
"""
import math

import numpy as np

from .backend import array_module, to_host, xp_for, array_device
from .checks import flag, mapping_problems, nonnegative, number
from .lr_scheduler import CosineAnnealingLR, ExponentialLR, LambdaLR, StepLR  # noqa: F401 (gpurnn.optim API)
from .module import Module, Parameter


def unit(v, name):
    return number(v, name, 0.0, 1.0, high_open=True)


def fraction(v, name):
    return number(v, name, 0.0, 1.0)


def positive(v, name):
    return number(v, name, 0.0, math.inf, low_open=True, high_open=True)


def betas_check(v, name):
    if not isinstance(v, (tuple, list)) or len(v) != 2:
        raise TypeError(f"{name} must be a pair (beta1, beta2), got {v!r}")
    return tuple(unit(b, f"{name}[{i}]") for i, b in enumerate(v))


def parameter_entries(params):
    """[(key, Parameter)] from a Module, or an iterable of Modules, Parameters or (name, Parameter) pairs.
    Keys: dotted names for a model or parameters; "i.name" for the i-th module of a list."""
    if isinstance(params, Module):
        return params.named_parameters()
    if isinstance(params, (str, bytes, dict)) or not hasattr(params, "__iter__"):
        raise TypeError(f"params must be a model, its parameters() or a list of modules, got {type(params).__name__}")
    entries = []
    for i, item in enumerate(params):
        if isinstance(item, Module):
            entries += [(f"{i}.{name}", p) for name, p in item.named_parameters()]
        elif isinstance(item, Parameter):
            entries.append((item.name, item))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Parameter):
            entries.append((str(item[0]), item[1]))
        else:
            hint = " (parameter groups are not supported)" if isinstance(item, dict) else ""
            raise TypeError(f"params[{i}] must be a Module, a Parameter or a (name, Parameter) pair, "
                            f"got {type(item).__name__}{hint}")
    keys = [k for k, _ in entries]
    if len(set(keys)) != len(keys):                # parameters of several models: keep them apart by position
        entries = [(f"{i}.{k}", p) for i, (k, p) in enumerate(entries)]
    return entries


class Optimizer:
    """Holds the parameters, the hyper-parameters, the step count and per-parameter state buffers.

    Subclasses name their buffers in `buffer_names(hyper)` and implement `update(p, g, state, xp)` for one
    parameter, where `state` maps buffer name -> array like p, made by `initial(buf, p, xp)` (zeros by default).
    """

    HYPER = {}      # hyper-parameter name -> check(value, name) returning the value to keep

    def __init__(self, params, **hyper):
        checked = {k: self.HYPER[k](v, k) for k, v in hyper.items()}      # every check before any state
        entries, seen = [], set()
        for key, p in parameter_entries(params):
            if (id(p.module), p.key) not in seen:    # a parameter listed twice is updated once
                seen.add((id(p.module), p.key))
                entries.append((key, p))
        if not entries:
            raise ValueError("params must hold at least one parameter")
        self.entries = entries
        self.hyper = checked
        self.step_count = 0
        self.state = {}
        for key, p in self.entries:
            for buf in self.buffers():
                self.buffer(buf, key, p.data)

    def __setattr__(self, name, value):
        check = self.HYPER.get(name)
        if check is not None:
            self.hyper[name] = check(value, name)
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        hyper = self.__dict__.get("hyper", {})
        if name in hyper:
            return hyper[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyper.items())
        return f"{type(self).__name__}({args})"

    def named_params(self):
        """(key, live array) for every parameter, in a fixed order."""
        for key, p in self.entries:
            yield key, p.data

    def buffers(self):
        return self.buffer_names(self.hyper)

    @staticmethod
    def buffer_names(hyper):
        """The per-parameter buffers kept under hyper-parameters `hyper`."""
        return ()

    def initial(self, buf, p, xp):
        """A new buffer `buf` for parameter p."""
        return xp.zeros_like(p)

    def zero_grad(self):
        for _, p in self.entries:
            p.grad[...] = 0

    def buffer(self, buf, key, p):
        """The buffer `buf` of parameter `key`, in p's array module (made by `initial` when new)."""
        arrays = self.state.setdefault(buf, {})
        s = arrays.get(key)
        xp = array_module(p)
        if s is None:
            s = arrays[key] = self.initial(buf, p, xp)
        elif array_module(s) is not xp:      # the module moved device since the buffer was made
            s = arrays[key] = xp.asarray(to_host(s))
        return s

    def step(self):
        self.step_count += 1
        for key, param in self.entries:
            p = param.data
            state = {buf: self.buffer(buf, key, p) for buf in self.buffers()}
            self.update(p, param.grad, state, array_module(p))

    def state_dict(self):
        """A plain dict: type, step count, hyper-parameters (JSON-able) and the buffers as NumPy arrays."""
        return {"type": type(self).__name__, "step": self.step_count,
                "hyper": {k: list(v) if isinstance(v, tuple) else v for k, v in self.hyper.items()},
                "state": {buf: {k: to_host(self.buffer(buf, k, p), copy=True) for k, p in self.named_params()}
                          for buf in self.buffers()}}

    def load_state_dict(self, sd):
        """Restore what `state_dict` returned (for the same parameters); all-or-nothing."""
        if not isinstance(sd, dict) or not {"type", "step", "hyper", "state"} <= sd.keys():
            raise ValueError("sd must be a dict from Optimizer.state_dict() with keys type, step, hyper, state")
        if not isinstance(sd["hyper"], dict) or not isinstance(sd["state"], dict):
            raise ValueError("sd['hyper'] and sd['state'] must be dicts")
        if sd["type"] != type(self).__name__:
            raise ValueError(f"sd was saved by {sd['type']}, not {type(self).__name__}")
        hyper = {k: self.HYPER[k](v, k) for k, v in sd["hyper"].items() if k in self.HYPER}
        if hyper.keys() != self.hyper.keys() or sd["hyper"].keys() != self.hyper.keys():
            raise ValueError(f"sd['hyper'] must have keys {sorted(self.hyper)}, got {sorted(sd['hyper'])}")
        step = sd["step"]
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"sd['step'] must be an integer >= 0, got {step!r}")
        buffers = self.buffer_names(hyper)
        problems = []
        if set(sd["state"]) != set(buffers):
            problems.append(f"state buffers {sorted(sd['state'])}, expected {sorted(buffers)}")
        params = dict(self.named_params())
        for buf in buffers:
            arrays = sd["state"].get(buf, {})
            problems += mapping_problems(params, arrays, buf)
            problems += [f"{buf}[{k}]: holds NaN or Inf" for k, v in arrays.items()
                         if k in params and not bool(xp_for(array_device(v)).isfinite(v).all())]
        if problems:
            raise ValueError(f"load_state_dict for {type(self).__name__}: " + "; ".join(problems))
        self.hyper = hyper
        self.step_count = int(step)
        self.state = {buf: {k: array_module(p).asarray(to_host(sd["state"][buf][k]), dtype=p.dtype)
                            for k, p in params.items()} for buf in buffers}


def lerp_(a, b, weight):
    """a += weight (b - a) in place, as torch.lerp_ computes it (the form chosen by weight, for rounding)."""
    if weight < 0.5:
        a += weight * (b - a)
    else:
        a[...] = b - (b - a) * (1 - weight)


def signed_decayed(p, g, maximize, weight_decay):
    """The gradient the rules use: -g when maximizing, plus the L2 term wd p (new arrays; grads stay untouched)."""
    g = -g if maximize else g
    return g + weight_decay * p if weight_decay else g


class SGD(Optimizer):
    """b = g at the first step, then b = momentum b + (1 - dampening) g;  p -= lr (g + momentum b if nesterov else b)
    (g: the gradient, negated with maximize, plus weight_decay p). Without momentum p -= lr g."""
    HYPER = {"lr": nonnegative, "momentum": nonnegative, "dampening": fraction, "weight_decay": nonnegative,
             "nesterov": flag, "maximize": flag}

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize=False):
        hyper = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                     maximize=maximize)
        checked = {k: self.HYPER[k](v, k) for k, v in hyper.items()}
        if checked["nesterov"] and (checked["momentum"] <= 0 or checked["dampening"] != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")
        super().__init__(params, **checked)

    @staticmethod
    def buffer_names(hyper):
        return ("momentum_buffer",) if hyper["momentum"] else ()

    def update(self, p, g, state, xp):
        g = signed_decayed(p, g, self.maximize, self.weight_decay)
        if self.momentum:
            b = state["momentum_buffer"]
            if self.step_count == 1:
                b[...] = g
            else:
                b *= self.momentum
                b += (1 - self.dampening) * g
            g = g + self.momentum * b if self.nesterov else b
        p -= self.lr * g


class Adam(Optimizer):
    """m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  v_max = max(v_max, v) with amsgrad;
    p -= lr/(1-b1^t) m / (sqrt(v or v_max)/sqrt(1-b2^t) + eps).

    Adam folds weight decay into g (L2, as torch.optim.Adam); AdamW shrinks p by (1 - lr wd) first (decoupled).
    """
    HYPER = {"lr": nonnegative, "betas": betas_check, "eps": positive, "weight_decay": nonnegative,
             "amsgrad": flag, "maximize": flag}
    decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 maximize=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize)

    @staticmethod
    def buffer_names(hyper):
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if hyper["amsgrad"] else ())

    def update(self, p, g, state, xp):
        b1, b2 = self.betas
        g = -g if self.maximize else g
        if self.weight_decay and self.decoupled:
            p *= 1 - self.lr * self.weight_decay
        elif self.weight_decay:
            g = g + self.weight_decay * p
        m, v = state["exp_avg"], state["exp_avg_sq"]
        lerp_(m, g, 1 - b1)
        v *= b2
        v += (1 - b2) * g * g
        t = self.step_count
        step_size = self.lr / (1 - b1 ** t)
        bias_correction2_sqrt = (1 - b2 ** t) ** 0.5
        if self.amsgrad:
            xp.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
            v = state["max_exp_avg_sq"]
        denom = xp.sqrt(v) / bias_correction2_sqrt + self.eps
        p -= step_size * m / denom


class AdamW(Adam):
    __doc__ = Adam.__doc__
    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize)


class Adagrad(Optimizer):
    """s += g^2 (s starts at initial_accumulator_value);  p -= lr / (1 + (t-1) lr_decay) g / (sqrt(s) + eps)."""
    HYPER = {"lr": nonnegative, "lr_decay": nonnegative, "weight_decay": nonnegative,
             "initial_accumulator_value": nonnegative, "eps": positive, "maximize": flag}

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10, *,
                 maximize=False):
        super().__init__(params, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                         initial_accumulator_value=initial_accumulator_value, eps=eps, maximize=maximize)

    @staticmethod
    def buffer_names(hyper):
        return ("sum",)

    def initial(self, buf, p, xp):
        return xp.full_like(p, self.initial_accumulator_value)

    def update(self, p, g, state, xp):
        g = signed_decayed(p, g, self.maximize, self.weight_decay)
        clr = self.lr / (1 + (self.step_count - 1) * self.lr_decay)
        s = state["sum"]
        s += g * g
        p -= clr * g / (xp.sqrt(s) + self.eps)


class RMSprop(Optimizer):
    """a = alpha a + (1-alpha) g^2;  centered: m = alpha m + (1-alpha) g, a~ = a - m^2;  u = g / (sqrt(a~) + eps);
    p -= lr u  (momentum: b = momentum b + u, p -= lr b)."""
    HYPER = {"lr": nonnegative, "alpha": unit, "eps": positive, "weight_decay": nonnegative,
             "momentum": nonnegative, "centered": flag, "maximize": flag}

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, *,
                 maximize=False):
        super().__init__(params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                         centered=centered, maximize=maximize)

    @staticmethod
    def buffer_names(hyper):
        return (("square_avg",) + (("grad_avg",) if hyper["centered"] else ())
                + (("momentum_buffer",) if hyper["momentum"] else ()))

    def update(self, p, g, state, xp):
        g = signed_decayed(p, g, self.maximize, self.weight_decay)
        a = state["square_avg"]
        a *= self.alpha
        a += (1 - self.alpha) * g * g
        if self.centered:
            m = state["grad_avg"]
            lerp_(m, g, 1 - self.alpha)
            avg = xp.sqrt(a - m * m)
        else:
            avg = xp.sqrt(a)
        avg += self.eps
        if self.momentum:
            b = state["momentum_buffer"]
            b *= self.momentum
            b += g / avg
            p -= self.lr * b
        else:
            p -= self.lr * g / avg
