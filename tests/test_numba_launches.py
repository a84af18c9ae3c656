"""Kernel launches per sweep, counted under the simulator by the `launches` fixture (conftest.py): a persistent sweep
is ONE launch per layer and direction, forward and backward; a per-step sweep is one pointwise launch per step."""
import numpy as np
import pytest

from gpurnn.kernels import numba_cuda as N
from util import make_layer, random_problem

pytestmark = pytest.mark.skipif(not N.simulator(), reason="counts the simulator's launches")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_persistent_sweep_is_one_launch_per_layer_and_direction(launches, cell):
    T, L, D = 5, 2, 2
    layer = make_layer(cell, 3, 6, backend="numba", seed=1, num_layers=L, bidirectional=True, dtype="float64")
    layer.sweep = "persistent"
    x, state, lengths, dy, dstate = random_problem(layer, T, 3, np.random.default_rng(0), ragged=True)
    out = layer.forward(x, state, lengths)
    assert launches == {"persistent_forward": L * D}
    launches.clear()
    layer.backward(out[2], dy, dstate)
    assert launches == {"persistent_backward": L * D}


def test_step_sweep_is_one_launch_per_step(launches):
    T = 5
    layer = make_layer("lstm", 3, 6, backend="numba", seed=1, dtype="float64")
    layer.sweep = "step"
    x, state, lengths, dy, dstate = random_problem(layer, T, 3, np.random.default_rng(0))
    out = layer.forward(x, state, lengths)
    assert launches == {"step_forward": T}
    launches.clear()
    layer.backward(out[2], dy, dstate)
    assert launches == {"step_backward": T}


@pytest.mark.parametrize("sweep,forward,backward", [
    ("persistent", {"persistent_forward": 1}, {"persistent_backward": 1}),
    ("step", {"jordan_hidden": 5, "jordan_output": 5}, {"jordan_output_backward": 5, "jordan_hidden_backward": 5})])
def test_jordan_launches(launches, sweep, forward, backward):
    T, B, H, O = 5, 3, 6, 2
    rng = np.random.default_rng(0)
    xw, w_yh, w_hy, b_y, y0, dy = (rng.standard_normal(s) for s in [(T, B, H), (H, O), (O, H), (O,), (B, O),
                                                                      (T, B, O)])
    lengths = np.array([5, 3, 4], np.int32)
    _, y_n, ctx = N.jordan_forward(xw, w_yh, w_hy, b_y, y0, lengths, "tanh", "sigmoid", True, sweep=sweep)
    assert launches == forward
    launches.clear()
    N.jordan_backward(ctx, dy, y_n)
    assert launches == backward
