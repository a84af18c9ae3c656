"""The CPU harness for CUDA C (kernels/cuda_host.py, host_include/cuda_host.h) on test-only kernels: each gives the
right answer only if the feature it uses works as on a GPU (barriers, shared memory, warp shuffles, votes, grid
sync, atomics, 2-D launches), a kernel with its barrier removed gives a wrong one, misuse the hardware leaves
undefined is an error, and a wrong argument is a TypeError before anything runs."""
import os
import shutil

import numpy as np
import pytest

from gpurnn.kernels import cuda_host

# Where the harness is on (CI without a GPU) a missing compiler fails loudly; elsewhere it skips these tests.
pytestmark = pytest.mark.skipif(not cuda_host.enabled() and shutil.which(os.environ.get("CXX", "g++")) is None,
                                reason="needs a C++17 compiler (g++ or $CXX)")

KERNELS = r"""
#include <cooperative_groups.h>

// out[block] = the sum of the block's slice of x, by a tree reduction in dynamic shared memory.
// Sync = false is the same kernel with its barriers removed.
template <bool Sync>
__global__ void block_sum(const float* x, float* out, int n) {
    extern __shared__ float partial[];
    const unsigned t = threadIdx.x;
    const int i = blockIdx.x * blockDim.x + t;
    partial[t] = i < n ? x[i] : 0.0f;
    if (Sync) __syncthreads();
    for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (t < stride) partial[t] += partial[t + stride];
        if (Sync) __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = partial[0];
}

// y = x^T for x (rows, cols), through a static shared (16, 17) tile per (16, 16) block of a 2-D grid.
__global__ void transpose(const double* x, double* y, int rows, int cols) {
    __shared__ double tile[16][17];
    int c = blockIdx.x * 16 + threadIdx.x, r = blockIdx.y * 16 + threadIdx.y;
    if (r < rows && c < cols) tile[threadIdx.y][threadIdx.x] = x[r * cols + c];
    __syncthreads();
    c = blockIdx.y * 16 + threadIdx.x;
    r = blockIdx.x * 16 + threadIdx.y;
    if (r < cols && c < rows) y[r * rows + c] = tile[threadIdx.x][threadIdx.y];
}

// y[t] = x[n - 1 - t] in one block; the threads t >= n exit before the barrier (exited counts as arrived).
__global__ void reverse(const int* x, int* y, int n) {
    __shared__ int s[1024];
    const int t = threadIdx.x;
    if (t >= n) return;
    s[t] = x[t];
    __syncthreads();
    y[t] = s[n - 1 - t];
}

// Per warp of 32 values: sums[w] by __shfl_down_sync, maxes[i] by __shfl_xor_sync (every lane), scan[i] the
// inclusive prefix sum by __shfl_up_sync, first[i] lane 0's value by __shfl_sync, votes[w] the ballot of x > 0 and
// whether any / all of x > -1.
__global__ void warp_ops(const float* x, float* sums, float* maxes, float* scan, float* first, unsigned* votes) {
    const unsigned full = 0xffffffffu, i = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x % 32;
    float v = x[i], m = x[i], s = x[i];
    for (int d = 16; d > 0; d /= 2) v += __shfl_down_sync(full, v, d);
    for (int d = 16; d > 0; d /= 2) m = fmaxf(m, __shfl_xor_sync(full, m, d));
    for (unsigned d = 1; d < 32; d *= 2) {
        const float up = __shfl_up_sync(full, s, d);
        if (lane >= d) s += up;
    }
    first[i] = __shfl_sync(full, x[i], 0);
    const unsigned ballot = __ballot_sync(full, x[i] > 0.0f);
    const int any = __any_sync(full, x[i] > -1.0f), all = __all_sync(full, x[i] > -1.0f);
    if (lane == 0) {
        sums[i / 32] = v;
        votes[3 * (i / 32)] = ballot;
        votes[3 * (i / 32) + 1] = any;
        votes[3 * (i / 32) + 2] = all;
    }
    maxes[i] = m;
    scan[i] = s;
}

// Each thread of one block: how many threads have x > 0, whether all do, whether any does.
__global__ void block_votes(const float* x, int* count, int* all, int* any) {
    const unsigned t = threadIdx.x;
    count[t] = __syncthreads_count(x[t] > 0.0f);
    all[t] = __syncthreads_and(x[t] > 0.0f);
    any[t] = __syncthreads_or(x[t] > 0.0f);
}

// out[b] = the sum of x over the whole grid, for every block b: block sums, a grid-wide barrier, then each block
// adds up the others' partial sums (written by other blocks, so only right if the grid sync holds).
__global__ void grid_sum(const float* x, float* partial, float* out) {
    namespace cg = cooperative_groups;
    __shared__ float s[64];
    const unsigned t = threadIdx.x;
    s[t] = x[blockIdx.x * blockDim.x + t];
    cg::this_thread_block().sync();
    if (t == 0) {
        float sum = 0.0f;
        for (unsigned k = 0; k < blockDim.x; ++k) sum += s[k];
        partial[blockIdx.x] = sum;
    }
    cg::this_grid().sync();
    if (t == 0) {
        float total = 0.0f;
        for (unsigned b = 0; b < gridDim.x; ++b) total += partial[b];
        out[blockIdx.x] = total;
    }
}

// total[0] += x[i], count[0] += 1, extremes[0] = min and extremes[1] = max of (i * 7919) % n, from every block.
__global__ void atomic_sum(const double* x, double* total, unsigned* count, int* extremes, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    atomicAdd(total, x[i]);
    atomicAdd(count, 1u);
    atomicMin(extremes, (i * 7919) % n);
    atomicMax(extremes + 1, (i * 7919) % n);
}

// Locals of 126.5 KiB: more than a fiber's stack holds.
__global__ void big_locals(int* out) {
    volatile char big[126 * 1024 + 512];
    for (int i = 0; i < (int)sizeof(big); ++i) big[i] = char(i);
    out[threadIdx.x] = big[threadIdx.x];
}

// Lane 0 waits at the block barrier while lanes 1..31 wait for it in a warp collective: never completes.
__global__ void deadlock(int* out) {
    if (threadIdx.x == 0)
        __syncthreads();
    else
        __syncwarp();
    out[threadIdx.x] = 1;
}
"""
NAMES = ["block_sum<true>", "block_sum<false>", "transpose", "reverse", "warp_ops", "block_votes", "grid_sum",
         "atomic_sum", "big_locals", "deadlock"]


@pytest.fixture(scope="module")
def module():
    return cuda_host.RawModule(code=KERNELS, options=("--std=c++17",), name_expressions=NAMES)


def block_sums(x, threads):
    return np.add.reduceat(x, np.arange(0, x.size, threads))


@pytest.mark.parametrize("n, threads", [(1000, 128), (64, 64), (1, 32)])
def test_shared_memory_reduction_with_barriers_is_right(module, n, threads):
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    out = np.empty(-(-n // threads), np.float32)
    module.get_function("block_sum<true>")((out.size,), (threads,), (x, out, np.int32(n)), shared_mem=4 * threads)
    np.testing.assert_allclose(out, block_sums(x, threads), rtol=1e-5, atol=1e-6)


def test_the_same_reduction_without_barriers_is_wrong(module):
    """Proves the harness catches a missing __syncthreads: the threads no longer wait for each other's writes."""
    n, threads = 1000, 128
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    out = np.empty(-(-n // threads), np.float32)
    module.get_function("block_sum<false>")((out.size,), (threads,), (x, out, np.int32(n)), shared_mem=4 * threads)
    assert not np.allclose(out, block_sums(x, threads), rtol=1e-3, atol=1e-3, equal_nan=False)


@pytest.mark.parametrize("rows, cols", [(33, 50), (16, 16), (1, 7)])
def test_static_shared_tile_over_a_2d_grid(module, rows, cols):
    x = np.random.default_rng(1).standard_normal((rows, cols))
    y = np.full((cols, rows), np.nan)
    module.get_function("transpose")((-(-cols // 16), -(-rows // 16)), (16, 16), (x, y, np.int32(rows), np.int32(cols)))
    np.testing.assert_array_equal(y, x.T)


def test_threads_that_exit_count_as_arrived_at_a_barrier(module):
    x = np.arange(100, dtype=np.int32)
    y = np.zeros_like(x)
    module.get_function("reverse")((1,), (128,), (x, y, np.int32(100)))
    np.testing.assert_array_equal(y, x[::-1])


def test_warp_shuffles_and_votes(module):
    warps = 8
    x = np.random.default_rng(2).standard_normal(32 * warps).astype(np.float32)
    x[32:64] = np.abs(x[32:64])                     # warp 1: every value > -1
    sums, votes = np.empty(warps, np.float32), np.empty((warps, 3), np.uint32)
    maxes, scan, first = (np.empty_like(x) for _ in range(3))
    module.get_function("warp_ops")((2,), (128,), (x, sums, maxes, scan, first, votes))
    per_warp = x.reshape(warps, 32)
    np.testing.assert_allclose(sums, per_warp.sum(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(maxes, np.repeat(per_warp.max(axis=1), 32))
    np.testing.assert_allclose(scan, np.cumsum(per_warp, axis=1).ravel(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(first, np.repeat(per_warp[:, 0], 32))
    ballots = [sum(1 << lane for lane in range(32) if row[lane] > 0) for row in per_warp]
    np.testing.assert_array_equal(votes[:, 0], ballots)
    np.testing.assert_array_equal(votes[:, 1], (per_warp > -1).any(axis=1))
    np.testing.assert_array_equal(votes[:, 2], (per_warp > -1).all(axis=1))
    assert votes[1, 2] == 1 and not votes[:, 2].all()


@pytest.mark.parametrize("positives", [0, 17, 64])
def test_syncthreads_count_and_or(module, positives):
    x = np.where(np.arange(64) < positives, 1.0, -1.0).astype(np.float32)
    count, all_, any_ = (np.full(64, -1, np.int32) for _ in range(3))
    module.get_function("block_votes")((1,), (64,), (x, count, all_, any_))
    np.testing.assert_array_equal(count, positives)
    np.testing.assert_array_equal(all_, positives == 64)
    np.testing.assert_array_equal(any_, positives > 0)


def test_grid_sync_in_a_cooperative_launch(module):
    blocks, threads = 6, 64
    x = np.random.default_rng(3).standard_normal(blocks * threads).astype(np.float32)
    partial, out = np.zeros(blocks, np.float32), np.zeros(blocks, np.float32)
    module.get_function("grid_sum")((blocks,), (threads,), (x, partial, out), enable_cooperative_groups=True)
    np.testing.assert_allclose(out, np.full(blocks, x.sum()), rtol=1e-4, atol=1e-5)


def test_grid_sync_outside_a_cooperative_launch_is_an_error(module):
    x = np.zeros(128, np.float32)
    with pytest.raises(RuntimeError, match="enable_cooperative_groups"):
        module.get_function("grid_sum")((2,), (64,), (x, np.zeros(2, np.float32), np.zeros(2, np.float32)))


@pytest.mark.parametrize("cooperative", [False, True])
def test_atomics_from_every_block(module, cooperative):
    n = 1000
    x = np.random.default_rng(4).standard_normal(n)
    total, count, extremes = np.zeros(1), np.zeros(1, np.uint32), np.array([n, -1], np.int32)
    module.get_function("atomic_sum")((8,), (128,), (x, total, count, extremes, np.int32(n)),
                                      enable_cooperative_groups=cooperative)
    assert count[0] == n
    np.testing.assert_allclose(total[0], x.sum(), rtol=1e-12)
    np.testing.assert_array_equal(extremes, [0, n - 1])


def test_a_deadlock_is_an_error(module):
    with pytest.raises(RuntimeError, match="deadlock"):
        module.get_function("deadlock")((1,), (32,), (np.zeros(32, np.int32),))


def test_a_stack_overflow_is_an_error(module):
    with pytest.raises(RuntimeError, match="stack overflowed"):
        module.get_function("big_locals")((1,), (2,), (np.zeros(2, np.int32),))


def test_launches_are_counted_by_name_expression(module):
    before = cuda_host.launched["reverse"]
    module.get_function("reverse")((1,), (1,), (np.zeros(1, np.int32), np.zeros(1, np.int32), np.int32(1)))
    assert cuda_host.launched["reverse"] == before + 1


@pytest.fixture
def block_sum(module):
    """(kernel, args) of a correct block_sum<true> call to alter."""
    x, out = np.ones(256, np.float32), np.zeros(2, np.float32)
    return module.get_function("block_sum<true>"), (x, out, np.int32(256))


@pytest.mark.parametrize("index, bad, match", [
    (0, np.ones(256, np.float64), "argument 0: expected a float32 array, got float64"),
    (0, np.ones(512, np.float32)[::2], "C-contiguous"),
    (0, [1.0] * 256, "expected a float32 array, got list"),
    (2, 256, "argument 2: expected np.int32, got int"),
    (2, np.int64(256), "expected np.int32, got int64"),
    (2, np.float32(256), "expected np.int32, got float32"),
])
def test_a_wrong_argument_is_a_type_error(block_sum, index, bad, match):
    kernel, args = block_sum
    args = args[:index] + (bad,) + args[index + 1:]
    with pytest.raises(TypeError, match=match):
        kernel((2,), (128,), args, shared_mem=512)
    assert not args[1].any(), "nothing ran"


def test_argument_count_tuple_and_writability_are_checked(block_sum):
    kernel, (x, out, n) = block_sum
    with pytest.raises(TypeError, match="takes 3 arguments, got 2"):
        kernel((2,), (128,), (x, out), shared_mem=512)
    with pytest.raises(TypeError, match="args must be a tuple"):
        kernel((2,), (128,), [x, out, n], shared_mem=512)
    out.flags.writeable = False
    with pytest.raises(TypeError, match="read-only"):
        kernel((2,), (128,), (x, out, n), shared_mem=512)
    x.flags.writeable = False             # a const pointer may be read-only
    out.flags.writeable = True
    kernel((2,), (128,), (x, out, n), shared_mem=512)
    np.testing.assert_array_equal(out, [128, 128])


@pytest.mark.parametrize("grid, block, shared, match", [
    ((0,), (128,), 512, "grid"), ((2,), (2048,), 512, "block"), ((2,), (64, 32), 512, "more than 1024"),
    ((2,), (128,), 48 * 1024 + 4, "shared_mem"), ((2,), (128,), -1, "shared_mem"), ((2, 1, 1, 1), (128,), 0, "grid"),
])
def test_a_bad_launch_configuration_is_refused(block_sum, grid, block, shared, match):
    kernel, args = block_sum
    with pytest.raises((ValueError, TypeError), match=match):
        kernel(grid, block, args, shared_mem=shared)


def test_dynamic_shared_memory_beyond_48k_needs_the_opt_in(block_sum):
    kernel, args = block_sum
    kernel.max_dynamic_shared_size_bytes = 100 * 1024
    kernel((2,), (128,), args, shared_mem=100 * 1024)
    np.testing.assert_array_equal(args[1], [128, 128])
    with pytest.raises(ValueError, match="max_dynamic_shared_size_bytes"):
        kernel.max_dynamic_shared_size_bytes = 300 * 1024


def test_only_name_expressions_are_functions(module):
    with pytest.raises(ValueError, match="name expressions"):
        module.get_function("block_sum<double>")
    with pytest.raises(ValueError, match="name_expressions"):
        cuda_host.RawModule(code=KERNELS)


def test_a_compile_error_names_the_compiler_output():
    with pytest.raises(cuda_host.CompileError, match="not_a_type"):
        cuda_host.RawModule(code="__global__ void k(not_a_type x) {}", name_expressions=["k"]).get_function("k")


def test_a_module_is_built_once_per_process(module):
    lib = module.get_function("reverse")._lib
    misses = cuda_host.library.cache_info().misses
    again = cuda_host.RawModule(code=KERNELS, options=("--std=c++17",), name_expressions=NAMES)
    assert again.get_function("transpose")._lib is lib
    assert cuda_host.library.cache_info().misses == misses


def test_the_cache_folder_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cuda_host.cache_dir() == tmp_path / "gpurnn" / "cuda_host"
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))     # not a folder: fall back to a temporary one
    assert cuda_host.cache_dir().name.startswith("gpurnn-cuda-host")
