"""The numba backend's sweeps with variants (ln, zoneout, w_hr; kernels/__init__.py), driven from the host.

Per step only (the persistent kernels have none of them: numba_plan sends such sweeps here and refuses an explicit
sweep="persistent"), on the same machinery as numba_cuda's per-step sweeps: the recurrent GEMM (gemm.Matmul, in the
layer's precision) into a (B, G*H) buffer, then ONE row kernel (numba_variant_kernels: LN statistics, gates, zoneout
and the state update, one block per batch row); with a projection, then the GEMM m W_hr^T and one element kernel
for h. Backward mirrors it: [projection kernel, GEMM dh~ W_hr,] row kernel, GEMM dG_s W_hh. Every launch's
arguments are built once per sweep and the loop runs as a CUDA graph (graphs.py); the per-call numbers (t0 and the
zoneout seeds) travel in a small device array (`keys`), an input of the graph, so a replay uses each call's seeds.
Parameter gradients (dparams) are summed per batch row inside the row kernel and over the rows after the sweep
(ln); dW_hr is one GEMM over all steps after it.
"""
import functools
from dataclasses import dataclass

import numpy as np

from . import GATES, Zoneout, gemm, graphs, numba_cuda as host, numba_plan, zoneout_threshold
from .numba_cuda_kernels import ACT_CODES, CELL_CODES
from .numba_variant_kernels import ROW, build, shared_bytes

LN_NAMES = {"lstm": ("gamma_ih", "gamma_hh", "gamma_c", "beta_c"), "gru": ("gamma_ih", "gamma_hh")}
ACC_NAMES = ("gamma_ih", "gamma_hh", "bias_ih", "bias_hh", "gamma_c", "beta_c")     # rows of the (6, B, G*H) sums
MASK32 = 0xFFFFFFFF


def used(ln, zoneout, w_hr):
    """Names of the variants a sweep uses, of those only this module runs."""
    return tuple(name for name, v in (("ln", ln), ("zoneout", zoneout), ("w_hr", w_hr)) if v is not None)


def keys_array(xp, t0, zoneout):
    """(5,) int64 on the device: t0, seed_h, threshold_h, seed_c, threshold_c (numba_variant_kernels)."""
    z = zoneout or Zoneout(0.0)
    host = [t0, z.seed_h & MASK32, zoneout_threshold(z.p_h), z.seed_c & MASK32, zoneout_threshold(z.p_c)]
    return xp.array(np.array(host, np.int64))


@dataclass
class VariantCtx:
    cell: str
    flags: tuple           # (ln, zoneout, proj) on
    plan: object           # numba_plan.Plan ("step")
    lengths: object        # (B,) int32, shifted by t0
    w_hh: object           # (G*H, P)
    h0: object             # (B, P)
    y: object              # (T, B, P)
    h_prev: object         # (T, B, P) h0, y[0], ..., y[T-2] (one buffer with y)
    saved: dict            # gates, c0, cs, hns, keys, the LN gains and rows (vhat_ih, vhat_hh, stats), w_hr, m
    math: str = "fp32"

    @property
    def gates_are_y(self):
        """The Elman's gates are its outputs (one buffer)."""
        return self.cell not in ("lstm", "gru")

    @property
    def sweep(self):
        return self.plan.sweep


def forward(cell, xw, w_hh, b_hh, state0, lengths, training, b_ih, t0, ln, zoneout, w_hr, sweep, math):
    """numba_cuda.forward for a sweep with variants; `lengths` already shifted by t0."""
    xp = host.array_module()
    T, B, GH = xw.shape
    H, P, F = GH // GATES[cell], w_hh.shape[1], xw.dtype.type
    flags = (ln is not None, zoneout is not None, w_hr is not None)
    lstm = cell == "lstm"
    with host.on_device_of(xw):
        plan = numba_plan.plan(sweep, B, H, GATES[cell], xw.dtype.itemsize, host.current_device(),
                               used(ln, zoneout, w_hr))
        inputs = host.forward_inputs(xp, cell, xw, w_hh, b_hh, b_ih, state0, lengths)
        inputs["keys"] = keys_array(xp, t0, zoneout)
        if ln is not None:
            inputs.update(zip(LN_NAMES[cell], (xp.ascontiguousarray(g) for g in ln)))
        if w_hr is not None:
            inputs["w_hr"] = xp.ascontiguousarray(w_hr)
        p = (F(zoneout.p_h), F(zoneout.p_c)) if zoneout is not None else (F(0), F(0))
        saved = ("gates", "cs", "hns", "vhat_ih", "vhat_hh", "stats", "m") if training else ()
        keep = ("hs", "h") + (("c",) if lstm else ()) + saved
        key = ("numba", "forward", "variants", cell, flags, p, bool(training), T, B, H, P, xw.dtype.str, math,
               host.device_id())
        out = graphs.run(xp, key, inputs, functools.partial(forward_buffers, cell, math, flags),
                         functools.partial(step_forward, cell, math, flags, training, p), keep)
    y = out["hs"][1:]
    state_n = (out["h"], out["c"]) if lstm else (out["h"],)
    if not training:
        return y, state_n, None
    kept = {k: out[k] for k in saved}
    kept.update({k: inputs[k] for k in ("keys",) + LN_NAMES.get(cell, ()) + ("w_hr",) if k in inputs})
    kept["c0"] = inputs["c0"] if lstm else host.placeholder(xp, 2, xw.dtype)
    return y, state_n, VariantCtx(cell, flags, plan, inputs["lengths"], w_hh, state0[0], y, out["hs"][:-1], kept,
                                  math)


def variant_placeholders(xp, a, dtype):
    """1-element stand-ins for the variant arrays the kernels take but this sweep lacks."""
    return {name: host.placeholder(xp, ndim, dtype) for name, ndim in
            (("gamma_ih", 1), ("gamma_hh", 1), ("gamma_c", 1), ("beta_c", 1), ("vhat_ih", 3), ("vhat_hh", 3),
             ("stats", 3), ("m", 3)) if name not in a}


def forward_buffers(cell, math, flags, a):
    """What a forward sweep writes, as numba_cuda.forward_buffers (hs (T+1, B, P) with y = hs[1:], h, c, gates, cs,
    hns, gh), plus with ln vhat_ih, vhat_hh (T, B, G*H) and stats (T, B, 4); with proj m (T, B, H), hp (B, P) the
    projection GEMM's output; the bf16 operand copies."""
    xp = host.array_module()
    ln, _, proj = flags
    T, B, GH = a["xw"].shape
    P, dtype = a["w_hh"].shape[1], a["xw"].dtype
    H = GH // GATES[cell]
    lstm, gru = cell == "lstm", cell == "gru"
    hs, h = xp.empty((T + 1, B, P), dtype), xp.empty((B, P), dtype)
    out = dict(hs=hs, h=h, gates=xp.empty((T, B, GH), dtype) if lstm or gru else hs[1:],
               c=xp.empty((B, H), dtype) if lstm else host.placeholder(xp, 2, dtype),
               cs=xp.empty((T, B, H), dtype) if lstm else host.placeholder(xp, 3, dtype),
               hns=xp.empty((T, B, H), dtype) if gru else host.placeholder(xp, 3, dtype),
               gh=xp.empty((B, GH), dtype), h_low=host.low(xp, h, math), w_low=host.low(xp, a["w_hh"].T, math))
    if ln:
        out.update(vhat_ih=xp.empty((T, B, GH), dtype), vhat_hh=xp.empty((T, B, GH), dtype),
                   stats=xp.empty((T, B, 4), dtype))
    if proj:
        m = xp.empty((T, B, H), dtype)
        out.update(m=m, hp=xp.empty((B, P), dtype), m_low=host.low(xp, m[0], math),
                   r_low=host.low(xp, a["w_hr"].T, math))
    out.update(variant_placeholders(xp, {**a, **out}, dtype))
    return out


def step_forward(cell, math, flags, training, p, a):
    """The forward sweep per step on the arrays `a` (forward_inputs + forward_buffers): per step the GEMM
    gh = h @ W_hh.T, the row kernel, and under proj the GEMM m_s @ W_hr.T and the projection's kernel. Allocates
    nothing, reads nothing on the host: capturable."""
    xp = host.array_module()
    T, B, P = a["hs"].shape[0] - 1, *a["h"].shape
    proj = flags[2]
    h, product = host.start_forward(xp, math, a)
    K, stream = build(a["h"].dtype.type, *flags), host.launch_stream()
    d = {k: host.device_view(v) for k, v in a.items() if v is not None and k != "hs"}
    y = host.device_view(a["hs"][1:])
    row = host.prepared(K.row_forward, B, stream,
                   (CELL_CODES[cell], ACT_CODES.get(cell[4:], 0), 0, *p, int(training), d["keys"],
                    *(d[k] for k in ("xw", "gh", "b_hh", "b_ih", "lengths", "gamma_ih", "gamma_hh", "gamma_c",
                                     "beta_c", "h", "c")), y,
                    *(d[k] for k in ("gates", "cs", "hns", "vhat_ih", "vhat_hh", "stats", "m"))), 2, per_block=ROW,
                   shared=shared_bytes(a["h"].dtype))
    if proj:
        projections = gemm.per_step(xp, T, a["m"], gemm.constant(xp, a["w_hr"].T, math, a["r_low"]), a["hp"], math,
                                    a["m_low"])
        emit = host.prepared(K.proj_forward, B * P, stream,
                        (0, p[0], int(training), d["keys"], d["hp"], d["lengths"], d["h"], y), 0)
    for s in range(T):
        h.update()
        product()
        row(s)
        if proj:
            projections[s]()
            emit(s)


def backward(ctx, dy, dstate_n, dparams=None):
    """numba_cuda.backward of a VariantCtx; dparams (kernels/__init__.py) filled when given."""
    xp = host.array_module()
    T, B, P = ctx.y.shape
    ln, _, proj = ctx.flags
    GH = ctx.w_hh.shape[0]
    H = GH // GATES[ctx.cell]
    lstm = ctx.cell == "lstm"
    separate = ctx.cell == "gru" or ln
    sv = ctx.saved
    with host.on_device_of(dy):
        inputs = dict(dy=dy, y=ctx.y, h0=ctx.h0, lengths=ctx.lengths, w_hh=ctx.w_hh, dh_n=dstate_n[0],
                      **({"dc_n": dstate_n[1]} if lstm else {}),
                      **{k: v for k, v in sv.items() if k != "m" and not (k == "gates" and ctx.gates_are_y)})
        inputs = {k: xp.ascontiguousarray(v) for k, v in inputs.items()}
        keep = ("dgx", "dh") + (("dgh",) if separate else ()) + (("dc",) if lstm else ()) + \
            (("acc",) if ln else ()) + (("dhn",) if proj else ())
        key = ("numba", "backward", "variants", ctx.cell, ctx.flags, T, B, H, P, ctx.y.dtype.str, ctx.math,
               host.device_id())
        out = graphs.run(xp, key, inputs, functools.partial(backward_buffers, ctx.cell, ctx.math, ctx.flags),
                         functools.partial(step_backward, ctx.cell, ctx.math, ctx.flags), keep)
        if dparams is not None:
            if ln:
                sums = out["acc"].sum(axis=1)                                        # (6, G*H)
                dparams.update({name: sums[k, :H] if name in ("gamma_c", "beta_c") else sums[k]
                                for k, name in enumerate(ACC_NAMES) if lstm or k < 4})
            if proj:                                                                 # h~ = m W_hr^T
                dparams["weight_hr"] = gemm.matmul(xp, out["dhn"].reshape(T * B, P).T, sv["m"].reshape(T * B, H),
                                                   ctx.math)
    dgx = out["dgx"]
    return dgx, out["dgh"] if separate else dgx, ((out["dh"], out["dc"]) if lstm else (out["dh"],))


def backward_buffers(cell, math, flags, a):
    """What a backward sweep writes: dgx (T, B, G*H) (every row written), dgh (GRU or ln; else dgx), dh (B, P),
    dc (B, H) (LSTM), dhg (B, P) the step's GEMM output; with ln acc (6, B, G*H) the per-row parameter sums; with
    proj dhn (T, B, P) = dL/dh~ of every step and dm (B, H) its GEMM with W_hr; the bf16 operand copies."""
    xp = host.array_module()
    ln, _, proj = flags
    T, B, P = a["y"].shape
    GH, dtype = a["w_hh"].shape[0], a["y"].dtype
    H = GH // GATES[cell]
    dgx = xp.empty((T, B, GH), dtype)
    out = dict(dgx=dgx, dgh=xp.empty((T, B, GH), dtype) if cell == "gru" or ln else dgx,
               dh=xp.empty((B, P), dtype), dhg=xp.empty((B, P), dtype),
               dc=xp.empty((B, H), dtype) if cell == "lstm" else host.placeholder(xp, 2, dtype),
               acc=xp.empty((6, B, GH), dtype) if ln else host.placeholder(xp, 3, dtype),
               dhn=xp.empty((T, B, P), dtype) if proj else host.placeholder(xp, 3, dtype),
               dm=xp.empty((B, H), dtype) if proj else host.placeholder(xp, 2, dtype),
               g_low=host.low(xp, dgx[0], math), w_low=host.low(xp, a["w_hh"], math))
    if proj:
        out.update(n_low=host.low(xp, out["dhn"][0], math), r_low=host.low(xp, a["w_hr"], math))
    out.update(variant_placeholders(xp, a, dtype))
    return out


def step_backward(cell, math, flags, a):
    """The backward sweep per step on the arrays `a`, s = T-1..0: [projection kernel, GEMM dm = dhn[s] @ W_hr,] the
    row kernel, then the GEMM dgh[s] @ W_hh into dhg (s = 0: added into dh, which then holds dL/dh0).
    Capturable, as step_forward."""
    xp = host.array_module()
    T, B, P = a["y"].shape
    ln, _, proj = flags
    host.start_backward(xp, a)
    xp.copyto(a["dhg"], 0)                                               # no step after T-1
    if ln:
        xp.copyto(a["acc"], 0)
    w = gemm.constant(xp, a["w_hh"], math, a["w_low"])
    products = gemm.per_step(xp, T, a["dgh"], w, a["dhg"], math, a["g_low"], into=a["dh"])
    K, stream = build(a["y"].dtype.type, *flags), host.launch_stream()
    d = {k: host.device_view(v) for k, v in a.items() if v is not None}
    gates = d.get("gates", d["y"])
    row = host.prepared(K.row_backward, B, stream,
                   (CELL_CODES[cell], ACT_CODES.get(cell[4:], 0), 0, d["keys"],
                    *(d[k] for k in ("dhg", "dh", "dy", "y", "h0")), gates,
                    *(d[k] for k in ("cs", "c0", "hns", "lengths", "dc", "dgx", "dgh", "gamma_ih", "gamma_hh",
                                     "gamma_c", "beta_c", "vhat_ih", "vhat_hh", "stats", "dm", "acc"))),
                   2, per_block=ROW, shared=shared_bytes(a["y"].dtype))
    if proj:
        to_m = gemm.per_step(xp, T, a["dhn"], gemm.constant(xp, a["w_hr"], math, a["r_low"]), a["dm"], math,
                             a["n_low"])
        split = host.prepared(K.proj_backward, B * P, stream,
                         (0, d["keys"], d["dhg"], d["dh"], d["dy"], d["lengths"], d["dhn"]), 0)
    for s in range(T - 1, -1, -1):
        if proj:
            split(s)
            to_m[s]()
        row(s)
        products[s]()
