// GRU cell, gates r, z, n: n = tanh(gi_n + r gh_n), h~ = (1 - z) n + z h, h' = k h + (1 - k) h~ (zoneout), with
// gi = xw + b_ih, gh = h W_hh^T + b_hh (LN: gi = LN(xw; gamma_ih) + b_ih, gh = LN(h W_hh^T; gamma_hh) + b_hh).
// One pointwise launch per step each way. T: float | double;  LN: layer-normalised. Without LN one thread per
// (b, j) of a (B, H) array; with LN one block per batch row, each thread its columns (common.cuh). Gate k of column
// j sits at k*H + j of a 3H row.
#include "common.cuh"

// Gates and state update, with gh = h @ W_hh^T from the GEMM just before this launch.
//   xw_t:    (B, 3H)  step s of x @ W_ih^T
//   gh:      (B, 3H)  h @ W_hh^T (no bias)
//   b_hh:    (3H,)
//   b_ih:    (3H,)    added here, not in a pass over xw of its own
//   gamma_ih, gamma_hh: (3H,)  LN gains (LN only; any array otherwise)
//   h:       (B, H)   state in, state out (kept at padded steps)
//   y_t:     (B, H)   h' at valid steps, 0 at padded ones
//   gates_t: (B, 3H)  out, activated gates r, z, n (for backward)
//   hn_t:    (B, H)   out, gh_n (for backward)
//   vhat_ih_t, vhat_hh_t: (B, 3H)  out, the normalised xw_t and gh (LN);  rstd_t: (B, 2) out, their rstd (LN)
//   lengths: (B,)     int32, kernel steps t >= lengths[b] are padding
//   zo, s, zmode: see common.cuh;  p_h: zoneout's p (blend mode)
template <typename T, bool LN>
__global__ void gru_forward_step(const T* xw_t, const T* gh, const T* b_hh, const T* b_ih, const T* gamma_ih,
                                 const T* gamma_hh, T* h, T* y_t, T* gates_t, T* hn_t, T* vhat_ih_t, T* vhat_hh_t,
                                 T* rstd_t, const int* lengths, const unsigned* zo, int s, int zmode, T p_h, int B,
                                 int H) {
    const int b = blockIdx.x, G = 3 * H;
    const int t = (int)zo[0] + s;
    const Zoneout<T> zh(zmode, zo, 0, t, b, p_h);
    const T *xr = xw_t + b * G, *gr = gh + b * G;
    T mean[2], rstd[2];
    if (LN) {
        const T* const rows[2] = {xr, gr};
        row_moments(rows, G, mean, rstd);
        if (threadIdx.x == 0) {
            rstd_t[b * 2] = rstd[0];
            rstd_t[b * 2 + 1] = rstd[1];
        }
    }
    for (int j = Columns::first(); j < H; j += Columns::stride()) {
        const int i = b * H + j;
        T gi[3], gg[3];
        for (int k = 0; k < 3; ++k) {
            const int q = k * H + j;
            if (LN) {
                T out[2];
                normalise_pair(q, xr, gr, mean, rstd, gamma_ih, gamma_hh, vhat_ih_t + b * G, vhat_hh_t + b * G, out);
                gi[k] = out[0] + b_ih[q];
                gg[k] = out[1] + b_hh[q];
            } else {
                gi[k] = xr[q] + b_ih[q];
                gg[k] = gr[q] + b_hh[q];
            }
        }
        const T reset = Sigmoid::fwd(gi[0] + gg[0]);
        const T update = Sigmoid::fwd(gi[1] + gg[1]);
        const T cand = Tanh::fwd(gi[2] + reset * gg[2]);
        gates_t[b * G + j] = reset;
        gates_t[b * G + H + j] = update;
        gates_t[b * G + 2 * H + j] = cand;
        hn_t[i] = gg[2];
        store_h(h, y_t, i, j, (T(1) - update) * cand + update * h[i], valid_step(lengths, b, t), zh);
    }
}

// The whole pointwise backward of step s, and the carry dh for step t-1.
//   dy_t:    (B, H)   dL/dy_t from above (ignored at padded steps)
//   gates_t: (B, 3H)  activated gates r, z, n of step s
//   hn_t:    (B, H)   gh_n of step s
//   h_prev:  (B, H)   state before step s (y_{t-1}, or h0 at s = 0)
//   gamma_ih, gamma_hh: (3H,)  (LN only);  vhat_ih_t, vhat_hh_t: (B, 3H), rstd_t: (B, 2) from forward (LN)
//   dhh:     (B, H)   dgh_{t+1} @ W_hh, step t+1's GEMM share of dL/dh_t (zeros at t = T-1)
//   dh:      (B, H)   carry in: the rest of dL/dh_t; carry out: the direct part of dL/dh_{t-1}
//   dgx_t:   (B, 3H)  out, dL/d(xw_t) for r, z, n; 0 at padded steps
//   dgh_t:   (B, 3H)  out, dL/d(h_{t-1} W_hh^T) for r, z, n; 0 at padded steps
//   dgi_t, dgg_t: (B, 3H)  out, dL/dgi and dL/dgh (LN: the biases' and gains' gradient rows; else dgx_t, dgh_t)
//   lengths, zo, s, zmode: as forward (zmode ZONEOUT_OFF or ZONEOUT_MASKS)
template <typename T, bool LN>
__global__ void gru_backward_step(const T* dy_t, const T* gates_t, const T* hn_t, const T* h_prev,
                                  const T* gamma_ih, const T* gamma_hh, const T* vhat_ih_t, const T* vhat_hh_t,
                                  const T* rstd_t, const T* dhh, T* dh, T* dgx_t, T* dgh_t, T* dgi_t, T* dgg_t,
                                  const int* lengths, const unsigned* zo, int s, int zmode, int B, int H) {
    const int b = blockIdx.x, G = 3 * H;
    const int t = (int)zo[0] + s;
    if (!valid_step(lengths, b, t)) {        // the whole row (block) is padding: no gradient, the carry passes
        for (int j = Columns::first(); j < H; j += Columns::stride()) {
            for (int k = 0; k < 3; ++k) dgx_t[b * G + k * H + j] = dgh_t[b * G + k * H + j] =
                                            dgi_t[b * G + k * H + j] = dgg_t[b * G + k * H + j] = T(0);
            // A padded step t+1 had dgh = 0, so dhh = 0 there and the carry passes through unchanged.
            dh[b * H + j] += dhh[b * H + j];
        }
        return;
    }
    const Zoneout<T> zh(zmode, zo, 0, t, b, T(0));
    ProjectionsLN<T> ln(gamma_ih, gamma_hh, vhat_ih_t + b * G, vhat_hh_t + b * G, 3, H);
    for (int j = Columns::first(); j < H; j += Columns::stride()) {
        const int i = b * H + j, g0 = b * G + j;
        const T reset = gates_t[g0], update = gates_t[g0 + H], cand = gates_t[g0 + 2 * H];
        // h' = k h + (1 - k) h~:  dh~ = (1 - k) dh',  k dh' straight on to h
        const ZoneoutGrad<T> d = zoneout_backward(zh, dh[i] + dhh[i] + dy_t[i], j);
        // h~ = (1 - z) n + z h_prev:  dn = dh~ (1 - z),  dz = dh~ (h_prev - n),  dh_prev (direct) = dh~ z
        // n = tanh(pn):  dpn = dn (1 - n^2)
        const T dn_pre = d.fresh * (T(1) - update) * Tanh::grad(cand);
        // z = sigmoid(pz):  dpz = dz z (1 - z)
        const T dz_pre = d.fresh * (h_prev[i] - cand) * Sigmoid::grad(update);
        // pn = gi_n + r gh_n:  dr = dpn gh_n,  d(gh_n) = dpn r;  r = sigmoid(pr):  dpr = dr r (1 - r)
        const T dr_pre = dn_pre * hn_t[i] * Sigmoid::grad(reset);
        dgi_t[g0] = dgg_t[g0] = dr_pre;
        dgi_t[g0 + H] = dgg_t[g0 + H] = dz_pre;
        dgi_t[g0 + 2 * H] = dn_pre;
        dgg_t[g0 + 2 * H] = dn_pre * reset;
        // dh_{t-1} = k dh' + dh~ z + dgh_t @ W_hh; the GEMM part arrives as the next step's dhh
        dh[i] = d.prev + d.fresh * update;
        // gi = gamma_ih vhat_ih + b_ih:  dvhat_ih = gamma_ih dgi (gh likewise)
        if (LN) ln.add(j, dgi_t + b * G, dgg_t + b * G);
    }
    if (!LN) return;
    ln.reduce();
    for (int j = Columns::first(); j < H; j += Columns::stride())
        ln.backward(j, dgi_t + b * G, dgg_t + b * G, rstd_t[b * 2], rstd_t[b * 2 + 1], dgx_t + b * G,
                    dgh_t + b * G);
}
