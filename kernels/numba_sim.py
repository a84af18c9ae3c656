"""Cooperative launches under Numba's CUDA simulator, run as the hardware runs them.

Numba's own simulator runs the blocks of a grid one after another and treats grid.sync() as a block barrier, so
it only proves one-block grids, and it has no warp shuffles. `launch` runs a kernel's Python function with
- every thread of every block at once: a Python thread per CUDA thread;
- cuda.syncthreads(): a barrier over the block's threads; grid.sync(): a barrier over all threads of the grid;
- shared memory of its own for each block;
- cuda.shfl_*_sync: the 32 lanes of a warp exchange values at a barrier of the warp (full mask only);
- a race check on every global and shared memory access: two accesses to one byte address, at least one a
  write, by threads that no barrier orders (different blocks between the same two grid barriers, or threads of
  one block between the same two block barriers) raise RaceError, whatever order the threads happened to run in.
A kernel error, a race or a barrier that never completes (a deadlock: BARRIER_TIMEOUT_S) is raised by `launch`.
"""
import threading

import numpy as np
from numba.core import types
from numba.cuda.np import numpy_support
from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray, FakeShape
from numba.cuda.simulator.kernel import _push_kernel_context
from numba.cuda.simulator.kernelapi import Dim3, FakeCUDAModule, swapped_cuda_module

WARP = 32
FULL_MASK = 0xFFFFFFFF
BARRIER_TIMEOUT_S = 300.0   # far longer than any barrier of a small test kernel takes on a loaded machine
MAX_THREADS = 1024          # Python threads one launch may start
MAX_SHARED_BYTES = 1 << 20  # shared memory per simulated block


class LaunchRefused(RuntimeError):
    """The simulator cannot run a grid this large (as a GPU refuses a cooperative grid that does not fit)."""


def admit(blocks, threads, shared_bytes):
    """Raise LaunchRefused unless `launch` can run this grid."""
    if blocks * threads > MAX_THREADS or shared_bytes > MAX_SHARED_BYTES:
        raise LaunchRefused(f"{blocks} blocks of {threads} threads with {shared_bytes} bytes of shared memory "
                            f"exceed the simulator's {MAX_THREADS} threads and {MAX_SHARED_BYTES} bytes per block")


class RaceError(RuntimeError):
    """Two unordered accesses to one address, at least one of them a write."""


class AccessLog:
    """The accesses to each byte address since its last write: who, and between which barriers.

    An access is (block, thread, grid epoch, block epoch): the epochs count the grid barriers and the block
    barriers (grid barriers included) the thread has passed. Two accesses are ordered when they come from one
    thread, from one block in different block epochs, or from different blocks in different grid epochs."""

    def __init__(self, name):
        self.name = name
        self.lock = threading.Lock()
        self.writes = {}   # address -> access
        self.reads = {}    # address -> {(block, thread): access}

    @staticmethod
    def unordered(a, b):
        if a[0] != b[0]:
            return a[2] == b[2]
        return a[1] != b[1] and a[3] == b[3]

    def read(self, address, who, where):
        with self.lock:
            w = self.writes.get(address)
            if w is not None and self.unordered(w, who):
                raise RaceError(f"{self.name}: {where} read by block {who[0]} thread {who[1]} races with the write "
                                f"by block {w[0]} thread {w[1]} (no barrier between them)")
            self.reads.setdefault(address, {})[who[:2]] = who

    def write(self, address, who, where):
        with self.lock:
            w = self.writes.get(address)
            if w is not None and self.unordered(w, who):
                raise RaceError(f"{self.name}: {where} written by block {who[0]} thread {who[1]} and by block "
                                f"{w[0]} thread {w[1]} with no barrier between them")
            for r in self.reads.pop(address, {}).values():
                if self.unordered(r, who):
                    raise RaceError(f"{self.name}: {where} written by block {who[0]} thread {who[1]} while block "
                                    f"{r[0]} thread {r[1]} reads it (no barrier between them)")
            self.writes[address] = who


class TrackedArray:
    """An array as a kernel sees it: element reads and writes only, each one logged."""

    def __init__(self, array, log, name):
        self._a = array
        self._log = log
        self._name = name
        self.shape = FakeShape(array.shape)
        self.dtype = array.dtype
        self.ndim = array.ndim
        self.size = array.size
        self._base = array.__array_interface__["data"][0]

    def _address(self, idx):
        idx = idx if isinstance(idx, tuple) else (idx,)
        if len(idx) != self._a.ndim:
            raise IndexError(f"{self._name}: kernels index single elements; got {idx} for shape {self._a.shape}")
        flat = []
        for i, n in zip(idx, self._a.shape):
            i = int(i)
            i = i + n if i < 0 else i             # Numba wraps negative indices like NumPy
            if not 0 <= i < n:
                raise IndexError(f"{self._name}: index {idx} out of bounds for shape {self._a.shape}")
            flat.append(i)
        flat = tuple(flat)
        return flat, self._base + sum(i * s for i, s in zip(flat, self._a.strides))

    def __getitem__(self, idx):
        flat, address = self._address(idx)
        self._log.read(address, current().who(), f"{self._name}{list(flat)}")
        return self._a[flat]

    def __setitem__(self, idx, value):
        flat, address = self._address(idx)
        self._log.write(address, current().who(), f"{self._name}{list(flat)}")
        self._a[flat] = value

    def __len__(self):
        return len(self._a)


def current():
    return threading.current_thread()


class Block:
    """One block's barrier, warps and shared memory."""

    def __init__(self, index, threads, shared_bytes, race_check):
        self.index = index
        self.barrier = threading.Barrier(threads, timeout=BARRIER_TIMEOUT_S)
        self.warps = [Warp(min(WARP, threads - w)) for w in range(0, threads, WARP)]
        self.shared_bytes = np.zeros(shared_bytes, np.uint8)
        self.log = AccessLog(f"shared memory of block {index}") if race_check else None
        self.static = {}

    def array(self, shape, dtype):
        """cuda.shared.array: shape 0 is the dynamic shared memory, in `dtype` elements."""
        dtype = numpy_support.as_dtype(dtype) if isinstance(dtype, types.Type) else np.dtype(dtype)
        if shape == 0:
            a = np.frombuffer(self.shared_bytes.data, dtype, len(self.shared_bytes) // dtype.itemsize)
        else:
            a = self.static.setdefault((shape, dtype.str), np.zeros(shape, dtype))
        return TrackedArray(a, self.log, "shared") if self.log else a


class Warp:
    def __init__(self, lanes):
        self.lanes = lanes
        self.barrier = threading.Barrier(lanes, timeout=BARRIER_TIMEOUT_S)
        self.slots = ([None] * WARP, [None] * WARP)   # two, so one shuffle's reads and the next writes never meet


class SimThread(threading.Thread):
    def __init__(self, launch, block, tid, target):
        super().__init__(target=target, daemon=True)
        self.launch = launch
        self.block = block
        self.blockIdx = Dim3(block.index, 0, 0)
        self.threadIdx = Dim3(tid, 0, 0)
        self.thread_id = tid
        self.warp = block.warps[tid // WARP]
        self.grid_epoch = 0
        self.block_epoch = 0
        self.shuffles = 0
        self.error = None

    def who(self):
        return self.block.index, self.thread_id, self.grid_epoch, self.block_epoch

    def run(self):
        try:
            super().run()
        except BaseException as e:   # noqa: B036 - reported by launch(), with every other thread stopped
            self.error = e
            self.launch.abort()

    def syncthreads(self):
        self.block.barrier.wait()
        self.block_epoch += 1

    def grid_sync(self):
        mode = self.launch.grid_sync
        if mode == "block":
            self.syncthreads()                      # what Numba's own simulator does
        elif mode == "grid":
            self.launch.grid_barrier.wait()
            self.grid_epoch += 1
            self.block_epoch += 1

    def shuffle(self, mask, value, src):
        if mask != FULL_MASK or self.warp.lanes != WARP:
            raise NotImplementedError("the simulator shuffles whole warps only (mask 0xffffffff, 32 lanes)")
        slots = self.warp.slots[self.shuffles % 2]
        self.shuffles += 1
        slots[self.thread_id % WARP] = value
        self.warp.barrier.wait()
        return slots[src % WARP]


class GridGroup:
    def sync(self):
        current().grid_sync()


class Cg:
    def this_grid(self):
        return GridGroup()


class SimModule(FakeCUDAModule):
    """What `cuda` means inside a kernel during `launch`."""

    def __init__(self, blocks, threads):
        super().__init__((blocks, 1, 1), (threads, 1, 1), 0)

    @property
    def cg(self):
        return Cg()

    @property
    def shared(self):
        return current().block

    def syncthreads(self):
        current().syncthreads()

    def syncwarp(self, mask=FULL_MASK):
        t = current()
        t.shuffle(mask, None, t.thread_id)

    def shfl_sync(self, mask, value, src_lane):
        return current().shuffle(mask, value, src_lane)

    def shfl_xor_sync(self, mask, value, lane_mask):
        t = current()
        return t.shuffle(mask, value, (t.thread_id % WARP) ^ lane_mask)

    def shfl_down_sync(self, mask, value, delta):
        t = current()
        lane = t.thread_id % WARP
        return t.shuffle(mask, value, lane + delta if lane + delta < WARP else lane)

    def shfl_up_sync(self, mask, value, delta):
        t = current()
        lane = t.thread_id % WARP
        return t.shuffle(mask, value, lane - delta if lane >= delta else lane)


GRID_SYNCS = ("grid", "block", "none")


class Launch:
    def __init__(self, blocks, threads, grid_sync):
        if grid_sync not in GRID_SYNCS:
            raise ValueError(f"grid_sync must be one of {GRID_SYNCS}; got {grid_sync!r}")
        self.grid_sync = grid_sync
        self.grid_barrier = threading.Barrier(blocks * threads, timeout=BARRIER_TIMEOUT_S)
        self.blocks = []

    def abort(self):
        """Release every thread waiting at a barrier (it raises BrokenBarrierError)."""
        barriers = [self.grid_barrier]
        for block in self.blocks:
            barriers += [block.barrier] + [w.barrier for w in block.warps]
        for b in barriers:
            b.abort()


def launch(kernel, blocks, threads, shared_bytes, args, grid_sync="grid", race_check=True):
    """Run `kernel` (a simulator @cuda.jit kernel) on a grid of `blocks` x `threads` with `shared_bytes` of
    dynamic shared memory per block. args: as for kernel[...](*args); NumPy arrays or simulator device arrays.
    grid_sync: what grid.sync() does: "grid" (a barrier over the grid), or, to show that the race check
    catches a broken kernel, "block" (a block barrier, as Numba's own simulator has it) or "none"."""
    fn = kernel.py_func
    run = Launch(blocks, threads, grid_sync)
    log = AccessLog("global memory") if race_check else None
    kernel_args = []
    for i, a in enumerate(args):
        a = a._ary if isinstance(a, FakeCUDAArray) else a
        if isinstance(a, np.ndarray) and log is not None:
            a = TrackedArray(a, log, f"argument {i}")
        kernel_args.append(a)
    module = SimModule(blocks, threads)
    run.blocks = [Block(b, threads, shared_bytes, race_check) for b in range(blocks)]
    workers = [SimThread(run, block, tid, lambda: fn(*kernel_args)) for block in run.blocks for tid in range(threads)]
    with _push_kernel_context(module), swapped_cuda_module(fn, module):
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    errors = [w.error for w in workers if w.error is not None]
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real:
        raise real[0]
    if errors:
        raise RuntimeError(f"a barrier did not complete within {BARRIER_TIMEOUT_S} s: the kernel deadlocks")
