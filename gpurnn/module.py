"""Module: the base of every layer, block and model.

A module owns `params` (name -> array, edited in place by optimizers) and `grads` (same keys, accumulated by
`backward`), and holds child modules, registered by assigning them as attributes (`self.rnn = LSTM(...)`).
Over the whole tree it gives `named_parameters()` (dotted names such as `rnn.weight_ih_l0`), `named_modules()`,
`state_dict()` / `load_state_dict()`, `zero_grad()`, `to(device)` and the `train()` / `eval()` mode that
`forward` follows when its `training=` argument is None. `config` is a JSON-able dict with a "kind" key from
which `gpurnn.models.build_model` rebuilds the module.

Two call protocols (no autograd): a *stateful* module (recurrent layers, Sequential, the models) has
`forward(x, state=None, lengths=None, training=None) -> (y, state_n, ctx)` and
`backward(ctx, dy, dstate=None) -> (dx, dstate0)`; any other block has `forward(x, training=None) -> (y, ctx)`
and `backward(ctx, dy) -> dx`. With training False, forward saves nothing and returns ctx None.
"""
import numpy as np

from . import checks
from .backend import array_device, array_module, as_array, to_host, xp_for


class Parameter:
    """A live handle on one parameter of a module: `data` is the array the module computes with (edit it in
    place), `grad` its accumulated gradient. `np.asarray(p)` gives the values on the host."""
    __slots__ = ("module", "key", "name")

    def __init__(self, module, key, name):
        self.module, self.key, self.name = module, key, name

    @property
    def data(self):
        return self.module.params[self.key]

    @property
    def grad(self):
        return self.module.grads[self.key]

    shape = property(lambda self: tuple(self.data.shape))
    dtype = property(lambda self: self.data.dtype)
    size = property(lambda self: int(self.data.size))
    ndim = property(lambda self: self.data.ndim)

    def __array__(self, dtype=None, copy=None):
        a = to_host(self.data)
        return a if dtype is None else a.astype(dtype)

    def __repr__(self):
        return f"Parameter({self.name!r}, shape={self.shape}, dtype={self.dtype.name})"


class Module:
    """Own parameters and gradients, named children, a training mode and a config (see the module docstring)."""
    stateful = False

    def __init__(self, dtype=None, backend="auto", seed=None):
        object.__setattr__(self, "_modules", {})
        self.params = {}
        self.grads = {}
        self.training = True
        self.device = "cpu"
        self.backend = backend
        self._dtype = None if dtype is None else checks.float_dtype(dtype)
        self.rng = np.random.default_rng(checks.seed(seed))
        self._device_rng = None     # the generator for dropout masks drawn on a GPU

    def __setattr__(self, name, value):
        modules = self.__dict__.get("_modules")
        if isinstance(value, Module):
            if modules is None:
                raise AttributeError(f"cannot assign module {name!r} before Module.__init__() has run")
            modules[name] = value
        elif modules is not None and name in modules:
            del modules[name]
        object.__setattr__(self, name, value)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward")

    @property
    def config(self):
        """{"kind": class name, constructor arguments...}: what build_model needs to rebuild this module."""
        return {"kind": type(self).__name__}

    @property
    def dtype(self):
        """The parameters' dtype (a container's: its first child's)."""
        if self._dtype is not None:
            return self._dtype
        return next((m.dtype for m in self._modules.values() if m.dtype is not None), None)

    @dtype.setter
    def dtype(self, value):
        self._dtype = checks.float_dtype(value)

    @property
    def xp(self):
        return xp_for(self.device)

    def is_training(self, training):
        """The mode of one call: `training` when given (a bool), else the module's train()/eval() mode."""
        return self.training if training is None else checks.flag(training, "training")

    # --- the tree ---
    def add_param(self, name, shape, bound):
        """A parameter drawn from U(-bound, bound) (float64 draw, cast: the same values in both dtypes)."""
        self.set_param(name, self.rng.uniform(-bound, bound, shape))

    def set_param(self, name, values):
        """Register parameter `name` with these initial values (cast to the module's dtype) and a zero gradient."""
        self.params[name] = np.asarray(values).astype(self.dtype)
        self.grads[name] = np.zeros(self.params[name].shape, self.dtype)

    def named_children(self):
        return list(self._modules.items())

    def children(self):
        return list(self._modules.values())

    def named_modules(self, prefix=""):
        """(dotted name, module) for this module ("" or `prefix`) and every descendant, each once."""
        seen, out = set(), []

        def walk(module, name):
            if id(module) in seen:
                return
            seen.add(id(module))
            out.append((name, module))
            for child_name, child in module._modules.items():
                walk(child, f"{name}.{child_name}" if name else child_name)

        walk(self, prefix)
        return out

    def modules(self):
        """This module and every descendant, each once (the list an optimizer or clip_grad_norm takes)."""
        return [m for _, m in self.named_modules()]

    def named_parameters(self, prefix=""):
        """(dotted name, Parameter) over the whole tree, e.g. ("rnn.weight_ih_l0", ...)."""
        return [(f"{name}.{k}" if name else k, Parameter(m, k, f"{name}.{k}" if name else k))
                for name, m in self.named_modules(prefix) for k in m.params]

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def num_parameters(self):
        return sum(int(m.params[k].size) for m in self.modules() for k in m.params)

    def zero_grad(self):
        for m in self.modules():
            for g in m.grads.values():
                g[...] = 0

    def train(self, mode=True):
        """Set training mode (dropout on, forward saves a ctx) on this module and every descendant; returns self."""
        mode = checks.flag(mode, "mode")
        for m in self.modules():
            m.training = mode
        return self

    def eval(self):
        """Inference mode: dropout off, forward saves nothing (unless called with training=True); returns self."""
        return self.train(False)

    def to(self, device):
        """Move every parameter and gradient to "cpu" or "cuda" (in the same dicts); returns self."""
        checks.choice(device, "device", ("cpu", "cuda"))
        xp = xp_for(device)
        for m in self.modules():
            for d in (m.params, m.grads):
                for k, v in d.items():
                    d[k] = to_host(v) if device == "cpu" else xp.asarray(v)
            m.device = device
        return self

    # --- state ---
    def state_dict(self):
        """{dotted name: NumPy copy} of every parameter."""
        return {name: to_host(p.data, copy=True) for name, p in self.named_parameters()}

    def load_state_dict(self, mapping):
        """Copy `mapping` (dotted name -> array-like) into the live parameters. All-or-nothing: every key, shape,
        dtype and value (finite) is checked first, so a mismatch raises ValueError and changes nothing."""
        if not hasattr(mapping, "keys") or not hasattr(mapping, "__getitem__"):
            raise TypeError(f"load_state_dict takes a dict name -> array, got {type(mapping).__name__}")
        own = dict(self.named_parameters())
        problems = checks.mapping_problems({k: p.data for k, p in own.items()}, mapping)
        values = {}
        for k in own:
            if k not in mapping:
                continue
            v = mapping[k]
            v = to_host(v) if array_device(v) == "cpu" or hasattr(v, "get") else as_array(v, "cuda", k)
            if not np.issubdtype(v.dtype, np.number):
                problems.append(f"{k}: expected numbers, got dtype {v.dtype}")
            elif v.size and not bool(xp_for(array_device(v)).isfinite(v).all()):
                problems.append(f"{k}: holds NaN or Inf")
            values[k] = v
        if problems:
            raise ValueError(f"load_state_dict for {type(self).__name__}: " + "; ".join(problems))
        for k, v in values.items():
            p = own[k]
            p.data[...] = p.module.xp.asarray(v, dtype=p.data.dtype)

    def save(self, path):
        """Write config and weights to `path` (a .npz file, or a folder); `gpurnn.load(path)` rebuilds it."""
        from .checkpoint import save_model
        return save_model(self, path)

    # --- randomness ---
    def rng_state(self):
        """{dotted module name: its NumPy generator's state} over the tree (JSON-able). With the parameters, what
        a resumed run needs to draw the same dropout masks on the CPU (a GPU generator is reseeded from it)."""
        return {name: m.rng.bit_generator.state for name, m in self.named_modules()}

    def load_rng_state(self, states):
        """Restore what `rng_state` returned; all-or-nothing."""
        own = dict(self.named_modules())
        if not isinstance(states, dict) or set(states) != set(own):
            raise ValueError(f"states must be a dict from rng_state() with keys {sorted(own)}")
        for name, state in states.items():
            try:
                type(own[name].rng.bit_generator)().state = state
            except (TypeError, ValueError, KeyError) as err:
                raise ValueError(f"states[{name!r}] is not a {type(own[name].rng.bit_generator).__name__} "
                                 f"state: {err}") from None
        for name, state in states.items():
            own[name].rng.bit_generator.state = state
            own[name]._device_rng = None

    def dropout_mask(self, like, p):
        """An array shaped, typed and placed like `like`: 0 with probability p, else 1 / (1 - p). Drawn from the
        module's seeded NumPy generator on the CPU, from the array module's own generator (seeded once from it)
        on a GPU, so masks never leave the device."""
        xp = array_module(like)
        if xp is np:
            u = self.rng.random(like.shape, dtype=like.dtype)
        else:
            if self._device_rng is None:
                self._device_rng = xp.random.default_rng(int(self.rng.integers(2 ** 63)))
            u = self._device_rng.random(like.shape, dtype=like.dtype)
        scale = like.dtype.type(1.0 / (1.0 - p) if p < 1 else 0.0)
        return (u >= p).astype(like.dtype) * scale

    def __repr__(self):
        lines = [f"  ({name}): " + repr(m).replace("\n", "\n  ") for name, m in self._modules.items()]
        return f"{type(self).__name__}(" + ("\n" + "\n".join(lines) + "\n" if lines else "") + ")"
