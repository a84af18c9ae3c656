// CUDA C on the host: what kernels/*.cu need to compile with a C++17 compiler and run on a CPU (cuda_host.py).
// This header is the CUDA surface; cuda_host_runtime.cpp, the scheduler, is built once and linked into each module.
//
// Execution model. A launch runs its blocks one after another on the calling OS thread, threads in order (x
// fastest). Each CUDA thread runs on a cooperative fiber until it exits or waits (__syncthreads, a warp
// collective, grid sync); a fiber runs the next thread as a plain call when its thread exits without waiting,
// so a kernel without waits costs one fiber per block. The order is deterministic. A cooperative launch
// (enable_cooperative_groups) runs every block at once, one OS thread per block, so grid sync and inter-block
// communication work. __shared__ is thread_local: one copy per OS thread, that is per running block; extern
// __shared__ arrays are defined by cuda_host.py, each of the largest size a block may opt in to (227 KiB).
//
// Supported: __global__/__device__/__host__/__forceinline__/__noinline__/__shared__/__constant__/__launch_bounds__/
// __align__; threadIdx, blockIdx, blockDim, gridDim, warpSize; dim3, uint3, float/double/int 2/3/4 vector types;
// static __shared__ and extern __shared__ (dynamic, filled with 0xff bytes, i.e. NaN floats, before each block);
// __syncthreads (+ _count/_and/_or), __syncwarp, __shfl{,_up,_down,_xor}_sync, __ballot/__any/__all_sync,
// cooperative_groups this_thread_block()/this_grid() .sync() (<cooperative_groups.h> is a shim too); atomics
// (atomicAdd/Sub/Exch/Min/Max/And/Or/Xor/CAS), __threadfence*, __nanosleep (yields), __trap; libm, and the CUDA
// intrinsics below computed with their exact libm twins (so fast-math intrinsics are more exact here).
// GPURNN_CUDA_HOST is defined, for code that cannot be the same on both (inline PTX, say).
// Misuse the hardware leaves undefined is an error here: a warp collective whose mask names an exited, missing or
// different-mask lane, a shuffle from a lane outside the mask, grid sync outside a cooperative launch, a block
// whose threads all wait on each other (deadlock). Exited threads count as arrived at __syncthreads.
// Not modelled: memory bounds, races (fibers switch only at the waits above), spin-waits on memory that another
// block of a non-cooperative launch writes (no preemption); two extern __shared__ names do not alias.
#ifndef GPURNN_CUDA_HOST_H
#define GPURNN_CUDA_HOST_H

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#define GPURNN_CUDA_HOST 1
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __shared__ thread_local
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define GPURNN_EXPORT extern "C" __attribute__((visibility("default")))

struct uint3 { unsigned x, y, z; };
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

#define GPURNN_VECTOR_TYPES(T, name, a2, a4)                                                                   \
    struct __attribute__((aligned(a2))) name##2 { T x, y; };                                                   \
    struct name##3 { T x, y, z; };                                                                             \
    struct __attribute__((aligned(a4))) name##4 { T x, y, z, w; };                                             \
    inline name##2 make_##name##2(T x, T y) { return {x, y}; }                                                 \
    inline name##3 make_##name##3(T x, T y, T z) { return {x, y, z}; }                                         \
    inline name##4 make_##name##4(T x, T y, T z, T w) { return {x, y, z, w}; }
GPURNN_VECTOR_TYPES(float, float, 8, 16)
GPURNN_VECTOR_TYPES(double, double, 16, 16)
GPURNN_VECTOR_TYPES(int, int, 8, 16)
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return {x, y, z}; }

namespace gpurnn_host {

constexpr unsigned kWarp = 32;
constexpr unsigned kMaxThreads = 1024;                  // per block
constexpr size_t kDynamicSharedMax = 227 * 1024;        // the most dynamic shared memory a block may opt in to
// A fiber's region, aligned to its size so the running fiber is found from the stack pointer alone:
// [Context header | canary | stack growing down from the top]. No guard page (each would cost the process two
// memory mappings, and a cooperative launch may hold tens of thousands of fibers): an overflow that reaches the
// canary is reported when the fiber next switches out.
constexpr size_t kRegion = 128 * 1024;
constexpr size_t kHeader = 2048;                // the Context, room for a small overflow, the canary
constexpr uint64_t kCanary = 0x6770726e6e2d6870ull;

enum State { kNew, kRunning, kRunnable, kWaitBlock, kWaitWarp, kDone };
enum Collective { kSyncWarp = 1, kShuffle, kVote };

struct Block;
struct Context;

struct Thread {             // one CUDA thread
    uint3 tid;
    unsigned rank;          // linear index in the block, x fastest
    State state;
    Context* context;       // the fiber running it
};

// A fiber. It runs CUDA threads one after another as plain calls until one waits; then it keeps that thread,
// and the scheduler starts a new fiber for the threads after it. A launch without waits is one fiber per block.
struct Context {
    void* sp;               // saved stack pointer while switched out
    Block* block;
    Thread* thread;         // the CUDA thread it runs now
    bool kept;              // its thread waited: another fiber carries on with the threads after it
    bool done;
};

inline Context* current() {     // the running fiber: the base of the region holding the stack pointer
    uintptr_t sp = reinterpret_cast<uintptr_t>(__builtin_frame_address(0));
    asm("" : "+r"(sp));         // launder: an address on this stack, not a pointer into any object of the frame
    return reinterpret_cast<Context*>(sp & ~uintptr_t(kRegion - 1));
}

struct Warp {
    unsigned arrived, mask, gen;
    int kind;
    uint64_t value[2][kWarp];   // by generation parity: a fast lane's next collective never overwrites this one
};

struct GridBarrier {        // across the blocks (OS threads) of a cooperative launch
    pthread_mutex_t mutex = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
    unsigned blocks = 0, arrived = 0, gen = 0, finished = 0;
    bool failed = false;
};

struct Launch {
    dim3 grid, block;
    size_t shared_bytes;
    void (*body)(const void*);  // runs the kernel once, for the current thread
    const void* call;
    GridBarrier* grid_barrier;  // null unless cooperative
};

struct Block {
    const Launch* launch;
    uint3 idx;
    unsigned n, live, next;                 // threads, threads not exited, next thread to start
    std::vector<Thread> threads;
    std::vector<Warp> warps;
    std::vector<unsigned> runq;             // ring of thread ranks; each thread is in it at most once
    std::vector<Context*> contexts;         // fibers started for this block and not yet given back
    unsigned head, count;
    void* sched_sp;
    unsigned bar_arrived, bar_gen, bar_grid;  // __syncthreads (bar_grid 0) or grid sync (1) in progress
    int bar_acc[2];                           // __syncthreads_count/and/or: the predicate sum, by gen parity
    bool failed;
    std::string error;
};

// extern __shared__ arrays: defined, and listed here, by the generated wrapper (cuda_host.py)
struct DynamicShared { void* (*address)(); };
extern const DynamicShared dynamic_shared[];
extern const unsigned dynamic_shared_count;

// The runtime (cuda_host_runtime.cpp, compiled once and linked into every module)
[[noreturn]] void fail(const char* what);                       // from a kernel: the launch stops with an error
void block_barrier(unsigned grid, int pred = 0);                // __syncthreads (grid 0), grid sync (grid 1)
int block_predicate_sum();                                      // after a barrier: how many threads passed pred
const uint64_t* warp_exchange(unsigned mask, int kind, uint64_t value);   // every lane's value, lanes of mask
void yield_thread();                                            // let the block's other threads run
int run_launch(Launch* launch, bool cooperative);               // 0, or 1 with gpurnn_host_error() set

// ---- the generated launchers: run a kernel in each fiber on a cuLaunchKernel-style argument array
template <class... A>
struct Call {
    void (*kernel)(A...);
    void** args;            // args[i] points at the value of parameter i
    template <size_t... I>
    void run(std::index_sequence<I...>) const { kernel(*static_cast<std::remove_cv_t<A>*>(args[I])...); }
    static void body(const void* self) { static_cast<const Call*>(self)->run(std::index_sequence_for<A...>{}); }
};

template <class... A>
int launch(void (*kernel)(A...), const unsigned* grid, const unsigned* block, size_t shared, int cooperative,
           void** args) {
    const Call<A...> call{kernel, args};
    Launch L{dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]), shared, &Call<A...>::body,
             &call, nullptr};
    return run_launch(&L, cooperative != 0);
}

// Parameter type codes for the Python side's argument checks: f4 f8 i1..i8 u1..u8 b1, "*" a pointer to one,
// "c*" a pointer to const; "?" anything else (refused at launch).
template <class T> struct Code { static constexpr const char* value = "?"; };
#define GPURNN_CODE(T, c)                                                                                      \
    template <> struct Code<T> { static constexpr const char* value = c; };                                   \
    template <> struct Code<T*> { static constexpr const char* value = "*" c; };                              \
    template <> struct Code<const T*> { static constexpr const char* value = "c*" c; };
GPURNN_CODE(float, "f4") GPURNN_CODE(double, "f8") GPURNN_CODE(bool, "b1")
GPURNN_CODE(signed char, "i1") GPURNN_CODE(char, "i1") GPURNN_CODE(unsigned char, "u1")
GPURNN_CODE(short, "i2") GPURNN_CODE(unsigned short, "u2") GPURNN_CODE(int, "i4") GPURNN_CODE(unsigned, "u4")
GPURNN_CODE(long, "i8") GPURNN_CODE(unsigned long, "u8") GPURNN_CODE(long long, "i8")
GPURNN_CODE(unsigned long long, "u8")
#undef GPURNN_CODE

// The kernel's parameter codes, then a null.
template <class... A>
const char* const* signature(void (*)(A...)) {
    static constexpr const char* codes[] = {Code<std::remove_cv_t<A>>::value..., nullptr};
    return codes;
}

}  // namespace gpurnn_host

// ---- the CUDA built-in variables and device functions
#define threadIdx (::gpurnn_host::current()->thread->tid)
#define blockIdx (::gpurnn_host::current()->block->idx)
#define blockDim (::gpurnn_host::current()->block->launch->block)
#define gridDim (::gpurnn_host::current()->block->launch->grid)
#define warpSize 32

inline void __syncthreads() { gpurnn_host::block_barrier(0); }
inline int __syncthreads_count(int p) { gpurnn_host::block_barrier(0, p); return gpurnn_host::block_predicate_sum(); }
inline int __syncthreads_and(int p) { return __syncthreads_count(!p) == 0; }
inline int __syncthreads_or(int p) { return __syncthreads_count(p) != 0; }
inline void __syncwarp(unsigned mask = 0xffffffffu) { gpurnn_host::warp_exchange(mask, gpurnn_host::kSyncWarp, 0); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __nanosleep(unsigned) { gpurnn_host::yield_thread(); }   // a spin-wait's pause
[[noreturn]] inline void __trap() { gpurnn_host::fail("__trap()"); }

namespace gpurnn_host {
template <class T> uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8, "warp shuffles move at most 8 bytes");
    uint64_t u = 0;
    memcpy(&u, &v, sizeof(T));
    return u;
}
template <class T> T from_bits(uint64_t u) {
    T v;
    memcpy(&v, &u, sizeof(T));
    return v;
}
// the value `src` held (its own value when src is -1), checking src is in the collective
template <class T> T shuffled(unsigned mask, T var, int src) {
    const unsigned lane = current()->thread->rank % kWarp;
    const uint64_t* v = warp_exchange(mask, kShuffle, to_bits(var));
    if (src < 0) return var;
    if (!(mask >> src & 1)) fail("a shuffle reads a lane outside its mask");
    return src == int(lane) ? var : from_bits<T>(v[src]);
}
inline int segment(int width) {
    if (width <= 0 || width > 32 || (width & (width - 1))) fail("a shuffle's width must be a power of 2 up to 32");
    return width;
}
inline unsigned lane() { return current()->thread->rank % kWarp; }
}  // namespace gpurnn_host

template <class T> T __shfl_sync(unsigned mask, T var, int src, int width = warpSize) {
    using namespace gpurnn_host;
    const int w = segment(width), l = int(lane());
    return shuffled(mask, var, (l & ~(w - 1)) + (src & (w - 1)));
}
template <class T> T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    using namespace gpurnn_host;
    const int w = segment(width), l = int(lane());
    return shuffled(mask, var, (l & (w - 1)) >= int(delta) ? l - int(delta) : -1);
}
template <class T> T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    using namespace gpurnn_host;
    const int w = segment(width), l = int(lane());
    return shuffled(mask, var, (l & (w - 1)) + int(delta) < w ? l + int(delta) : -1);
}
template <class T> T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
    using namespace gpurnn_host;
    const int w = segment(width), l = int(lane()), src = l ^ lane_mask;
    return shuffled(mask, var, src < ((l / w) + 1) * w ? src : -1);   // a later segment gives the own value
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    const uint64_t* v = gpurnn_host::warp_exchange(mask, gpurnn_host::kVote, pred != 0);
    unsigned bits = 0;
    for (unsigned l = 0; l < 32; ++l)
        if ((mask >> l & 1) && v[l]) bits |= 1u << l;
    return bits;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }

namespace cooperative_groups {
struct thread_block {
    void sync() const { __syncthreads(); }
    unsigned thread_rank() const { return ::gpurnn_host::current()->thread->rank; }
    unsigned size() const { return blockDim.x * blockDim.y * blockDim.z; }
    dim3 group_index() const { return blockIdx; }
    dim3 thread_index() const { return threadIdx; }
};
struct grid_group {
    void sync() const { ::gpurnn_host::block_barrier(1); }
    bool is_valid() const { return ::gpurnn_host::current()->block->launch->grid_barrier != nullptr; }
    unsigned long long size() const {
        return 1ull * gridDim.x * gridDim.y * gridDim.z * blockDim.x * blockDim.y * blockDim.z;
    }
    unsigned long long thread_rank() const {
        const unsigned long long b = blockIdx.x + 1ull * gridDim.x * (blockIdx.y + 1ull * gridDim.y * blockIdx.z);
        return b * blockDim.x * blockDim.y * blockDim.z + ::gpurnn_host::current()->thread->rank;
    }
};
inline thread_block this_thread_block() { return {}; }
inline grid_group this_grid() { return {}; }
inline void sync(const thread_block& g) { g.sync(); }
inline void sync(const grid_group& g) { g.sync(); }
}  // namespace cooperative_groups

// ---- atomics (real ones: blocks of a cooperative launch run on different OS threads)
#define GPURNN_ATOMIC_INT(T)                                                                                    \
    inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }                      \
    inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }                      \
    inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }                      \
    inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }                        \
    inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST); }                      \
    inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }                    \
    inline T atomicCAS(T* p, T expected, T v) {                                                                \
        __atomic_compare_exchange_n(p, &expected, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);               \
        return expected;                                                                                       \
    }                                                                                                          \
    inline T atomicMin(T* p, T v) {                                                                            \
        T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);                                                          \
        while (v < old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) \
            ;                                                                                                  \
        return old;                                                                                            \
    }                                                                                                          \
    inline T atomicMax(T* p, T v) {                                                                            \
        T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);                                                          \
        while (v > old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) \
            ;                                                                                                  \
        return old;                                                                                            \
    }
GPURNN_ATOMIC_INT(int)
GPURNN_ATOMIC_INT(unsigned)
GPURNN_ATOMIC_INT(unsigned long long)
GPURNN_ATOMIC_INT(long long)
#undef GPURNN_ATOMIC_INT
template <class F> F gpurnn_atomic_add_float(F* p, F v) {
    F old, sum;
    __atomic_load(p, &old, __ATOMIC_SEQ_CST);
    do sum = old + v;
    while (!__atomic_compare_exchange(p, &old, &sum, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    return old;
}
inline float atomicAdd(float* p, float v) { return gpurnn_atomic_add_float(p, v); }
inline double atomicAdd(double* p, double v) { return gpurnn_atomic_add_float(p, v); }
inline float atomicExch(float* p, float v) {
    float old;
    __atomic_exchange(p, &v, &old, __ATOMIC_SEQ_CST);
    return old;
}

// ---- math: libm through <math.h> (float and double overloads of the standard names), CUDA's extras, and its
// fast intrinsics computed exactly (glibc declares some __xxxf names itself; these definitions match them)
#define GPURNN_MINMAX(T)                                                                                        \
    inline T min(T a, T b) { return a < b ? a : b; }                                                           \
    inline T max(T a, T b) { return a > b ? a : b; }
GPURNN_MINMAX(int) GPURNN_MINMAX(unsigned) GPURNN_MINMAX(long long) GPURNN_MINMAX(unsigned long long)
#undef GPURNN_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
#define GPURNN_LIBM_ALIAS(name, fn)                                                                            \
    extern "C" inline __attribute__((always_inline, visibility("hidden"))) float name(float x) noexcept {      \
        return fn(x);                                                                                          \
    }
GPURNN_LIBM_ALIAS(__expf, expf) GPURNN_LIBM_ALIAS(__exp10f, exp10f) GPURNN_LIBM_ALIAS(__logf, logf)
GPURNN_LIBM_ALIAS(__log2f, log2f) GPURNN_LIBM_ALIAS(__log10f, log10f) GPURNN_LIBM_ALIAS(__sinf, sinf)
GPURNN_LIBM_ALIAS(__cosf, cosf) GPURNN_LIBM_ALIAS(__tanf, tanf)
#undef GPURNN_LIBM_ALIAS
extern "C" inline __attribute__((always_inline, visibility("hidden"))) float __powf(float x, float y) noexcept {
    return powf(x, y);
}
extern "C" inline __attribute__((always_inline, visibility("hidden"))) void __sincosf(float x, float* s,
                                                                                      float* c) noexcept {
    *s = sinf(x);
    *c = cosf(x);
}
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __saturatef(float x) { return x != x ? 0.0f : fminf(fmaxf(x, 0.0f), 1.0f); }
inline int __float_as_int(float x) { int i; memcpy(&i, &x, 4); return i; }
inline unsigned __float_as_uint(float x) { unsigned i; memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; memcpy(&x, &i, 4); return x; }
inline float __uint_as_float(unsigned i) { float x; memcpy(&x, &i, 4); return x; }
inline long long __double_as_longlong(double x) { long long i; memcpy(&i, &x, 8); return i; }
inline double __longlong_as_double(long long i) { double x; memcpy(&x, &i, 8); return x; }
inline int __float2int_rn(float x) { return int(nearbyintf(x)); }
inline int __float2int_rz(float x) { return int(x); }
inline int __double2int_rn(double x) { return int(nearbyint(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x ? __builtin_clz(unsigned(x)) : 32; }
inline int __clzll(long long x) { return x ? __builtin_clzll((unsigned long long)x) : 64; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
template <class T> T __ldg(const T* p) { return *p; }

#endif
