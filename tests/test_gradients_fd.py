"""Every gradient of the float64 reference (params, x, initial state) against central finite differences."""
import numpy as np
import pytest

import gpurnn
from util import CELLS, check_layer_gradients, make_layer, random_problem


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_recurrent_gradients(cell, num_layers, bidirectional, ragged, batch_first):
    layer = make_layer(cell, 3, 2, num_layers=num_layers, bidirectional=bidirectional,
                       batch_first=batch_first, dtype="float64", seed=3)
    check_layer_gradients(layer, *random_problem(layer, T=4, B=3, rng=np.random.default_rng(7), ragged=ragged))


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu", "sigmoid"])
@pytest.mark.parametrize("output_nonlinearity", ["sigmoid", "tanh", "identity"])
@pytest.mark.parametrize("ragged", [False, True])
def test_jordan_gradients(nonlinearity, output_nonlinearity, ragged):
    rng = np.random.default_rng(11)
    layer = gpurnn.JordanRNN(3, 4, 2, nonlinearity=nonlinearity, output_nonlinearity=output_nonlinearity,
                             dtype="float64", seed=5)
    T, B = 5, 3
    lengths = np.array([T, 2, 4]) if ragged else None
    check_layer_gradients(layer, rng.standard_normal((T, B, 3)), rng.standard_normal((1, B, 2)), lengths,
                          rng.standard_normal((T, B, 2)), rng.standard_normal((1, B, 2)))
