"""The CuPy backend: the CUDA C kernels of ``kernels/*.cu`` between cuBLAS GEMMs, on CuPy arrays.

Interface and shapes: see ``kernels/__init__.py``; every sweep also takes ``math`` ("fp32" | "tf32" | "bf16", see
gemm.py) for its GEMMs. Every step of a sweep is one GEMM (cuBLAS GemmEx, prepared once per sweep: gemm.Matmul)
into a buffer of the sweep, then one fused pointwise launch (Jordan: two GEMMs, two launches) whose arguments are
built once per sweep; the input bias b_ih is added by the pointwise kernels. The whole time loop is captured into a
CUDA graph on its first call with a given shape and replayed after (graphs.py). Everything goes on CuPy's current
stream and nothing in a sweep waits for the device or reads device memory on the host. The .cu files are compiled
into one ``cupy.RawModule`` on first use, once per device, never at import; cupy itself is imported on first use.
With GPURNN_CUDA_HOST=1 the same code runs on NumPy arrays, its kernels compiled for the CPU (``cuda_host``,
``cupy_host``). ``sweep="auto"`` is the per-step sweep; this backend has no persistent (one-launch) sweep yet.

The variants (FEATURES) are template flags and arguments of the same step kernels: LN (LSTM, GRU) takes one block per
batch row, whose threads reduce the row statistics (block_sum in common.cuh) and own its columns; the projection
(LSTM) adds per step the GEMM hr = m @ W_hr.T and an h update launch (backward: the h update's backward and dm =
dh~ @ W_hr before the cell's launch, dW_hr one GEMM over all steps after the loop); zoneout draws its masks in the
kernels from the seeds. t0 and the seeds reach the kernels in a small device array (``zo``), so a captured graph
serves every call; LN's parameter gradients are column sums after the backward loop (column_sums), so dparams costs
no atomics and is deterministic.
"""
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import ACTIVATIONS, CELLS, GATES, LN_EPS, JordanCtx, gemm, graphs, zoneout_threshold

SOURCES = ("rnn.cu", "lstm.cu", "gru.cu", "jordan.cu")
HEADER = "common.cuh"
OPTIONS = ("--std=c++17",)
THREADS = 256
FLOAT_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
ACTIVATION_TYPES = {"tanh": "Tanh", "relu": "Relu", "sigmoid": "Sigmoid", "identity": "Identity"}
SWEEPS = ("auto", "step")
FEATURES = frozenset({"t0", "ln", "zoneout", "w_hr"})


def header():
    """common.cuh after the #defines of its float32 activations' constants, written from cpu_fused (their one
    definition) as exact hexadecimal float literals, and of LN's epsilon (kernels.LN_EPS, a double literal)."""
    from . import cpu_fused
    defines = [f"#define GPURNN_{name} ({float(getattr(cpu_fused, name)).hex()}f)"
               for name in cpu_fused.ACTIVATION_CONSTANTS] + [f"#define GPURNN_LN_EPS ({float(LN_EPS).hex()})"]
    return "\n".join(defines + [(Path(__file__).parent / HEADER).read_text()])


def source():
    """The module's CUDA C, one translation unit: header(), then the .cu files without their include of common.cuh."""
    here = Path(__file__).parent
    include = f'#include "{HEADER}"'
    return "\n".join([header()] + [(here / name).read_text().replace(include, "") for name in SOURCES])


def kernel_name(stem, dtype, *args):
    """The name expression of one instantiation, e.g. ``rnn_forward_step<float, Tanh>``,
    ``lstm_forward_step<float, true, false>``: args are activation names or bools (the variant flags)."""
    parts = [FLOAT_TYPES[np.dtype(dtype)]] + [("true" if a else "false") if isinstance(a, bool) else
                                              ACTIVATION_TYPES[a] for a in args]
    return f"{stem}<{', '.join(parts)}>"


def step_kernels(cell, dtype, ln=False, proj=False):
    """(forward, backward) name expressions of a cell's per-step kernels; ln (LSTM, GRU) and proj (LSTM) choose the
    variant's instantiation."""
    if cell.startswith("rnn_"):
        return tuple(kernel_name(f"rnn_{way}_step", dtype, cell[4:]) for way in ("forward", "backward"))
    flags = (ln, proj) if cell == "lstm" else (ln,)
    return tuple(kernel_name(f"{cell}_{way}_step", dtype, *flags) for way in ("forward", "backward"))


def variant_kernels(dtype):
    """Name expressions of the variants' own kernels: the LSTM projection's h update forward and backward, and the
    LN parameters' column sums."""
    return (kernel_name("lstm_project_step", dtype), kernel_name("lstm_project_backward", dtype),
            kernel_name("column_sums", dtype))


def jordan_kernels(act, out_act, dtype):
    """Name expressions of the Jordan kernels: hidden forward, output forward, output backward, hidden backward."""
    return (kernel_name("jordan_hidden_forward", dtype, act), kernel_name("jordan_output_forward", dtype, out_act),
            kernel_name("rnn_backward_step", dtype, out_act), kernel_name("jordan_hidden_backward", dtype, act))


def kernel_names():
    """Every instantiation in the module (cell x variant x direction x dtype, Jordan x activations): the one list of
    names."""
    names = []
    for dtype in FLOAT_TYPES:
        for cell in CELLS:
            for ln in (False, True) if cell in ("lstm", "gru") else (False,):
                for proj in (False, True) if cell == "lstm" else (False,):
                    names += step_kernels(cell, dtype, ln, proj)
        names += variant_kernels(dtype)
        for act in ("tanh", "relu", "sigmoid"):
            for out_act in ACTIVATIONS:
                names += jordan_kernels(act, out_act, dtype)
    return list(dict.fromkeys(names))


@functools.lru_cache(maxsize=None)
def _module(device_id):
    """The RawModule of every instantiation on one device; NVRTC compiles it on its first get_function."""
    cp = _cupy()
    with cp.cuda.Device(device_id):
        return cp.RawModule(code=source(), options=OPTIONS, name_expressions=kernel_names())


@functools.lru_cache(maxsize=None)
def _kernel(device_id, name):
    with _cupy().cuda.Device(device_id):
        return _module(device_id).get_function(name)


def _cupy():
    """cupy, or its NumPy stand-in under GPURNN_CUDA_HOST=1."""
    from .cuda_host import enabled
    if enabled():
        from . import cupy_host
        return cupy_host
    import cupy
    return cupy


def array_module():
    """The array module of this backend: cupy, or cupy_host under GPURNN_CUDA_HOST=1."""
    return _cupy()


def _kernels(*names):
    device_id = _cupy().cuda.Device().id
    return tuple(_kernel(device_id, name) for name in names)


def geometry(rows, cols, whole_rows=False):
    """(grid, block) of a launch over a (rows, cols) array (common.cuh's Element): blockIdx.x the row, a warp
    multiple of threads per block along the columns; `whole_rows`: one block per row (its LN statistics)."""
    threads = min(THREADS, -(-max(cols, 1) // 32) * 32)
    return (rows, 1 if whole_rows else -(-cols // threads)), (threads,)


def _launcher(kernel, rows, cols, whole_rows=False, tail=None):
    """launch(*args): `kernel` over a (rows, cols) array; its last arguments are `tail`, by default (rows, cols)."""
    grid, block = geometry(rows, cols, whole_rows)
    tail = (np.int32(rows), np.int32(cols)) if tail is None else tuple(np.int32(v) for v in tail)
    return lambda *args: kernel(grid, block, args + tail)


def _column_sums(kernel, a, w, sum_a, sum_aw):
    """launch(): sum_a (N,) = column sums of a (..., N), sum_aw of a * w (common.cuh's column_sums)."""
    cols = a.shape[-1]
    rows = a.size // cols
    args = (a, w, sum_a, sum_aw, np.int32(rows), np.int32(cols))
    return lambda: kernel((-(-cols // 32),), (32, 8), args)


def _float_type(a, name):
    if np.dtype(a.dtype) not in FLOAT_TYPES:
        raise TypeError(f"{name} must be float32 or float64 for the cupy backend, got {np.dtype(a.dtype).name}")
    return np.dtype(a.dtype)


def _check_sweep(sweep):
    if sweep not in SWEEPS:
        raise ValueError(f"sweep must be one of {', '.join(map(repr, SWEEPS))} for the cupy backend "
                         f"(a launch per step); got {sweep!r}")


PARAMS = ("bias_ih", "gamma_ih", "bias_hh", "gamma_hh", "beta_c", "gamma_c", "weight_hr")    # dparams' names
# LN's column sums per cell: (gradient rows, normalised rows, suffix): d_<bias of suffix> and d_gamma_<suffix>
SUMS = {"lstm": (("da", "vhat_ih", "ih"), ("da", "vhat_hh", "hh"), ("du", "chat", "c")),
        "gru": (("dgi", "vhat_ih", "ih"), ("dgg", "vhat_hh", "hh"))}
BIAS = {"ih": "bias_ih", "hh": "bias_hh", "c": "beta_c"}


@dataclass(frozen=True)
class Variant:
    """What fixes a sweep's kernels beyond the cell: LN, the projection, zoneout's mode (common.cuh's ZONEOUT_*)
    and its p (the blend's, in evaluation)."""
    ln: bool = False
    proj: bool = False
    zmode: int = 0
    p_h: float = 0.0
    p_c: float = 0.0


def variant_of(cell, training, ln, zoneout, w_hr):
    """The Variant of a sweep's arguments; ValueError for a variant the cell does not take."""
    if ln is not None and cell not in ("lstm", "gru"):
        raise ValueError(f"ln is for the LSTM and the GRU, not {cell!r}")
    if w_hr is not None and cell != "lstm":
        raise ValueError(f"w_hr is the LSTM's projection, not {cell!r}'s")
    names = ("gamma_ih", "gamma_hh") + (("gamma_c", "beta_c") if cell == "lstm" else ())
    if ln is not None and len(ln) != len(names):
        raise ValueError(f"ln for the {cell} must be ({', '.join(names)}), got {len(ln)} arrays")
    zmode = 0 if zoneout is None else 1 if training else 2
    return Variant(ln is not None, w_hr is not None, zmode, *((zoneout.p_h, zoneout.p_c) if zmode == 2 else (0, 0)))


def step_args(cp, t0, zoneout):
    """zo (5,) uint32 on the device: t0, seed_h, threshold_h, seed_c, threshold_c (common.cuh)."""
    if t0 < 0:
        raise ValueError(f"t0 must be >= 0, got {t0}")
    z = zoneout
    values = [t0] + ([z.seed_h, zoneout_threshold(z.p_h), z.seed_c, zoneout_threshold(z.p_c)] if z else [0] * 4)
    return cp.array(np.array(values, np.uint64).astype(np.uint32))


@dataclass
class SweepCtx:
    cell: str
    lengths: object     # (B,) int32
    w_hh: object        # (G*H, P)
    h0: object          # (B, P)
    y: object           # (T, B, P)
    gates: object       # (T, B, G*H) activated gates (Elman: None, y holds h)
    zo: object          # (5,) uint32 t0, zoneout's seeds and thresholds
    variant: Variant
    c0: object = None   # (B, H) LSTM
    c: object = None    # (T, B, H) LSTM cell state after each step
    hn: object = None   # (T, B, H) GRU gh_n
    h_prev: object = None   # (T, B, P) the state before each step: h0, y[0], ..., y[T-2] (one buffer with y)
    math: str = "fp32"
    saved: dict = None  # the variants' per-step arrays (forward_buffers), by name
    ln: tuple = None    # LN's parameters
    w_hr: object = None  # (P, H)


def saved_names(cell, v):
    """The variants' per-step arrays a forward saves for backward (forward_buffers)."""
    gated = cell in ("lstm", "gru")
    on = dict(htil=not gated and v.zmode, chat=cell == "lstm" and (v.ln or v.zmode), vhat_ih=v.ln, vhat_hh=v.ln,
              rstd=v.ln, m=v.proj)
    return tuple(name for name, used in on.items() if used)


def forward_buffers(cell, training, math, v, a):
    """What a forward sweep writes, shaped from its inputs `a`: hs (T+1, B, P) with hs[0] = h0 and y = hs[1:]; h (B,
    P) and c (B, H) state; gates (T, B, G*H) and per_step (T, B, H) (LSTM c_t, GRU gh_n); gh (B, G*H) the step's
    GEMM output; the variants' (None when off): htil (T, B, H) the Elman's h~ with zoneout; chat (T, B, H) the
    LSTM's c~ (normalised with LN) with LN or zoneout; vhat_ih, vhat_hh (T, B, G*H), rstd (T, B, 3 | 2) with LN;
    m (T, B, H) and hr (B, P) with the projection; one step of each in inference; spare (1,) for a kernel's unused
    outputs; the bf16 operand copies (None unless math is "bf16")."""
    cp = _cupy()
    T, B, GH = a["xw"].shape
    P, dtype = a["w_hh"].shape[1], a["xw"].dtype
    H = GH // GATES[cell]
    n = T if training else 1                            # inference overwrites one step's scratch
    gated = cell in ("lstm", "gru")
    per = lambda width, on=True: cp.empty((n, B, width), dtype) if on else None  # noqa: E731
    h = cp.empty((B, P), dtype)
    on = saved_names(cell, v)
    width = dict(htil=H, chat=H, vhat_ih=GH, vhat_hh=GH, rstd=3 if cell == "lstm" else 2, m=H)
    saved = {name: per(w, name in on) for name, w in width.items()}
    m = saved["m"]
    return dict(hs=cp.empty((T + 1, B, P), dtype), h=h, c=cp.empty((B, H), dtype) if cell == "lstm" else None,
                gates=per(GH, gated), per_step=per(H, gated), gh=cp.empty((B, GH), dtype), **saved,
                hr=cp.empty((B, P), dtype) if v.proj else None, spare=cp.empty((1,), dtype),
                h_low=gemm.Operand.buffer(cp, h, math), w_low=gemm.Operand.buffer(cp, a["w_hh"].T, math),
                m_low=gemm.Operand.buffer(cp, m[0], math) if v.proj else None,
                hr_low=gemm.Operand.buffer(cp, a["w_hr"].T, math) if v.proj else None)


def step_forward(cell, training, math, v, a):
    """The forward sweep on the arrays `a` (inputs + forward_buffers): per step the GEMM gh = h @ W_hh.T and one
    pointwise launch (projection: then the GEMM hr = m @ W_hr.T and its h update). Allocates nothing and reads
    nothing on the host: capturable."""
    cp = _cupy()
    T, (B, P) = a["hs"].shape[0] - 1, a["h"].shape
    GH = a["gh"].shape[1]
    H = GH // GATES[cell]
    dtype = np.dtype(a["hs"].dtype)
    kernel = _kernels(step_kernels(cell, dtype, v.ln, v.proj)[0])[0]
    launch = _launcher(kernel, B, H, v.ln, (B, H, P) if cell == "lstm" else (B, H))
    cp.copyto(a["h"], a["h0"])
    cp.copyto(a["hs"][0], a["h0"])
    if cell == "lstm":
        cp.copyto(a["c"], a["c0"])
    w = gemm.constant(cp, a["w_hh"].T, math, a["w_low"])
    h = gemm.Operand(cp, a["h"], math, a["h_low"])
    product = gemm.Matmul(cp, h, w, a["gh"], math)
    if v.proj:
        project = _launcher(_kernels(variant_kernels(dtype)[0])[0], B, P)
        w_hr = gemm.constant(cp, a["w_hr"].T, math, a["hr_low"])
        projections = gemm.per_step(cp, T, a["m"], w_hr, a["hr"], math, a["m_low"])
    y, xw, spare, zo = a["hs"][1:], a["xw"], a["spare"], a["zo"]
    zoneout = (np.int32(v.zmode), dtype.type(v.p_h)) + ((dtype.type(v.p_c),) if cell == "lstm" else ())
    gains = tuple(a.get(k, a["b_hh"]) for k in ("gamma_ih", "gamma_hh", "gamma_c", "beta_c"))
    head = (a["gh"], a["b_hh"], a["b_ih"])
    saved = lambda name, s: spare if a[name] is None else a[name][s]  # noqa: E731
    steps = []                                           # each step's arguments, built before the loop
    for t in range(T):
        s, tail = (t if training else 0), (a["lengths"], zo, np.int32(t), *zoneout)
        ln_out = (saved("vhat_ih", s), saved("vhat_hh", s), saved("rstd", s))
        if cell == "lstm":
            c_t = a["per_step"][s]
            chat = c_t if a["chat"] is None else a["chat"][s]
            steps.append((xw[t], *head, *gains, a["h"], a["c"], y[t], a["gates"][s], c_t, chat, *ln_out,
                          saved("m", s), *tail))
        elif cell == "gru":
            steps.append((xw[t], *head, *gains[:2], a["h"], y[t], a["gates"][s], a["per_step"][s], *ln_out, *tail))
        else:
            steps.append((xw[t], *head, a["h"], y[t], y[t] if a["htil"] is None else a["htil"][s], *tail))
    for t, args in enumerate(steps):
        h.update()
        product()
        launch(*args)
        if v.proj:
            projections[t]()
            project(a["hr"], a["h"], y[t], a["lengths"], zo, np.int32(t), *zoneout[:2])


def forward(cell, xw, w_hh, b_hh, state0, lengths, training=True, sweep="auto", b_ih=None, math="fp32", *, t0=0,
            ln=None, zoneout=None, w_hr=None):
    _check_sweep(sweep)
    cp = _cupy()
    dtype = _float_type(xw, "xw")
    v = variant_of(cell, training, ln, zoneout, w_hr)
    T, B, GH = xw.shape
    H, P = GH // GATES[cell], w_hh.shape[1]
    inputs = dict(xw=xw, w_hh=w_hh, b_hh=b_hh, b_ih=cp.zeros(b_hh.shape, dtype) if b_ih is None else b_ih,
                  lengths=lengths, h0=state0[0])
    if cell == "lstm":
        inputs["c0"] = state0[1]
    if ln is not None:
        inputs.update(zip(("gamma_ih", "gamma_hh", "gamma_c", "beta_c"), ln))
    if w_hr is not None:
        inputs["w_hr"] = w_hr
    inputs = {k: cp.ascontiguousarray(a, dtype=np.int32 if k == "lengths" else dtype) for k, a in inputs.items()}
    inputs["zo"] = step_args(cp, t0, zoneout)
    saved = saved_names(cell, v)
    keep = ("hs", "h") + (("c",) if cell == "lstm" else ()) + \
        ((("gates", "per_step") if cell in ("lstm", "gru") else ()) + saved if training else ())
    key = ("cupy", "forward", cell, T, B, H, P, dtype.str, training, math, v, cp.cuda.Device().id)
    out = graphs.run(cp, key, inputs, functools.partial(forward_buffers, cell, training, math, v),
                     functools.partial(step_forward, cell, training, math, v), keep)
    y = out["hs"][1:]
    state_n = (out["h"], out["c"]) if cell == "lstm" else (out["h"],)
    if not training:
        return y, state_n, None
    per_step = out.get("per_step")
    ctx = SweepCtx(cell, inputs["lengths"], inputs["w_hh"], inputs["h0"], y, out.get("gates"), inputs["zo"], v,
                   c0=inputs.get("c0"), c=per_step if cell == "lstm" else None,
                   hn=per_step if cell == "gru" else None, h_prev=out["hs"][:-1], math=math,
                   saved={k: out[k] for k in saved},
                   ln=tuple(inputs[k] for k in ("gamma_ih", "gamma_hh", "gamma_c", "beta_c") if k in inputs) or None,
                   w_hr=inputs.get("w_hr"))
    return y, state_n, ctx


def backward_buffers(cell, math, v, a):
    """dgx (T, B, G*H): every row written (0 at padded steps), no fill; dgh (GRU or LN; else dgx); dh (B, P), dc
    (B, H) carried gradients; dhh (B, P) the step's GEMM output; with LN the pre-LN gradient rows (LSTM da (T, B,
    G*H) and du (T, B, H); GRU dgi, dgg (T, B, G*H)) and the parameters' sums (bias_ih ... beta_c); with the
    projection dhtil (T, B, P) dL/dh~, dm (B, H) and weight_hr (P, H); spare (1,); the bf16 operand copies."""
    cp = _cupy()
    T, B, P = a["y"].shape
    GH, dtype = a["w_hh"].shape[0], a["y"].dtype
    H = GH // GATES[cell]
    dgx = cp.empty((T, B, GH), dtype)
    lstm_ln, gru_ln = v.ln and cell == "lstm", v.ln and cell == "gru"
    empty = lambda shape, on=True: cp.empty(shape, dtype) if on else None  # noqa: E731
    dhtil = empty((T, B, P), v.proj)
    out = dict(dgx=dgx, dgh=cp.empty_like(dgx) if cell == "gru" or v.ln else dgx, dh=cp.empty((B, P), dtype),
               dc=empty((B, H), cell == "lstm"), dhh=cp.empty((B, P), dtype), da=empty((T, B, GH), lstm_ln),
               du=empty((T, B, H), lstm_ln), dgi=empty((T, B, GH), gru_ln), dgg=empty((T, B, GH), gru_ln),
               dhtil=dhtil, dm=empty((B, H), v.proj), spare=cp.empty((1,), dtype),
               g_low=gemm.Operand.buffer(cp, dgx[0], math), w_low=gemm.Operand.buffer(cp, a["w_hh"], math),
               dhtil_low=gemm.Operand.buffer(cp, dhtil[0], math) if v.proj else None,
               hr_low=gemm.Operand.buffer(cp, a["w_hr"], math) if v.proj else None)
    for name in PARAMS:
        size = (P, H) if name == "weight_hr" else (H,) if name.endswith("_c") else (GH,)
        out["d_" + name] = empty(size, v.proj if name == "weight_hr" else lstm_ln if name.endswith("_c") else v.ln)
    return out


def step_backward(cell, math, v, a):
    """The backward sweep on the arrays `a`: per step, t = T-1..0, (projection: the h update's backward and the GEMM
    dm = dh~_t @ W_hr,) one pointwise launch, then the GEMM dgh_t @ W_hh into dhh (t = 0: added into dh, which then
    holds dL/dh0). Then the LN parameters' column sums and dW_hr = dh~^T m over all T*B rows. Capturable."""
    cp = _cupy()
    T, B, P = a["y"].shape
    GH = a["w_hh"].shape[0]
    H = GH // GATES[cell]
    dtype = np.dtype(a["y"].dtype)
    kernel = _kernels(step_kernels(cell, dtype, v.ln, v.proj)[1])[0]
    launch = _launcher(kernel, B, H, v.ln, (B, H, P) if cell == "lstm" else (B, H))
    _, project, sums = _kernels(*variant_kernels(dtype))
    cp.copyto(a["dh"], a["dh_n"])
    if cell == "lstm":
        cp.copyto(a["dc"], a["dc_n"])
    cp.copyto(a["dhh"], 0)                               # no step after T-1
    w = gemm.constant(cp, a["w_hh"], math, a["w_low"])
    products = gemm.per_step(cp, T, a["dgh"], w, a["dhh"], math, a["g_low"], into=a["dh"])
    if v.proj:
        project = _launcher(project, B, P)
        w_hr = gemm.constant(cp, a["w_hr"], math, a["hr_low"])
        to_m = gemm.per_step(cp, T, a["dhtil"], w_hr, a["dm"], math, a["dhtil_low"])
        rows = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
        d_w_hr = gemm.Matmul(cp, rows(a["dhtil"]).T, rows(a["m"]), a["d_weight_hr"], math)
    dy, y, dgx, dgh, spare, zo = a["dy"], a["y"], a["dgx"], a["dgh"], a["spare"], a["zo"]
    gains = tuple(a.get(k, a["dh_n"]) for k in ("gamma_ih", "gamma_hh", "gamma_c", "beta_c"))
    per = lambda name, t: spare if a.get(name) is None else a[name][t]  # noqa: E731
    steps = []
    for t in range(T):
        tail = (a["lengths"], zo, np.int32(t), np.int32(v.zmode))
        ln_in = (per("vhat_ih", t), per("vhat_hh", t), per("rstd", t))
        if cell == "lstm":
            c_prev = a["c"][t - 1] if t > 0 else a["c0"]
            chat = a["c"][t] if a.get("chat") is None else a["chat"][t]
            steps.append((dy[t], a["gates"][t], c_prev, chat, *gains, *ln_in, a["dm"] if v.proj else spare,
                          a["dhh"], a["dh"], a["dc"], dgx[t], dgh[t], per("da", t), per("du", t), *tail))
        elif cell == "gru":
            h_prev = y[t - 1] if t > 0 else a["h0"]
            dgi, dgg = (dgx[t], dgh[t]) if a["dgi"] is None else (a["dgi"][t], a["dgg"][t])
            steps.append((dy[t], a["gates"][t], a["hn"][t], h_prev, *gains[:2], *ln_in, a["dhh"], a["dh"], dgx[t],
                          dgh[t], dgi, dgg, *tail))
        else:
            steps.append((dy[t], y[t] if a.get("htil") is None else a["htil"][t], a["dhh"], a["dh"], dgx[t], *tail))
    for t in range(T - 1, -1, -1):
        if v.proj:
            project(dy[t], a["dhh"], a["dh"], a["dhtil"][t], a["lengths"], zo, np.int32(t), np.int32(v.zmode))
            to_m[t]()
        launch(*steps[t])
        products[t]()
    for a_name, w_name, suffix in SUMS[cell] if v.ln else ():
        _column_sums(sums, a[a_name], a[w_name], a["d_" + BIAS[suffix]], a["d_gamma_" + suffix])()
    if v.proj:
        for operand in d_w_hr.operands:             # bf16: the copies of dhtil and m, converted now
            operand.update()
        d_w_hr()


def backward(ctx, dy, dstate_n, dparams=None):
    cp = _cupy()
    cell, v = ctx.cell, ctx.variant
    T, B, P = ctx.y.shape
    dtype = np.dtype(ctx.y.dtype)
    inputs = dict(dy=dy, y=ctx.y, h0=ctx.h0, lengths=ctx.lengths, w_hh=ctx.w_hh, dh_n=dstate_n[0])
    inputs.update({"lstm": dict(gates=ctx.gates, c=ctx.c, c0=ctx.c0, dc_n=dstate_n[-1]),
                   "gru": dict(gates=ctx.gates, hn=ctx.hn)}.get(cell, {}))
    inputs.update(ctx.saved)
    if ctx.ln is not None:
        inputs.update(zip(("gamma_ih", "gamma_hh", "gamma_c", "beta_c"), ctx.ln))
    if ctx.w_hr is not None:
        inputs["w_hr"] = ctx.w_hr
    inputs = {k: cp.ascontiguousarray(a, dtype=np.int32 if k == "lengths" else dtype) for k, a in inputs.items()}
    inputs["zo"] = ctx.zo
    params = [name for name in PARAMS if (v.proj if name == "weight_hr" else
                                          v.ln and (cell == "lstm" or not name.endswith("_c")))]
    keep = ("dgx", "dh") + (("dgh",) if cell == "gru" or v.ln else ()) + (("dc",) if cell == "lstm" else ()) + \
        tuple("d_" + name for name in params)
    key = ("cupy", "backward", cell, T, B, P, dtype.str, ctx.math, v, cp.cuda.Device().id)
    out = graphs.run(cp, key, inputs, functools.partial(backward_buffers, cell, ctx.math, v),
                     functools.partial(step_backward, cell, ctx.math, v), keep)
    if dparams is not None:
        dparams.update({name: out["d_" + name] for name in params})
    dgx = out["dgx"]
    dgh = out.get("dgh", dgx)
    return dgx, dgh, ((out["dh"], out["dc"]) if cell == "lstm" else (out["dh"],))


def jordan_buffers(training, math, a):
    """hs (T, B, H) (one step of scratch in inference), y (T, B, O), state (B, O) y_{t-1}, gy (B, H) and py (B, O)
    the GEMM outputs, the bf16 operand copies."""
    cp = _cupy()
    T, B, H = a["xw"].shape
    O, dtype = a["w_hy"].shape[0], a["xw"].dtype
    hs, state = cp.empty((T if training else 1, B, H), dtype), cp.empty((B, O), dtype)
    low = functools.partial(gemm.Operand.buffer, cp, math=math)
    return dict(hs=hs, y=cp.empty((T, B, O), dtype), state=state, gy=cp.empty((B, H), dtype),
                py=cp.empty((B, O), dtype), s_low=low(state), h_low=low(hs[0]), yh_low=low(a["w_yh"].T),
                hy_low=low(a["w_hy"].T))


def step_jordan_forward(act, out_act, training, math, a):
    """Per step: GEMM y_{t-1} @ W_yh.T, hidden launch, GEMM h_t @ W_hy.T, output launch. Capturable."""
    cp = _cupy()
    T, B, H = a["xw"].shape
    O = a["y"].shape[2]
    hidden, output = _kernels(*jordan_kernels(act, out_act, np.dtype(a["y"].dtype))[:2])
    hidden, output = _launcher(hidden, B, H), _launcher(output, B, O)
    cp.copyto(a["state"], a["y0"])
    w_yh, w_hy = (gemm.constant(cp, a[k].T, math, a[low]) for k, low in (("w_yh", "yh_low"), ("w_hy", "hy_low")))
    state = gemm.Operand(cp, a["state"], math, a["s_low"])
    recurrent = gemm.Matmul(cp, state, w_yh, a["gy"], math)
    outputs = gemm.per_step(cp, T, a["hs"], w_hy, a["py"], math, a["h_low"])    # inference: one row of hs
    hs = a["hs"]
    for t in range(T):
        tt = np.int32(t)
        state.update()
        recurrent()
        hidden(a["xw"][t], a["gy"], hs[t % hs.shape[0]], a["lengths"], tt)
        outputs[t]()
        output(a["py"], a["b_y"], a["state"], a["y"][t], a["lengths"], tt)


def jordan_forward(xw, w_yh, w_hy, b_y, y0, lengths, act, out_act, training=True, math="fp32"):
    cp = _cupy()
    dtype = _float_type(xw, "xw")
    T, B, H = xw.shape
    O = w_hy.shape[0]
    inputs = {k: cp.ascontiguousarray(v, dtype=np.int32 if k == "lengths" else dtype)
              for k, v in dict(xw=xw, w_yh=w_yh, w_hy=w_hy, b_y=b_y, lengths=lengths, y0=y0).items()}
    key = ("cupy", "jordan_forward", act, out_act, T, B, H, O, dtype.str, training, math, cp.cuda.Device().id)
    out = graphs.run(cp, key, inputs, functools.partial(jordan_buffers, training, math),
                     functools.partial(step_jordan_forward, act, out_act, training, math), ("hs", "y", "state"))
    if not training:
        return out["y"], out["state"], None
    ctx = JordanCtx(inputs["lengths"], w_yh, w_hy, act, out_act, inputs["y0"], out["hs"], out["y"])
    ctx.math = math
    return out["y"], out["state"], ctx


def jordan_backward_buffers(math, a):
    """dph (T, B, H), dpy (T, B, O): every row written; dstate (B, O) dL/dy_{t} carried (dL/dy0 at the end); dyh
    (B, O) dph_{t+1} @ W_yh; zo (5,) the Elman backward's step arguments (t0 = 0, no zoneout); the bf16 operand
    copies."""
    cp = _cupy()
    T, B, O = a["y"].shape
    H, dtype = a["h"].shape[2], a["y"].dtype
    dph, dpy = cp.empty((T, B, H), dtype), cp.empty((T, B, O), dtype)
    low = functools.partial(gemm.Operand.buffer, cp, math=math)
    return dict(dph=dph, dpy=dpy, dstate=cp.empty((B, O), dtype), dyh=cp.empty((B, O), dtype),
                zo=cp.zeros((5,), np.uint32),
                ph_low=low(dph[0]), py_low=low(dpy[0]), yh_low=low(a["w_yh"]), hy_low=low(a["w_hy"]))


def step_jordan_backward(act, out_act, math, a):
    """Per step, t = T-1..0: output launch (dpy_t), GEMM dpy_t @ W_hy into dph_t, hidden launch (dph_t in place),
    GEMM dph_t @ W_yh (t = 0: added into dstate, which then holds dL/dy0). Capturable."""
    cp = _cupy()
    T, B, O = a["y"].shape
    H = a["h"].shape[2]
    output, hidden = _kernels(*jordan_kernels(act, out_act, np.dtype(a["y"].dtype))[2:])
    output, hidden = _launcher(output, B, O), _launcher(hidden, B, H)
    cp.copyto(a["dstate"], a["dy_n"])
    cp.copyto(a["dyh"], 0)
    w_yh, w_hy = (gemm.constant(cp, a[k], math, a[low]) for k, low in (("w_yh", "yh_low"), ("w_hy", "hy_low")))
    to_hidden = gemm.per_step(cp, T, a["dpy"], w_hy, a["dph"], math, a["py_low"])
    to_state = gemm.per_step(cp, T, a["dph"], w_yh, a["dyh"], math, a["ph_low"], into=a["dstate"])
    for t in range(T - 1, -1, -1):
        output(a["dy"][t], a["y"][t], a["dyh"], a["dstate"], a["dpy"][t], a["lengths"], a["zo"], np.int32(t),
               np.int32(0))
        to_hidden[t]()
        hidden(a["dph"][t], a["h"][t])
        to_state[t]()


def jordan_backward(ctx, dy, dy_n):
    cp = _cupy()
    T, B, O = ctx.y.shape
    H = ctx.h.shape[2]
    dtype = np.dtype(ctx.y.dtype)
    math = getattr(ctx, "math", "fp32")
    inputs = {k: cp.ascontiguousarray(v, dtype=np.int32 if k == "lengths" else dtype)
              for k, v in dict(dy=dy, y=ctx.y, h=ctx.h, lengths=ctx.lengths, w_yh=ctx.w_yh, w_hy=ctx.w_hy,
                               dy_n=dy_n).items()}
    key = ("cupy", "jordan_backward", ctx.act, ctx.out_act, T, B, H, O, dtype.str, math, cp.cuda.Device().id)
    out = graphs.run(cp, key, inputs, functools.partial(jordan_backward_buffers, math),
                     functools.partial(step_jordan_backward, ctx.act, ctx.out_act, math), ("dph", "dpy", "dstate"))
    return out["dph"], out["dpy"], out["dstate"]
