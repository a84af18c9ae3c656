"""torch autograd as an oracle for a gpurnn layer: the same weights, the same problem, every output and gradient.

torch.nn.RNN/LSTM/GRU (packed sequences under `lengths`) for the cells torch has; the sigmoid Elman network and the
Jordan network, which torch lacks, as recurrences written from their definitions, differentiated by autograd.
The loss is <y, dy> + <state_n, dstate>, as the layer's backward(ctx, dy, dstate) computes its gradients.
Results are NumPy arrays named as util.layer_outputs names them. torch is imported on first use.
"""
import numpy as np

TORCH_CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")


def _torch():
    import torch
    return torch


def activation(name):
    torch = _torch()
    return {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid, "identity": lambda v: v}[name]


def twin(layer, dtype=None):
    """torch's module of the layer's kind (a torch cell, an LSTM's proj_size too), holding the layer's weights, in
    `dtype` (default: the layer's)."""
    torch = _torch()
    tdtype = getattr(torch, np.dtype(dtype or layer.dtype).name)
    kind = layer.cell.split("_")[0].upper()
    kwargs = {"nonlinearity": layer.nonlinearity} if kind == "RNN" else {}
    if getattr(layer, "proj_size", 0):
        kwargs["proj_size"] = layer.proj_size
    module = getattr(torch.nn, kind)(layer.input_size, layer.hidden_size, num_layers=layer.num_layers,
                                     bias=layer.bias, batch_first=layer.batch_first,
                                     bidirectional=layer.num_directions == 2, dtype=tdtype, **kwargs)
    module.load_state_dict({k: torch.tensor(v, dtype=tdtype) for k, v in layer.state_dict().items()})
    return module


def _valid(lengths, T, B):
    """(T, B, 1) bool tensor: step t of sequence b is inside its length."""
    torch = _torch()
    lens = torch.full((B,), T) if lengths is None else torch.as_tensor(np.asarray(lengths, np.int64))
    return (torch.arange(T)[:, None] < lens[None, :])[:, :, None]


def _elman(layer, p, x, h0, valid):
    """Stacked, bidirectional Elman network over time-major x (T, B, I); h0 (L*D, B, H). Padded steps keep the
    state and output 0; the reverse direction runs t = T-1..0, so it starts at each sequence's last valid step."""
    torch = _torch()
    act, T, D = activation(layer.nonlinearity), x.shape[0], layer.num_directions
    inp, h_n = x, []
    for lay in range(layer.num_layers):
        outs = []
        for d in range(D):
            k = f"_l{lay}" + ("_reverse" if d else "")
            h, ys = h0[lay * D + d], [None] * T
            for t in (reversed(range(T)) if d else range(T)):
                pre = inp[t] @ p["weight_ih" + k].T + h @ p["weight_hh" + k].T
                if layer.bias:
                    pre = pre + p["bias_ih" + k] + p["bias_hh" + k]
                new = act(pre)
                h = torch.where(valid[t], new, h)
                ys[t] = torch.where(valid[t], new, torch.zeros_like(new))
            outs.append(torch.stack(ys))
            h_n.append(h)
        inp = torch.cat(outs, dim=2)
    return inp, torch.stack(h_n)


def _jordan(layer, p, x, y0, valid):
    """h_t = act(x_t W_ih^T + b_h + y_{t-1} W_yh^T), y_t = out_act(h_t W_hy^T + b_y); y0 (1, B, O)."""
    torch = _torch()
    act, out_act = activation(layer.nonlinearity), activation(layer.output_nonlinearity)
    state, ys = y0[0], []
    for t in range(x.shape[0]):
        h = act(x[t] @ p["weight_ih"].T + p["bias_h"] + state @ p["weight_yh"].T)
        y = out_act(h @ p["weight_hy"].T + p["bias_y"])
        ys.append(torch.where(valid[t], y, torch.zeros_like(y)))
        state = torch.where(valid[t], y, state)
    return torch.stack(ys), state[None]


def run(layer, x, state, lengths, dy, dstate, dtype=None):
    """Everything torch computes for the layer (NumPy inputs and the layer's weights, computed in `dtype`, default
    the layer's): y, h_n (c_n), dx, dh0 (dc0) and every parameter's gradient, by name, as NumPy arrays."""
    torch = _torch()
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    tdtype = getattr(torch, np.dtype(dtype or layer.dtype).name)
    leaf = lambda a: torch.tensor(np.asarray(a), dtype=tdtype, requires_grad=True)  # noqa: E731
    cell = getattr(layer, "cell", "jordan")
    states = state if isinstance(state, tuple) else (state,)
    xt, st = leaf(x), tuple(map(leaf, states))
    if cell in TORCH_CELLS:
        module = twin(layer, dtype)
        params = dict(module.named_parameters())
        if lengths is None:
            yt, snt = module(xt, st if cell == "lstm" else st[0])
        else:
            packed = pack_padded_sequence(xt, torch.as_tensor(np.asarray(lengths, np.int64)),
                                          batch_first=layer.batch_first, enforce_sorted=False)
            yt, snt = module(packed, st if cell == "lstm" else st[0])
            yt, _ = pad_packed_sequence(yt, batch_first=layer.batch_first, total_length=x.shape[int(layer.batch_first)])
        snt = snt if cell == "lstm" else (snt,)
    else:
        params = {k: leaf(v) for k, v in layer.state_dict().items()}
        time_major = xt.transpose(0, 1) if getattr(layer, "batch_first", False) else xt
        valid = _valid(lengths, *time_major.shape[:2])
        yt, sn = (_jordan if cell == "jordan" else _elman)(layer, params, time_major, st[0], valid)
        yt = yt.transpose(0, 1) if getattr(layer, "batch_first", False) else yt
        snt = (sn,)
    dstates = dstate if isinstance(dstate, tuple) else (dstate,)
    loss = (yt * torch.tensor(np.asarray(dy), dtype=tdtype)).sum()
    for s, d in zip(snt, dstates):
        loss = loss + (s * torch.tensor(np.asarray(d), dtype=tdtype)).sum()
    loss.backward()
    out = {"y": yt.detach().numpy()}
    out.update({name: s.detach().numpy() for name, s in zip(("h_n", "c_n"), snt)})
    out["dx"] = xt.grad.numpy()
    out.update({name: s.grad.numpy() for name, s in zip(("dh0", "dc0"), st)})
    out.update({k: p.grad.numpy() for k, p in params.items()})
    return out
