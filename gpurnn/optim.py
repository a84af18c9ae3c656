"""Optimizers that update the parameters of a list of modules in place: SGD, Adam, AdamW, Adagrad, RMSprop.

The update rules are those of torch.optim (same hyper-parameters give the same steps). Every step writes into
the arrays of `module.params` (never rebinding them), so layers and their ctxs keep seeing the live values.
Each rule runs on whatever array module holds the parameter: NumPy on the CPU, CuPy on a GPU.
"""
import math

import numpy as np

from .backend import array_module, to_host
from .checks import mapping_problems, number


class Optimizer:
    """Holds the modules, the hyper-parameters, the step count and per-parameter state buffers.

    Subclasses name their buffers in `buffer_names(hyper)` and implement `update(p, g, state, xp)` for one parameter,
    where `state` maps buffer name -> array like p; all buffers start at zero.
    """

    HYPER = {}      # hyper-parameter name -> check(value, name) returning the value to keep

    def __init__(self, modules, **hyper):
        if hasattr(modules, "params"):
            modules = [modules]
        if isinstance(modules, (str, bytes)) or not hasattr(modules, "__iter__"):
            raise TypeError(f"modules must be a list of modules, got {type(modules).__name__}")
        self.modules = list(modules)
        if not self.modules:
            raise ValueError("modules must hold at least one module")
        for i, m in enumerate(self.modules):
            params, grads = getattr(m, "params", None), getattr(m, "grads", None)
            if not isinstance(params, dict) or not isinstance(grads, dict):
                raise TypeError(f"modules[{i}] must have dicts `params` and `grads`, got {type(m).__name__}")
            if params.keys() != grads.keys():
                raise ValueError(f"modules[{i}]: params and grads must have the same keys")
        self.hyper = {}
        for k, v in hyper.items():
            setattr(self, k, v)
        self.step_count = 0
        self.state = {}
        for key, p in self.named_params():
            for buf in self.buffers():
                self.buffer(buf, key, p)

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
        """("module_index.name", param) for every parameter, in a fixed order."""
        for i, m in enumerate(self.modules):
            for name, p in m.params.items():
                yield f"{i}.{name}", p

    def buffers(self):
        return self.buffer_names(self.hyper)

    @staticmethod
    def buffer_names(hyper):
        """The per-parameter buffers kept under hyper-parameters `hyper`."""
        return ()

    def zero_grad(self):
        for m in self.modules:
            for g in m.grads.values():
                g[...] = 0

    def buffer(self, buf, key, p):
        """The buffer `buf` of parameter `key`, in p's array module (made as zeros when new)."""
        arrays = self.state.setdefault(buf, {})
        s = arrays.get(key)
        xp = array_module(p)
        if s is None:
            s = arrays[key] = xp.zeros_like(p)
        elif array_module(s) is not xp:      # the module moved device since the buffer was made
            s = arrays[key] = xp.asarray(to_host(s))
        return s

    def step(self):
        self.step_count += 1
        for i, m in enumerate(self.modules):
            for name, p in m.params.items():
                state = {buf: self.buffer(buf, f"{i}.{name}", p) for buf in self.buffers()}
                self.update(p, m.grads[name], state, array_module(p))

    def state_dict(self):
        """A plain, picklable dict: type, step count, hyper-parameters, and the buffers as NumPy arrays."""
        return {"type": type(self).__name__, "step": self.step_count, "hyper": dict(self.hyper),
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
        if hyper.keys() != self.hyper.keys():
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
            problems += mapping_problems(params, sd["state"].get(buf, {}), buf)
        if problems:
            raise ValueError(f"load_state_dict for {type(self).__name__}: " + "; ".join(problems))
        self.hyper = hyper
        self.step_count = int(step)
        self.state = {buf: {k: array_module(p).asarray(to_host(sd["state"][buf][k]), dtype=p.dtype)
                            for k, p in params.items()} for buf in buffers}


def unit_check(v, name):
    return number(v, name, 0.0, 1.0, high_open=True)


def betas_check(v, name):
    if not isinstance(v, (tuple, list)) or len(v) != 2:
        raise TypeError(f"{name} must be a pair (beta1, beta2), got {v!r}")
    return tuple(unit_check(b, f"{name}[{i}]") for i, b in enumerate(v))


def eps_check(v, name):
    return number(v, name, 0.0, low_open=True)


def flag_check(v, name):
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {v!r}")
    return bool(v)


def with_weight_decay(p, g, weight_decay):
    """L2 penalty folded into the gradient: g + wd p (a new array; grads stay untouched)."""
    return g + weight_decay * p if weight_decay else g


class SGD(Optimizer):
    """v = momentum v + g (g with L2 weight decay);  p -= lr (g + momentum v if nesterov else v)."""
    HYPER = {"lr": number, "momentum": number, "nesterov": flag_check, "weight_decay": number}

    def __init__(self, modules, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        if nesterov and not momentum:
            raise ValueError("nesterov=True needs momentum > 0")
        super().__init__(modules, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)

    @staticmethod
    def buffer_names(hyper):
        return ("momentum_buffer",) if hyper["momentum"] else ()

    def update(self, p, g, state, xp):
        g = with_weight_decay(p, g, self.weight_decay)
        if self.momentum:
            v = state["momentum_buffer"]
            v *= self.momentum
            v += g
            g = g + self.momentum * v if self.nesterov else v
        p -= self.lr * g


class Adam(Optimizer):
    """m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p -= lr/(1-b1^t) m / (sqrt(v/(1-b2^t)) + eps).

    Adam folds weight decay into g (L2, as torch.optim.Adam); AdamW shrinks p by (1 - lr wd) first (decoupled).
    """
    HYPER = {"lr": number, "betas": betas_check, "eps": eps_check, "weight_decay": number}
    decoupled = False

    def __init__(self, modules, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(modules, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    @staticmethod
    def buffer_names(hyper):
        return ("exp_avg", "exp_avg_sq")

    def update(self, p, g, state, xp):
        b1, b2 = self.betas
        if self.decoupled:
            p *= 1 - self.lr * self.weight_decay
        else:
            g = with_weight_decay(p, g, self.weight_decay)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * g * g
        t = self.step_count
        denom = xp.sqrt(v) / math.sqrt(1 - b2 ** t) + self.eps
        p -= (self.lr / (1 - b1 ** t)) * m / denom


class AdamW(Adam):
    __doc__ = Adam.__doc__
    decoupled = True

    def __init__(self, modules, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(modules, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


class Adagrad(Optimizer):
    """s += g^2 (g with L2 weight decay);  p -= lr g / (sqrt(s) + eps)."""
    HYPER = {"lr": number, "eps": eps_check, "weight_decay": number}

    def __init__(self, modules, lr=1e-2, eps=1e-10, weight_decay=0.0):
        super().__init__(modules, lr=lr, eps=eps, weight_decay=weight_decay)

    @staticmethod
    def buffer_names(hyper):
        return ("sum",)

    def update(self, p, g, state, xp):
        g = with_weight_decay(p, g, self.weight_decay)
        s = state["sum"]
        s += g * g
        p -= self.lr * g / (xp.sqrt(s) + self.eps)


class RMSprop(Optimizer):
    """a = alpha a + (1-alpha) g^2;  u = g / (sqrt(a) + eps);  p -= lr u  (momentum: b = momentum b + u, p -= lr b)."""
    HYPER = {"lr": number, "alpha": number, "eps": eps_check, "momentum": number, "weight_decay": number}

    def __init__(self, modules, lr=1e-2, alpha=0.99, eps=1e-8, momentum=0.0, weight_decay=0.0):
        super().__init__(modules, lr=lr, alpha=alpha, eps=eps, momentum=momentum, weight_decay=weight_decay)

    @staticmethod
    def buffer_names(hyper):
        return ("square_avg",) + (("momentum_buffer",) if hyper["momentum"] else ())

    def update(self, p, g, state, xp):
        g = with_weight_decay(p, g, self.weight_decay)
        a = state["square_avg"]
        a *= self.alpha
        a += (1 - self.alpha) * g * g
        u = g / (xp.sqrt(a) + self.eps)
        if self.momentum:
            b = state["momentum_buffer"]
            b *= self.momentum
            b += u
            u = b
        p -= self.lr * u
