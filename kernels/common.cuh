// Shared by every .cu file: activations (derivatives written from the activation's output, as in
// numpy_ref.py, so backward needs only what forward saved), and the element index of a pointwise launch.
// cupy_raw.source() puts this header once at the top of the one translation unit of all .cu files.
#ifndef GPURNN_COMMON_CUH
#define GPURNN_COMMON_CUH

__device__ __forceinline__ float tanh_(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_(double x) { return tanh(x); }

// An activation is a type with fwd(pre-activation) and grad(output) = d act / d pre-activation.
struct Tanh {
    template <typename T> __device__ static T fwd(T x) { return tanh_(x); }
    template <typename T> __device__ static T grad(T y) { return T(1) - y * y; }        // 1 - tanh^2
};

struct Sigmoid {
    // 1 / (1 + e^-x) = (1 + tanh(x / 2)) / 2, without overflow for large |x|
    template <typename T> __device__ static T fwd(T x) { return T(0.5) * (T(1) + tanh_(T(0.5) * x)); }
    template <typename T> __device__ static T grad(T y) { return y * (T(1) - y); }      // s (1 - s)
};

struct Relu {
    template <typename T> __device__ static T fwd(T x) { return x > T(0) ? x : T(0); }
    template <typename T> __device__ static T grad(T y) { return y > T(0) ? T(1) : T(0); }
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
