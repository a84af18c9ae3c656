// CUDA C on the host: what kernels/*.cu need to compile with a C++17 compiler and run on a CPU (cuda_host.py).
//
// Execution model. A launch runs its blocks one after another on the calling OS thread; inside a block every
// CUDA thread is a cooperative fiber with its own stack, started in thread order and run until it exits or waits
// (__syncthreads, a warp collective, grid sync), so a launch is deterministic. A cooperative launch
// (enable_cooperative_groups) runs every block at once, one OS thread per block, so grid sync and inter-block
// communication work. __shared__ is thread_local: one copy per OS thread, that is per running block.
//
// Supported: __global__/__device__/__host__/__forceinline__/__shared__/__constant__/__launch_bounds__/__align__;
// threadIdx, blockIdx, blockDim, gridDim, warpSize; dim3, uint3 and the float/double/int/uint vector types;
// static __shared__ and extern __shared__ (dynamic, filled with 0xff bytes, i.e. NaN floats, before each block);
// __syncthreads (+ _count/_and/_or), __syncwarp, __shfl{,_up,_down,_xor}_sync, __ballot/__any/__all_sync,
// cooperative_groups this_thread_block()/this_grid() .sync(); atomics (atomicAdd/Sub/Exch/Min/Max/And/Or/Xor/CAS),
// __threadfence*, __nanosleep (yields); libm, and the CUDA intrinsics below computed with their exact libm twins.
// Misuse the hardware leaves undefined is an error here: a warp collective whose mask names an exited, missing or
// different-mask lane, a shuffle from a lane outside the mask, grid sync outside a cooperative launch, a block
// whose threads all wait on each other (deadlock). Exited threads count as arrived at __syncthreads.
// Not modelled: memory bounds, races inside a block (fibers switch only at the waits above), spin-waits on
// memory another block of a non-cooperative launch writes (no preemption).
#ifndef GPURNN_CUDA_HOST_H
#define GPURNN_CUDA_HOST_H

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#include <string>
#include <tuple>
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
// A fiber's mapping, aligned to its size so the running fiber is found from the stack pointer alone:
// [Context header | guard page | stack growing down from the top].
constexpr size_t kRegion = 256 * 1024;
constexpr size_t kHeader = 16 * 1024;
constexpr size_t kGuard = 4096;

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

struct StackPool {                          // per OS thread
    std::vector<Context*> free;
    ~StackPool() {
        for (Context* c : free) munmap(c, kRegion);
    }
    Context* get() {
        if (!free.empty()) {
            Context* c = free.back();
            free.pop_back();
            return c;
        }
        char* m = static_cast<char*>(mmap(nullptr, 2 * kRegion, PROT_READ | PROT_WRITE,
                                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
        if (m == MAP_FAILED) return nullptr;
        char* base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(m) + kRegion - 1) & ~uintptr_t(kRegion - 1));
        if (base > m) munmap(m, base - m);
        if (m + 2 * kRegion > base + kRegion) munmap(base + kRegion, m + 2 * kRegion - (base + kRegion));
        mprotect(base + kHeader, kGuard, PROT_NONE);    // an overflow faults instead of corrupting the header
        return reinterpret_cast<Context*>(base);
    }
    void put(Context* c) { free.push_back(c); }
};

inline thread_local StackPool tl_stacks;
inline thread_local std::string tl_error;  // the last failed launch's message, for the caller's thread

// extern __shared__ arrays: defined, and listed here, by the generated wrapper (cuda_host.py)
struct DynamicShared { void* (*address)(); };
extern const DynamicShared dynamic_shared[];
extern const unsigned dynamic_shared_count;

}  // namespace gpurnn_host

// ---- context switch: save callee-saved registers on this stack, store sp, load the other sp, restore
extern "C" void gpurnn_host_switch(void** save_sp, void* load_sp);
extern "C" void gpurnn_host_fiber_main(gpurnn_host::Context* c);
#if defined(__x86_64__) && defined(__linux__)
asm(R"(
    .pushsection .text
    .globl gpurnn_host_switch
    .hidden gpurnn_host_switch
    .type gpurnn_host_switch, @function
gpurnn_host_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size gpurnn_host_switch, .-gpurnn_host_switch

    .globl gpurnn_host_trampoline
    .hidden gpurnn_host_trampoline
    .type gpurnn_host_trampoline, @function
gpurnn_host_trampoline:
    movq %r12, %rdi
    call gpurnn_host_fiber_main
    ud2
    .size gpurnn_host_trampoline, .-gpurnn_host_trampoline
    .popsection
)");
extern "C" void gpurnn_host_trampoline();

namespace gpurnn_host {
// A new fiber's stack as gpurnn_host_switch leaves a suspended one: r15..rbp, then the return address.
inline void* initial_sp(Context* c) {
    const uintptr_t top = reinterpret_cast<uintptr_t>(c) + kRegion - 64;
    uint64_t* sp = reinterpret_cast<uint64_t*>(top - 72);   // the trampoline then starts with rsp % 16 == 0
    sp[0] = sp[1] = sp[2] = 0;                              // r15, r14, r13
    sp[3] = reinterpret_cast<uint64_t>(c);                  // r12: the trampoline's argument
    sp[4] = sp[5] = 0;                                      // rbx, rbp
    sp[6] = reinterpret_cast<uint64_t>(&gpurnn_host_trampoline);
    return sp;
}
}  // namespace gpurnn_host
#else
#include <ucontext.h>
// Elsewhere: ucontext (a system call per switch, so slower; same semantics). sp points at a ucontext_t.
extern "C" inline void gpurnn_host_switch(void** save_sp, void* load_sp) {
    ucontext_t here;
    *save_sp = &here;
    swapcontext(&here, static_cast<ucontext_t*>(load_sp));
}
namespace gpurnn_host {
inline void* initial_sp(Context* c) {
    static_assert(sizeof(Context) + sizeof(ucontext_t) <= kHeader, "the header holds the first ucontext");
    ucontext_t* uc = reinterpret_cast<ucontext_t*>(reinterpret_cast<char*>(c) + sizeof(Context));
    getcontext(uc);
    uc->uc_stack.ss_sp = reinterpret_cast<char*>(c) + kHeader + kGuard;
    uc->uc_stack.ss_size = kRegion - kHeader - kGuard;
    uc->uc_link = nullptr;
    makecontext(uc, reinterpret_cast<void (*)()>(&gpurnn_host_fiber_main), 1, c);
    return uc;
}
}  // namespace gpurnn_host
#endif

namespace gpurnn_host {

// ---- the scheduler of one block
inline void push(Block* b, unsigned rank) {
    b->runq[(b->head + b->count++) % b->n] = rank;
    b->threads[rank].state = kRunnable;
}

inline void switch_to(Block* b, Context* c) {     // scheduler -> fiber, back when its thread waits or it ends
    if (c->thread) c->thread->state = kRunning;
    gpurnn_host_switch(&b->sched_sp, c->sp);
}

inline void suspend(Thread* t, State why) {        // fiber -> scheduler
    Context* c = t->context;
    t->state = why;
    c->kept = true;
    gpurnn_host_switch(&c->sp, c->block->sched_sp);
}

inline std::string where(const Block* b, const Thread* t) {
    char s[96];
    snprintf(s, sizeof s, "thread (%u, %u, %u) of block (%u, %u, %u): ", t->tid.x, t->tid.y, t->tid.z, b->idx.x,
             b->idx.y, b->idx.z);
    return s;
}

[[noreturn]] inline void fail(const char* what) {   // from a fiber: the launch stops, the fiber never resumes
    Context* c = current();
    Block* b = c->block;
    if (!b->failed) b->error = where(b, c->thread) + what;
    b->failed = true;
    suspend(c->thread, kDone);
    __builtin_unreachable();
}

inline void grid_wait(Block* b);

inline void release_block_barrier(Block* b) {  // by the last thread to arrive; it goes on, the others queue
    if (b->bar_grid) grid_wait(b);
    b->bar_arrived = 0;
    b->bar_acc[(b->bar_gen + 1) & 1] = 0;
    b->bar_gen++;
    for (Thread& t : b->threads)
        if (t.state == kWaitBlock) push(b, t.rank);
}

inline void block_barrier(unsigned grid, int pred = 0) {
    Context* c = current();
    Block* b = c->block;
    if (b->bar_arrived && b->bar_grid != grid)
        fail("__syncthreads and grid sync reached by different threads of a block at once");
    b->bar_grid = grid;
    b->bar_acc[b->bar_gen & 1] += pred != 0;
    if (++b->bar_arrived == b->live)
        release_block_barrier(b);
    else
        suspend(c->thread, kWaitBlock);
}

inline int block_predicate_sum() {
    const Block* b = current()->block;
    return b->bar_acc[(b->bar_gen - 1) & 1];
}

// A warp collective: every lane of `mask` contributes `value`; returns the 32 contributions.
inline const uint64_t* warp_exchange(unsigned mask, int kind, uint64_t value) {
    Context* c = current();
    Block* b = c->block;
    Thread* t = c->thread;
    const unsigned warp = t->rank / kWarp, lane = t->rank % kWarp, first = warp * kWarp;
    const unsigned present = b->n - first >= kWarp ? ~0u : (1u << (b->n - first)) - 1;
    Warp& w = b->warps[warp];
    if (!(mask >> lane & 1)) fail("a warp collective called by a lane outside its mask");
    if (mask & ~present) fail("a warp collective's mask names lanes the block does not have");
    for (unsigned l = 0; l < kWarp; ++l)
        if ((mask >> l & 1) && b->threads[first + l].state == kDone)
            fail("a warp collective's mask names a lane that has exited");
    if (w.arrived && (w.mask != mask || w.kind != kind))
        fail("lanes of a warp are in different collectives (or masks) at once");
    w.mask = mask;
    w.kind = kind;
    const unsigned gen = w.gen;
    w.value[gen & 1][lane] = value;
    w.arrived |= 1u << lane;
    if (w.arrived == mask) {
        w.arrived = 0;
        w.gen++;
        for (unsigned l = 0; l < kWarp; ++l)
            if ((mask >> l & 1) && l != lane) push(b, first + l);
    } else {
        suspend(t, kWaitWarp);
    }
    return w.value[gen & 1];
}

inline void poison_dynamic_shared(size_t bytes) {
    for (unsigned i = 0; i < dynamic_shared_count; ++i) memset(dynamic_shared[i].address(), 0xff, bytes);
}

// Start a fiber for the threads from b->next on, or resume the one holding a waiting thread; collect it when done.
inline void step(Block* b, Context* c) {
    switch_to(b, c);
    if (!c->done) return;
    tl_stacks.put(c);
    for (Context*& k : b->contexts)
        if (k == c) {
            k = b->contexts.back();
            b->contexts.pop_back();
            break;
        }
}

inline void run_block(Block* b, const Launch* L, uint3 idx) {
    b->launch = L;
    b->idx = idx;
    b->live = b->n;
    b->next = b->head = b->count = 0;
    b->bar_arrived = b->bar_gen = b->bar_grid = 0;
    b->bar_acc[0] = b->bar_acc[1] = 0;
    for (Warp& w : b->warps) w.arrived = w.gen = 0;
    const dim3 d = L->block;
    for (unsigned r = 0; r < b->n; ++r)
        b->threads[r] = Thread{uint3{r % d.x, r / d.x % d.y, r / (d.x * d.y)}, r, kNew, nullptr};
    poison_dynamic_shared(L->shared_bytes);
    while (!b->failed && b->next < b->n) {
        Context* c = tl_stacks.get();
        if (!c) {
            b->failed = true;
            b->error = "out of memory for fiber stacks";
            break;
        }
        *c = Context{initial_sp(c), b, nullptr, false, false};
        b->contexts.push_back(c);
        step(b, c);
    }
    while (!b->failed && b->count) {
        const unsigned r = b->runq[b->head];
        b->head = (b->head + 1) % b->n;
        b->count--;
        step(b, b->threads[r].context);
    }
    if (!b->failed && b->live) {
        for (Thread& t : b->threads)
            if (t.state != kDone) {
                b->error = where(b, &t) + (t.state == kWaitWarp ? "deadlock: waits in a warp collective that "
                                                                  "other lanes never reach"
                                                                : "deadlock: waits at a block barrier that "
                                                                  "other threads never reach");
                break;
            }
        b->failed = true;
    }
    for (Context* c : b->contexts) tl_stacks.put(c);     // after a failure: abandon the fibers still waiting
    b->contexts.clear();
}

inline void grid_wait(Block* b) {
    GridBarrier* g = b->launch->grid_barrier;
    if (!g) fail("grid sync in a launch without enable_cooperative_groups");
    pthread_mutex_lock(&g->mutex);
    const unsigned gen = g->gen;
    if (++g->arrived == g->blocks) {
        g->arrived = 0;
        g->gen++;
        pthread_cond_broadcast(&g->cond);
    } else {
        while (g->gen == gen && !g->failed && !g->finished) pthread_cond_wait(&g->cond, &g->mutex);
    }
    const bool ok = g->gen != gen;
    pthread_mutex_unlock(&g->mutex);
    if (!ok) fail("grid sync that another block never reaches (it exited or failed)");
}

struct BlockTask {
    const Launch* launch;
    uint3 idx;
    Block block;
};

inline void* run_cooperative_block(void* p) {
    BlockTask* t = static_cast<BlockTask*>(p);
    run_block(&t->block, t->launch, t->idx);
    GridBarrier* g = t->launch->grid_barrier;
    pthread_mutex_lock(&g->mutex);
    g->finished++;
    g->failed |= t->block.failed;
    pthread_cond_broadcast(&g->cond);
    pthread_mutex_unlock(&g->mutex);
    return nullptr;
}

inline void prepare(Block* b, unsigned n) {
    b->n = n;
    b->threads.assign(n, Thread{});
    b->warps.assign((n + kWarp - 1) / kWarp, Warp{});
    b->runq.assign(n, 0);
    b->failed = false;
}

inline int run_launch(Launch* L, bool cooperative) {
    const dim3 g = L->grid, d = L->block;
    const unsigned n = d.x * d.y * d.z;
    const unsigned long long blocks = 1ull * g.x * g.y * g.z;
    if (!n || n > kMaxThreads || !blocks || L->shared_bytes > kDynamicSharedMax) {
        tl_error = "invalid launch configuration";
        return 1;
    }
    std::string error;
    if (!cooperative) {
        Block b;
        prepare(&b, n);
        for (unsigned z = 0; z < g.z && !b.failed; ++z)
            for (unsigned y = 0; y < g.y && !b.failed; ++y)
                for (unsigned x = 0; x < g.x && !b.failed; ++x) run_block(&b, L, uint3{x, y, z});
        error = b.error;
    } else {
        GridBarrier barrier;
        barrier.blocks = static_cast<unsigned>(blocks);
        L->grid_barrier = &barrier;
        std::vector<BlockTask> tasks(blocks);
        std::vector<pthread_t> threads(blocks);
        size_t started = 0;
        for (unsigned long long i = 0; i < blocks; ++i) {
            tasks[i].launch = L;
            tasks[i].idx = uint3{unsigned(i % g.x), unsigned(i / g.x % g.y), unsigned(i / (1ull * g.x * g.y))};
            prepare(&tasks[i].block, n);
        }
        for (; started < blocks; ++started)
            if (pthread_create(&threads[started], nullptr, run_cooperative_block, &tasks[started])) break;
        if (started < blocks) {         // the blocks that did start fail at their first grid sync
            pthread_mutex_lock(&barrier.mutex);
            barrier.failed = true;
            pthread_cond_broadcast(&barrier.cond);
            pthread_mutex_unlock(&barrier.mutex);
            error = "could not start an OS thread for every block of a cooperative launch";
        }
        for (size_t i = 0; i < started; ++i) pthread_join(threads[i], nullptr);
        for (size_t i = 0; i < started && error.empty(); ++i) error = tasks[i].block.error;
    }
    if (error.empty()) return 0;
    tl_error = error;
    return 1;
}

// ---- the generated launchers: unpack a cuLaunchKernel-style argument array once, run the kernel in each fiber
template <class... A>
struct Call {
    void (*kernel)(A...);
    std::tuple<A...> args;
    static void body(const void* self) {
        const Call* c = static_cast<const Call*>(self);
        std::apply(c->kernel, c->args);
    }
};

template <class... A, size_t... I>
int launch(void (*kernel)(A...), const unsigned* grid, const unsigned* block, size_t shared, int cooperative,
           void** args, std::index_sequence<I...>) {
    Call<A...> call{kernel, std::tuple<A...>(*static_cast<std::remove_cv_t<A>*>(args[I])...)};
    Launch L{dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]), shared, &Call<A...>::body,
             &call, nullptr};
    return run_launch(&L, cooperative != 0);
}

template <class... A>
int launch(void (*kernel)(A...), const unsigned* grid, const unsigned* block, size_t shared, int cooperative,
           void** args) {
    return launch(kernel, grid, block, shared, cooperative, args, std::index_sequence_for<A...>{});
}

// Parameter type codes for the Python side's argument checks: f4 f8 i1..i8 u1..u8 b1, "*" a pointer to one,
// "c*" a pointer to const; "?" anything else (refused at launch).
template <class T> struct Code { static std::string get() { return "?"; } };
#define GPURNN_CODE(T, c) template <> struct Code<T> { static std::string get() { return c; } };
GPURNN_CODE(float, "f4") GPURNN_CODE(double, "f8") GPURNN_CODE(bool, "b1")
GPURNN_CODE(signed char, "i1") GPURNN_CODE(char, "i1") GPURNN_CODE(unsigned char, "u1")
GPURNN_CODE(short, "i2") GPURNN_CODE(unsigned short, "u2") GPURNN_CODE(int, "i4") GPURNN_CODE(unsigned, "u4")
GPURNN_CODE(long, "i8") GPURNN_CODE(unsigned long, "u8") GPURNN_CODE(long long, "i8")
GPURNN_CODE(unsigned long long, "u8")
#undef GPURNN_CODE
template <class T> struct Code<T*> {
    static std::string get() {
        const std::string inner = Code<std::remove_cv_t<T>>::get();
        if (inner == "?" || inner[0] == '*' || inner[0] == 'c') return "?";
        return (std::is_const_v<T> ? "c*" : "*") + inner;
    }
};

template <class... A>
const char* signature(void (*)(A...)) {
    static const std::string s = [] {
        std::string out;
        ((out += Code<std::remove_cv_t<A>>::get() + ","), ...);
        return out;
    }();
    return s.c_str();
}

}  // namespace gpurnn_host

// A fiber's life: run CUDA threads from b->next on, each to its end, until one waits (suspend marks the fiber
// kept: when that thread ends, the threads after it belong to a newer fiber) or none is left.
extern "C" __attribute__((used, visibility("hidden"))) void gpurnn_host_fiber_main(gpurnn_host::Context* c) {
    using namespace gpurnn_host;
    Block* b = c->block;
    while (!c->kept && b->next < b->n) {
        Thread* t = &b->threads[b->next++];
        t->context = c;
        t->state = kRunning;
        c->thread = t;
        b->launch->body(b->launch->call);
        t->state = kDone;
        b->live--;
        if (b->bar_arrived && b->bar_arrived == b->live) release_block_barrier(b);  // exited = arrived
    }
    c->thread = nullptr;
    c->done = true;
    gpurnn_host_switch(&c->sp, b->sched_sp);
}

GPURNN_EXPORT const char* gpurnn_host_error() { return gpurnn_host::tl_error.c_str(); }

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
inline void __nanosleep(unsigned) {     // a spin-wait's pause: let the block's other threads run
    using namespace gpurnn_host;
    Context* c = current();
    push(c->block, c->thread->rank);
    suspend(c->thread, kRunnable);
}
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
