"""Gradient-flow curves: exact (finite differences on the state, torch autograd on the same weights), the
vanishing / exploding shape for Elman at 0.9 / 1.1, and the PNG the plot writes."""
import numpy as np
import pytest

from gpurnn.diagnostics import gradient_flow_problem, gradient_norms, plot_gradient_flow

STEPS = 65


def loss_from_step(layer, x, v, t, state):
    """L = <v, h_{T-1}> when the state after step t is `state` (h, or (h, c) for the LSTM; each (1, 1, H))."""
    if t == x.shape[0] - 1:
        return float(v @ (state[0] if isinstance(state, tuple) else state).ravel())
    y, _, _ = layer.forward(x[t + 1:], state, training=False)
    return float(v @ y[-1, 0])


def run_states(layer, x):
    """The state after every step: [(h_t[, c_t]) for t in 0..T-1]."""
    y, state = None, None
    states = []
    for t in range(x.shape[0]):
        y, state, _ = layer.forward(x[t:t + 1], state, training=False)
        states.append(state)
    return states


@pytest.mark.parametrize("cell, scale", [("rnn_tanh", 0.9), ("rnn_tanh", 1.1), ("lstm", 1.0)])
def test_norms_match_finite_differences(cell, scale):
    steps, eps = 12, 1e-6
    layer, x, v = gradient_flow_problem(cell, steps, hidden=8, recurrent_scale=scale, input_scale=0.5, seed=3)
    norms = gradient_norms(cell, steps, hidden=8, recurrent_scale=scale, input_scale=0.5, seed=3)
    states = run_states(layer, x)
    for t in (0, 5, steps - 2, steps - 1):
        h = states[t][0] if cell == "lstm" else states[t]
        grad = np.zeros(h.size)
        for j in range(h.size):
            bumped = []
            for sign in (1, -1):
                hp = h.copy()
                hp[0, 0, j] += sign * eps                        # c_t (LSTM) held fixed: the partial in h_t
                bumped.append(loss_from_step(layer, x, v, t, (hp, states[t][1]) if cell == "lstm" else hp))
            grad[j] = (bumped[0] - bumped[1]) / (2 * eps)
        np.testing.assert_allclose(norms[t], np.linalg.norm(grad), rtol=1e-6, err_msg=f"t={t}")


@pytest.mark.parametrize("cell, scale", [("rnn_tanh", 0.9), ("rnn_tanh", 1.1), ("lstm", 1.0)])
def test_norms_match_torch_autograd(cell, scale):
    torch = pytest.importorskip("torch")
    layer, x, v = gradient_flow_problem(cell, STEPS, recurrent_scale=scale)
    H = layer.hidden_size
    twin = (torch.nn.LSTM if cell == "lstm" else torch.nn.RNN)(H, H, dtype=torch.float64)
    twin.load_state_dict({k: torch.tensor(p) for k, p in layer.state_dict().items()})
    hs, state = [], None
    for t in range(STEPS):
        _, state = twin(torch.tensor(x[t:t + 1]), state)
        h = state[0] if cell == "lstm" else state
        h.retain_grad()
        hs.append(h)
    (torch.tensor(v) * hs[-1].reshape(-1)).sum().backward()
    want = np.array([h.grad.norm().item() for h in hs])
    np.testing.assert_allclose(gradient_norms(cell, STEPS, recurrent_scale=scale), want, rtol=1e-9)


def test_elman_vanishes_at_0_9_and_explodes_at_1_1():
    vanish = gradient_norms("rnn_tanh", STEPS, recurrent_scale=0.9)
    explode = gradient_norms("rnn_tanh", STEPS, recurrent_scale=1.1)
    assert vanish[-1] == pytest.approx(1.0) and explode[-1] == pytest.approx(1.0)
    assert vanish[0] < 1e-2 and np.all(np.diff(vanish) > 0)           # shrinks every step back
    assert explode[0] > 1e2 and np.all(np.diff(explode) < 0)          # grows every step back
    # in the near-linear regime the rate is the scale itself: 0.9^64 and 1.1^64 within a factor 2
    assert 0.5 < vanish[0] / 0.9 ** (STEPS - 1) < 2
    assert 0.5 < explode[0] / 1.1 ** (STEPS - 1) < 2


def test_plot_writes_png_and_returns_curves(tmp_path):
    path = tmp_path / "gradient_flow.png"
    curves = plot_gradient_flow(path, steps=20, hidden=8)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert len(curves) == 3 and all(c.shape == (20,) and np.all(np.isfinite(c)) for c in curves.values())
    lstm = next(c for k, c in curves.items() if k.startswith("LSTM"))
    np.testing.assert_allclose(lstm, gradient_norms("lstm", 20, hidden=8, recurrent_scale=1.0), rtol=1e-12)


def test_unknown_cell_is_refused():
    with pytest.raises(ValueError, match="cell must be one of 'rnn_tanh', 'lstm'"):
        gradient_norms("gru")
