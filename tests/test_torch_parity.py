"""The layers against torch.nn.RNN/LSTM/GRU on the same weights: outputs, final states, every gradient."""
import numpy as np
import pytest

from util import CELLS, device_of, make_layer, random_problem, to_device, to_numpy

torch = pytest.importorskip("torch")


def torch_twin(layer):
    """torch's module of the same kind, holding the gpurnn layer's weights."""
    kind = layer.cell.split("_")[0].upper()
    kwargs = {"nonlinearity": layer.nonlinearity} if kind == "RNN" else {}
    module = getattr(torch.nn, kind)(layer.input_size, layer.hidden_size, num_layers=layer.num_layers,
                                     bias=layer.bias, batch_first=layer.batch_first,
                                     bidirectional=layer.num_directions == 2, dtype=torch.float64, **kwargs)
    module.load_state_dict({k: torch.tensor(v, dtype=torch.float64) for k, v in layer.state_dict().items()})
    return module


def torch_run(module, x, state, lengths, dy, dstate):
    """y, state_n, grads of <y, dy> + <state_n, dstate> by torch autograd (packed sequences under lengths)."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    t = lambda a: torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=True)  # noqa: E731
    xt = t(x)
    st = tuple(map(t, state)) if isinstance(state, tuple) else t(state)
    if lengths is None:
        yt, snt = module(xt, st)
    else:
        packed = pack_padded_sequence(xt, torch.tensor(lengths), batch_first=module.batch_first,
                                      enforce_sorted=False)
        yt, snt = module(packed, st)
        yt, _ = pad_packed_sequence(yt, batch_first=module.batch_first, total_length=x.shape[1 if module.batch_first else 0])
    pairs = zip(snt, dstate) if isinstance(snt, tuple) else [(snt, dstate)]
    loss = (yt * torch.tensor(np.asarray(dy, np.float64))).sum() + sum(
        (s * torch.tensor(np.asarray(d, np.float64))).sum() for s, d in pairs)
    loss.backward()
    grads = {k: p.grad.numpy() for k, p in module.named_parameters()}
    dstate0 = tuple(s.grad.numpy() for s in st) if isinstance(st, tuple) else st.grad.numpy()
    detach = lambda s: tuple(v.detach().numpy() for v in s) if isinstance(s, tuple) else s.detach().numpy()  # noqa: E731
    return yt.detach().numpy(), detach(snt), xt.grad.numpy(), dstate0, grads


def assert_close_tree(actual, expected, rtol, atol, what):
    if isinstance(expected, tuple):
        for i, (a, e) in enumerate(zip(actual, expected)):
            np.testing.assert_allclose(to_numpy(a), e, rtol=rtol, atol=atol, err_msg=f"{what}[{i}]")
    else:
        np.testing.assert_allclose(to_numpy(actual), expected, rtol=rtol, atol=atol, err_msg=what)


def check_against_torch(layer, backend, problem, rtol, atol):
    """Run layer on problem = (x, state, lengths, dy, dstate) on backend; compare everything with torch."""
    x, state, lengths, dy, dstate = problem
    y_ref, sn_ref, dx_ref, ds_ref, g_ref = torch_run(torch_twin(layer), x, state, lengths, dy, dstate)
    layer.to(device_of(backend))
    y, state_n, ctx = layer.forward(to_device(x, backend), to_device(state, backend), lengths)
    dx, dstate0 = layer.backward(ctx, to_device(dy, backend), to_device(dstate, backend))
    assert sorted(layer.grads) == sorted(g_ref)
    for what, got, want in [("y", y, y_ref), ("state_n", state_n, sn_ref), ("dx", dx, dx_ref),
                            ("dstate0", dstate0, ds_ref)] + [(k, layer.grads[k], g) for k, g in g_ref.items()]:
        assert_close_tree(got, want, rtol, atol, what)


@pytest.mark.parametrize("cell", [c for c in CELLS if c != "rnn_sigmoid"])
@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_torch(backend, cell, num_layers, bidirectional, ragged, batch_first, dtype, bias):
    rng = np.random.default_rng(num_layers * 4 + bidirectional * 2 + ragged)
    layer = make_layer(cell, 5, 7, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first,
                       bias=bias, dtype=dtype, backend=backend, seed=2)
    problem = random_problem(layer, T=6, B=4, rng=rng, ragged=ragged)
    check_against_torch(layer, backend, problem, *((1e-10, 1e-12) if dtype == "float64" else (2e-4, 2e-5)))


@pytest.mark.parametrize("cell", [c for c in CELLS if c != "rnn_sigmoid"])
@pytest.mark.parametrize("T, B, I, H", [(1, 1, 1, 1), (1, 3, 2, 5), (9, 1, 3, 33), (4, 17, 8, 13)])
def test_matches_torch_odd_sizes(backend, cell, T, B, I, H):
    layer = make_layer(cell, I, H, num_layers=2, bidirectional=True, dtype="float64", backend=backend, seed=9)
    problem = random_problem(layer, T, B, np.random.default_rng(T * B + H), ragged=True)
    check_against_torch(layer, backend, problem, 1e-10, 1e-12)


def test_weights_load_both_ways():
    module = torch.nn.LSTM(4, 3, num_layers=2, bidirectional=True)
    layer = make_layer("lstm", 4, 3, num_layers=2, bidirectional=True, seed=0)
    layer.load_state_dict({k: v.detach().numpy() for k, v in module.state_dict().items()})
    x = np.random.default_rng(0).standard_normal((5, 2, 4)).astype(np.float32)
    y, _, _ = layer.forward(x)
    np.testing.assert_allclose(y, module(torch.tensor(x))[0].detach().numpy(), rtol=1e-5, atol=1e-6)
