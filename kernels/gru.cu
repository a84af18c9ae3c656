// GRU cell, gates r, z, n: n = tanh(xn + r (h W_hn^T + b_hn)), h' = (1 - z) n + z h.
// One pointwise launch per step each way. T: float | double.  One thread per (b, j) of a (B, H) array;
// gate k of column j sits at k*H + j of a 3H row.
#include "common.cuh"

// Gates and state update, with gh = h @ W_hh^T from the GEMM just before this launch.
//   xw_t:    (B, 3H)  step t of x @ W_ih^T
//   gh:      (B, 3H)  h @ W_hh^T (no bias)
//   b_hh:    (3H,)
//   b_ih:    (3H,)    added here, not in a pass over xw of its own
//   h:       (B, H)   state in, state out (kept at padded steps)
//   y_t:     (B, H)   h' at valid steps, 0 at padded ones
//   gates_t: (B, 3H)  out, activated gates r, z, n (for backward)
//   hn_t:    (B, H)   out, h W_hn^T + b_hn (for backward)
//   lengths: (B,)     int32, steps t >= lengths[b] are padding
template <typename T>
__global__ void gru_forward_step(const T* xw_t, const T* gh, const T* b_hh, const T* b_ih, T* h, T* y_t, T* gates_t,
                                 T* hn_t, const int* lengths, int t, int B, int H) {
    const Element e = element(B, H);
    if (!e.inside) return;
    const int i = e.b * H + e.j;                 // (B, H) row-major
    const int g0 = e.b * 3 * H + e.j;            // gate 0 of column j in a (B, 3H) row; gate k at g0 + k*H
    const T reset = Sigmoid::fwd(xw_t[g0] + b_ih[e.j] + gh[g0] + b_hh[e.j]);
    const T update = Sigmoid::fwd(xw_t[g0 + H] + b_ih[H + e.j] + gh[g0 + H] + b_hh[H + e.j]);
    const T hn = gh[g0 + 2 * H] + b_hh[2 * H + e.j];
    const T cand = Tanh::fwd(xw_t[g0 + 2 * H] + b_ih[2 * H + e.j] + reset * hn);
    gates_t[g0] = reset;
    gates_t[g0 + H] = update;
    gates_t[g0 + 2 * H] = cand;
    hn_t[i] = hn;
    if (valid_step(lengths, e.b, t)) {
        const T h_new = (T(1) - update) * cand + update * h[i];
        h[i] = h_new;
        y_t[i] = h_new;
    } else {
        y_t[i] = T(0);
    }
}

// The whole pointwise backward of step t, and the carry dh for step t-1.
//   dy_t:    (B, H)   dL/dy_t from above (ignored at padded steps)
//   gates_t: (B, 3H)  activated gates r, z, n of step t
//   hn_t:    (B, H)   h_{t-1} W_hn^T + b_hn of step t
//   h_prev:  (B, H)   state before step t (y_{t-1}, or h0 at t = 0)
//   dhh:     (B, H)   dgh_{t+1} @ W_hh, step t+1's GEMM share of dL/dh_t (zeros at t = T-1)
//   dh:      (B, H)   carry in: the rest of dL/dh_t; carry out: the direct part of dL/dh_{t-1}
//   dgx_t:   (B, 3H)  out, dL/d(xw_t) for r, z, n; 0 at padded steps
//   dgh_t:   (B, 3H)  out, dL/d(h_{t-1} W_hh^T + b_hh) for r, z, n; 0 at padded steps
//   lengths: (B,)     int32
template <typename T>
__global__ void gru_backward_step(const T* dy_t, const T* gates_t, const T* hn_t, const T* h_prev,
                                  const T* dhh, T* dh, T* dgx_t, T* dgh_t, const int* lengths, int t,
                                  int B, int H) {
    const Element e = element(B, H);
    if (!e.inside) return;
    const int i = e.b * H + e.j;
    const int g0 = e.b * 3 * H + e.j;
    // A padded step t+1 had dgh = 0, so dhh = 0 there and the carry passes through unchanged.
    const T carry = dh[i] + dhh[i];
    if (!valid_step(lengths, e.b, t)) {
        for (int k = 0; k < 3; ++k) dgx_t[g0 + k * H] = dgh_t[g0 + k * H] = T(0);
        dh[i] = carry;
        return;
    }
    const T reset = gates_t[g0], update = gates_t[g0 + H], cand = gates_t[g0 + 2 * H];
    const T dh_t = carry + dy_t[i];
    // h = (1 - z) n + z h_prev:  dn = dh (1 - z),  dz = dh (h_prev - n),  dh_prev (direct) = dh z
    // n = tanh(pn):  dpn = dn (1 - n^2)
    const T dn_pre = dh_t * (T(1) - update) * Tanh::grad(cand);
    // z = sigmoid(pz):  dpz = dz z (1 - z)
    const T dz_pre = dh_t * (h_prev[i] - cand) * Sigmoid::grad(update);
    // pn = xn + r hn:  dr = dpn hn,  d(hn) = dpn r;  r = sigmoid(pr):  dpr = dr r (1 - r)
    const T dr_pre = dn_pre * hn_t[i] * Sigmoid::grad(reset);
    dgx_t[g0] = dgh_t[g0] = dr_pre;
    dgx_t[g0 + H] = dgh_t[g0 + H] = dz_pre;
    dgx_t[g0 + 2 * H] = dn_pre;
    dgh_t[g0 + 2 * H] = dn_pre * reset;
    // dh_{t-1} = dh z + dgh_t @ W_hh; the GEMM part arrives as the next step's dhh
    dh[i] = dh_t * update;
}
