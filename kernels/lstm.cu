// LSTM cell, gates i, f, g, o: c' = f c + i g, h' = o tanh(c'). One pointwise launch per step each way.
// T: float | double.  One thread per (b, j) of a (B, H) array; gate k of column j sits at k*H + j of a 4H row.
#include "common.cuh"

// Gates and state update, with gh = h @ W_hh^T from the GEMM just before this launch.
//   xw_t:    (B, 4H)  step t of x @ W_ih^T
//   gh:      (B, 4H)  h @ W_hh^T
//   b_hh:    (4H,)
//   b_ih:    (4H,)    added here, not in a pass over xw of its own
//   h, c:    (B, H)   state in, state out (kept at padded steps)
//   y_t:     (B, H)   h' at valid steps, 0 at padded ones
//   gates_t: (B, 4H)  out, activated gates i, f, g, o (for backward)
//   c_t:     (B, H)   out, the cell state after step t (kept value at padded steps)
//   lengths: (B,)     int32, steps t >= lengths[b] are padding
template <typename T>
__global__ void lstm_forward_step(const T* xw_t, const T* gh, const T* b_hh, const T* b_ih, T* h, T* c, T* y_t,
                                  T* gates_t, T* c_t, const int* lengths, int t, int B, int H) {
    const Element e = element(B, H);
    if (!e.inside) return;
    const int i = e.b * H + e.j;                 // (B, H) row-major
    const int g0 = e.b * 4 * H + e.j;            // gate 0 of column j in a (B, 4H) row; gate k at g0 + k*H
    T p[4];
    for (int k = 0; k < 4; ++k) p[k] = xw_t[g0 + k * H] + b_ih[k * H + e.j] + gh[g0 + k * H] + b_hh[k * H + e.j];
    const T in = Sigmoid::fwd(p[0]), forget = Sigmoid::fwd(p[1]), cand = Tanh::fwd(p[2]),
            out = Sigmoid::fwd(p[3]);
    gates_t[g0] = in;
    gates_t[g0 + H] = forget;
    gates_t[g0 + 2 * H] = cand;
    gates_t[g0 + 3 * H] = out;
    if (valid_step(lengths, e.b, t)) {
        const T c_new = forget * c[i] + in * cand;
        const T h_new = out * tanh_(c_new);
        c[i] = c_new;
        h[i] = h_new;
        y_t[i] = h_new;
    } else {
        y_t[i] = T(0);
    }
    c_t[i] = c[i];
}

// The whole pointwise backward of step t: gate gradients, dc_{t-1}, and the carry dh for step t-1.
//   dy_t:    (B, H)   dL/dy_t from above (ignored at padded steps)
//   gates_t: (B, 4H)  activated gates i, f, g, o of step t
//   c_t:     (B, H)   cell state after step t
//   c_prev:  (B, H)   cell state before step t (c_{t-1}, or c0 at t = 0)
//   dhh:     (B, H)   dg_{t+1} @ W_hh, step t+1's share of dL/dh_t (zeros at t = T-1)
//   dh:      (B, H)   carry in: the rest of dL/dh_t; carry out: 0 where step t is valid
//   dc:      (B, H)   in: dL/dc_t; out: dL/dc_{t-1}
//   dg_t:    (B, 4H)  out, dL/d(gate pre-activations); 0 at padded steps
//   lengths: (B,)     int32
template <typename T>
__global__ void lstm_backward_step(const T* dy_t, const T* gates_t, const T* c_t, const T* c_prev,
                                   const T* dhh, T* dh, T* dc, T* dg_t, const int* lengths, int t, int B, int H) {
    const Element e = element(B, H);
    if (!e.inside) return;
    const int i = e.b * H + e.j;
    const int g0 = e.b * 4 * H + e.j;
    // A padded step t+1 had dg = 0, so dhh = 0 there and the carry passes through unchanged.
    const T carry = dh[i] + dhh[i];
    if (!valid_step(lengths, e.b, t)) {
        for (int k = 0; k < 4; ++k) dg_t[g0 + k * H] = T(0);
        dh[i] = carry;
        return;
    }
    const T in = gates_t[g0], forget = gates_t[g0 + H], cand = gates_t[g0 + 2 * H], out = gates_t[g0 + 3 * H];
    const T dh_t = carry + dy_t[i];
    const T tc = tanh_(c_t[i]);
    // h = o tanh(c):  do = dh tanh(c),  dc += dh o (1 - tanh^2 c)
    const T dc_t = dc[i] + dh_t * out * (T(1) - tc * tc);
    // c = f c_prev + i g:  di = dc g,  df = dc c_prev,  dg = dc i,  dc_prev = dc f
    // then through each gate's activation, written from its output: sigmoid' = s (1 - s), tanh' = 1 - g^2
    dg_t[g0] = dc_t * cand * Sigmoid::grad(in);
    dg_t[g0 + H] = dc_t * c_prev[i] * Sigmoid::grad(forget);
    dg_t[g0 + 2 * H] = dc_t * in * Tanh::grad(cand);
    dg_t[g0 + 3 * H] = dh_t * tc * Sigmoid::grad(out);
    dc[i] = dc_t * forget;
    // dh_{t-1} = dg_t @ W_hh, all of it through the next GEMM
    dh[i] = T(0);
}
