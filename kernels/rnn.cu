// Elman cell, one pointwise launch per step each way; the recurrent GEMMs run in cuBLAS between launches.
// T: float | double;  Act: Tanh | Relu | Sigmoid (common.cuh).  One thread per (b, j) of a (B, H) array.
#include "common.cuh"

// h' = act(xw_t + b_ih + gh + b_hh), with gh = h @ W_hh^T from the GEMM just before this launch.
//   xw_t:    (B, H)  step t of x @ W_ih^T
//   gh:      (B, H)  h @ W_hh^T
//   b_hh:    (H,)
//   b_ih:    (H,)    added here, not in a pass over xw of its own
//   h:       (B, H)  state in, state out (kept at padded steps)
//   y_t:     (B, H)  h' at valid steps, 0 at padded ones
//   lengths: (B,)    int32, steps t >= lengths[b] are padding
template <typename T, typename Act>
__global__ void rnn_forward_step(const T* xw_t, const T* gh, const T* b_hh, const T* b_ih, T* h, T* y_t,
                                 const int* lengths, int t, int B, int H) {
    const Element e = element(B, H);
    if (!e.inside) return;
    const int i = e.b * H + e.j;          // (B, H) row-major
    if (valid_step(lengths, e.b, t)) {
        const T h_new = Act::fwd(xw_t[i] + b_ih[e.j] + gh[i] + b_hh[e.j]);
        h[i] = h_new;
        y_t[i] = h_new;
    } else {
        y_t[i] = T(0);
    }
}

// dL/d(pre-activation) at step t, and the carry dh for step t-1.
//   dy_t:    (B, H)  dL/dy_t from above (ignored at padded steps)
//   y_t:     (B, H)  the forward output h_t
//   dhh:     (B, H)  dg_{t+1} @ W_hh, this step's share of dL/dh_t through step t+1 (zeros at t = T-1)
//   dh:      (B, H)  carry in: the rest of dL/dh_t; carry out: what step t-1 adds to its dhh
//   dg_t:    (B, H)  out, dL/d(xw_t + h_{t-1} W_hh^T + b_hh); 0 at padded steps
//   lengths: (B,)    int32
template <typename T, typename Act>
__global__ void rnn_backward_step(const T* dy_t, const T* y_t, const T* dhh, T* dh, T* dg_t,
                                  const int* lengths, int t, int B, int H) {
    const Element e = element(B, H);
    if (!e.inside) return;
    const int i = e.b * H + e.j;
    // A padded step t+1 had dg = 0, so dhh = 0 there and the carry passes through unchanged.
    const T carry = dh[i] + dhh[i];
    if (valid_step(lengths, e.b, t)) {
        const T dh_t = carry + dy_t[i];
        // h = act(p):  dp = dh act'(p), with act' written from the output h
        dg_t[i] = Act::backward(dh_t, y_t[i]);
        // dh_{t-1} = dg_t @ W_hh, all of it through the next GEMM
        dh[i] = T(0);
    } else {
        dg_t[i] = T(0);
        dh[i] = carry;
    }
}
