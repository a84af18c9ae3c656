// Shared by every .cu file: activations (derivatives written from the activation's output, as in
// numpy_ref.py, so backward needs only what forward saved), and the element index of a pointwise launch.
// cupy_raw.source() puts this header once at the top of the one translation unit of all .cu files, after the
// GPURNN_* constants of the float32 activations (#defines written from kernels/cpu_fused.py, their one definition).
#ifndef GPURNN_COMMON_CUH
#define GPURNN_COMMON_CUH

// float32 tanh and sigmoid: kernels/cpu_fused.py's exp_parts, sigmoid and tanh (the derivation is there), operation
// for operation, so the results are bit-identical to the CPU's (tests/test_activations.py, through the CUDA host
// harness) and carry its bounds, measured over every float32 input: tanh within 1.35 ulp, sigmoid within 1.32 ulp,
// both monotone, exactly +-1 / 0 / 1 wherever the correctly rounded value is, NaN in NaN out, limits at +-Inf.
// Every product is __fmul_rn and every fused one fmaf, so the compiler's mul+add contraction (-fmad=true) cannot
// change a rounding; + and - are IEEE and the one division __fdiv_rn, so no fast-math flag changes them either
// (cupy_raw compiles without --use_fast_math: no flush to zero).
struct ExpParts {
    float p, c, r, q;   // 2^Bias / (1 + e^a) = p / (c + r q): p = 2^(Bias-n), c = 1 + 2^-n, r = a - n ln2, q ~ (e^r - 1) / r
};

template <int Bias>     // a in [0, A_MAX] or NaN; Bias - n + 127 in 1..254
__device__ __forceinline__ ExpParts exp_parts(float a) {
    const float t = fmaf(a, GPURNN_INV_LN2_LOW, -0.5f) + GPURNN_ROUNDER;   // n + ROUNDER
    const float n = t - GPURNN_ROUNDER;
    ExpParts e;
    e.r = fmaf(-n, GPURNN_LN2_LO, fmaf(-n, GPURNN_LN2_HI, a));              // a - n ln2 (Cody-Waite)
    e.q = fmaf(fmaf(fmaf(fmaf(fmaf(GPURNN_Q5, e.r, GPURNN_Q4), e.r, GPURNN_Q3), e.r, GPURNN_Q2), e.r, GPURNN_Q1),
               e.r, GPURNN_Q0);
    // 2^(Bias-n) from n's low bits in t, shifted into the exponent field (unsigned: wraps mod 2^32 as intended)
    e.p = __uint_as_float(((127u + Bias) << 23) - (__float_as_uint(t) << 23));
    e.c = fmaf(e.p, __uint_as_float((127u - Bias) << 23), 1.0f);            // p 2^-Bias + 1
    return e;
}

__device__ __forceinline__ float sigmoid_f32(float x) {
    float a = fabsf(x);
    a = a > GPURNN_A_MAX ? GPURNN_A_MAX : a;                                 // NaN stays NaN (not fminf)
    const ExpParts e = exp_parts<64>(a);
    const float den = fmaf(e.r, e.q, e.c);
    const float den_lo = fmaf(e.r, e.q, (1.0f - den) + __fmul_rn(e.p, GPURNN_UNSCALE));
    float y = __fdiv_rn(e.p, den);
    const float res = fmaf(-y, den_lo, fmaf(-y, den, e.p));                 // p - y (den + den_lo)
    y = __fmul_rn(fmaf(res, fmaf(-0.5f, den, 1.5f), y), GPURNN_UNSCALE);   // y + res / den, rounded once
    return x < 0.0f ? y : 1.0f - y;
}

__device__ __forceinline__ float tanh_f32(float x) {
    const float ax = fabsf(x);
    const float x2 = __fmul_rn(ax, ax);
    const float small = fmaf(__fmul_rn(ax, x2),
                             fmaf(fmaf(fmaf(GPURNN_T3, x2, GPURNN_T2), x2, GPURNN_T1), x2, GPURNN_T0), ax);
    float a = __fmul_rn(2.0f, ax);
    a = a > GPURNN_TANH_A_MAX ? GPURNN_TANH_A_MAX : a;
    const ExpParts e = exp_parts<1>(a);
    const float large = 1.0f - __fdiv_rn(e.p, fmaf(e.r, e.q, e.c));        // 1 - 2 / (1 + e^2|x|)
    return copysignf(ax < GPURNN_TANH_SMALL ? small : large, x);
}

__device__ __forceinline__ float tanh_(float x) { return tanh_f32(x); }
__device__ __forceinline__ double tanh_(double x) { return tanh(x); }       // CUDA's tanh: <= 1 ulp
__device__ __forceinline__ float sigmoid_(float x) { return sigmoid_f32(x); }
__device__ __forceinline__ double sigmoid_(double x) {
    // e = e^-|x| in [0, 1] never overflows: 1 / (1 + e) for x >= 0, e / (1 + e) for x < 0, relatively accurate also
    // for tiny results; <= 2 ulp (x >= 0), <= 3.5 ulp (x < 0) with CUDA's exp (1 ulp): an exp error of k ulp moves
    // 1 / (1 + e) by <= k/2 ulp and e / (1 + e) by <= 2k ulp, plus 1 ulp for rounding 1 + e and 1/2 for the division.
    const double e = exp(x < 0.0 ? x : -x);
    return (x < 0.0 ? e : 1.0) / (1.0 + e);
}

// An activation is a type with fwd(pre-activation) and backward(dy, output) = dL/d pre-activation from dL/dy.
// tanh and sigmoid also have grad(output) = d act / d pre-activation, which the LSTM and GRU multiply by; relu
// has none: its backward selects, as torch's threshold backward does. All pass NaN through and give the limits at
// +-Inf.
struct Tanh {
    template <typename T> __device__ static T fwd(T x) { return tanh_(x); }
    template <typename T> __device__ static T grad(T y) { return T(1) - y * y; }        // 1 - tanh^2
    template <typename T> __device__ static T backward(T dy, T y) { return dy * grad(y); }
};

struct Sigmoid {
    template <typename T> __device__ static T fwd(T x) { return sigmoid_(x); }
    template <typename T> __device__ static T grad(T y) { return y * (T(1) - y); }      // s (1 - s)
    template <typename T> __device__ static T backward(T dy, T y) { return dy * grad(y); }
};

struct Relu {
    // exact; x <= 0 is false for NaN, so NaN passes through (fmax would turn it into 0)
    template <typename T> __device__ static T fwd(T x) { return x <= T(0) ? T(0) : x; }
    // 0 where the unit is off whatever dy is (NaN * 0 would be NaN), dy elsewhere (NaN y included)
    template <typename T> __device__ static T backward(T dy, T y) { return y <= T(0) ? T(0) : dy; }
};

struct Identity {
    template <typename T> __device__ static T fwd(T x) { return x; }
    template <typename T> __device__ static T backward(T dy, T) { return dy; }
};

// Pointwise launches cover a (B, N) array with one thread per element: a 2-D grid, blockIdx.x the batch row b and
// blockIdx.y * blockDim.x + threadIdx.x the column j (blockDim.x a multiple of 32, cupy_raw.geometry). A kernel with
// a layer-normalised row takes the whole row in one block (gridDim.y = 1): each thread its columns j = threadIdx.x,
// + blockDim.x, ... (Columns); the row's statistics are block reductions (block_sum).
struct Element {
    int b, j;      // batch row, column in 0..N-1
    bool inside;   // false for the tail threads of the row's last block
};

__device__ __forceinline__ Element element(int B, int N) {
    Element e;
    e.b = (int)blockIdx.x;
    e.j = (int)(blockIdx.y * blockDim.x + threadIdx.x);
    e.inside = e.b < B && e.j < N;
    return e;
}

// The columns of row blockIdx.x a thread owns: for (int j = first(); j < N; j += stride()).
struct Columns {
    __device__ static int first() { return (int)(blockIdx.y * blockDim.x + threadIdx.x); }
    __device__ static int stride() { return (int)(gridDim.y * blockDim.x); }
};

// Step t of sequence b is inside its length: padded steps output 0, keep the state, take no gradient.
__device__ __forceinline__ bool valid_step(const int* lengths, int b, int t) { return t < lengths[b]; }

// ---- the variants (kernels/__init__.py defines them) ----
// The step arguments every variant kernel reads from the device (so a captured graph serves every call):
//   zo: (5,) uint32  t0 (the kernel step of the sweep's first step), seed_h, threshold_h, seed_c, threshold_c
// and by value: s (the step within the sweep; kernel step t = t0 + s) and the zoneout mode (ZONEOUT_*).
enum { ZONEOUT_OFF = 0, ZONEOUT_MASKS = 1, ZONEOUT_BLEND = 2 };

// The counter-based generator, uint32 arithmetic wrapping mod 2^32 (numpy_ref.mix32, zoneout_bits).
__device__ __forceinline__ unsigned mix32(unsigned x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}
__device__ __forceinline__ unsigned row_key(unsigned seed, unsigned t, unsigned b) {
    return mix32(mix32(mix32(seed) + t) + b);
}
__device__ __forceinline__ unsigned zoneout_bits(unsigned key, unsigned j) { return mix32(key + j); }

// Zoneout of one row of h or c at one step: k = 1 where the unit keeps its previous value (masks: its bits below
// the threshold), k = p everywhere (blend, evaluation); off: the new value as it is.
template <typename T>
struct Zoneout {
    int mode;
    unsigned key, threshold;
    T p;
    // which: 0 for h, 1 for c (their seeds and thresholds in zo)
    __device__ Zoneout(int mode_, const unsigned* zo, int which, int t, int b, T p_)
        : mode(mode_), key(0), threshold(zo[2 + 2 * which]), p(p_) {
        if (mode == ZONEOUT_MASKS) key = row_key(zo[1 + 2 * which], (unsigned)t, (unsigned)b);
    }
    __device__ T keep(int j) const {
        return mode == ZONEOUT_MASKS ? (zoneout_bits(key, (unsigned)j) < threshold ? T(1) : T(0)) : p;
    }
    // h_t = k h_{t-1} + (1 - k) h~_t
    __device__ T apply(T prev, T fresh, int j) const {
        if (mode == ZONEOUT_OFF) return fresh;
        const T k = keep(j);
        return k * prev + (T(1) - k) * fresh;
    }
};

// Backward of h_t = k h_{t-1} + (1 - k) h~ for dL/dh_t = dh:  dh~ = (1 - k) dh;  k dh goes on to h_{t-1} directly.
template <typename T>
struct ZoneoutGrad {
    T fresh, prev;
};
template <typename T>
__device__ __forceinline__ ZoneoutGrad<T> zoneout_backward(const Zoneout<T>& z, T dh, int j) {
    if (z.mode == ZONEOUT_OFF) return {dh, T(0)};
    const T k = z.keep(j);
    return {(T(1) - k) * dh, k * dh};
}

// h update of a valid step (zoned), y_t = h_t there; a padded step keeps h and outputs 0.
template <typename T>
__device__ __forceinline__ void store_h(T* h, T* y_t, int i, int j, T fresh, bool valid, const Zoneout<T>& z) {
    if (valid) {
        const T h_new = z.apply(h[i], fresh, j);
        h[i] = h_new;
        y_t[i] = h_new;
    } else {
        y_t[i] = T(0);
    }
}

// v[0..N-1] summed over the threads of the block, the total in every thread; every thread of the block must call
// it (blockDim.x a multiple of 32). Warp sums by shuffles, then each thread adds the warps' partial sums in warp
// order, so every thread holds the same bits.
template <int N, typename T>
__device__ __forceinline__ void block_sum(T (&v)[N]) {
    __shared__ T partial[N][32];
    for (int k = 0; k < N; ++k)
        for (int offset = 16; offset > 0; offset >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], offset);
    __syncthreads();                          // the previous call's readers are done with `partial`
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    if (lane == 0)
        for (int k = 0; k < N; ++k) partial[k][warp] = v[k];
    __syncthreads();
    for (int k = 0; k < N; ++k) {
        T total = T(0);
        for (int w = 0; w < warps; ++w) total += partial[k][w];
        v[k] = total;
    }
}

// Mean and 1 / sqrt(var + eps) (biased variance, two passes) of N rows of n entries, read by the whole block.
template <int N, typename T>
__device__ __forceinline__ void row_moments(const T* const (&rows)[N], int n, T (&mean)[N], T (&rstd)[N]) {
    T sum[N];
    for (int k = 0; k < N; ++k) sum[k] = T(0);
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        for (int k = 0; k < N; ++k) sum[k] += rows[k][i];
    block_sum(sum);
    for (int k = 0; k < N; ++k) {
        mean[k] = sum[k] / T(n);
        sum[k] = T(0);
    }
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        for (int k = 0; k < N; ++k) {
            const T d = rows[k][i] - mean[k];
            sum[k] += d * d;
        }
    block_sum(sum);
    for (int k = 0; k < N; ++k) rstd[k] = T(1) / sqrt(sum[k] / T(n) + T(GPURNN_LN_EPS));
}

// LN backward of out = gamma vhat, vhat = (v - mean v) rstd over n entries, for one entry:
//   dv = rstd (dvhat - mean(dvhat) - vhat mean(dvhat vhat)),  dvhat = gamma dout
// (d mean v / dv = 1/n, d rstd / dv = -rstd^2 vhat / n); sums = (sum dvhat, sum dvhat vhat) over the row.
template <typename T>
__device__ __forceinline__ T ln_backward(T dvhat, T vhat, T rstd, T sum_dvhat, T sum_dvhat_vhat, int n) {
    return rstd * (dvhat - sum_dvhat / T(n) - vhat * (sum_dvhat_vhat / T(n)));
}

// The LN forward of entry q of the two projections' rows xr, gr (G,) of one batch row, from their mean and rstd:
// stores vhat_ih[q], vhat_hh[q] and gives out = (gamma_ih vhat_ih, gamma_hh vhat_hh).
template <typename T>
__device__ __forceinline__ void normalise_pair(int q, const T* xr, const T* gr, const T (&mean)[2], const T (&rstd)[2],
                                               const T* gamma_ih, const T* gamma_hh, T* vhat_ih, T* vhat_hh,
                                               T (&out)[2]) {
    const T vi = (xr[q] - mean[0]) * rstd[0], vh = (gr[q] - mean[1]) * rstd[1];
    vhat_ih[q] = vi;
    vhat_hh[q] = vh;
    out[0] = gamma_ih[q] * vi;
    out[1] = gamma_hh[q] * vh;
}

// The LN backward of the two projections of one batch row, gi = gamma_ih vhat_ih + ..., gh = gamma_hh vhat_hh + ...,
// each of G = gates*H entries (gate k of column j at k*H + j): d_ih, d_hh are dL/dgi, dL/dgh, and dvhat = gamma d.
// add() each thread's columns, reduce() (the whole block), then backward() each thread's columns.
template <typename T>
struct ProjectionsLN {
    const T *gamma_ih, *gamma_hh, *vhat_ih, *vhat_hh;   // (G,) gains; (G,) the row's normalised values
    int gates, H;
    T sums[4];                                           // sum dvhat, sum dvhat vhat, for the ih and the hh row
    __device__ ProjectionsLN(const T* gamma_ih_, const T* gamma_hh_, const T* vhat_ih_, const T* vhat_hh_, int gates_,
                             int H_)
        : gamma_ih(gamma_ih_), gamma_hh(gamma_hh_), vhat_ih(vhat_ih_), vhat_hh(vhat_hh_), gates(gates_), H(H_) {
        for (int k = 0; k < 4; ++k) sums[k] = T(0);
    }
    // d_ih, d_hh: the row's (G,) gradients
    __device__ void add(int j, const T* d_ih, const T* d_hh) {
        for (int k = 0; k < gates; ++k) {
            const int q = k * H + j;
            const T di = gamma_ih[q] * d_ih[q], dh = gamma_hh[q] * d_hh[q];
            sums[0] += di;
            sums[1] += di * vhat_ih[q];
            sums[2] += dh;
            sums[3] += dh * vhat_hh[q];
        }
    }
    __device__ void reduce() { block_sum(sums); }
    // dgx, dgh (the row's (G,)): dL/d(xw), dL/d(h W_hh^T) before the LN, by ln_backward
    __device__ void backward(int j, const T* d_ih, const T* d_hh, T rstd_ih, T rstd_hh, T* dgx, T* dgh) const {
        const int G = gates * H;
        for (int k = 0; k < gates; ++k) {
            const int q = k * H + j;
            dgx[q] = ln_backward(gamma_ih[q] * d_ih[q], vhat_ih[q], rstd_ih, sums[0], sums[1], G);
            dgh[q] = ln_backward(gamma_hh[q] * d_hh[q], vhat_hh[q], rstd_hh, sums[2], sums[3], G);
        }
    }
};

// Column sums over `rows` rows of (rows, cols) arrays: sum_a[j] = sum_r a[r, j], sum_aw[j] = sum_r a[r, j] w[r, j]
// (the LN parameters' gradients: beta/bias from a = dL/d(LN output), gamma with w = vhat). One block of 32 x 8
// threads per 32 columns; each column's threads reduce in a fixed order (deterministic).
//   a, w: (rows, cols);  sum_a, sum_aw: (cols,) out
template <typename T>
__global__ void column_sums(const T* a, const T* w, T* sum_a, T* sum_aw, int rows, int cols) {
    __shared__ T partial[2][8][32];
    const int j = blockIdx.x * 32 + threadIdx.x;
    T s = T(0), sw = T(0);
    if (j < cols)
        for (long long r = threadIdx.y; r < rows; r += 8) {
            const T v = a[r * cols + j];
            s += v;
            sw += v * w[r * cols + j];
        }
    partial[0][threadIdx.y][threadIdx.x] = s;
    partial[1][threadIdx.y][threadIdx.x] = sw;
    __syncthreads();
    if (threadIdx.y == 0 && j < cols) {
        for (int y = 1; y < 8; ++y) {
            s += partial[0][y][threadIdx.x];
            sw += partial[1][y][threadIdx.x];
        }
        sum_a[j] = s;
        sum_aw[j] = sw;
    }
}

#endif
