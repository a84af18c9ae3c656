// float32 -> bfloat16 for the GEMMs of math="bf16" (kernels/gemm.py): the upper 16 bits of the float32, rounded to
// nearest even; NaN stays a quiet NaN; a value that rounds past the largest finite bfloat16 becomes Inf.
//   x: (n,) float32   y: (n,) uint16, the bits of bfloat16
__global__ void f32_to_bf16(const float* x, unsigned short* y, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const unsigned u = __float_as_uint(x[i]);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        y[i] = (unsigned short)((u >> 16) | 0x0040u);
        return;
    }
    // + 0x7fff + the lowest kept bit: a tie rounds to the even neighbour
    y[i] = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
