// Shared by every .cu file: activations (derivatives written from the activation's output, as in
// numpy_ref.py, so backward needs only what forward saved), and the element index of a pointwise launch.
// cupy_raw.source() puts this header once at the top of the one translation unit of all .cu files.
#ifndef GPURNN_COMMON_CUH
#define GPURNN_COMMON_CUH

__device__ __forceinline__ float tanh_(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_(double x) { return tanh(x); }
__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }

// An activation is a type with fwd(pre-activation) and grad(output) = d act / d pre-activation.
// Error bounds from the CUDA math API (tanhf 2 ulp, tanh 1 ulp, expf 2 ulp, exp 1 ulp; + and / correctly rounded:
// cupy_raw compiles without --use_fast_math, so no approximate intrinsics and no flush to zero). All three pass
// NaN through and give the limits at +-Inf.
struct Tanh {
    // float <= 2 ulp, double <= 1 ulp
    template <typename T> __device__ static T fwd(T x) { return tanh_(x); }
    template <typename T> __device__ static T grad(T y) { return T(1) - y * y; }        // 1 - tanh^2
};

struct Sigmoid {
    // e = e^-|x| in [0, 1] never overflows: 1 / (1 + e) for x >= 0, e / (1 + e) for x < 0, relatively accurate also
    // for tiny results. float <= 2.5 ulp (x >= 0), <= 5.5 ulp (x < 0); double <= 2, <= 3.5 ulp: an exp error of
    // k ulp moves 1 / (1 + e) by <= k/2 ulp and e / (1 + e) by <= 2k ulp, plus 1 ulp for rounding 1 + e and 1/2
    // for the division.
    template <typename T> __device__ static T fwd(T x) {
        const T e = exp_(x < T(0) ? x : -x);
        return (x < T(0) ? e : T(1)) / (T(1) + e);
    }
    template <typename T> __device__ static T grad(T y) { return y * (T(1) - y); }      // s (1 - s)
};

struct Relu {
    // exact; x <= 0 is false for NaN, so NaN passes through (fmax would turn it into 0), and so does its gradient
    template <typename T> __device__ static T fwd(T x) { return x <= T(0) ? T(0) : x; }
    template <typename T> __device__ static T grad(T y) { return y <= T(0) ? T(0) : T(1); }
};

struct Identity {
    template <typename T> __device__ static T fwd(T x) { return x; }
    template <typename T> __device__ static T grad(T) { return T(1); }
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
