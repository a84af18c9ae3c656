"""gpurnn.torch: torch.nn.LSTM / GRU / RNN computed by gpurnn's kernels. gradcheck in float64, the same outputs and
gradients as torch's own modules with the same weights (padded, packed, unbatched input), a model trained with a
torch optimizer, and the errors."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
gt = pytest.importorskip("gpurnn.torch")
from torch.nn.utils.rnn import pack_padded_sequence  # noqa: E402

KINDS = {"LSTM": (gt.LSTM, torch.nn.LSTM, {}), "GRU": (gt.GRU, torch.nn.GRU, {}),
         "RNN_TANH": (gt.RNN, torch.nn.RNN, {}), "RNN_RELU": (gt.RNN, torch.nn.RNN, {"nonlinearity": "relu"})}


def pair(kind, dtype=torch.float64, hidden_size=4, **kwargs):
    """(ours, torch's) with the same weights."""
    ours_cls, ref_cls, extra = KINDS[kind]
    torch.manual_seed(0)
    ours = ours_cls(3, hidden_size, **extra, **kwargs).to(dtype)
    ref = ref_cls(3, hidden_size, **extra, **kwargs).to(dtype)
    ref.load_state_dict(ours.state_dict())
    assert isinstance(ours, ref_cls) and list(ours.state_dict()) == list(ref.state_dict())
    return ours, ref


def initial_state(kind, shape, dtype):
    h0 = torch.randn(shape, dtype=dtype, requires_grad=True)
    if kind == "LSTM":
        return (h0, torch.randn(shape, dtype=dtype, requires_grad=True))
    return h0


def leaves(hx):
    return list(hx) if isinstance(hx, tuple) else [hx]


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_gradcheck_float64(kind, bidirectional):
    ours, _ = pair(kind, num_layers=2, bidirectional=bidirectional, hidden_size=2)
    D = 2 if bidirectional else 1
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    hx = initial_state(kind, (2 * D, 2, 2), torch.float64)
    names = [n for n, _ in ours.named_parameters()]
    weights = [p.detach().clone().requires_grad_() for p in ours.parameters()]

    def f(x, *rest):
        state = tuple(rest[:2]) if kind == "LSTM" else rest[0]
        params = dict(zip(names, rest[len(leaves(hx)):]))
        y, state_n = torch.func.functional_call(ours, params, (x, state))
        return (y,) + tuple(leaves(state_n))

    assert torch.autograd.gradcheck(f, (x, *leaves(hx), *weights), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_same_outputs_and_gradients_as_torch(kind, dtype, tol, batch_first, packed):
    ours, ref = pair(kind, dtype, num_layers=2, bidirectional=True, batch_first=batch_first)
    T, B = 6, 3
    x = torch.randn((B, T, 3) if batch_first else (T, B, 3), dtype=dtype, requires_grad=True)
    hx = initial_state(kind, (4, B, 4), dtype)
    lengths = torch.tensor([4, 6, 2])
    results, layouts = [], []
    for module in (ours, ref):
        for t in [x, *leaves(hx), *module.parameters()]:
            t.grad = None
        inp = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False) if packed else x
        y, state_n = module(inp, hx)
        data = y.data if packed else y
        loss = (data * torch.linspace(-1, 1, data.numel(), dtype=dtype).reshape(data.shape)).sum() + \
            sum((s * s).sum() for s in leaves(state_n))
        loss.backward()
        if packed:
            layouts.append((y.batch_sizes, y.sorted_indices, y.unsorted_indices))
        results.append([data.detach(), *[s.detach() for s in leaves(state_n)], x.grad,
                        *[h.grad for h in leaves(hx)], *[p.grad for p in module.parameters()]])
    for i, (a, b) in enumerate(zip(*results)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"result {i}")
    for a, b in zip(*layouts):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_unbatched_input(kind):
    ours, ref = pair(kind)
    x = torch.randn(5, 3, dtype=torch.float64)
    y, state = ours(x)
    y_ref, state_ref = ref(x)
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(leaves(state), leaves(state_ref)):
        torch.testing.assert_close(a, b)


def test_a_model_trains_with_a_torch_optimizer_as_torchs_does():
    def make(rnn_cls):
        torch.manual_seed(3)
        rnn = rnn_cls(3, 8, num_layers=2, batch_first=True).double()
        head = torch.nn.Linear(8, 1).double()
        return rnn, head, torch.optim.Adam([*rnn.parameters(), *head.parameters()], lr=0.02)

    torch.manual_seed(4)
    x = torch.randn(16, 10, 3, dtype=torch.float64)
    target = x.sum(dim=(1, 2)).unsqueeze(1) / 5
    runs = []
    for rnn_cls in (gt.GRU, torch.nn.GRU):
        rnn, head, opt = make(rnn_cls)
        losses = []
        for _ in range(8):
            opt.zero_grad()
            y, _ = rnn(x)
            loss = torch.nn.functional.mse_loss(head(y[:, -1]), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        runs.append((losses, [p.detach().clone() for p in rnn.parameters()]))
    (ours, ours_params), (theirs, their_params) = runs
    np.testing.assert_allclose(ours, theirs, rtol=1e-9)
    assert ours[-1] < 0.8 * ours[0]
    for a, b in zip(ours_params, their_params):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_dropout_between_layers_in_training_only():
    ours, ref = pair("LSTM", num_layers=3, dropout=0.5)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    assert not torch.allclose(ours(x)[0], ref.eval()(x)[0])
    torch.testing.assert_close(ours.eval()(x)[0], ref(x)[0])
    ours.train()
    x.requires_grad_()
    ours(x)[0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_in_place_weight_edit_before_backward_is_refused():
    ours, _ = pair("GRU")
    y, _ = ours(torch.randn(3, 1, 3, dtype=torch.float64, requires_grad=True))
    with torch.no_grad():
        ours.weight_hh_l0.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("call, error, match", [
    (lambda: gt.LSTM(3, 4, proj_size=2), ValueError, "proj_size"),
    (lambda: gt.GRU(3, 4)(torch.randn(2, 1, 3, dtype=torch.float64)), TypeError, "weight_ih_l0 is torch.float32"),
    (lambda: gt.GRU(3, 4)(torch.randn(2, 1, 3).half()), TypeError, "float32 or float64"),
    (lambda: gt.RNN(3, 4)(torch.randn(2, 1, 1, 3)), ValueError, "2-D .* or 3-D"),
    (lambda: gt.LSTM(3, 4)(torch.randn(2, 1, 2)), ValueError, "input_size is 3"),
])
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
