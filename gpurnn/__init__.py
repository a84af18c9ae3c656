"""gpurnn: fused recurrent-network kernels with hand-written backpropagation through time."""
import importlib
import importlib.util
import os
import sys


def _source_tree_kernels():
    """Run from a source checkout (the repository root on sys.path), `gpurnn/` has no `kernels/` inside: the
    installed package maps `gpurnn.kernels` to the top-level `kernels/` folder, so do the same here. An installed
    or editable package never takes this path."""
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(here, "kernels")) or "gpurnn.kernels" in sys.modules:
        return
    init = os.path.join(os.path.dirname(here), "kernels", "__init__.py")
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location("gpurnn.kernels", init,
                                                  submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpurnn.kernels"] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module          # the attribute the import system sets for a submodule it loads


_source_tree_kernels()

from .layers import GRU, LSTM, RNN, JordanRNN, LayerNormGRU, LayerNormLSTM  # noqa: E402

__version__ = "0.1.0"
__all__ = ["RNN", "LSTM", "GRU", "LayerNormLSTM", "LayerNormGRU", "JordanRNN", "save", "load"]


def save(obj, path):
    """Write a model or module (its `config` and `state_dict()`) to `path`: a .npz file, or a folder that gets
    checkpoint.npz. No pickle: arrays, a JSON header and a SHA-256 checksum (see gpurnn.checkpoint)."""
    from .checkpoint import save_model
    return save_model(obj, path)


def load(path):
    """The model or module saved at `path` (by `save`, `obj.save` or the trainer), checksum verified."""
    from .checkpoint import load_model
    return load_model(path)

# Submodules reachable as attributes (`gpurnn.nn.Linear`), imported on first use so `import gpurnn` stays light.
_LAZY = ("nn", "optim", "lr_scheduler", "models", "module", "sequential", "init", "clip", "trainer", "tasks",
         "checkpoint", "diagnostics", "backend", "bench", "torch", "files", "segments")


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'gpurnn' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
