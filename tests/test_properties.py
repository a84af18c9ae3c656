"""Property-based checks (hypothesis) of every layer kind on every backend that runs here, against the float64
reference (kernels/numpy_ref.py through backend="numpy", dtype float64) and the reference against torch autograd.

Each test runs per kind (Elman tanh/relu/sigmoid, LSTM, GRU, Jordan), backend and dtype; hypothesis draws T, B,
I, H (1 and odd sizes included), layers, directions, batch_first, bias, ragged lengths, Jordan's activations, the
numba sweep (step or persistent), the numpy backend's workspace and the data's seed. Checked: the output, the
final state, dx, dstate0 and every parameter gradient; then the edge values: zeros and subnormals (match the
reference), huge inputs, biases and input weights (finite, match the reference up to what near-saturation leaves
undetermined, exact zero weight gradients and torch's values where every gate saturates), NaN and +-Inf in any
input, state, parameter or upstream gradient (checks on: NonFiniteError naming the array, nothing changed; checks
off: NaN and Inf reach the same elements as in the reference, and the reference's reach those of torch; two known
gaps are strict xfails at the end).

Deterministic (derandomize, no example database) and bounded: the numba simulator runs one Python thread per CUDA
thread, so it gets fewer and smaller examples than the CPU backends.
"""
import re
from dataclasses import dataclass, replace

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import gpurnn
from gpurnn.checks import NonFiniteError
from gpurnn.kernels import ACTIVATIONS
from util import CELLS, KERNEL_BACKENDS, device_of, layer_outputs, make_layer, on_layer_device, to_numpy

import torch_oracle

KINDS = CELLS + ("jordan",)
# backend -> the dtypes it is checked in (numpy's float64 IS the reference: checked against torch below)
DTYPES = {"numpy": ("float32",), "numba": ("float32", "float64"), "cupy": ("float32", "float64")}
EXAMPLES = {"numpy": 30, "cupy": 20, "numba": 6}          # per kind and dtype (edge tests: half)
# simulator: one block of at most 32 threads per launch does most of the work; keep B*H and T small
SIZES = {"numba": dict(max_T=3, max_B=3, max_I=3, hidden=range(1, 6), sweeps=("step", "persistent")),
         "numpy": dict(hidden=[*range(1, 10), 16, 33], workspaces=(False, True)),
         "cupy": dict(hidden=[*range(1, 10), 33, 70])}         # B*H = 280 > 256 threads: two blocks
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:overflow encountered")


def examples(backend, scale=1.0):
    """hypothesis settings for a backend: fixed examples (derandomized, no database), no deadline."""
    return settings(max_examples=max(1, int(EXAMPLES[backend] * scale)), deadline=None, derandomize=True,
                    database=None, suppress_health_check=list(HealthCheck))


@dataclass(frozen=True)
class Case:
    """One layer and problem: shapes, options, lengths (None: every sequence has T steps), the data's seed."""
    kind: str
    T: int
    B: int
    I: int
    H: int
    num_layers: int = 1
    bidirectional: bool = False
    batch_first: bool = False
    bias: bool = True
    O: int = 1                    # Jordan: output size and activations
    act: str = "tanh"
    out_act: str = "sigmoid"
    lengths: tuple = None
    seed: int = 0
    sweep: str = "auto"           # GPU backends: how a sweep runs (numba: "step" or "persistent")
    workspace: bool = False       # numpy backend: buffers reused across calls

    def layer(self, dtype, backend="numpy"):
        """The layer (seeded parameters) on `backend`'s device."""
        if self.kind == "jordan":
            layer = gpurnn.JordanRNN(self.I, self.H, self.O, nonlinearity=self.act, output_nonlinearity=self.out_act,
                                     dtype=dtype, backend=backend, seed=self.seed)
        else:
            layer = make_layer(self.kind, self.I, self.H, num_layers=self.num_layers, bias=self.bias,
                               bidirectional=self.bidirectional, batch_first=self.batch_first, dtype=dtype,
                               backend=backend, seed=self.seed)
            layer.sweep = self.sweep
            layer.workspace(self.workspace)
        return layer.to(device_of(backend))

    @property
    def state_parts(self):
        return 2 if self.kind == "lstm" else 1

    def shapes(self):
        """x, one state part, y shapes."""
        T, B = self.T, self.B
        if self.kind == "jordan":
            return (T, B, self.I), (1, B, self.O), (T, B, self.O)
        D, H = 2 if self.bidirectional else 1, self.H
        tb = (B, T) if self.batch_first else (T, B)
        return tb + (self.I,), (self.num_layers * D, B, H), tb + (D * H,)

    def problem(self, dtype):
        """{"x", "state", "lengths", "dy", "dstate"}: standard normal NumPy data in `dtype`, the states as lists
        of their parts (h, or h and c); lengths None or (B,) ints."""
        rng = np.random.default_rng(self.seed)
        xs, ss, ys = self.shapes()
        draw = lambda shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
        return dict(x=draw(xs), state=[draw(ss) for _ in range(self.state_parts)],
                    lengths=None if self.lengths is None else np.array(self.lengths), dy=draw(ys),
                    dstate=[draw(ss) for _ in range(self.state_parts)])

    def args(self, problem, dtype=None):
        """(x, state, lengths, dy, dstate) of a problem, as forward and backward take them, in `dtype` if given."""
        cast = (lambda a: a) if dtype is None else (lambda a: a.astype(dtype))
        pack = tuple if self.kind == "lstm" else (lambda parts: parts[0])
        p = {k: (pack([cast(a) for a in v]) if k in ("state", "dstate") else v if k == "lengths" else cast(v))
             for k, v in problem.items()}
        return p["x"], p["state"], p["lengths"], p["dy"], p["dstate"]


@st.composite
def cases(draw, kind, max_T=6, max_B=4, max_I=5, hidden=range(1, 10), max_layers=2, sweeps=("auto",),
          workspaces=(False,)):
    """A Case of `kind`; H from `hidden`."""
    T, B, I = draw(st.integers(1, max_T)), draw(st.integers(1, max_B)), draw(st.integers(1, max_I))
    H = draw(st.sampled_from(hidden))
    lengths = draw(st.none() | st.lists(st.integers(1, T), min_size=B, max_size=B).map(tuple))
    seed = draw(st.integers(0, 2 ** 16))
    if kind == "jordan":
        return Case(kind, T, B, I, H, O=draw(st.integers(1, 4)), act=draw(st.sampled_from(("tanh", "relu", "sigmoid"))),
                    out_act=draw(st.sampled_from(ACTIVATIONS)), lengths=lengths, seed=seed)
    return Case(kind, T, B, I, H, num_layers=draw(st.integers(1, max_layers)), bidirectional=draw(st.booleans()),
                batch_first=draw(st.booleans()), bias=draw(st.booleans()), lengths=lengths, seed=seed,
                sweep=draw(st.sampled_from(sweeps)), workspace=draw(st.sampled_from(workspaces)))


def reference_for(case, layer):
    """The float64 reference layer holding `layer`'s parameters (rounded to its dtype, then exactly float64)."""
    ref = case.layer("float64")
    ref.load_state_dict(layer.state_dict())
    return ref


def run_pair(case, layer, problem):
    """(the layer's outputs, the float64 reference's on the same parameters and data)."""
    ref = reference_for(case, layer)
    ref.check_finite = layer.check_finite
    return layer_outputs(layer, *case.args(problem)), layer_outputs(ref, *case.args(problem, "float64"))


def tolerance(case, dtype):
    """|got - want| <= tolerance * max(1, max|want|) for every array. A result passes through about T * layers
    dependent stages (steps, stacked layers), each a GEMM and a pointwise update that add a few ulp of the O(1)
    magnitudes involved (the data is standard normal; the floor 1 covers sums that cancel): 32 ulp per stage is
    several times the worst seen (about 5 ulp in all), far below what a wrong formula gives (O(1))."""
    return 32 * float(np.finfo(dtype).eps) * case.T * case.num_layers


def assert_outputs_close(got, want, tol, what=""):
    """Same names; each array within tol * max(1, max finite |want|), NaN and +-Inf exactly where `want` has them."""
    assert got.keys() == want.keys(), f"{what}names differ: {sorted(got)} vs {sorted(want)}"
    for name, w in want.items():
        finite = np.isfinite(w)
        scale = max(1.0, float(np.abs(w[finite]).max())) if finite.any() else 1.0
        np.testing.assert_allclose(got[name], w, rtol=0, atol=tol * scale, err_msg=f"{what}{name}")


BACKEND_DTYPES = [(b, dt) for b in KERNEL_BACKENDS for dt in DTYPES[b]]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_backend_matches_reference(kind, backend, dtype):
    @examples(backend)
    @given(case=cases(kind, **SIZES[backend]))
    def check(case):
        layer, problem = case.layer(dtype, backend), case.problem(dtype)
        if case.workspace:              # a first call leaves buffers for the second to reuse
            layer_outputs(layer, *case.args(problem))
        got, want = run_pair(case, layer, problem)
        assert_outputs_close(got, want, tolerance(case, dtype))
    check()


@pytest.mark.parametrize("kind", KINDS)
def test_reference_matches_torch(kind):
    """The oracle itself: numpy_ref in float64 against torch autograd on the same weights and data."""
    pytest.importorskip("torch")

    @examples("numpy", 0.5)
    @given(case=cases(kind, **SIZES["numpy"]))
    def check(case):
        layer = case.layer("float64")
        problem = case.args(case.problem("float64"))
        assert_outputs_close(layer_outputs(layer, *problem), torch_oracle.run(layer, *problem),
                             tolerance(case, "float64"))
    check()


FILLS = ("normal", "zero", "denormal")


def filled(a, how, rng):
    """`a` as drawn ("normal"), zeros, or subnormal numbers of either sign (k * the smallest subnormal, k < 2^20)."""
    if how == "zero":
        return np.zeros_like(a)
    if how == "denormal":
        tiny = np.finfo(a.dtype).smallest_subnormal
        return (rng.choice([-1, 1], a.shape) * rng.integers(1, 2 ** 20, a.shape) * tiny).astype(a.dtype)
    return a


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_zeros_and_denormals_match_reference(kind, backend, dtype):
    """x, the states, the weights and the biases each drawn normal, zero or subnormal: the results are finite and
    match the reference as normal data does (subnormal inputs neither trap nor turn into NaN or Inf)."""
    @examples(backend, 0.5)
    @given(case=cases(kind, **SIZES[backend]), fills=st.fixed_dictionaries({k: st.sampled_from(FILLS) for k in
                                                                            ("x", "state", "weight", "bias")}))
    def check(case, fills):
        rng = np.random.default_rng(case.seed + 1)
        layer = case.layer(dtype, backend)
        for name, p in layer.params.items():
            p[...] = layer.xp.asarray(filled(to_numpy(p), fills[name.split("_")[0]], rng))
        problem = case.problem(dtype)
        problem["x"] = filled(problem["x"], fills["x"], rng)
        problem["state"] = [filled(s, fills["state"], rng) for s in problem["state"]]
        got, want = run_pair(case, layer, problem)
        assert all(np.isfinite(g).all() for g in got.values())
        assert_outputs_close(got, want, tolerance(case, dtype))
    check()


SATURATING = ("rnn_tanh", "rnn_sigmoid", "lstm", "gru")
# near saturation a derivative written from the output, 1 - y^2 or y (1 - y), keeps only the digits of y that
# differ from the limit: compared relative to the largest value, float32 keeps the 5 digits issue 15 asks for and
# float64 (16 digits) at least 9
SATURATED_REL = {"float32": 1e-5, "float64": 1e-9}


@st.composite
def huge(draw):
    """(where, magnitude): x, every bias (bias_ih only, so b_ih + b_hh cannot cancel; Jordan: bias_h and bias_y) or
    the first layer's input weights scaled to 10^4..10^30, the rest standard normal. No product of two huge values
    arises, so nothing overflows float32 at these sizes."""
    return draw(st.sampled_from(("x", "bias", "weight_ih"))), 10.0 ** draw(st.floats(4, 30))


def make_huge(layer, problem, where, magnitude, rng):
    if where == "x":
        problem["x"] = (problem["x"] * magnitude).astype(problem["x"].dtype)
    for name, p in layer.params.items():
        if where == "bias" and name.startswith("bias") and not name.startswith("bias_hh"):
            p[...] = layer.xp.asarray(rng.choice([-magnitude, magnitude], p.shape).astype(p.dtype))
        elif where == "bias" and name.startswith("bias_hh"):
            p[...] = 0
        elif where == "weight_ih" and name in ("weight_ih", "weight_ih_l0", "weight_ih_l0_reverse"):
            p *= magnitude


def groups(names):
    """Outputs (y, h_n, c_n) and gradients (the rest)."""
    outputs = [k for k in names if k in ("y", "h_n", "c_n")]
    return outputs, [k for k in names if k not in outputs]


def assert_close_to_largest(got, want, rel, slack=None):
    """Each array of `got` within `rel` of the largest |value| of its group in `want`, plus slack[name] if given."""
    for group in groups(want):
        largest = max(float(np.abs(want[k]).max()) for k in group)
        for k in group:
            extra = 0.0 if slack is None else slack[k]
            np.testing.assert_allclose(got[k], want[k], rtol=0, atol=rel * largest + extra, err_msg=k)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_huge_values_saturate(kind, backend, dtype):
    """Huge x, biases or input weights, checks on: finite results. Against the float64 reference, within
    SATURATED_REL of the largest value of their group, plus 4 times torch's own error in the same dtype (a unit
    that is almost, not quite, saturated has a derivative 1 - y^2 that no float32 code knows to more than an ulp
    of y; torch's distance from the reference measures that). Where every pre-activation is huge (the biases) and
    every activation saturates: each weight gradient exactly 0, and everything within SATURATED_REL of the largest
    value of torch's."""
    pytest.importorskip("torch")

    @examples(backend, 0.5)
    @given(case=cases(kind, **SIZES[backend]), huge=huge())
    def check(case, huge):
        if huge[0] == "bias" and kind != "jordan":
            case = replace(case, bias=True)
        layer = case.layer(dtype, backend)
        problem = case.problem(dtype)
        make_huge(layer, problem, *huge, np.random.default_rng(case.seed + 1))
        ref = reference_for(case, layer)
        got = layer_outputs(layer, *case.args(problem))
        want = layer_outputs(ref, *case.args(problem, "float64"))
        theirs = torch_oracle.run(layer, *case.args(problem))
        assert all(np.isfinite(g).all() for g in got.values())
        torch_error = {k: float(np.abs(theirs[k] - want[k]).max()) for k in want}
        assert_close_to_largest(got, want, SATURATED_REL[dtype], {k: 4 * e for k, e in torch_error.items()})
        saturating = kind in SATURATING or kind == "jordan" and {case.act, case.out_act} <= {"tanh", "sigmoid"}
        if huge[0] == "bias":
            assert_close_to_largest(got, theirs, SATURATED_REL[dtype])
            if saturating:
                assert not any(got[k].any() for k in layer.params), "a saturated layer passed gradient to a weight"
    check()


NONFINITE = (np.nan, np.inf, -np.inf)


def targets(case, layer):
    """Where a NaN or Inf can come in: (what, part or parameter name)."""
    parts = range(case.state_parts)
    return [("x", None), ("dy", None)] + [(k, i) for k in ("state", "dstate") for i in parts] + \
        [("param", name) for name in layer.params]


def message_name(case, what, part):
    """How the error names the array."""
    if what == "param":
        return part
    if what in ("state", "dstate"):
        return f"{what}[{'hc'[part]}]" if case.state_parts == 2 else what
    return what


def inject(problem, layers, target, index, value):
    """Put `value` at flat `index` (modulo the size) of the target array: of `problem` (in place), or of the
    parameter in each of `layers`."""
    what, part = target
    if what == "param":
        for layer in layers:
            p = layer.params[part]
            p[np.unravel_index(index % p.size, p.shape)] = value
        return
    a = problem[what] if part is None else problem[what][part]
    a[np.unravel_index(index % a.size, a.shape)] = value


def snapshot(layer):
    return {k: (to_numpy(layer.params[k]).copy(), to_numpy(layer.grads[k]).copy()) for k in layer.params}


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_nonfinite_input_raises_naming_it(kind, backend, dtype):
    """Checks on: NaN or +-Inf in x, a state, a parameter (forward, training or not) or in dy, dstate (backward)
    raises NonFiniteError naming the array, and changes no parameter or gradient."""
    @examples(backend, 0.5)
    @given(case=cases(kind, **SIZES[backend]), value=st.sampled_from(NONFINITE), index=st.integers(0, 2 ** 16),
           data=st.data())
    def check(case, value, index, data):
        layer = case.layer(dtype, backend)
        problem = case.problem(dtype)
        target = data.draw(st.sampled_from(targets(case, layer)))
        inject(problem, [layer], target, index, value)
        x, state, lengths, dy, dstate = (on_layer_device(a, layer) for a in case.args(problem))
        before = snapshot(layer)
        raises = pytest.raises(NonFiniteError, match=f"^{re.escape(message_name(case, *target))} contains NaN or Inf")
        if target[0] in ("dy", "dstate"):
            _, _, ctx = layer.forward(x, state, lengths)
            with raises:
                layer.backward(ctx, dy, dstate)
        else:
            for training in (True, False):
                with raises:
                    layer.forward(x, state, lengths, training=training)
        for k, (p, g) in before.items():
            np.testing.assert_array_equal(to_numpy(layer.params[k]), p, err_msg=f"params[{k}] changed")
            np.testing.assert_array_equal(to_numpy(layer.grads[k]), g, err_msg=f"grads[{k}] changed")
    check()


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_unchecked_nonfinite_reaches_what_it_reaches_in_the_reference(kind, backend, dtype):
    """Checks off: NaN or +-Inf in x (padded steps too), a state, a parameter, dy or dstate flows through to the
    same elements of every output and gradient as in the float64 reference (NaN where NaN, Inf where Inf), and the
    finite rest matches as usual."""
    @examples(backend, 0.5)
    @given(case=cases(kind, **SIZES[backend]), value=st.sampled_from(NONFINITE), index=st.integers(0, 2 ** 16),
           data=st.data())
    def check(case, value, index, data):
        layer = case.layer(dtype, backend)
        ref = reference_for(case, layer)
        layer.check_finite = ref.check_finite = False
        problem = case.problem(dtype)
        target = data.draw(st.sampled_from(targets(case, layer)))
        inject(problem, [layer, ref], target, index, value)
        got = layer_outputs(layer, *case.args(problem))
        want = layer_outputs(ref, *case.args(problem, "float64"))
        assert_outputs_close(got, want, tolerance(case, dtype), f"{target} = {value}: ")
    check()


def assert_same_nonfinite(got, want, tol, what=""):
    """NaN or +-Inf (either) exactly where `want` has one, the finite rest within tol * max(1, max finite |want|)."""
    for name, w in want.items():
        finite = np.isfinite(w)
        np.testing.assert_array_equal(np.isfinite(got[name]), finite, err_msg=f"{what}{name}: where not finite")
        scale = max(1.0, float(np.abs(w[finite]).max())) if finite.any() else 1.0
        np.testing.assert_allclose(got[name][finite], w[finite], rtol=0, atol=tol * scale, err_msg=f"{what}{name}")


def at_padded_step(case, problem, target, index):
    """True when the target is x at a padded step, or weight_ih_l0 (whose dx at padded steps is 0 * NaN)."""
    if case.lengths is None or target[0] not in ("x", "param"):
        return False
    if target[0] == "param":
        return target[1].startswith("weight_ih_l0")
    t, b = np.unravel_index(index % problem["x"].size, problem["x"].shape)[:2]
    t, b = (b, t) if case.batch_first else (t, b)
    return t >= case.lengths[b]


@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru"])
def test_unchecked_nonfinite_reaches_what_it_reaches_in_torch(kind):
    """Checks off, the reference in float64: NaN or +-Inf in x, a state, a parameter, dy or dstate makes the same
    elements of every output and gradient non-finite as in torch.nn, and the finite rest matches. (NaN and Inf may
    trade places: torch's GRU forms dn = dh - z dh, the reference dh (1 - z); Inf - Inf is NaN, Inf * (1 - z) is
    Inf. Padded steps and relu: see the two tests below.)"""
    pytest.importorskip("torch")

    @examples("numpy", 0.5)
    @given(case=cases(kind, **SIZES["numpy"]), value=st.sampled_from(NONFINITE), index=st.integers(0, 2 ** 16),
           data=st.data())
    def check(case, value, index, data):
        layer = case.layer("float64")
        layer.check_finite = False
        problem = case.problem("float64")
        target = data.draw(st.sampled_from(targets(case, layer)))
        assume(not at_padded_step(case, problem, target, index))
        inject(problem, [layer], target, index, value)
        got = layer_outputs(layer, *case.args(problem))
        assert_same_nonfinite(got, torch_oracle.run(layer, *case.args(problem)), tolerance(case, "float64"),
                              f"{target} = {value}: ")
    check()


def reference_and_torch(case, poke):
    """The float64 reference's and torch's outputs, checks off, after poke(layer, problem)."""
    pytest.importorskip("torch")
    layer = case.layer("float64")
    layer.check_finite = False
    problem = case.problem("float64")
    poke(layer, problem)
    return layer_outputs(layer, *case.args(problem)), torch_oracle.run(layer, *case.args(problem))


@pytest.mark.xfail(strict=True, reason="known gap: the layer's GEMMs multiply padded steps' zero dgx by x, and "
                   "padded steps' zero dgx by W_ih (0 * NaN = NaN); torch never reads padded steps")
@pytest.mark.parametrize("where", ["x", "weight_ih_l0"])
def test_nonfinite_at_padded_steps_stays_there_like_torch(where):
    """NaN in x at a padded step leaves dW_ih finite; NaN in W_ih leaves dx 0 at padded steps (as in torch)."""
    case = Case("rnn_tanh", T=3, B=2, I=2, H=3, lengths=(3, 1))

    def poke(layer, problem):
        if where == "x":
            problem["x"][2, 1, 0] = np.nan
        else:
            layer.params["weight_ih_l0"][0, 0] = np.nan
    assert_same_nonfinite(*reference_and_torch(case, poke), tolerance(case, "float64"))


@pytest.mark.xfail(strict=True, reason="known gap: relu's backward multiplies by relu' = 0 at units that are off "
                   "(NaN * 0 = NaN); torch's threshold_backward selects 0 there")
def test_relu_off_units_stop_a_nonfinite_gradient_like_torch():
    """NaN in dy of the top layer: units of the layer below that are off pass 0 back, in torch."""
    case = Case("rnn_relu", T=1, B=1, I=1, H=1, num_layers=2, bias=False)

    def poke(layer, problem):
        layer.params["weight_hh_l1"][...] = 0
        layer.params["weight_ih_l1"][...] = 1.0
        problem["x"][...] = -np.sign(to_numpy(layer.params["weight_ih_l0"]))    # layer 0's unit is off
        problem["state"][0][...] = 0
        problem["dy"][...] = np.nan
    assert_same_nonfinite(*reference_and_torch(case, poke), tolerance(case, "float64"))
