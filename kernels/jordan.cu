// Jordan network: h_t = act(xw_t + y_{t-1} W_yh^T),  y_t = out_act(h_t W_hy^T + b_y); the state is y_{t-1}.
// Each step is two GEMMs, each followed by one pointwise launch. T: float | double;  Act: Tanh | Relu | Sigmoid;
// OutAct: those or Identity.  One thread per (b, j) of a (B, H) or (B, O) array. The output's backward is an
// Elman step's, rnn_backward_step<T, OutAct> in rnn.cu: y = out_act(py) as h~ = act(p), dL/dy_{t-1} as dh (no
// zoneout, t0 = 0).
#include "common.cuh"

// Hidden layer of step t, with gy = y_{t-1} @ W_yh^T from the GEMM just before this launch.
//   xw_t:    (B, H)  step t of x @ W_ih^T + b_h
//   gy:      (B, H)  y_{t-1} @ W_yh^T
//   h_t:     (B, H)  out, act(xw_t + gy) at valid steps, 0 at padded ones
//   lengths: (B,)    int32, steps t >= lengths[b] are padding
template <typename T, typename Act>
__global__ void jordan_hidden_forward(const T* xw_t, const T* gy, T* h_t, const int* lengths, int t, int B, int H) {
    const Element e = element(B, H);
    if (!e.inside) return;
    const int i = e.b * H + e.j;          // (B, H) row-major
    h_t[i] = valid_step(lengths, e.b, t) ? Act::fwd(xw_t[i] + gy[i]) : T(0);
}

// Output of step t, with py = h_t @ W_hy^T from the GEMM just before this launch.
//   py:      (B, O)  h_t @ W_hy^T
//   b_y:     (O,)
//   y:       (B, O)  state in (y_{t-1}), state out (kept at padded steps)
//   y_t:     (B, O)  out, out_act(py + b_y) at valid steps, 0 at padded ones
//   lengths: (B,)    int32
template <typename T, typename OutAct>
__global__ void jordan_output_forward(const T* py, const T* b_y, T* y, T* y_t, const int* lengths, int t,
                                      int B, int O) {
    const Element e = element(B, O);
    if (!e.inside) return;
    const int i = e.b * O + e.j;          // (B, O) row-major
    if (valid_step(lengths, e.b, t)) {
        const T y_new = OutAct::fwd(py[i] + b_y[e.j]);
        y[i] = y_new;
        y_t[i] = y_new;
    } else {
        y_t[i] = T(0);
    }
}

// dL/d(hidden pre-activation) of step t, in place over the GEMM result.
//   dph_t: (B, H)  in: dpy_t @ W_hy (py = h W_hy^T + b_y gives dh = dpy W_hy); out: dh act'(ph)
//   h_t:   (B, H)  the forward hidden layer of step t (0 at padded steps, where dpy_t and so dh are 0)
template <typename T, typename Act>
__global__ void jordan_hidden_backward(T* dph_t, const T* h_t, int B, int H) {
    const Element e = element(B, H);
    if (!e.inside) return;
    const int i = e.b * H + e.j;
    // h = act(ph):  dph = dh act'(ph), with act' written from the output h
    dph_t[i] = Act::backward(dph_t[i], h_t[i]);
}
