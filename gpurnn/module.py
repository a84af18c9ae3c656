"""Module: the live `params` / `grads` dicts, state dicts and device moves shared by every layer."""
import numpy as np

from .backend import array_device, as_array, to_host, xp_for
from .checks import choice, float_dtype, mapping_problems


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
        return {k: to_host(v, copy=True) for k, v in self.params.items()}

    def load_state_dict(self, mapping):
        """Copy `mapping` (name -> array-like) into the live parameters; all-or-nothing."""
        problems = mapping_problems(self.params, mapping)
        values = {k: to_host(v) if array_device(v) == "cpu" or hasattr(v, "get") else as_array(v, "cuda", k)
                  for k, v in mapping.items() if k in self.params}
        problems += [f"{k}: expected numbers, got dtype {v.dtype}" for k, v in values.items()
                     if not np.issubdtype(v.dtype, np.number)]
        if problems:
            raise ValueError(f"load_state_dict for {type(self).__name__}: " + "; ".join(problems))
        for k, v in values.items():
            self.params[k][...] = self.xp.asarray(v, dtype=self.dtype)

    def save(self, path):
        """Write config and weights to `path` (a .npz file, or a folder); `gpurnn.load(path)` rebuilds it."""
        from .checkpoint import save_model
        return save_model(self, path)

    def to(self, device):
        """Move parameters and gradients to "cpu" or "cuda" (in the same dicts); returns self."""
        choice(device, "device", ("cpu", "cuda"))
        xp = xp_for(device)
        for d in (self.params, self.grads):
            for k, v in d.items():
                d[k] = to_host(v) if device == "cpu" else xp.asarray(v)
        self.device = device
        return self

    def num_parameters(self):
        return sum(int(p.size) for p in self.params.values())
