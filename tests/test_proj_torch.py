"""LSTM(proj_size=P) against torch.nn.LSTM(proj_size=P): outputs, final states and every gradient, with weights
loaded both ways; stacked, bidirectional, ragged, float32 (fused CPU) and float64 (reference)."""
import numpy as np
import pytest

import gpurnn
import torch_oracle
from util import layer_outputs, random_problem

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("num_layers,bidirectional,ragged,batch_first", [
    (1, False, False, False), (2, True, True, False), (3, False, True, True), (2, True, False, True)])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("direction", ["gpurnn_to_torch", "torch_to_gpurnn"])
def test_matches_torch(num_layers, bidirectional, ragged, batch_first, dtype, direction):
    layer = gpurnn.LSTM(5, 7, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first,
                        proj_size=3, dtype=dtype, seed=2)
    module = torch_oracle.twin(layer, "float64")
    if direction == "torch_to_gpurnn":
        torch.manual_seed(0)
        module.reset_parameters()
        layer.load_state_dict({k: v.detach().numpy() for k, v in module.state_dict().items()})
    assert list(layer.state_dict()) == list(module.state_dict())            # names and order as torch's
    for k, v in module.state_dict().items():
        np.testing.assert_array_equal(layer.state_dict()[k], v.numpy().astype(dtype))
    problem = random_problem(layer, T=6, B=4, rng=np.random.default_rng(num_layers), ragged=ragged)
    want = torch_oracle.run(layer, *problem, dtype="float64")
    got = layer_outputs(layer, *problem)
    rtol, atol = (1e-10, 1e-12) if dtype == "float64" else (2e-4, 2e-5)
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, rtol=rtol, atol=atol, err_msg=name)


def test_shapes_follow_torch():
    layer = gpurnn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=2, seed=0)
    shapes = {k: v.shape for k, v in layer.params.items()}
    assert shapes["weight_hr_l0"] == (2, 6) and shapes["weight_hh_l0"] == (24, 2)
    assert shapes["weight_ih_l1"] == (24, 4)                       # layer 1 reads both directions' h: 2 * P
    y, (h, c), _ = layer.forward(np.zeros((3, 5, 4), np.float32), training=False)
    assert y.shape == (3, 5, 4) and h.shape == (4, 5, 2) and c.shape == (4, 5, 6)
