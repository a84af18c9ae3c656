// The host harness's runtime: fibers, the block scheduler, barriers, warp collectives, cooperative launches
// (see cuda_host.h for the execution model). Compiled once per compiler and flags, linked into every module.
#include "cuda_host.h"

#include <sys/mman.h>

namespace gpurnn_host {

struct StackPool {                          // per OS thread; regions mapped kChunk at a time
    static constexpr size_t kChunk = 64;
    std::vector<Context*> free;
    std::vector<char*> chunks;
    ~StackPool() {
        for (char* chunk : chunks) munmap(chunk, kChunk * kRegion);
    }
    Context* get() {
        if (free.empty()) {
            const size_t bytes = (kChunk + 1) * kRegion;
            char* m = static_cast<char*>(mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
            if (m == MAP_FAILED) return nullptr;
            char* base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(m) + kRegion - 1) &
                                                 ~uintptr_t(kRegion - 1));
            if (base > m) munmap(m, base - m);
            if (m + bytes > base + kChunk * kRegion) munmap(base + kChunk * kRegion, m + bytes - base - kChunk * kRegion);
            chunks.push_back(base);
            for (size_t i = kChunk; i-- > 0;) free.push_back(reinterpret_cast<Context*>(base + i * kRegion));
        }
        Context* c = free.back();
        free.pop_back();
        return c;
    }
    void put(Context* c) { free.push_back(c); }
};

static_assert(sizeof(Context) <= kHeader, "the Context fits below the canary");
static uint64_t* canary(Context* c) { return reinterpret_cast<uint64_t*>(reinterpret_cast<char*>(c) + kHeader); }

static thread_local StackPool tl_stacks;
static thread_local std::string tl_error;  // the last failed launch's message, for the caller's thread

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
static void* initial_sp(Context* c) {
    const uintptr_t top = reinterpret_cast<uintptr_t>(c) + kRegion - 64;
    *canary(c) = kCanary;
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
extern "C" void gpurnn_host_switch(void** save_sp, void* load_sp) {
    ucontext_t here;
    *save_sp = &here;
    swapcontext(&here, static_cast<ucontext_t*>(load_sp));
}
namespace gpurnn_host {
static void* initial_sp(Context* c) {     // the first ucontext at the top of the region, the stack below it
    char* top = reinterpret_cast<char*>(c) + kRegion;
    ucontext_t* uc = reinterpret_cast<ucontext_t*>(top - ((sizeof(ucontext_t) + 63) & ~size_t(63)));
    *canary(c) = kCanary;
    getcontext(uc);
    uc->uc_stack.ss_sp = reinterpret_cast<char*>(c) + kHeader + sizeof(uint64_t);
    uc->uc_stack.ss_size = reinterpret_cast<char*>(uc) - static_cast<char*>(uc->uc_stack.ss_sp);
    uc->uc_link = nullptr;
    makecontext(uc, reinterpret_cast<void (*)()>(&gpurnn_host_fiber_main), 1, c);
    return uc;
}
}  // namespace gpurnn_host
#endif

namespace gpurnn_host {

// ---- the scheduler of one block
static void push(Block* b, unsigned rank) {
    b->runq[(b->head + b->count++) % b->n] = rank;
    b->threads[rank].state = kRunnable;
}

static void switch_to(Block* b, Context* c) {     // scheduler -> fiber, back when its thread waits or it ends
    if (c->thread) c->thread->state = kRunning;
    gpurnn_host_switch(&b->sched_sp, c->sp);
}

static void suspend(Thread* t, State why) {        // fiber -> scheduler
    Context* c = t->context;
    t->state = why;
    c->kept = true;
    gpurnn_host_switch(&c->sp, c->block->sched_sp);
}

static std::string where(const Block* b, const Thread* t) {
    char s[96];
    snprintf(s, sizeof s, "thread (%u, %u, %u) of block (%u, %u, %u): ", t->tid.x, t->tid.y, t->tid.z, b->idx.x,
             b->idx.y, b->idx.z);
    return s;
}

[[noreturn]] void fail(const char* what) {   // from a fiber: the launch stops, the fiber never resumes
    Context* c = current();
    Block* b = c->block;
    if (!b->failed) b->error = where(b, c->thread) + what;
    b->failed = true;
    suspend(c->thread, kDone);
    __builtin_unreachable();
}

static void grid_wait(Block* b);

static void release_block_barrier(Block* b) {  // by the last thread to arrive; it goes on, the others queue
    if (b->bar_grid) grid_wait(b);
    b->bar_arrived = 0;
    b->bar_acc[(b->bar_gen + 1) & 1] = 0;
    b->bar_gen++;
    for (Thread& t : b->threads)
        if (t.state == kWaitBlock) push(b, t.rank);
}

void block_barrier(unsigned grid, int pred) {
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

int block_predicate_sum() {
    const Block* b = current()->block;
    return b->bar_acc[(b->bar_gen - 1) & 1];
}

// A warp collective: every lane of `mask` contributes `value`; returns the 32 contributions.
const uint64_t* warp_exchange(unsigned mask, int kind, uint64_t value) {
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

static void poison_dynamic_shared(size_t bytes) {
    for (unsigned i = 0; i < dynamic_shared_count; ++i) memset(dynamic_shared[i].address(), 0xff, bytes);
}

// Start a fiber for the threads from b->next on, or resume the one holding a waiting thread; collect it when done.
static void step(Block* b, Context* c) {
    switch_to(b, c);
    if (*canary(c) != kCanary && !b->failed) {
        b->failed = true;
        b->error = (c->thread ? where(b, c->thread) : std::string()) +
                   "a fiber's stack overflowed (a thread's locals need more than 125 KiB)";
    }
    if (!c->done) return;
    tl_stacks.put(c);
    for (Context*& k : b->contexts)
        if (k == c) {
            k = b->contexts.back();
            b->contexts.pop_back();
            break;
        }
}

static void run_block(Block* b, const Launch* L, uint3 idx) {
    b->launch = L;
    b->idx = idx;
    b->live = b->n;
    b->next = b->head = b->count = 0;
    b->bar_arrived = b->bar_gen = b->bar_grid = 0;
    b->bar_acc[0] = b->bar_acc[1] = 0;
    for (Warp& w : b->warps) w.arrived = w.gen = 0;
    const dim3 d = L->block;
    for (unsigned r = 0, x = 0, y = 0, z = 0; r < b->n; ++r) {
        b->threads[r] = Thread{uint3{x, y, z}, r, kNew, nullptr};
        if (++x == d.x) {
            x = 0;
            if (++y == d.y) y = 0, ++z;
        }
    }
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

static void grid_wait(Block* b) {
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

static void* run_cooperative_block(void* p) {
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

static void prepare(Block* b, unsigned n) {
    b->n = n;
    b->threads.assign(n, Thread{});
    b->warps.assign((n + kWarp - 1) / kWarp, Warp{});
    b->runq.assign(n, 0);
    b->failed = false;
}

int run_launch(Launch* L, bool cooperative) {
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

void yield_thread() {
    Context* c = current();
    push(c->block, c->thread->rank);
    suspend(c->thread, kRunnable);
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

