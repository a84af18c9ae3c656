"""The fused CPU sweeps (float32) against the float64 NumPy reference: sweep interface and layers."""
import numpy as np
import pytest

from gpurnn.kernels import GATES, cpu_fused, numpy_ref
from util import CELLS, make_layer, random_problem

SHAPES = [(1, 1, 1), (1, 3, 5), (6, 1, 33), (5, 4, 33), (9, 3, 8)]   # (T, B, H)
RTOL, ATOL = 2e-4, 2e-5


def sweep_problem(cell, T, B, H, ragged, rng):
    G = GATES[cell]
    xw = rng.standard_normal((T, B, G * H))
    w_hh = rng.uniform(-1, 1, (G * H, H)) / np.sqrt(H)
    b_hh = rng.uniform(-0.5, 0.5, G * H)
    state0 = tuple(rng.standard_normal((B, H)) for _ in range(2 if cell == "lstm" else 1))
    lengths = rng.integers(1, T + 1, B).astype(np.int32) if ragged else np.full(B, T, np.int32)
    dy = rng.standard_normal((T, B, H))
    dstate = tuple(rng.standard_normal((B, H)) for _ in state0)
    return xw, w_hh, b_hh, state0, lengths, dy, dstate


def f32(a):
    return tuple(f32(x) for x in a) if isinstance(a, tuple) else np.asarray(a, np.float32)


def assert_close(got, want):
    for g, w in zip(got, want):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("T,B,H", SHAPES)
@pytest.mark.parametrize("cell", CELLS)
def test_sweep_matches_reference(cell, T, B, H, ragged):
    xw, w_hh, b_hh, state0, lengths, dy, dstate = sweep_problem(cell, T, B, H, ragged, np.random.default_rng(T * B * H))
    y, s_n, ctx = numpy_ref.forward(cell, xw.copy(), w_hh, b_hh, state0, lengths)
    dgx, dgh, ds0 = numpy_ref.backward(ctx, dy, dstate)
    y32, s_n32, ctx32 = cpu_fused.forward(cell, f32(xw), f32(w_hh), f32(b_hh), f32(state0), lengths)
    assert isinstance(ctx32, cpu_fused.FusedCtx)
    assert_close((y32, ctx32.y, ctx32.h0) + s_n32, (y, ctx.y, ctx.h0) + s_n)
    dgx32, dgh32, ds032 = cpu_fused.backward(ctx32, f32(dy), f32(dstate))
    assert_close((dgx32, dgh32) + ds032, (dgx, dgh) + ds0)
    y_inf, s_inf, none = cpu_fused.forward(cell, f32(xw), f32(w_hh), f32(b_hh), f32(state0), lengths, False)
    assert none is None
    assert_close((y_inf,) + s_inf, (y,) + s_n)


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
def test_float64_is_the_reference(cell):
    xw, w_hh, b_hh, state0, lengths, dy, dstate = sweep_problem(cell, 4, 3, 5, True, np.random.default_rng(1))
    y, s_n, ctx = numpy_ref.forward(cell, xw.copy(), w_hh, b_hh, state0, lengths)
    y2, s_n2, ctx2 = cpu_fused.forward(cell, xw.copy(), w_hh, b_hh, state0, lengths)
    np.testing.assert_array_equal(y2, y)
    for got, want in zip(cpu_fused.backward(ctx2, dy, dstate)[:2], numpy_ref.backward(ctx, dy, dstate)[:2]):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("act,out_act", [("tanh", "sigmoid"), ("relu", "identity")])
@pytest.mark.parametrize("T,B,H", SHAPES)
def test_jordan_matches_reference(T, B, H, act, out_act):
    rng = np.random.default_rng(T + B + H)
    O = 3
    xw, y0, dy, dy_n = (rng.standard_normal(s) for s in ((T, B, H), (B, O), (T, B, O), (B, O)))
    w_yh, w_hy, b_y = rng.uniform(-1, 1, (H, O)), rng.uniform(-1, 1, (O, H)), rng.uniform(-1, 1, O)
    lengths = rng.integers(1, T + 1, B).astype(np.int32)
    y, y_n, ctx = numpy_ref.jordan_forward(xw, w_yh, w_hy, b_y, y0, lengths, act, out_act)
    y32, y_n32, ctx32 = cpu_fused.jordan_forward(f32(xw), f32(w_yh), f32(w_hy), f32(b_y), f32(y0), lengths,
                                                 act, out_act)
    assert_close((y32, y_n32, ctx32.y, ctx32.y0, ctx32.h), (y, y_n, ctx.y, ctx.y0, ctx.h))
    assert_close(cpu_fused.jordan_backward(ctx32, f32(dy), f32(dy_n)), numpy_ref.jordan_backward(ctx, dy, dy_n))


def run_layer(layer, problem):
    x, state, lengths, dy, dstate = problem
    y, s_n, ctx = layer.forward(x, state, lengths)
    dx, ds0 = layer.backward(ctx, dy, dstate)
    flat = lambda s: s if isinstance(s, tuple) else (s,)   # noqa: E731
    return (y,) + flat(s_n) + (dx,) + flat(ds0) + tuple(layer.grads[k] for k in sorted(layer.grads))


@pytest.mark.parametrize("layout", [dict(), dict(num_layers=2, bidirectional=True), dict(batch_first=True)])
@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("cell", CELLS)
def test_layer_float32_matches_float64(cell, ragged, layout):
    T, B, I, H = 6, 3, 4, 33
    l64 = make_layer(cell, I, H, dtype="float64", seed=3, **layout)
    l32 = make_layer(cell, I, H, dtype="float32", seed=3, **layout)
    problem = random_problem(l64, T, B, np.random.default_rng(5), ragged=ragged)
    want = run_layer(l64, problem)
    problem32 = tuple(None if a is None else a if isinstance(a, np.ndarray) and a.dtype.kind == "i"
                      else f32(a) for a in problem)
    got = run_layer(l32, problem32)
    assert_close(got, want)


def test_layer_inference_matches_training_forward():
    layer = make_layer("lstm", 5, 7, seed=0)
    x = np.random.default_rng(0).standard_normal((4, 2, 5)).astype(np.float32)
    y, (h, c), _ = layer.forward(x)
    y2, (h2, c2), ctx = layer.forward(x, training=False)
    assert ctx is None
    for got, want in ((y2, y), (h2, h), (c2, c)):
        np.testing.assert_array_equal(got, want)


def test_layers_use_the_fused_module():
    from gpurnn import backend
    assert backend.kernels("numpy") is cpu_fused


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("cell", CELLS)
def test_threads_do_not_change_results(cell, ragged, monkeypatch):
    """The step kernels split batch rows over Numba's threads; one thread and all of them agree bit for bit."""
    import numba
    xw, w_hh, b_hh, state0, lengths, dy, dstate = sweep_problem(cell, 5, 7, 33, ragged, np.random.default_rng(9))
    b_ih = np.random.default_rng(10).uniform(-0.5, 0.5, b_hh.shape)

    def sweep(threads):
        monkeypatch.setattr(cpu_fused, "THREADS", threads)
        y, s_n, ctx = cpu_fused.forward(cell, f32(xw), f32(w_hh), f32(b_hh), f32(state0), lengths, b_ih=f32(b_ih))
        dgx, dgh, ds0 = cpu_fused.backward(ctx, f32(dy), f32(dstate))
        return (y,) + s_n + (dgx, dgh) + ds0
    serial, parallel = sweep(1), sweep(numba.config.NUMBA_NUM_THREADS)
    for got, want in zip(parallel, serial):
        np.testing.assert_array_equal(got, want)


def test_step_threads_follow_numba_and_the_layer(monkeypatch):
    import numba
    monkeypatch.setattr(cpu_fused, "THREADS", None)
    layer = cpu_fused.threading_layer()
    assert layer in ("tbb", "omp", "workqueue")
    spinning = layer == "omp" and cpu_fused.os.environ.get("OMP_WAIT_POLICY", "").lower() != "passive"
    assert cpu_fused.step_threads() == (1 if spinning else numba.get_num_threads())
    monkeypatch.setattr(cpu_fused, "THREADS", 1)
    before = numba.get_num_threads()
    with cpu_fused.kernel_threads():
        assert numba.get_num_threads() == 1
    assert numba.get_num_threads() == before


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("cell", CELLS)
def test_input_bias_in_the_sweep_matches_adding_it_first(cell, ragged):
    """b_ih given to the sweep (summed with b_hh once, added in the step kernel) against xw + b_ih in the reference."""
    xw, w_hh, b_hh, state0, lengths, dy, dstate = sweep_problem(cell, 6, 3, 9, ragged, np.random.default_rng(11))
    b_ih = np.random.default_rng(12).uniform(-0.5, 0.5, b_hh.shape)
    y, s_n, ctx = numpy_ref.forward(cell, xw + b_ih, w_hh, b_hh, state0, lengths)
    y32, s_n32, ctx32 = cpu_fused.forward(cell, f32(xw), f32(w_hh), f32(b_hh), f32(state0), lengths, b_ih=f32(b_ih))
    assert_close((y32,) + s_n32, (y,) + s_n)
    dgx, dgh, ds0 = numpy_ref.backward(ctx, dy, dstate)
    assert_close(cpu_fused.backward(ctx32, f32(dy), f32(dstate))[:2], (dgx, dgh))
    y64, s_n64, _ = numpy_ref.forward(cell, xw, w_hh, b_hh, state0, lengths, b_ih=b_ih)
    for got, want in zip((y64,) + s_n64, (y,) + s_n):
        np.testing.assert_array_equal(got, want)
