"""The numba backend's kernels against the float64 NumPy reference: outputs, final states and every gradient.

Without a GPU these run in Numba's CUDA simulator (conftest sets NUMBA_ENABLE_CUDASIM=1); persistent sweeps then
run on several blocks at once through kernels/numba_sim.py (see test_persistent_many_blocks.py); with a GPU they
run for real on CuPy arrays. Sizes stay tiny: the simulator runs one Python thread per CUDA thread.
"""
import numpy as np
import pytest

from gpurnn.kernels import GATES
from gpurnn.kernels import numba_cuda as N
from gpurnn.kernels import numpy_ref as ref
from util import CELLS, make_layer, random_problem, to_numpy

# (T, B, H, lengths): T = B = H = 1; odd sizes with ragged lengths; H = 33 (3 blocks of 12 units in a persistent
# sweep, so each warp takes several items); B*H = 36 > 32 threads of a simulator block, so the per-step kernels
# span blocks.
SHAPES = {"T1B1H1": (1, 1, 1, [1]), "ragged": (4, 3, 5, [4, 2, 1]), "H33": (2, 2, 33, [2, 2]),
          "blocks": (3, 4, 9, [3, 1, 2, 3])}
TOL = {np.float32: dict(rtol=2e-4, atol=2e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}


def on_device(a):
    """NumPy in the simulator, CuPy on a GPU."""
    return a if N.simulator() else N.array_module().asarray(a)


def sweep_problem(cell, T, B, H, lengths, dtype, rng):
    G, lstm = GATES[cell], cell == "lstm"
    data = dict(xw=rng.standard_normal((T, B, G * H)), w_hh=rng.standard_normal((G * H, H)) / np.sqrt(H),
                b_hh=rng.standard_normal(G * H) * 0.5,
                state0=tuple(rng.standard_normal((B, H)) for _ in range(2 if lstm else 1)),
                dy=rng.standard_normal((T, B, H)),
                dstate_n=tuple(rng.standard_normal((B, H)) for _ in range(2 if lstm else 1)))
    # the reference sees exactly the values the kernels see: rounded to `dtype`, then float64
    data = {k: (tuple(s.astype(dtype).astype(np.float64) for s in v) if isinstance(v, tuple)
                else v.astype(dtype).astype(np.float64)) for k, v in data.items()}
    return data, np.array(lengths, np.int32)


def run_numba_sweep(cell, d, lengths, dtype, sweep):
    cast = (lambda a: on_device(a.astype(dtype)))
    y, state_n, ctx = N.forward(cell, cast(d["xw"]), cast(d["w_hh"]), cast(d["b_hh"]),
                                tuple(map(cast, d["state0"])), on_device(lengths), True, sweep=sweep)
    dgx, dgh, dstate0 = N.backward(ctx, cast(d["dy"]), tuple(map(cast, d["dstate_n"])))
    return ctx, to_numpy((y, *state_n, dgx, dgh, *dstate0))


def run_reference_sweep(cell, d, lengths):
    y, state_n, ctx = ref.forward(cell, d["xw"].copy(), d["w_hh"], d["b_hh"], d["state0"], lengths, True)
    dgx, dgh, dstate0 = ref.backward(ctx, d["dy"], d["dstate_n"])
    return (y, *state_n, dgx, dgh, *dstate0)


@pytest.mark.parametrize("sweep", ["step", "persistent"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", CELLS)
def test_sweep_matches_reference(cell, dtype, shape, sweep):
    T, B, H, lengths = SHAPES[shape]
    d, lens = sweep_problem(cell, T, B, H, lengths, dtype, np.random.default_rng(7))
    ctx, got = run_numba_sweep(cell, d, lens, dtype, sweep)
    assert ctx.sweep == sweep
    names = ["y"] + (["h_n", "c_n"] if cell == "lstm" else ["h_n"]) + ["dgx", "dgh"] + \
            (["dh0", "dc0"] if cell == "lstm" else ["dh0"])
    for name, a, b in zip(names, got, run_reference_sweep(cell, d, lens)):
        assert a.dtype == dtype, name
        np.testing.assert_allclose(a, b, err_msg=name, **TOL[dtype])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_inference_returns_no_ctx_and_same_output(cell):
    d, lens = sweep_problem(cell, 3, 2, 4, [3, 1], np.float64, np.random.default_rng(1))
    y, state_n, ctx = N.forward(cell, on_device(d["xw"]), on_device(d["w_hh"]), on_device(d["b_hh"]),
                                tuple(map(on_device, d["state0"])), on_device(lens), False)
    assert ctx is None
    y_ref, state_ref, _ = ref.forward(cell, d["xw"].copy(), d["w_hh"], d["b_hh"], d["state0"], lens, False)
    np.testing.assert_allclose(to_numpy(y), y_ref, **TOL[np.float64])
    for a, b in zip(state_n, state_ref):
        np.testing.assert_allclose(to_numpy(a), b, **TOL[np.float64])


@pytest.mark.parametrize("sweep", ["step", "persistent"])
@pytest.mark.parametrize("act,out_act", [("tanh", "sigmoid"), ("relu", "identity"), ("sigmoid", "tanh")])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_jordan_matches_reference(act, out_act, dtype, sweep):
    T, B, H, O = 4, 3, 5, 2
    got, want, ctx = run_jordan(act, out_act, dtype, sweep, T, B, H, O, [4, 1, 3], np.random.default_rng(3))
    assert ctx.plan.sweep == sweep
    for name, a, b in zip(["y", "y_n", "dph", "dpy", "dy0", "h"], got, want):
        np.testing.assert_allclose(a, b, err_msg=name, **TOL[dtype])


def run_jordan(act, out_act, dtype, sweep, T, B, H, O, lengths, rng):
    """(numba results, reference results, numba ctx): y, y_n, dph, dpy, dy0, h of one forward and backward."""
    xw, w_yh, w_hy, b_y, y0, dy, dy_n = (rng.standard_normal(s).astype(dtype).astype(np.float64) for s in
                                         [(T, B, H), (H, O), (O, H), (O,), (B, O), (T, B, O), (B, O)])
    lens = np.array(lengths, np.int32)
    cast = (lambda a: on_device(a.astype(dtype)))
    y, y_n, ctx = N.jordan_forward(cast(xw), cast(w_yh), cast(w_hy), cast(b_y), cast(y0), on_device(lens),
                                   act, out_act, True, sweep=sweep)
    got = to_numpy((y, y_n, *N.jordan_backward(ctx, cast(dy), cast(dy_n)), ctx.h))
    y_r, y_n_r, ctx_r = ref.jordan_forward(xw, w_yh, w_hy, b_y, y0, lens, act, out_act, True)
    return got, (y_r, y_n_r, *ref.jordan_backward(ctx_r, dy, dy_n), ctx_r.h), ctx


def layer_pair(cell, sweep, **kwargs):
    """The same layer (same seed, same parameters) on the numba and numpy backends."""
    numba_layer = make_layer(cell, 3, 4, backend="numba", seed=5, **kwargs)
    numba_layer.sweep = sweep
    return numba_layer, make_layer(cell, 3, 4, backend="numpy", seed=5, **kwargs)


@pytest.mark.skipif(not N.simulator(), reason="layers on NumPy arrays: the simulator's configuration")
@pytest.mark.parametrize("sweep", ["step", "persistent"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_relu"])
def test_layer_stacked_bidirectional_ragged(cell, sweep):
    layer, oracle = layer_pair(cell, sweep, num_layers=2, bidirectional=True, dtype="float64")
    x, state, lengths, dy, dstate = random_problem(layer, 4, 3, np.random.default_rng(11), ragged=True)
    out, out_ref = layer.forward(x, state, lengths), oracle.forward(x, state, lengths)
    back = layer.backward(out[2], dy, dstate)
    back_ref = oracle.backward(out_ref[2], dy, dstate)
    flat = (lambda s: list(s) if isinstance(s, tuple) else [s])
    for a, b in zip([out[0], *flat(out[1]), back[0], *flat(back[1])],
                    [out_ref[0], *flat(out_ref[1]), back_ref[0], *flat(back_ref[1])]):
        np.testing.assert_allclose(a, b, **TOL[np.float64])
    assert layer.grads.keys() == oracle.grads.keys()
    for name in layer.grads:
        np.testing.assert_allclose(layer.grads[name], oracle.grads[name], err_msg=name, **TOL[np.float64])


@pytest.mark.skipif(not N.simulator(), reason="layers on NumPy arrays: the simulator's configuration")
def test_jordan_layer_matches_numpy_backend():
    import gpurnn
    layer, oracle = (gpurnn.JordanRNN(3, 5, 2, dtype="float64", backend=b, seed=2) for b in ("numba", "numpy"))
    rng = np.random.default_rng(4)
    x, dy = rng.standard_normal((4, 3, 3)), rng.standard_normal((4, 3, 2))
    lengths = np.array([4, 2, 3])
    out, out_ref = layer.forward(x, lengths=lengths), oracle.forward(x, lengths=lengths)
    back, back_ref = layer.backward(out[2], dy), oracle.backward(out_ref[2], dy)
    for a, b in zip([out[0], out[1], *back], [out_ref[0], out_ref[1], *back_ref]):
        np.testing.assert_allclose(a, b, **TOL[np.float64])
    for name in layer.grads:
        np.testing.assert_allclose(layer.grads[name], oracle.grads[name], err_msg=name, **TOL[np.float64])
