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

// Pointwise launches cover a (B, N) array with one thread per element: a 1-D grid of B*N threads.
struct Element {
    int b, j;      // batch row, column in 0..N-1
    bool inside;   // false for the tail threads of the last block
};

__device__ __forceinline__ Element element(int B, int N) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    Element e;
    e.inside = idx < (long long)B * N;
    e.b = (int)(idx / N);
    e.j = (int)(idx % N);
    return e;
}

// Step t of sequence b is inside its length: padded steps output 0, keep the state, take no gradient.
__device__ __forceinline__ bool valid_step(const int* lengths, int b, int t) { return t < lengths[b]; }

#endif
