"""Module: the live `params` / `grads` dicts, state dicts and device moves shared by every layer."""
import numpy as np

from .backend import array_device, as_array, xp_for
from .checks import choice, float_dtype


class Module:
    """Holds `params` (name -> array, edited in place by optimizers) and `grads` (same keys, accumulated)."""

    def __init__(self, dtype, backend, seed):
        self.dtype = float_dtype(dtype)
        self.backend = backend
        self.device = "cpu"
        self.params = {}
        self.grads = {}
        self.rng = np.random.default_rng(seed)

    def add_param(self, name, shape, bound):
        """A parameter drawn from U(-bound, bound) (float64 draw, cast: the same values in both dtypes)."""
        self.params[name] = self.rng.uniform(-bound, bound, shape).astype(self.dtype)
        self.grads[name] = np.zeros(shape, self.dtype)

    @property
    def xp(self):
        return xp_for(self.device)

    def zero_grad(self):
        for g in self.grads.values():
            g[...] = 0

    def state_dict(self):
        """Copies of the parameters, as NumPy arrays."""
        return {k: (v.get() if hasattr(v, "get") else np.array(v)) for k, v in self.params.items()}

    def load_state_dict(self, mapping):
        """Copy `mapping` (name -> array-like) into the live parameters; all-or-nothing."""
        missing = [k for k in self.params if k not in mapping]
        unexpected = [k for k in mapping if k not in self.params]
        values, problems = {}, []
        for k, p in self.params.items():
            if k not in mapping:
                continue
            v = mapping[k]
            v = v.get() if hasattr(v, "get") else np.asarray(v) if array_device(v) == "cpu" else as_array(v, "cuda", k)
            if tuple(v.shape) != tuple(p.shape):
                problems.append(f"{k}: expected shape {tuple(p.shape)}, got {tuple(v.shape)}")
            elif not np.issubdtype(v.dtype, np.number):
                problems.append(f"{k}: expected numbers, got dtype {v.dtype}")
            else:
                values[k] = v
        if missing or unexpected or problems:
            parts = ([f"missing keys: {', '.join(missing)}"] if missing else []) + \
                    ([f"unexpected keys: {', '.join(unexpected)}"] if unexpected else []) + problems
            raise ValueError(f"load_state_dict for {type(self).__name__}: " + "; ".join(parts))
        for k, v in values.items():
            self.params[k][...] = self.xp.asarray(v, dtype=self.dtype)

    def to(self, device):
        """Move parameters and gradients to "cpu" or "cuda" (in the same dicts); returns self."""
        choice(device, "device", ("cpu", "cuda"))
        xp = xp_for(device)
        for d in (self.params, self.grads):
            for k, v in d.items():
                d[k] = xp.asarray(v.get() if hasattr(v, "get") and device == "cpu" else v)
        self.device = device
        return self

    def num_parameters(self):
        return sum(int(p.size) for p in self.params.values())
