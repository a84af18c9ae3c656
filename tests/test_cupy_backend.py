"""backend="cupy" (the CUDA C kernels of kernels/*.cu) against the float64 NumPy reference: every cell, both dtypes,
stacked, bidirectional, ragged lengths; on a GPU through CuPy, without one through the CPU harness
(GPURNN_CUDA_HOST=1, set by conftest). A deliberately altered kernel must fail the same check, and every kernel
the module defines must be launched."""
import collections

import numpy as np
import pytest

import gpurnn
from gpurnn import backend
from gpurnn.kernels import ACTIVATIONS, CELLS, cuda_host, cupy_raw, graphs
from test_variants_reference import make as make_variant
from util import BACKENDS, device_of, layer_outputs, make_layer, random_problem, to_device, to_numpy

pytestmark = pytest.mark.skipif("cupy" not in BACKENDS, reason="needs a CUDA GPU with CuPy, or GPURNN_CUDA_HOST=1")

TOL = {"float64": dict(rtol=1e-9, atol=1e-10), "float32": dict(rtol=1e-4, atol=1e-5)}
JORDAN_ACTS = [(act, out_act) for act in ("tanh", "relu", "sigmoid") for out_act in ACTIVATIONS]


def as64(a):
    return tuple(v.astype(np.float64) for v in a) if isinstance(a, tuple) else a.astype(np.float64)


def assert_close(got, want, **tol):
    """got (backend arrays, or a tuple of them) against want (NumPy)."""
    if isinstance(want, tuple):
        for g, w in zip(got, want, strict=True):
            assert_close(g, w, **tol)
    else:
        np.testing.assert_allclose(to_numpy(got), want, **tol)


def check_against_reference(layer, ref, dtype, x, state, lengths, dy, dstate):
    """layer (backend="cupy") and ref (float64 NumPy, same weights) on the same problem: outputs, final states,
    input and state gradients, every parameter gradient."""
    y, s_n, ctx = layer.forward(to_device(x, "cupy"), to_device(state, "cupy"), lengths)
    dx, dstate0 = layer.backward(ctx, to_device(dy, "cupy"), to_device(dstate, "cupy"))
    y_ref, s_n_ref, ctx_ref = ref.forward(as64(x), as64(state), lengths)
    dx_ref, dstate0_ref = ref.backward(ctx_ref, as64(dy), as64(dstate))
    tol = TOL[dtype]
    for what, got, want in (("y", y, y_ref), ("state_n", s_n, s_n_ref), ("dx", dx, dx_ref),
                            ("dstate0", dstate0, dstate0_ref)):
        assert_close(got, want, err_msg=what, **tol)
    for k in ref.grads:
        assert_close(layer.grads[k], ref.grads[k], err_msg=k, **tol)


def layer_pair(cell, I, H, dtype, **kwargs):
    """The same layer (same parameters) on backend="cupy" in `dtype` and on the float64 reference."""
    layer = make_layer(cell, I, H, dtype=dtype, backend="cupy", seed=0, **kwargs)
    ref = make_layer(cell, I, H, dtype="float64", seed=0, **kwargs)
    ref.load_state_dict(layer.state_dict())
    return layer.to(device_of("cupy")), ref


def check_layer(cell, T, B, I, H, dtype, ragged, seed=1, **kwargs):
    layer, ref = layer_pair(cell, I, H, dtype, **kwargs)
    check_against_reference(layer, ref, dtype, *random_problem(layer, T, B, np.random.default_rng(seed), ragged))


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cell", CELLS)
def test_layer_matches_reference(cell, dtype, ragged, bidirectional, num_layers):
    check_layer(cell, 5, 3, 4, 33, dtype, ragged, num_layers=num_layers, bidirectional=bidirectional)


# T, B, input, hidden: one step of one unit; B*H = 2800 threads, so the per-step launches span 11 blocks of 256
EDGE_SHAPES = {"T1B1H1": (1, 1, 1, 1), "eleven_blocks": (3, 40, 5, 70)}


@pytest.mark.parametrize("shape", EDGE_SHAPES)
@pytest.mark.parametrize("cell", CELLS)
def test_edge_shapes_match_reference(cell, shape):
    check_layer(cell, *EDGE_SHAPES[shape], "float32", ragged=True, bidirectional=True)


def check_jordan(act, out_act, dtype):
    T, B, I, H, O = 6, 5, 3, 33, 4
    kwargs = dict(nonlinearity=act, output_nonlinearity=out_act, seed=0)
    layer = gpurnn.JordanRNN(I, H, O, dtype=dtype, backend="cupy", **kwargs)
    ref = gpurnn.JordanRNN(I, H, O, dtype="float64", **kwargs)
    ref.load_state_dict(layer.state_dict())
    layer.to(device_of("cupy"))
    rng = np.random.default_rng(2)
    x, y0, dy, dy_n = (rng.standard_normal(s).astype(dtype) for s in ((T, B, I), (1, B, O), (T, B, O), (1, B, O)))
    check_against_reference(layer, ref, dtype, x, y0, np.array([T, 1, 4, T, 2]), dy, dy_n)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("act,out_act", JORDAN_ACTS)
def test_jordan_matches_reference(act, out_act, dtype):
    check_jordan(act, out_act, dtype)


def clear_compiled():
    """Forget the compiled module, and the CUDA graphs captured with its kernels."""
    cupy_raw._kernel.cache_clear()
    cupy_raw._module.cache_clear()
    graphs.clear()


@pytest.fixture
def altered_source(monkeypatch):
    """alter(old, new): the cupy backend compiles its source with `old` replaced by `new` until the test ends."""
    def alter(old, new):
        source = cupy_raw.source()
        assert source.count(old) == 1, f"{old!r} is not in the kernels once"
        monkeypatch.setattr(cupy_raw, "source", lambda: source.replace(old, new))
        clear_compiled()
    yield alter
    monkeypatch.undo()
    clear_compiled()


def test_an_altered_kernel_fails_the_parity_check(altered_source):
    """The LSTM's cell-state carry dc_{t-1} = dc_t * f changed to dc_t * i: the check above must catch it."""
    check_layer("lstm", 4, 3, 2, 5, "float64", ragged=True)       # the real kernel passes
    altered_source("dc[i] = forget * dc_tilde + dcz.prev;", "dc[i] = in * dc_tilde + dcz.prev;")
    with pytest.raises(AssertionError):
        check_layer("lstm", 4, 3, 2, 5, "float64", ragged=True)


@pytest.mark.skipif(not backend.cuda_host(), reason="counts launches on the CPU harness")
def test_every_kernel_of_the_module_is_launched():
    """A representative run of each cell, variant, dtype and Jordan activation pair launches every name in
    kernel_names(): a kernel added to the module without a run here fails this test."""
    before = collections.Counter(cuda_host.launched)
    for dtype in ("float32", "float64"):
        for cell in CELLS:
            check_layer(cell, 2, 2, 2, 3, dtype, ragged=True)
        for name in ("lnlstm", "lngru", "lstm_proj", "lnlstm_all"):
            layer = make_variant(name, dtype=dtype, backend="cupy", seed=0).to(device_of("cupy"))
            layer_outputs(layer, *random_problem(layer, 2, 2, np.random.default_rng(0), ragged=True))
        for act, out_act in JORDAN_ACTS:
            check_jordan(act, out_act, dtype)
    ran = set(cuda_host.launched - before)
    assert set(cupy_raw.kernel_names()) <= ran, f"never launched: {sorted(set(cupy_raw.kernel_names()) - ran)}"


def test_backend_cupy_runs_where_the_layer_lives():
    layer = make_layer("gru", 2, 3, backend="cupy").to(device_of("cupy"))
    assert backend.resolve("cupy", layer.device) == "cupy"
    assert "cupy" in backend.available()


def test_unknown_sweep_is_refused_before_any_work():
    with pytest.raises(ValueError, match="sweep"):
        cupy_raw.forward("lstm", None, None, None, None, None, True, sweep="persistent")
