"""Weight initialisation of the recurrent layers (`init=`), drawn in float64 from the layer's seeded generator.

| init             | weight_ih                  | weight_hh                          | biases          |
| "uniform"        | U(-1/sqrt(H), 1/sqrt(H))   | U(-1/sqrt(H), 1/sqrt(H))           | same (PyTorch)  |
| "xavier_uniform" | xavier_uniform (below)     | xavier_uniform                     | 0               |
| "orthogonal"     | xavier_uniform             | each (H, H) gate block orthogonal  | 0               |
weight_hr (LSTM proj_size) draws as weight_ih; with a projection, weight_hh's (H, P) gate blocks get orthonormal
columns under "orthogonal".
xavier_uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out)) of the whole matrix (torch.nn.init.xavier_uniform_).
"""
import math

import numpy as np

INITS = ("uniform", "xavier_uniform", "orthogonal")


def xavier_uniform(rng, shape):
    """(fan_out, fan_in) ~ U(-a, a), a = sqrt(6 / (fan_in + fan_out)): unit-variance activations both ways."""
    fan_out, fan_in = shape
    a = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-a, a, shape)


def orthogonal_blocks(rng, shape, block_rows):
    """(G*H, P): G stacked (H, P) blocks (H = block_rows), each Haar-distributed with orthonormal columns (QR of a
    Gaussian, signs of R's diagonal moved into Q so the draw is uniform); square (orthogonal) when P = H."""
    rows, P = shape
    blocks = []
    for _ in range(rows // block_rows):
        q, r = np.linalg.qr(rng.standard_normal((block_rows, P)))
        blocks.append(q * np.sign(np.diag(r)))
    return np.concatenate(blocks)


def draw(rng, init, name, shape, hidden_size):
    """Initial values (float64) of parameter `name` ("weight_ih_l0", "bias_hh_l1_reverse", ...) under `init`."""
    if init == "uniform":
        bound = 1.0 / math.sqrt(hidden_size)
        return rng.uniform(-bound, bound, shape)
    if name.startswith("bias"):
        return np.zeros(shape)
    if init == "orthogonal" and name.startswith("weight_hh"):
        return orthogonal_blocks(rng, shape, hidden_size)
    return xavier_uniform(rng, shape)
