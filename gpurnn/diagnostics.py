"""Gradient flow through time: ||dL/dh_t|| at every step for a loss on the last step, Elman vs LSTM, and its plot.

The recurrent weights are `recurrent_scale` times an orthogonal matrix, so the Elman Jacobian dh_t/dh_{t-1} =
diag(tanh'(a_t)) W_hh has every singular value at most `recurrent_scale`: with small inputs (tanh' ~ 1) the gradient
shrinks like 0.9^k or grows like 1.1^k, k steps back. The LSTM carries it along the cell state, scaled by the
forget gate (bias `forget_bias`, 1 as is common practice), and loses far less over the same span.
"""
import numpy as np

from .files import atomic_write
from .kernels import GATES
from .layers import LSTM, RNN

CELLS = ("rnn_tanh", "lstm")


def orthogonal(n, rng):
    """(n, n) orthogonal matrix, Haar-distributed (QR of a Gaussian matrix with R's diagonal made positive)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def gradient_flow_problem(cell, steps=65, hidden=32, recurrent_scale=1.0, seed=0, input_scale=1e-4,
                          forget_bias=1.0):
    """layer (float64, zero biases but the LSTM forget gate's), x (steps, 1, hidden), v (hidden,): L = <v, h_{T-1}>.

    Each gate block of W_hh (H, H) is `recurrent_scale` times its own orthogonal matrix; x ~ input_scale N(0, 1).
    """
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {', '.join(map(repr, CELLS))}; got {cell!r}")
    rng = np.random.default_rng(seed)
    layer = (LSTM if cell == "lstm" else RNN)(hidden, hidden, dtype="float64", seed=seed)
    G = GATES[cell]
    H = layer.hidden_size
    p = layer.params
    p["weight_hh_l0"][...] = np.concatenate([recurrent_scale * orthogonal(H, rng) for _ in range(G)])  # (G*H, H)
    p["bias_ih_l0"][...] = 0
    p["bias_hh_l0"][...] = 0
    if cell == "lstm":
        p["bias_ih_l0"][H:2 * H] = forget_bias                  # gate order i, f, g, o
    x = input_scale * rng.standard_normal((steps, 1, H))
    v = rng.standard_normal(H)
    return layer, x, v / np.linalg.norm(v)


def gradient_norms(cell, steps=65, hidden=32, recurrent_scale=1.0, seed=0, input_scale=1e-4, forget_bias=1.0):
    """(steps,) ||dL/dh_t|| for t = 0..steps-1, L = <v, h_{steps-1}> (so the last entry is 1).

    Runs the layer one step at a time and backpropagates the state step by step: dstate_{t-1} is what the
    layer's backward returns for step t given dstate_t, exactly the chain rule through h_t (and c_t).
    cell: "rnn_tanh" (Elman) or "lstm".
    """
    layer, x, v = gradient_flow_problem(cell, steps, hidden, recurrent_scale, seed, input_scale, forget_bias)
    state, ctxs = None, []
    for t in range(steps):
        y, state, ctx = layer.forward(x[t:t + 1], state)
        ctxs.append(ctx)
    dh = v[None, None, :]                                        # (1, B=1, H)
    dstate = (dh, np.zeros_like(dh)) if cell == "lstm" else dh
    norms = np.empty(steps)
    zero_dy = np.zeros_like(y)                                   # (1, 1, H): the loss sees only the state
    for t in range(steps - 1, -1, -1):
        norms[t] = np.linalg.norm(dstate[0] if cell == "lstm" else dstate)
        _, dstate = layer.backward(ctxs[t], zero_dy, dstate)
    return norms


def plot_gradient_flow(path, steps=65, hidden=32, seed=0):
    """Write a PNG of ||dL/dh_t|| against steps back from the loss (log scale), atomically (a reader never sees
    half a file); returns {label: (steps,) curve}."""
    curves = {"Elman, W_hh = 0.9 Q": gradient_norms("rnn_tanh", steps, hidden, 0.9, seed),
              "Elman, W_hh = 1.1 Q": gradient_norms("rnn_tanh", steps, hidden, 1.1, seed),
              "LSTM, W_hh = Q, forget bias 1": gradient_norms("lstm", steps, hidden, 1.0, seed)}
    from matplotlib.figure import Figure          # no pyplot: renders with Agg, leaves the global backend alone
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    back = np.arange(steps)
    for label, curve in curves.items():
        ax.semilogy(back, curve[::-1], label=label)
    ax.set_xlabel("steps back from the loss (k = T-1-t)")
    ax.set_ylabel("||dL/dh_t||")
    ax.set_title(f"Gradient flow through time, H = {hidden}, loss on step {steps - 1}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    return curves
