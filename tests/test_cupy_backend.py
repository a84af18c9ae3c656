"""backend="cupy" against the float64 NumPy reference: every cell, stacked, bidirectional, ragged lengths (GPU)."""
import numpy as np
import pytest

import gpurnn
from gpurnn import backend
from gpurnn.kernels import cupy_raw
from util import CELLS, make_layer, random_problem, to_device, to_numpy

needs_gpu = pytest.mark.skipif(not backend.gpu_available(), reason="needs a CUDA GPU with CuPy")

TOL = {"float64": dict(rtol=1e-9, atol=1e-10), "float32": dict(rtol=1e-3, atol=1e-4)}
# T, B, input, hidden, layers, bidirectional, ragged
SHAPES = {"one_step": (1, 1, 2, 3, 1, False, False),
          "stacked_bidirectional_ragged": (7, 5, 4, 33, 2, True, True),
          "several_blocks_ragged": (3, 40, 5, 70, 1, False, True)}


def as64(a):
    return tuple(v.astype(np.float64) for v in a) if isinstance(a, tuple) else a.astype(np.float64)


def assert_close(got, want, **tol):
    """got (device arrays, or a tuple of them) against want (NumPy)."""
    if isinstance(want, tuple):
        for g, w in zip(got, want, strict=True):
            assert_close(g, w, **tol)
    else:
        np.testing.assert_allclose(to_numpy(got), want, **tol)


def check_against_reference(gpu, ref, dtype, x, state, lengths, dy, dstate):
    """gpu (backend="cupy", on the device) and ref (float64 NumPy, same weights) on the same problem."""
    y, s_n, ctx = gpu.forward(to_device(x, "cupy"), to_device(state, "cupy"), lengths)
    dx, dstate0 = gpu.backward(ctx, to_device(dy, "cupy"), to_device(dstate, "cupy"))
    y_ref, s_n_ref, ctx_ref = ref.forward(as64(x), as64(state), lengths)
    dx_ref, dstate0_ref = ref.backward(ctx_ref, as64(dy), as64(dstate))
    tol = TOL[dtype]
    for got, want in ((y, y_ref), (s_n, s_n_ref), (dx, dx_ref), (dstate0, dstate0_ref)):
        assert_close(got, want, **tol)
    for k in ref.grads:
        assert_close(gpu.grads[k], ref.grads[k], err_msg=k, **tol)


@needs_gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
@pytest.mark.parametrize("cell", CELLS)
def test_layer_matches_reference(cell, shape, dtype):
    T, B, I, H, L, bidirectional, ragged = SHAPES[shape]
    gpu = make_layer(cell, I, H, num_layers=L, bidirectional=bidirectional, dtype=dtype, backend="cupy", seed=0)
    ref = make_layer(cell, I, H, num_layers=L, bidirectional=bidirectional, dtype="float64", seed=0)
    ref.load_state_dict(gpu.state_dict())
    gpu.to("cuda")
    check_against_reference(gpu, ref, dtype, *random_problem(gpu, T, B, np.random.default_rng(1), ragged=ragged))


@needs_gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("act,out_act", [("tanh", "sigmoid"), ("relu", "identity"), ("sigmoid", "tanh")])
def test_jordan_matches_reference(act, out_act, dtype):
    T, B, I, H, O = 6, 5, 3, 33, 4
    kwargs = dict(nonlinearity=act, output_nonlinearity=out_act, seed=0)
    gpu = gpurnn.JordanRNN(I, H, O, dtype=dtype, backend="cupy", **kwargs)
    ref = gpurnn.JordanRNN(I, H, O, dtype="float64", **kwargs)
    ref.load_state_dict(gpu.state_dict())
    gpu.to("cuda")
    rng = np.random.default_rng(2)
    x, y0, dy, dy_n = (rng.standard_normal(s).astype(dtype) for s in ((T, B, I), (1, B, O), (T, B, O), (1, B, O)))
    check_against_reference(gpu, ref, dtype, x, y0, np.array([T, 1, 4, T, 2]), dy, dy_n)


def test_unknown_sweep_is_refused_before_any_work():
    with pytest.raises(ValueError, match="sweep"):
        cupy_raw.forward("lstm", None, None, None, None, None, True, sweep="persistent")
