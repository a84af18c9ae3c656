"""The layers against torch.nn.RNN/LSTM/GRU on the same weights: outputs, final states, every gradient."""
import numpy as np
import pytest

import torch_oracle
from gpurnn.kernels import GATES
from util import CELLS, KERNEL_BACKENDS, device_of, layer_outputs, make_layer, random_problem

torch = pytest.importorskip("torch")


def check_against_torch(layer, backend, problem, rtol, atol):
    """Run layer on problem = (x, state, lengths, dy, dstate) on backend; compare everything with torch (float64)."""
    want = torch_oracle.run(layer, *problem, dtype="float64")
    got = layer_outputs(layer.to(device_of(backend)), *problem)
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, rtol=rtol, atol=atol, err_msg=name)


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


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("cell", CELLS)
def test_gradients_match_torch_at_saturated_inputs(cell, backend_name):
    """Inputs of size 1e4 and biases of +-1e5 saturate every gate (|pre-activation| > 8e4): the derivatives are
    exactly 0 in float32 there, in torch as in the layer, so dW_ih (dG^T x, x ~ 1e4) and every other gradient
    match torch's float32 ones to 1e-5 of the largest gradient (relu's live units carry the only nonzero dG)."""
    layer = make_layer(cell, 4, 5, dtype="float32", backend=backend_name, seed=3).to(device_of(backend_name))
    rng = np.random.default_rng(4)
    layer.params["bias_hh_l0"][...] = 0
    layer.params["bias_ih_l0"][...] = layer.xp.asarray(rng.choice([-1e5, 1e5], GATES[cell] * 5).astype(np.float32))
    T, B, H = 4, 3, 5
    x = (1e4 * rng.standard_normal((T, B, 4))).astype(np.float32)
    lstm = cell == "lstm"
    state = tuple(rng.standard_normal((1, B, H)).astype(np.float32) for _ in range(2 if lstm else 1))
    dstate = tuple(rng.standard_normal((1, B, H)).astype(np.float32) for _ in state)
    dy = rng.standard_normal((T, B, H)).astype(np.float32)
    problem = (x, state if lstm else state[0], None, dy, dstate if lstm else dstate[0])
    want = torch_oracle.run(layer, *problem)                # float32, as the layer
    got = layer_outputs(layer, *problem)
    grads = [k for k in want if k not in ("y", "h_n", "c_n")]
    largest = max(float(np.abs(want[k]).max()) for k in grads)
    for name in grads:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5 * largest, err_msg=name)
    if cell != "rnn_relu":                              # saturated everywhere: no gradient reaches the weights
        assert not any(got[k].any() for k in layer.params)
