"""The cupy backend's variants in its own CUDA C kernels (kernels/*.cu; without a GPU on the CPU harness): the zoneout
generator bit for bit against the reference's, the sweeps with every variant (t0 > 0, LN, zoneout, the projection,
dparams) against numpy_ref's, rows wider than a block (each thread several columns), CUDA graphs replayed with new
seeds and steps, and deliberately wrong LN and zoneout backward kernels failing the same comparison."""
import numpy as np
import pytest

from gpurnn.kernels import GATES, Zoneout, cuda_host, cupy_raw, graphs, numpy_ref
from test_cupy_backend import altered_source  # noqa: F401  (fixture)
from test_variants_reference import VARIANTS
from util import BACKENDS, device_of, layer_outputs, random_problem, to_device, to_numpy

pytestmark = pytest.mark.skipif("cupy" not in BACKENDS, reason="needs a CUDA GPU with CuPy, or GPURNN_CUDA_HOST=1")

TOL = {"float32": dict(rtol=3e-4, atol=3e-5), "float64": dict(rtol=1e-9, atol=1e-11)}

GENERATOR = r"""
// bits: (B, n) uint32, zoneout_bits(seed, t, b, j) of common.cuh; one thread per (b, j)
__global__ void bits_kernel(unsigned* bits, unsigned seed, unsigned t, int B, int n) {
    const Element e = element(B, n);
    if (e.inside) bits[e.b * n + e.j] = zoneout_bits(row_key(seed, t, (unsigned)e.b), (unsigned)e.j);
}
"""


@pytest.mark.skipif(not cuda_host.enabled(), reason="launches a test kernel through the CPU harness")
@pytest.mark.parametrize("seed,t", [(0, 0), (1, 7), (0xFFFFFFFF, 0xFFFFFFF0), (0x9E3779B9, 123456), (2 ** 31, 1)])
def test_generator_is_bit_identical_to_the_reference(seed, t):
    """Seeds and steps near 2^32, so every sum wraps somewhere: the kernel's uint32 arithmetic against the reference's
    uint64-and-mask one."""
    B, n = 5, 70
    module = cuda_host.RawModule(code=cupy_raw.header() + GENERATOR, options=cupy_raw.OPTIONS,
                                 name_expressions=["bits_kernel"])
    bits = np.zeros((B, n), np.uint32)
    grid, block = cupy_raw.geometry(B, n)
    module.get_function("bits_kernel")(grid, block, (bits, np.uint32(seed), np.uint32(t), np.int32(B), np.int32(n)))
    np.testing.assert_array_equal(bits, numpy_ref.zoneout_bits(seed, t, B, n).astype(np.uint32))


def sweep_problem(cell, dtype, T=4, B=3, I=5, H=6, P=None, rng=None):
    """Random inputs of one sweep of `cell` with every variant it takes (LN with gains away from 1, zoneout with
    both p, the LSTM's projection when P), as float64 NumPy arrays, and the kernel keyword arguments."""
    rng = np.random.default_rng(0) if rng is None else rng
    G, P = GATES[cell], P or H
    r = lambda *shape: rng.standard_normal(shape)  # noqa: E731
    state0 = (r(B, P), r(B, H)) if cell == "lstm" else (r(B, P),)
    ln = None
    if cell in ("lstm", "gru"):
        ln = (1 + 0.5 * r(G * H), 1 + 0.5 * r(G * H)) + ((1 + 0.5 * r(H), 0.5 * r(H)) if cell == "lstm" else ())
    args = dict(xw=r(T, B, G * H) * 2, w_hh=r(G * H, P) / np.sqrt(P), b_hh=r(G * H), state0=state0,
                lengths=np.array([T + 2, 1, T + 1][:B], np.int32), b_ih=r(G * H))
    variant = dict(t0=2, ln=ln, zoneout=Zoneout(0.3, 0.5 if cell == "lstm" else 0.0, 12345, 0xFFFFFFF0),
                   w_hr=r(P, H) / np.sqrt(H) if P != H else None)
    return args, variant, (r(T, B, P), tuple(r(*s.shape) for s in state0))


def cast(a, dtype, backend="cupy"):
    if a is None or isinstance(a, (int, Zoneout)):
        return a
    if isinstance(a, tuple):
        return tuple(cast(v, dtype, backend) for v in a)
    return to_device(a if a.dtype == np.int32 else a.astype(dtype), backend)


def run_sweep(K, cell, args, variant, grads, dtype, training=True):
    """Everything a forward and backward sweep of kernel module K give, as NumPy arrays by name."""
    dev = "cupy" if K is cupy_raw else "numpy"
    a = {k: cast(v, dtype, dev) for k, v in args.items()}
    kw = {k: cast(v, dtype, dev) for k, v in variant.items()}
    y, state_n, ctx = K.forward(cell, a["xw"], a["w_hh"], a["b_hh"], a["state0"], a["lengths"], training,
                                b_ih=a["b_ih"], **kw)
    out = {"y": y, **{f"state_n{k}": s for k, s in enumerate(state_n)}}
    if training:
        dparams = {}
        dgx, dgh, dstate0 = K.backward(ctx, cast(grads[0], dtype, dev), cast(grads[1], dtype, dev), dparams)
        out.update(dgx=dgx, dgh=dgh, **{f"dstate0{k}": s for k, s in enumerate(dstate0)},
                   **{f"d{k}": v for k, v in dparams.items()})
    return {k: to_numpy(v) for k, v in out.items()}


def assert_sweeps_match(got, want, dtype):
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        tol = TOL[dtype]
        np.testing.assert_allclose(got[k], w, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, float(np.abs(w).max())),
                                   err_msg=k)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cell,P", [("lstm", None), ("lstm", 4), ("gru", None), ("rnn_tanh", None),
                                    ("rnn_relu", None)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("with_ln", [True, False])
def test_sweep_with_every_variant_matches_the_reference(cell, P, dtype, training, with_ln):
    """t0 = 2 with lengths 1 (all padding), T + 1 and T + 2: validity and masks are those of kernel steps 2..5;
    dparams has exactly the reference's names."""
    args, variant, grads = sweep_problem(cell, dtype, P=P)
    if not with_ln:
        variant["ln"] = None
    want = run_sweep(numpy_ref, cell, args, variant, grads, "float64", training)
    assert_sweeps_match(run_sweep(cupy_raw, cell, args, variant, grads, dtype, training), want, dtype)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rows_wider_than_a_block(cell, monkeypatch):
    """32 threads per block: an LN row of H = 37 units is two columns for some threads (block reductions across
    warps' partial sums of several columns), a plain row two blocks along y."""
    monkeypatch.setattr(cupy_raw, "THREADS", 32)
    graphs.clear()
    for with_ln in (True, False):
        args, variant, grads = sweep_problem(cell, "float64", H=37, P=5 if cell == "lstm" else None)
        variant["ln"] = variant["ln"] if with_ln else None
        want = run_sweep(numpy_ref, cell, args, variant, grads, "float64")
        assert_sweeps_match(run_sweep(cupy_raw, cell, args, variant, grads, "float64"), want, "float64")
    graphs.clear()


def test_a_graph_replays_with_new_seeds_and_steps():
    """The seeds and t0 reach the kernels from the device, so the graph captured by the first call serves calls
    with other seeds and steps, and each gives its own masks."""
    graphs.clear()
    before = dict(graphs.stats)
    for seed_h, seed_c, t0 in ((1, 2, 0), (77, 5, 3), (0xFFFFFFFF, 9, 1)):
        args, variant, grads = sweep_problem("lstm", "float64", P=4)
        variant.update(t0=t0, zoneout=Zoneout(0.4, 0.6, seed_h, seed_c))
        want = run_sweep(numpy_ref, "lstm", args, variant, grads, "float64")
        assert_sweeps_match(run_sweep(cupy_raw, "lstm", args, variant, grads, "float64"), want, "float64")
    if graphs.ENABLED:
        assert graphs.stats["captured"] - before.get("captured", 0) == 2          # forward and backward, once
        assert graphs.stats["replayed"] - before.get("replayed", 0) == 4


def test_every_variant_kernel_is_a_compiled_name():
    """The instantiations the variants launch are in kernel_names(), which tests/test_cuda_compile.py compiles for
    sm_80 and sm_90 (NVRTC, nvcc)."""
    names = set(cupy_raw.kernel_names())
    for dtype in ("float32", "float64"):
        for ln in (False, True):
            assert set(cupy_raw.step_kernels("gru", dtype, ln)) <= names
            for proj in (False, True):
                assert set(cupy_raw.step_kernels("lstm", dtype, ln, proj)) <= names
        assert set(cupy_raw.variant_kernels(dtype)) <= names


def check_layer(name, hidden=3, dtype="float64"):
    """A variant layer (input size 3) on the cupy backend against the float64 reference: every output and
    gradient."""
    cls, options = VARIANTS[name]
    kwargs = dict(options, num_layers=1, bidirectional=True, seed=3, memory="checkpoint", segment_steps=2)
    ref = cls(3, hidden, dtype="float64", **kwargs)
    layer = cls(3, hidden, dtype=dtype, backend="cupy", **kwargs).to(device_of("cupy"))
    for p in ref.params.values():                 # gains away from 1, so a wrong gamma term cannot hide
        p += np.random.default_rng(4).uniform(-0.5, 0.5, p.shape)
    layer.load_state_dict(ref.state_dict())
    problem = random_problem(ref, T=5, B=3, rng=np.random.default_rng(1), ragged=True)
    want, got = layer_outputs(ref, *problem), layer_outputs(layer, *problem)
    assert_sweeps_match(got, want, dtype)


MUTATIONS = [
    # LN backward without its mean(dvhat vhat) term (the variance's share)
    ("lngru", "return rstd * (dvhat - sum_dvhat / T(n) - vhat * (sum_dvhat_vhat / T(n)));",
     "return rstd * (dvhat - sum_dvhat / T(n));"),
    # LN(c~)'s backward fed beta_c's gradient row instead of gamma_c's
    ("lnlstm", "gates(j, ln_backward(gamma_c[j] * du_t[i],", "gates(j, ln_backward(du_t[i],"),
    # the row statistics of a block from one warp only
    ("lnlstm", "for (int w = 0; w < warps; ++w) total += partial[k][w];", "total = partial[k][0];"),
    # zoneout's backward lets all of dh reach the cell (forgets 1 - k)
    ("lstm_zoneout", "return {(T(1) - k) * dh, k * dh};", "return {dh, k * dh};"),
]


@pytest.mark.parametrize("name,old,new", MUTATIONS)
def test_an_altered_variant_kernel_fails_the_comparison(name, old, new, altered_source, monkeypatch):  # noqa: F811
    hidden = 3
    if "warps" in old:      # two warps per block, both with entries of the 4H = 80 of a row
        hidden = 20
        monkeypatch.setattr(cupy_raw, "geometry", lambda rows, cols, whole_rows=False:
                            ((rows, 1 if whole_rows else -(-cols // 64)), (64,)))
        graphs.clear()                                    # no graph launches the old geometry
    check_layer(name, hidden)                             # the real kernels pass
    altered_source(old, new)
    with pytest.raises(AssertionError):
        check_layer(name, hidden)
