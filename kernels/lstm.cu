// LSTM cell, gates i, f, g, o: c~ = f c + i g, m = o tanh(u) with u = c~ (LN: LN(c~; gamma_c) + beta_c), h~ = m
// (Proj: h~ = m W_hr^T, a GEMM after this launch and lstm_project_step), then zoneout: c' = k_c c + (1 - k_c) c~,
// h' = k_h h + (1 - k_h) h~. One pointwise launch per step each way (Proj: two).
// T: float | double;  LN: layer-normalised (a = LN(xw; gamma_ih) + LN(h W_hh^T; gamma_hh) + b_ih + b_hh);  Proj:
// the projection. Without LN one thread per (b, j) of a (B, H) array; with LN one block per batch row, each thread
// its columns (common.cuh). Gate k of column j sits at k*H + j of a 4H row. h, y are (B, P): P = H without Proj.
#include "common.cuh"

// Gates and state update, with gh = h @ W_hh^T from the GEMM just before this launch.
//   xw_t:     (B, 4H)  step s of x @ W_ih^T
//   gh:       (B, 4H)  h @ W_hh^T
//   b_hh:     (4H,)
//   b_ih:     (4H,)    added here, not in a pass over xw of its own
//   gamma_ih, gamma_hh: (4H,)  LN gains;  gamma_c, beta_c: (H,)  (LN only; any array otherwise)
//   h:        (B, P)   state in, state out (kept at padded steps; Proj: lstm_project_step updates it)
//   c:        (B, H)   state in, state out (kept at padded steps)
//   y_t:      (B, P)   h' at valid steps, 0 at padded ones (not Proj)
//   gates_t:  (B, 4H)  out, activated gates i, f, g, o (for backward)
//   c_t:      (B, H)   out, c after step s (kept value at padded steps)
//   chat_t:   (B, H)   out, c~ (LN: its normalised value); the sweep passes c_t itself without LN and c's zoneout
//   vhat_ih_t, vhat_hh_t: (B, 4H)  out, the normalised xw_t and gh (LN)
//   rstd_t:   (B, 3)   out, 1 / sqrt(var + eps) of xw_t, gh and c~ rows (LN)
//   m_t:      (B, H)   out, m = o tanh(u), the projection's input (Proj)
//   lengths:  (B,)     int32, kernel steps t >= lengths[b] are padding
//   zo, s, zmode: see common.cuh;  p_h, p_c: zoneout's p (blend mode)
template <typename T, bool LN, bool Proj>
__global__ void lstm_forward_step(const T* xw_t, const T* gh, const T* b_hh, const T* b_ih, const T* gamma_ih,
                                  const T* gamma_hh, const T* gamma_c, const T* beta_c, T* h, T* c, T* y_t,
                                  T* gates_t, T* c_t, T* chat_t, T* vhat_ih_t, T* vhat_hh_t, T* rstd_t, T* m_t,
                                  const int* lengths, const unsigned* zo, int s, int zmode, T p_h, T p_c, int B,
                                  int H, int P) {
    const int b = blockIdx.x, G = 4 * H;
    const int t = (int)zo[0] + s;
    const bool valid = valid_step(lengths, b, t);
    const Zoneout<T> zh(zmode, zo, 0, t, b, p_h), zc(zmode, zo, 1, t, b, p_c);
    const T *xr = xw_t + b * G, *gr = gh + b * G;
    T mean[2], rstd[2];
    if (LN) {
        const T* const rows[2] = {xr, gr};
        row_moments(rows, G, mean, rstd);
        if (threadIdx.x == 0 && blockIdx.y == 0) {
            rstd_t[b * 3] = rstd[0];
            rstd_t[b * 3 + 1] = rstd[1];
        }
    }
    // u = tanh's argument: c~ (LN: gamma_c chat + beta_c);  m = o tanh(u);  c' and h' (unless Proj) zoned
    auto finish = [&](int j, T c_tilde, T u) {
        const int i = b * H + j;
        const T m = gates_t[b * G + 3 * H + j] * tanh_(u);
        if (valid) c[i] = zc.apply(c[i], c_tilde, j);
        c_t[i] = c[i];
        if (Proj)
            m_t[i] = m;
        else
            store_h(h, y_t, b * P + j, j, m, valid, zh);
    };
    T c_sum[1] = {T(0)};
    for (int j = Columns::first(); j < H; j += Columns::stride()) {
        const int i = b * H + j;
        T p[4];
        for (int k = 0; k < 4; ++k) {
            const int q = k * H + j;
            if (LN) {
                // a = gamma_ih vhat_ih + gamma_hh vhat_hh + b_ih + b_hh
                T out[2];
                normalise_pair(q, xr, gr, mean, rstd, gamma_ih, gamma_hh, vhat_ih_t + b * G, vhat_hh_t + b * G, out);
                p[k] = out[0] + out[1] + b_ih[q] + b_hh[q];
            } else {
                p[k] = xr[q] + b_ih[q] + gr[q] + b_hh[q];
            }
        }
        const T in = Sigmoid::fwd(p[0]), forget = Sigmoid::fwd(p[1]), cand = Tanh::fwd(p[2]),
                out = Sigmoid::fwd(p[3]);
        gates_t[b * G + j] = in;
        gates_t[b * G + H + j] = forget;
        gates_t[b * G + 2 * H + j] = cand;
        gates_t[b * G + 3 * H + j] = out;
        const T c_tilde = forget * c[i] + in * cand;
        chat_t[i] = c_tilde;
        if (LN)
            c_sum[0] += c_tilde;
        else
            finish(j, c_tilde, c_tilde);
    }
    if (LN) {
        // LN(c~) over the H entries of the row: this thread's columns hold c~ in chat_t (two passes)
        block_sum(c_sum);
        const T mean_c = c_sum[0] / T(H);
        T sq[1] = {T(0)};
        for (int j = Columns::first(); j < H; j += Columns::stride()) {
            const T d = chat_t[b * H + j] - mean_c;
            sq[0] += d * d;
        }
        block_sum(sq);
        const T rstd_c = T(1) / sqrt(sq[0] / T(H) + T(GPURNN_LN_EPS));
        if (threadIdx.x == 0) rstd_t[b * 3 + 2] = rstd_c;
        for (int j = Columns::first(); j < H; j += Columns::stride()) {
            const int i = b * H + j;
            const T c_tilde = chat_t[i], chat = (c_tilde - mean_c) * rstd_c;
            chat_t[i] = chat;
            finish(j, c_tilde, gamma_c[j] * chat + beta_c[j]);
        }
    }
}

// Proj: h~ = hr = m W_hr^T from the GEMM after lstm_forward_step; h' = h~ zoned. One thread per (b, j) of (B, P).
//   hr: (B, P);  h: (B, P) state;  y_t: (B, P) out;  the rest as lstm_forward_step
template <typename T>
__global__ void lstm_project_step(const T* hr, T* h, T* y_t, const int* lengths, const unsigned* zo, int s,
                                  int zmode, T p_h, int B, int P) {
    const Element e = element(B, P);
    if (!e.inside) return;
    const int t = (int)zo[0] + s;
    store_h(h, y_t, e.b * P + e.j, e.j, hr[e.b * P + e.j], valid_step(lengths, e.b, t),
            Zoneout<T>(zmode, zo, 0, t, e.b, p_h));
}

// Proj backward, before the GEMM dm = dh~ @ W_hr and lstm_backward_step: what reaches h'.
//   dy_t: (B, P) dL/dy_t;  dhh: (B, P) dg_{t+1} @ W_hh;  dh: (B, P) carry in, out: the direct part of dL/dh_{t-1}
//   dhtil_t: (B, P) out, dL/dh~ (0 at padded steps)
template <typename T>
__global__ void lstm_project_backward(const T* dy_t, const T* dhh, T* dh, T* dhtil_t, const int* lengths,
                                      const unsigned* zo, int s, int zmode, int B, int P) {
    const Element e = element(B, P);
    if (!e.inside) return;
    const int i = e.b * P + e.j;
    const int t = (int)zo[0] + s;
    const T carry = dh[i] + dhh[i];
    if (!valid_step(lengths, e.b, t)) {
        dhtil_t[i] = T(0);
        dh[i] = carry;
        return;
    }
    // h' = k h + (1 - k) h~:  dh~ = (1 - k) dh',  k dh' straight on to h
    const ZoneoutGrad<T> d = zoneout_backward(Zoneout<T>(zmode, zo, 0, t, e.b, T(0)), carry + dy_t[i], e.j);
    dhtil_t[i] = d.fresh;
    dh[i] = d.prev;
}

// The whole pointwise backward of step s: gate gradients, dc_{t-1}, and (not Proj) the carry dh for step t-1.
//   dy_t:     (B, P)   dL/dy_t from above (ignored at padded steps; not Proj)
//   gates_t:  (B, 4H)  activated gates i, f, g, o of step s
//   c_prev:   (B, H)   cell state before step s (c_{t-1}, or c0 at s = 0)
//   chat_t:   (B, H)   c~ (LN: normalised) of step s
//   gamma_ih, gamma_hh (4H,), gamma_c, beta_c (H,): LN's parameters (LN only)
//   vhat_ih_t, vhat_hh_t: (B, 4H)  the normalised rows of step s;  rstd_t: (B, 3) their and c~'s rstd (LN)
//   dm_t:     (B, H)   dL/dm = dh~ @ W_hr (Proj; else unused)
//   dhh:      (B, P)   dg_{t+1} @ W_hh, step t+1's share of dL/dh_t (zeros at t = T-1; not Proj)
//   dh:       (B, P)   carry in: the rest of dL/dh_t; carry out: the direct part of dL/dh_{t-1} (not Proj)
//   dc:       (B, H)   in: dL/dc_t; out: dL/dc_{t-1}
//   dgx_t:    (B, 4H)  out, dL/d(xw_t); 0 at padded steps
//   dgh_t:    (B, 4H)  out, dL/d(h_{t-1} W_hh^T) (the same array as dgx_t without LN)
//   da_t:     (B, 4H)  out, dL/da (LN: the biases' and gains' gradient rows; any array otherwise)
//   du_t:     (B, H)   out, dL/du (LN: gamma_c's and beta_c's; any array otherwise)
//   lengths, zo, s, zmode: as forward (zmode ZONEOUT_OFF or ZONEOUT_MASKS)
template <typename T, bool LN, bool Proj>
__global__ void lstm_backward_step(const T* dy_t, const T* gates_t, const T* c_prev, const T* chat_t,
                                   const T* gamma_ih, const T* gamma_hh, const T* gamma_c, const T* beta_c,
                                   const T* vhat_ih_t, const T* vhat_hh_t, const T* rstd_t, const T* dm_t,
                                   const T* dhh, T* dh, T* dc, T* dgx_t, T* dgh_t, T* da_t, T* du_t,
                                   const int* lengths, const unsigned* zo, int s, int zmode, int B, int H, int P) {
    const int b = blockIdx.x, G = 4 * H;
    const int t = (int)zo[0] + s;
    if (!valid_step(lengths, b, t)) {        // the whole row (block) is padding: no gradient, carries pass
        for (int j = Columns::first(); j < H; j += Columns::stride()) {
            for (int k = 0; k < 4; ++k) {
                dgx_t[b * G + k * H + j] = dgh_t[b * G + k * H + j] = T(0);
                if (LN) da_t[b * G + k * H + j] = T(0);
            }
            if (LN) du_t[b * H + j] = T(0);
            // A padded step t+1 had dg = 0, so dhh = 0 there and the carry passes through unchanged.
            if (!Proj) dh[b * P + j] += dhh[b * P + j];
        }
        return;
    }
    const Zoneout<T> zh(zmode, zo, 0, t, b, T(0)), zc(zmode, zo, 1, t, b, T(0));
    T* da = LN ? da_t : dgx_t;               // dL/da; without LN that is dgx (= dgh) itself
    // dL/dc~ from du (through u) and the carried dc, then the gates: c~ = f c_prev + i g,
    //   dc~ = (1 - k_c) dc_t + dc(u);  di = dc~ g,  df = dc~ c_prev,  dg = dc~ i;  dc_prev = k_c dc_t + f dc~
    // each through its activation, written from its output: sigmoid' = s (1 - s), tanh' = 1 - g^2
    auto gates = [&](int j, T dc_from_u) {
        const int i = b * H + j, g0 = b * G + j;
        const T in = gates_t[g0], forget = gates_t[g0 + H], cand = gates_t[g0 + 2 * H];
        const ZoneoutGrad<T> dcz = zoneout_backward(zc, dc[i], j);
        const T dc_tilde = dcz.fresh + dc_from_u;
        da[g0] = dc_tilde * cand * Sigmoid::grad(in);
        da[g0 + H] = dc_tilde * c_prev[i] * Sigmoid::grad(forget);
        da[g0 + 2 * H] = dc_tilde * in * Tanh::grad(cand);
        dc[i] = forget * dc_tilde + dcz.prev;
    };
    T sums_c[2] = {T(0), T(0)};               // LN(c~): sum dchat, sum dchat chat
    for (int j = Columns::first(); j < H; j += Columns::stride()) {
        const int i = b * H + j, g0 = b * G + j;
        T dm;
        if (Proj) {
            dm = dm_t[i];
        } else {
            // h' = k h + (1 - k) h~, h~ = m:  dm = (1 - k) dh';  dh_{t-1} = k dh' + dg_t @ W_hh (the next GEMM)
            const int ih = b * P + j;
            const ZoneoutGrad<T> d = zoneout_backward(zh, dh[ih] + dhh[ih] + dy_t[ih], j);
            dm = d.fresh;
            dh[ih] = d.prev;
        }
        const T out = gates_t[g0 + 3 * H], chat = chat_t[i];
        const T tu = tanh_(LN ? gamma_c[j] * chat + beta_c[j] : chat);
        // m = o tanh(u):  do = dm tanh(u),  du = dm o (1 - tanh^2 u)
        da[g0 + 3 * H] = dm * tu * Sigmoid::grad(out);
        const T du = dm * out * (T(1) - tu * tu);
        if (LN) {
            // u = gamma_c chat + beta_c:  dchat = gamma_c du (LN backward after the row sums)
            du_t[i] = du;
            sums_c[0] += gamma_c[j] * du;
            sums_c[1] += gamma_c[j] * du * chat;
        } else {
            gates(j, du);
        }
    }
    if (!LN) return;
    block_sum(sums_c);
    const T rstd_ih = rstd_t[b * 3], rstd_hh = rstd_t[b * 3 + 1], rstd_c = rstd_t[b * 3 + 2];
    // a = gamma_ih vhat_ih + gamma_hh vhat_hh + ...:  dvhat_ih = gamma_ih da,  dvhat_hh = gamma_hh da
    ProjectionsLN<T> ln(gamma_ih, gamma_hh, vhat_ih_t + b * G, vhat_hh_t + b * G, 4, H);
    for (int j = Columns::first(); j < H; j += Columns::stride()) {
        const int i = b * H + j;
        gates(j, ln_backward(gamma_c[j] * du_t[i], chat_t[i], rstd_c, sums_c[0], sums_c[1], H));
        ln.add(j, da + b * G, da + b * G);
    }
    ln.reduce();
    for (int j = Columns::first(); j < H; j += Columns::stride())
        ln.backward(j, da + b * G, da + b * G, rstd_ih, rstd_hh, dgx_t + b * G, dgh_t + b * G);
}
