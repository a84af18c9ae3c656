"""Per-element recurrent math: one module per backend, all with the same sweep interface.

Every module (``numpy_ref``, ``cpu_fused`` and the GPU modules) exposes the functions below. A *sweep* runs one layer
in one direction over a run of steps, in kernel time order (the layer reverses time for the reverse direction before
calling, respecting ``lengths``). G = 1 (Elman), 4 (LSTM, gates i, f, g, o), 3 (GRU, r, z, n). P = H except for an
LSTM with a projection (``w_hr``), whose h is (B, P).

    forward(cell, xw, w_hh, b_hh, state0, lengths, training, b_ih=None, *, t0=0, ln=None, zoneout=None,
            w_hr=None[, sweep][, workspace][, math]) -> (y, state_n, ctx)
        cell:    "rnn_tanh" | "rnn_relu" | "rnn_sigmoid" | "lstm" | "gru"
        xw:      (T, B, G*H)  x @ W_ih.T for the T steps t0..t0+T-1, plus b_ih when b_ih is None (never with ln);
                 the sweep may overwrite it
        w_hh:    (G*H, P)
        b_hh:    (G*H,)       zeros for a layer without bias
        b_ih:    (G*H,) or None  the input bias when xw leaves it out: the sweep adds it in its step kernels (the CPU
                 module with b_hh summed once, the GPU modules in the pointwise kernels), never in a pass of its own
        state0:  tuple: (h0,) (B, P), or (h0, c0) for the LSTM, c0 (B, H)
        lengths: (B,) int32, 1 <= lengths[b]; kernel step t (= t0 + s for the s-th step of xw) is valid while
                 t < lengths[b]; padded steps output 0 and keep the state
        y:       (T, B, P)    h_t at valid steps, 0 at padded ones
        state_n: tuple like state0, each sequence's state after its last valid step (of this run of steps)
        ctx:     what backward needs, None when training is False; has ``ctx.y`` (T, B, P) and ``ctx.h0`` (B, P);
                 the GPU modules also ``ctx.h_prev`` (T, B, P) = [h0; y[:T-1]], in one buffer with y (dW_hh's GEMM)
        sweep:   GPU modules only: "auto" | "persistent" | "step"; backward follows what forward used
        workspace: cpu_fused only: a ``gpurnn.workspace.Workspace`` its buffers (y, saved state, dgx) come from,
                 for forward and the backward of its ctx; None allocates fresh ones
        math:    GPU modules only: "fp32" | "tf32" | "bf16", the precision of their cuBLAS GEMMs (gemm.py); the
                 backward of the ctx uses the same. Their per-step sweeps run as CUDA graphs (graphs.py)
      The variants (FEATURES below; a module without one raises ValueError for it, and the layer says so first):
        t0:      the kernel step of xw[0]: a sweep split into runs of steps (gpurnn.segments) gives each run its
                 first step, so validity and zoneout masks are those of the whole sweep. The runs chain: run j+1
                 starts from run j's state_n.
        ln:      layer normalisation, LN(v; gamma) = gamma (v - mean v) / sqrt(var v + LN_EPS) over the G*H entries
                 of one row (biased variance): ``(gamma_ih, gamma_hh)`` (G*H,) for the GRU, plus
                 ``(gamma_c, beta_c)`` (H,) for the LSTM. Then xw never holds b_ih, and
                   LSTM: a = LN(xw_t; gamma_ih) + LN(h_{t-1} W_hh^T; gamma_hh) + b_ih + b_hh,
                         c~ = f c_{t-1} + i g,  m = o tanh(LN(c~; gamma_c) + beta_c)
                   GRU:  gi = LN(xw_t; gamma_ih) + b_ih,  gh = LN(h_{t-1} W_hh^T; gamma_hh) + b_hh, then torch's GRU
        zoneout: a ``Zoneout``: each unit of h (and the LSTM's c) keeps its previous value,
                   h_t = k_t h_{t-1} + (1 - k_t) h~_t   (c_t likewise with its own k),
                 h~_t the cell's new value (the LSTM's h~ = o tanh(c~) reads the new c~, not c_t). Training:
                 k_t[b, j] = 1 if zoneout_bits(seed, t, b, j) < zoneout_threshold(p) else 0, t the kernel step;
                 evaluation (training False): k = p. y_t is h_t.
        w_hr:    (P, H) LSTM projection, torch's proj_size: h~ = m W_hr^T, m = o tanh(c~) (B, H).

    backward(ctx, dy, dstate_n, dparams=None) -> (dgx, dgh, dstate0)
        dy:       (T, B, P)  ignored at padded steps
        dstate_n: tuple like state0: dL/d(state_n), what reaches the end of this run of steps
        dgx:      (T, B, G*H)  dL/d(xw), 0 at padded steps; the layer forms dW_ih = dgx^T x, db_ih, dx
        dgh:      (T, B, G*H)  dL/d(h_prev @ W_hh.T) (+ b_hh without ln); the same array as dgx for the Elman and
                  the plain LSTM
        dstate0:  tuple like state0
        dparams:  a dict, given when the forward had ln or w_hr: backward stores the gradients of this run's
                  steps there: "gamma_ih", "gamma_hh", "bias_ih", "bias_hh" (G*H,) and "gamma_c", "beta_c" (H,)
                  with ln (the layer takes the biases' from here: dgx and dgh are before the LN), "weight_hr" (P, H)
                  with w_hr
      A run's backward chains to the run before it: its dstate0 is that run's dstate_n.

    jordan_forward(xw, w_yh, w_hy, b_y, y0, lengths, act, out_act, training[, sweep][, math]) -> (y, y_n, ctx)
        xw: (T, B, H) x @ W_ih.T + b_h;  w_yh: (H, O);  w_hy: (O, H);  b_y: (O,);  y0: (B, O)
        h_t = act(xw_t + y_{t-1} @ w_yh.T),  y_t = out_act(h_t @ w_hy.T + b_y)
        y: (T, B, O);  y_n: (B, O);  ctx has ``ctx.y`` (T, B, O), ``ctx.y0`` (B, O), ``ctx.h`` (T, B, H)
    jordan_backward(ctx, dy, dy_n) -> (dph, dpy, dy0)
        dph: (T, B, H) dL/d(h pre-activation);  dpy: (T, B, O) dL/d(y pre-activation);  dy0: (B, O)

FEATURES: a module's set of the variants it implements ("t0", "ln", "zoneout", "w_hr"); absent means none.

The zoneout masks come from a counter-based generator, so every backend draws the same ones from (seed, t, b, j),
with no state and no pass over memory, and backward regenerates them from the seed. All arithmetic on uint32,
wrapping mod 2^32 (multiplication keeps the low 32 bits):
    mix32(x):  x ^= x >> 16;  x *= 0x7feb352d;  x ^= x >> 15;  x *= 0x846ca68b;  x ^= x >> 16
    row_key(seed, t, b) = mix32(mix32(mix32(seed) + t) + b)        (once per row and step)
    zoneout_bits(seed, t, b, j) = mix32(row_key(seed, t, b) + j)
    zoneout_threshold(p) = floor(p * 2^32), computed on the host in float64; 0 <= p < 1
seed: the uint32 of ``Zoneout.seed_h`` (h) or ``seed_c`` (c), drawn per sweep and forward call by the layer;
t: the kernel step (t0 + s); b: the batch row; j: the unit (0..P-1 for h, 0..H-1 for c).
"""
from dataclasses import dataclass

CELLS = ("rnn_tanh", "rnn_relu", "rnn_sigmoid", "lstm", "gru")
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "rnn_sigmoid": 1, "lstm": 4, "gru": 3}
ACTIVATIONS = ("tanh", "relu", "sigmoid", "identity")
LN_EPS = 1e-5


def zoneout_threshold(p):
    """floor(p 2^32): a unit keeps its value when its 32 random bits are below this (0 <= p < 1)."""
    return int(p * 2.0 ** 32)


@dataclass(frozen=True)
class Zoneout:
    """Zoneout of one sweep: probabilities p_h (h) and p_c (the LSTM's c; 0 otherwise), and the uint32 seeds of
    their masks (see the module docstring)."""
    p_h: float
    p_c: float = 0.0
    seed_h: int = 0
    seed_c: int = 0


@dataclass
class JordanCtx:
    """What every backend's jordan_backward reads; arrays live where the sweep ran."""
    lengths: object     # (B,) int32
    w_yh: object        # (H, O)
    w_hy: object        # (O, H)
    act: str            # hidden activation, one of ACTIVATIONS
    out_act: str        # output activation
    y0: object          # (B, O)
    h: object           # (T, B, H), 0 at padded steps
    y: object           # (T, B, O), 0 at padded steps
