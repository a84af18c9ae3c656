"""LSTM(proj_size=P) against torch.nn.LSTM(proj_size=P): outputs, final states and every gradient, with weights
loaded both ways; stacked, bidirectional, ragged, float32 (fused CPU) and float64 (reference)."""
import numpy as np
import pytest

import gpurnn
from test_torch_parity import assert_close_tree, torch_run
from util import random_problem

torch = pytest.importorskip("torch")


def torch_lstm(layer):
    return torch.nn.LSTM(layer.input_size, layer.hidden_size, num_layers=layer.num_layers, bias=layer.bias,
                         batch_first=layer.batch_first, bidirectional=layer.num_directions == 2,
                         proj_size=layer.proj_size, dtype=torch.float64)


def run(layer, problem):
    x, state, lengths, dy, dstate = problem
    layer.zero_grad()
    y, state_n, ctx = layer.forward(x, state, lengths)
    dx, dstate0 = layer.backward(ctx, dy, dstate)
    return y, state_n, dx, dstate0, dict(layer.grads)


@pytest.mark.parametrize("num_layers,bidirectional,ragged,batch_first", [
    (1, False, False, False), (2, True, True, False), (3, False, True, True), (2, True, False, True)])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("direction", ["gpurnn_to_torch", "torch_to_gpurnn"])
def test_matches_torch(num_layers, bidirectional, ragged, batch_first, dtype, direction):
    layer = gpurnn.LSTM(5, 7, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first,
                        proj_size=3, dtype=dtype, seed=2)
    module = torch_lstm(layer)
    if direction == "gpurnn_to_torch":
        module.load_state_dict({k: torch.tensor(v, dtype=torch.float64) for k, v in layer.state_dict().items()})
    else:
        torch.manual_seed(0)
        module.reset_parameters()
        layer.load_state_dict({k: v.detach().numpy() for k, v in module.state_dict().items()})
    assert list(layer.state_dict()) == list(module.state_dict())            # names and order as torch's
    problem = random_problem(layer, T=6, B=4, rng=np.random.default_rng(num_layers), ragged=ragged)
    y_ref, sn_ref, dx_ref, ds_ref, g_ref = torch_run(module, *problem)
    y, state_n, dx, dstate0, grads = run(layer, problem)
    rtol, atol = (1e-10, 1e-12) if dtype == "float64" else (2e-4, 2e-5)
    assert sorted(grads) == sorted(g_ref)
    for what, got, want in [("y", y, y_ref), ("state_n", state_n, sn_ref), ("dx", dx, dx_ref),
                            ("dstate0", dstate0, ds_ref)] + [(k, grads[k], g) for k, g in g_ref.items()]:
        assert_close_tree(got, want, rtol, atol, what)


def test_shapes_follow_torch():
    layer = gpurnn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=2, seed=0)
    shapes = {k: v.shape for k, v in layer.params.items()}
    assert shapes["weight_hr_l0"] == (2, 6) and shapes["weight_hh_l0"] == (24, 2)
    assert shapes["weight_ih_l1"] == (24, 4)                       # layer 1 reads both directions' h: 2 * P
    y, (h, c), _ = layer.forward(np.zeros((3, 5, 4), np.float32), training=False)
    assert y.shape == (3, 5, 4) and h.shape == (4, 5, 2) and c.shape == (4, 5, 6)
