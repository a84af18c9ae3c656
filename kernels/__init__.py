"""Per-element recurrent math: one module per backend, all with the same sweep interface.

Every module (``numpy_ref``, and the GPU modules) exposes the functions below. A *sweep* runs one layer in
one direction over the whole sequence, in kernel time order (the layer reverses time for the reverse
direction before calling, respecting ``lengths``). G = 1 (Elman), 4 (LSTM, gates i, f, g, o), 3 (GRU, r, z, n).

    forward(cell, xw, w_hh, b_hh, state0, lengths, training[, sweep], b_ih=None[, workspace][, math])
        -> (y, state_n, ctx)
        cell:    "rnn_tanh" | "rnn_relu" | "rnn_sigmoid" | "lstm" | "gru"
        xw:      (T, B, G*H)  x @ W_ih.T for every step, plus b_ih when b_ih is None; the sweep may overwrite it
        w_hh:    (G*H, H)
        b_hh:    (G*H,)       zeros for a layer without bias
        b_ih:    (G*H,) or None  the input bias when xw leaves it out: the sweep adds it in its step kernels (the CPU
                 module with b_hh summed once, the GPU modules in the pointwise kernels), never in a pass of its own
        state0:  tuple of (B, H): (h0,) or (h0, c0) for the LSTM
        lengths: (B,) int32, 1 <= lengths[b] <= T; steps t >= lengths[b] output 0 and keep the state
        y:       (T, B, H)    h_t at valid steps, 0 at padded ones
        state_n: tuple like state0, each sequence's state after its last valid step
        ctx:     what backward needs, None when training is False; has ``ctx.y`` (T, B, H) and ``ctx.h0`` (B, H);
                 the GPU modules also ``ctx.h_prev`` (T, B, H) = [h0; y[:T-1]], in one buffer with y (dW_hh's GEMM)
        sweep:   GPU modules only: "auto" | "persistent" | "step"; backward follows what forward used
        workspace: cpu_fused only: a ``gpurnn.workspace.Workspace`` its buffers (y, saved state, dgx) come from,
                 for forward and the backward of its ctx; None allocates fresh ones
        math:    GPU modules only: "fp32" | "tf32" | "bf16", the precision of their cuBLAS GEMMs (gemm.py); the
                 backward of the ctx uses the same. Their per-step sweeps run as CUDA graphs (graphs.py)

    backward(ctx, dy, dstate_n) -> (dgx, dgh, dstate0)
        dy:       (T, B, H)  ignored at padded steps
        dstate_n: tuple like state0
        dgx:      (T, B, G*H)  dL/d(xw), 0 at padded steps; the layer forms dW_ih = dgx^T x, db_ih, dx
        dgh:      (T, B, G*H)  dL/d(h_prev @ W_hh.T + b_hh); the same array as dgx except for the GRU
        dstate0:  tuple like state0

    jordan_forward(xw, w_yh, w_hy, b_y, y0, lengths, act, out_act, training[, sweep][, math]) -> (y, y_n, ctx)
        xw: (T, B, H) x @ W_ih.T + b_h;  w_yh: (H, O);  w_hy: (O, H);  b_y: (O,);  y0: (B, O)
        h_t = act(xw_t + y_{t-1} @ w_yh.T),  y_t = out_act(h_t @ w_hy.T + b_y)
        y: (T, B, O);  y_n: (B, O);  ctx has ``ctx.y`` (T, B, O), ``ctx.y0`` (B, O), ``ctx.h`` (T, B, H)
    jordan_backward(ctx, dy, dy_n) -> (dph, dpy, dy0)
        dph: (T, B, H) dL/d(h pre-activation);  dpy: (T, B, O) dL/d(y pre-activation);  dy0: (B, O)
"""
from dataclasses import dataclass

CELLS = ("rnn_tanh", "rnn_relu", "rnn_sigmoid", "lstm", "gru")
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "rnn_sigmoid": 1, "lstm": 4, "gru": 3}
ACTIVATIONS = ("tanh", "relu", "sigmoid", "identity")


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
