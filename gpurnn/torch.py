"""gpurnn's kernels inside PyTorch: `LSTM`, `GRU` and `RNN` here *are* torch.nn.LSTM / GRU / RNN (same constructor
arguments, parameters, state_dict, isinstance), whose forward and backward run gpurnn's fused kernels and
hand-written BPTT through a torch.autograd.Function, so a PyTorch model can swap them in.

Tensors cross zero-copy: CPU tensors as NumPy views (`Tensor.numpy()` / `torch.from_numpy`), CUDA tensors through
DLPack to CuPy and back, on torch's current stream. Supported: float32 and float64, stacked, bidirectional,
batch_first, unbatched (2-D) input, PackedSequence input (variable lengths), dropout between layers (gpurnn's
masks: the same distribution as torch's, not the same draws). Not supported: proj_size > 0 (ValueError), double
backward. Inputs holding NaN/Inf are refused (gpurnn's ValueError) where torch would propagate them.

Importing gpurnn never imports torch; importing gpurnn.torch does.
"""
import contextlib

import numpy as np
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import layers

DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def to_array(t):
    """The tensor's data as a NumPy (CPU) or CuPy (CUDA) array sharing its memory."""
    t = t.detach()
    if t.device.type == "cpu":
        return t.numpy()
    import cupy
    return cupy.from_dlpack(t)


def to_tensor(a):
    """A tensor sharing the memory of a NumPy or CuPy array."""
    return torch.from_numpy(a) if isinstance(a, np.ndarray) else torch.from_dlpack(a)


def stream_of(t):
    """Run CuPy work on torch's current CUDA stream (so the two stay ordered); nothing on the CPU."""
    if t.device.type != "cuda":
        return contextlib.nullcontext()
    import cupy
    return cupy.cuda.ExternalStream(torch.cuda.current_stream(t.device).cuda_stream)


class _Sweep(torch.autograd.Function):
    """(y, h_n[, c_n]) = the module's recurrent sweep over x, from (h0[, c0]), under lengths."""

    @staticmethod
    def forward(ctx, module, lengths, x, h0, c0, *weights):
        layer = bind(module, x, weights)
        lstm = module.mode == "LSTM"
        state = None if h0 is None else ((to_array(h0), to_array(c0)) if lstm else to_array(h0))
        save = any(ctx.needs_input_grad)
        layer.dropout = module.dropout if module.training else 0.0
        if layer.dropout:       # masks from torch's generator: torch.manual_seed makes them reproducible
            layer.rng, layer._device_rng = np.random.default_rng(int(torch.randint(2 ** 62, ()).item())), None
        with stream_of(x):
            y, state_n, gctx = layer.forward(to_array(x), state, lengths, training=save or layer.dropout > 0)
        ctx.module, ctx.gctx, ctx.has_state = module, gctx if save else None, h0 is not None
        ctx.save_for_backward(*weights)         # torch then refuses a backward after in-place edits of them
        return tuple(to_tensor(a) for a in (y,) + (tuple(state_n) if lstm else (state_n,)))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, *dstate_n):
        module, weights = ctx.module, ctx.saved_tensors
        layer = bind(module, dy, weights)
        layer.grads = {k: layer.xp.zeros_like(p) for k, p in layer.params.items()}
        dstate = tuple(to_array(d.contiguous()) for d in dstate_n)
        with stream_of(dy):
            dx, dstate0 = layer.backward(ctx.gctx, to_array(dy.contiguous()), dstate if len(dstate) == 2
                                         else dstate[0])
        dstate0 = [to_tensor(d) for d in (dstate0 if isinstance(dstate0, tuple) else (dstate0,))]
        dh0, dc0 = (dstate0 + [None])[:2] if ctx.has_state else (None, None)
        return (None, None, to_tensor(dx), dh0, dc0) + tuple(to_tensor(layer.grads[n])
                                                              for n in module._flat_weights_names)


def bind(module, like, weights):
    """The module's gpurnn layer computing with `weights` (zero-copy views) in like's dtype and device."""
    dtype = DTYPES.get(like.dtype)
    if dtype is None:
        raise TypeError(f"{type(module).__name__} runs float32 or float64 tensors, got {like.dtype}")
    for name, w in zip(module._flat_weights_names, weights):
        if w.dtype != like.dtype or w.device != like.device:
            raise TypeError(f"input is {like.dtype} on {like.device} but {name} is {w.dtype} on {w.device}; "
                            f"convert one of them (module.to(...))")
    layer = module._gpurnn
    layer.dtype, layer.device = dtype, "cuda" if like.device.type == "cuda" else "cpu"
    layer.params = {name: to_array(w) for name, w in zip(module._flat_weights_names, weights)}
    return layer


def run(module, input, hx):
    """torch.nn.RNNBase.forward's contract, computed by gpurnn."""
    lstm = module.mode == "LSTM"
    packed = isinstance(input, PackedSequence)
    if packed:
        x, lengths_t = pad_packed_sequence(input, batch_first=module.batch_first)
        lengths = lengths_t.numpy()
    else:
        x, lengths = input, None
    if x.dim() not in (2, 3):
        raise ValueError(f"{type(module).__name__}: input must be 2-D (unbatched) or 3-D, got shape {tuple(x.shape)}")
    unbatched = x.dim() == 2
    if unbatched:
        x = x.unsqueeze(0 if module.batch_first else 1)
    h0, c0 = (hx if lstm else (hx, None)) if hx is not None else (None, None)
    if unbatched and h0 is not None:
        h0, c0 = h0.unsqueeze(1), (None if c0 is None else c0.unsqueeze(1))
    weights = [getattr(module, name) for name in module._flat_weights_names]
    y, h_n, *c_n = _Sweep.apply(module, lengths, x, h0, c0, *weights)
    if packed:
        order = input.sorted_indices
        if order is not None:
            y = y.index_select(0 if module.batch_first else 1, order)
            lengths_t = lengths_t[order.cpu()]
        y = PackedSequence(*pack_padded_sequence(y, lengths_t, batch_first=module.batch_first)[:2],
                           input.sorted_indices, input.unsorted_indices)
    if unbatched:
        y, h_n, c_n = y.squeeze(0 if module.batch_first else 1), h_n.squeeze(1), [c.squeeze(1) for c in c_n]
    return y, ((h_n, c_n[0]) if lstm else h_n)


def inner_layer(module):
    """The gpurnn layer of the same shape (its own parameters are replaced by views at every call)."""
    if getattr(module, "proj_size", 0):
        raise ValueError("gpurnn.torch.LSTM does not support proj_size > 0; use torch.nn.LSTM")
    kwargs = dict(num_layers=module.num_layers, bias=module.bias, batch_first=module.batch_first,
                  bidirectional=module.bidirectional, seed=0)
    if module.mode == "LSTM":
        return layers.LSTM(module.input_size, module.hidden_size, **kwargs)
    if module.mode == "GRU":
        return layers.GRU(module.input_size, module.hidden_size, **kwargs)
    return layers.RNN(module.input_size, module.hidden_size, nonlinearity=module.nonlinearity, **kwargs)


class Swapped:
    """Mixed into torch's class: the same module, its forward computed by gpurnn."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._gpurnn = inner_layer(self)

    def forward(self, input, hx=None):
        return run(self, input, hx)


class LSTM(Swapped, torch.nn.LSTM):
    """torch.nn.LSTM running gpurnn's kernels (see the module docstring)."""


class GRU(Swapped, torch.nn.GRU):
    """torch.nn.GRU running gpurnn's kernels (see the module docstring)."""


class RNN(Swapped, torch.nn.RNN):
    """torch.nn.RNN (tanh or relu) running gpurnn's kernels (see the module docstring)."""
