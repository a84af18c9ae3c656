// Elman cell, one pointwise launch per step each way; the recurrent GEMMs run in cuBLAS between launches.
// T: float | double;  Act: Tanh | Relu | Sigmoid (common.cuh).  One thread per (b, j) of a (B, H) array.
// Every step kernel reads the kernel step t = zo[0] + s (t0 + s, common.cuh) and zoneout's seeds from zo.
#include "common.cuh"

// h~ = act(xw_t + b_ih + gh + b_hh), with gh = h @ W_hh^T from the GEMM just before this launch; h' = h~ zoned.
//   xw_t:    (B, H)  step s of x @ W_ih^T
//   gh:      (B, H)  h @ W_hh^T
//   b_hh:    (H,)
//   b_ih:    (H,)    added here, not in a pass over xw of its own
//   h:       (B, H)  state in, state out (kept at padded steps)
//   y_t:     (B, H)  h' at valid steps, 0 at padded ones
//   htil_t:  (B, H)  out, h~ (for backward; the sweep passes y_t itself without zoneout, where h' = h~)
//   lengths: (B,)    int32, kernel steps t >= lengths[b] are padding
//   zo:      (5,)    uint32 t0 and zoneout's seeds and thresholds;  s: the step;  zmode: ZONEOUT_*;  p_h: its p
template <typename T, typename Act>
__global__ void rnn_forward_step(const T* xw_t, const T* gh, const T* b_hh, const T* b_ih, T* h, T* y_t, T* htil_t,
                                 const int* lengths, const unsigned* zo, int s, int zmode, T p_h, int B, int H) {
    const Element e = element(B, H);
    if (!e.inside) return;
    const int i = e.b * H + e.j;          // (B, H) row-major
    const int t = (int)zo[0] + s;
    const T fresh = Act::fwd(xw_t[i] + b_ih[e.j] + gh[i] + b_hh[e.j]);
    htil_t[i] = fresh;
    store_h(h, y_t, i, e.j, fresh, valid_step(lengths, e.b, t), Zoneout<T>(zmode, zo, 0, t, e.b, p_h));
}

// dL/d(pre-activation) at step s, and the carry dh for step s-1.
//   dy_t:    (B, H)  dL/dy_t from above (ignored at padded steps)
//   htil_t:  (B, H)  the forward's h~ = act(pre-activation)
//   dhh:     (B, H)  dg_{t+1} @ W_hh, this step's share of dL/dh_t through step t+1 (zeros at t = T-1)
//   dh:      (B, H)  carry in: the rest of dL/dh_t; carry out: what step t-1 adds to its dhh
//   dg_t:    (B, H)  out, dL/d(xw_t + h_{t-1} W_hh^T + b_hh); 0 at padded steps
//   lengths: (B,)    int32;  zo, s: as forward;  zmode: ZONEOUT_OFF or ZONEOUT_MASKS (backward is training's)
template <typename T, typename Act>
__global__ void rnn_backward_step(const T* dy_t, const T* htil_t, const T* dhh, T* dh, T* dg_t, const int* lengths,
                                  const unsigned* zo, int s, int zmode, int B, int H) {
    const Element e = element(B, H);
    if (!e.inside) return;
    const int i = e.b * H + e.j;
    const int t = (int)zo[0] + s;
    // A padded step t+1 had dg = 0, so dhh = 0 there and the carry passes through unchanged.
    const T carry = dh[i] + dhh[i];
    if (valid_step(lengths, e.b, t)) {
        // h' = k h + (1 - k) h~:  dh~ = (1 - k) dh',  k dh' straight on to h (zoneout_backward)
        const ZoneoutGrad<T> d = zoneout_backward(Zoneout<T>(zmode, zo, 0, t, e.b, T(0)), carry + dy_t[i], e.j);
        // h~ = act(p):  dp = dh~ act'(p), with act' written from the output h~
        dg_t[i] = Act::backward(d.fresh, htil_t[i]);
        // dh_{t-1} = dg_t @ W_hh (through the next GEMM) + k dh'
        dh[i] = d.prev;
    } else {
        dg_t[i] = T(0);
        dh[i] = carry;
    }
}
