"""The seed tasks: data generators for problems small recurrent networks are known to learn.

Each generator takes a batch size and a NumPy Generator and returns (inputs, targets), time-major:
    bit_flip                  x (1, B, 1) bits              -> y (B,) classes 1 - x            (many-to-one)
    bit_vector_flip           v (B, n) bits, -1 padding     -> y (n, B) classes 1 - v, -1 pad  (one-to-many)
    bit_sequence_flip         x (T, B, 1) bits              -> y (T, B) classes 1 - x          (many-to-many)
    flip_if_previous_output   x (T, B, 1) bits              -> y (T, B, 1): 1 - x_t if x_t == y_{t-1} else x_t
    adding_problem            x (T, B, 2) values, markers   -> y (B, 1) sum of the two marked values
and `hello()` the four-letter character task.
"""
import numpy as np

from . import checks

PAD = -1
HELLO_VOCAB = "helo"


def bits(rng, shape):
    return rng.integers(0, 2, shape)


def bit_flip(batch, rng, dtype="float32"):
    """Problem 1: one bit in, its flip out. x (1, B, 1) float, y (B,) int."""
    b = bits(rng, (1, checks.positive_int(batch, "batch"), 1))
    return b.astype(dtype), 1 - b[0, :, 0]


def bit_vector_flip(batch, rng, n_bits=10, variable=False, dtype="float32"):
    """Problem 2: a vector of n_bits bits in, the flipped bits out, one per step.

    With variable=True each vector has a length in 1..n_bits; the positions past it hold PAD (-1) in both
    the input v (B, n_bits) float and the targets y (n_bits, B) int."""
    B, n = checks.positive_int(batch, "batch"), checks.positive_int(n_bits, "n_bits")
    b = bits(rng, (B, n))
    y = 1 - b
    v = b.astype(dtype)
    if variable:
        lengths = rng.integers(1, n + 1, B)
        pad = np.arange(n)[None, :] >= lengths[:, None]      # (B, n)
        v[pad] = PAD
        y[pad] = PAD
    return v, np.ascontiguousarray(y.T)


def bit_sequence_flip(batch, rng, length=10, dtype="float32"):
    """Problem 3: a bit per step in, its flip out at the same step. x (T, B, 1) float, y (T, B) int."""
    b = bits(rng, (checks.positive_int(length, "length"), checks.positive_int(batch, "batch"), 1))
    return b.astype(dtype), 1 - b[:, :, 0]


def flip_if_previous_output(batch, rng, length=10, dtype="float32"):
    """Problem 4: y_t = 1 - x_t when x_t equals the previous output y_{t-1} (y_{-1} = 0), else x_t.

    x (T, B, 1) float bits, y (T, B, 1) float bits. Either way y_t = 1 - y_{t-1}: the output alternates
    1, 0, 1, ... whatever the input, which a network can only produce by feeding back its own output
    (a Jordan network's state) or by counting in its hidden state."""
    T, B = checks.positive_int(length, "length"), checks.positive_int(batch, "batch")
    x = bits(rng, (T, B, 1))
    y = np.empty_like(x)
    prev = np.zeros((B, 1), x.dtype)
    for t in range(T):
        y[t] = np.where(x[t] == prev, 1 - x[t], x[t])
        prev = y[t]
    return x.astype(dtype), y.astype(dtype)


def hello():
    """The character task: vocabulary "helo"; reading "hell" a model must emit "ello".

    ids (4, 1) for "hell" and targets (4, 1) for "ello", as indices into HELLO_VOCAB."""
    to_ids = [HELLO_VOCAB.index(ch) for ch in "hello"]
    seq = np.array(to_ids)[:, None]                 # (5, 1)
    return seq[:-1], seq[1:]


def adding_problem(batch, rng, length=20, dtype="float32"):
    """The adding problem (Hochreiter & Schmidhuber 1997, in the form of Le et al. 2015).

    x (T, B, 2): channel 0 holds values U(0, 1), channel 1 marks two steps with 1 (one in each half of the
    sequence), y (B, 1) is the sum of the two marked values. Predicting the mean, 1, scores MSE Var = 1/6."""
    T, B = checks.positive_int(length, "length", minimum=2), checks.positive_int(batch, "batch")
    x = np.zeros((T, B, 2))
    x[:, :, 0] = rng.uniform(0, 1, (T, B))
    half = T // 2
    first, second = rng.integers(0, half, B), rng.integers(half, T, B)
    cols = np.arange(B)
    x[first, cols, 1] = 1
    x[second, cols, 1] = 1
    y = x[first, cols, 0] + x[second, cols, 0]
    return x.astype(dtype), y[:, None].astype(dtype)
