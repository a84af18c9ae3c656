"""Learning-rate schedules with torch.optim.lr_scheduler's semantics: StepLR, ExponentialLR, CosineAnnealingLR,
LambdaLR. Each sets its optimizer's `lr`; call `scheduler.step()` after `optimizer.step()`, once per epoch (or
per update, as you count). The rules are torch's chainable forms (they read the current lr), so the same calls
give the same learning rates; `state_dict()` / `load_state_dict()` resume a schedule exactly.
"""
import math

from .checks import nonnegative, positive_int


class LRScheduler:
    """last_epoch counts the step() calls; base_lr is the optimizer's lr when the scheduler was made."""
    HYPER = {}      # hyper-parameter name -> check(value, name) returning the value to keep

    def __init__(self, optimizer, **hyper):
        checked = {k: self.HYPER[k](v, k) for k, v in hyper.items()}
        if not hasattr(optimizer, "hyper") or "lr" not in getattr(optimizer, "hyper", {}):
            raise TypeError(f"optimizer must be a gpurnn.optim optimizer, got {type(optimizer).__name__}")
        for k, v in checked.items():
            setattr(self, k, v)
        self.optimizer = optimizer
        self.base_lr = optimizer.lr
        self.last_epoch = 0
        self.last_lr = optimizer.lr

    def __repr__(self):
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.HYPER)
        return f"{type(self).__name__}({args}, last_epoch={self.last_epoch})"

    def get_last_lr(self):
        """[lr] after the latest step (a list, as torch has one entry per parameter group)."""
        return [self.last_lr]

    def step(self):
        """Advance one step and set the optimizer's lr; on an error (a bad lr) nothing changes."""
        self.last_epoch += 1
        try:
            lr = self.get_lr()
            self.optimizer.lr = lr
        except Exception:
            self.last_epoch -= 1
            raise
        self.last_lr = lr

    def get_lr(self):
        raise NotImplementedError

    def state_dict(self):
        """A plain JSON-able dict: type, last_epoch, base_lr, last_lr and the hyper-parameters."""
        return {"type": type(self).__name__, "last_epoch": self.last_epoch, "base_lr": self.base_lr,
                "last_lr": self.last_lr, **{k: getattr(self, k) for k in self.HYPER}}

    def load_state_dict(self, sd):
        """Restore a `state_dict()` of the same kind of scheduler; all-or-nothing. The optimizer's lr is its own
        state (restore it with the optimizer's load_state_dict)."""
        keys = {"type", "last_epoch", "base_lr", "last_lr", *self.HYPER}
        if not isinstance(sd, dict) or set(sd) != keys:
            raise ValueError(f"sd must be a dict from {type(self).__name__}.state_dict() with keys {sorted(keys)}")
        if sd["type"] != type(self).__name__:
            raise ValueError(f"sd was saved by {sd['type']}, not {type(self).__name__}")
        epoch = positive_int(sd["last_epoch"], "sd['last_epoch']", minimum=0)
        lrs = {k: nonnegative(sd[k], f"sd[{k!r}]") for k in ("base_lr", "last_lr")}
        hyper = {k: check(sd[k], k) for k, check in self.HYPER.items()}
        self.last_epoch = epoch
        self.base_lr, self.last_lr = lrs["base_lr"], lrs["last_lr"]
        for k, v in hyper.items():
            setattr(self, k, v)


class StepLR(LRScheduler):
    """lr times gamma every step_size steps."""
    HYPER = {"step_size": positive_int, "gamma": nonnegative}

    def __init__(self, optimizer, step_size, gamma=0.1):
        super().__init__(optimizer, step_size=step_size, gamma=gamma)

    def get_lr(self):
        lr = self.optimizer.lr
        return lr if self.last_epoch % self.step_size else lr * self.gamma


class ExponentialLR(LRScheduler):
    """lr times gamma every step."""
    HYPER = {"gamma": nonnegative}

    def __init__(self, optimizer, gamma):
        super().__init__(optimizer, gamma=gamma)

    def get_lr(self):
        return self.optimizer.lr * self.gamma


class CosineAnnealingLR(LRScheduler):
    """lr_t = eta_min + (base_lr - eta_min) (1 + cos(pi t / T_max)) / 2, computed recursively as torch does
    (continuing as a cosine wave after T_max)."""
    HYPER = {"T_max": positive_int, "eta_min": nonnegative}

    def __init__(self, optimizer, T_max, eta_min=0.0):
        super().__init__(optimizer, T_max=T_max, eta_min=eta_min)

    def get_lr(self):
        lr, t, T, eta = self.optimizer.lr, self.last_epoch, self.T_max, self.eta_min
        if (t - 1 - T) % (2 * T) == 0:
            return lr + (self.base_lr - eta) * (1 - math.cos(math.pi / T)) / 2
        return (1 + math.cos(math.pi * t / T)) / (1 + math.cos(math.pi * (t - 1) / T)) * (lr - eta) + eta


class LambdaLR(LRScheduler):
    """lr = base_lr * lr_lambda(step). The function is not saved by state_dict (pass it again when resuming)."""

    def __init__(self, optimizer, lr_lambda):
        if not callable(lr_lambda):
            raise TypeError(f"lr_lambda must be a function of the step count, got {type(lr_lambda).__name__}")
        self.lr_lambda = lr_lambda
        super().__init__(optimizer)

    def get_lr(self):
        factor = self.lr_lambda(self.last_epoch)
        return self.base_lr * nonnegative(factor, f"lr_lambda({self.last_epoch})")
