"""Data-parallel training over MPI: `mpiexec -n N gpurnn train --distributed`, or `Trainer(distributed=...)`.

N processes (ranks) each hold the whole model and its optimizer. Every batch is the global batch one process would
train on, and rank r takes its rows r, r + N, r + 2N, ... (`shard_rows`):
  1. at the start of fit, rank 0's parameters are broadcast, so every rank starts from the same values;
  2. after backward, before clipping, each update: every gradient is packed, times the rank's number of targets
     n_r, into one flat preallocated buffer, and ONE allreduce sums the buffers over the ranks. Dividing by
     sum_r n_r gives every rank the gradient of the whole batch's mean loss, exactly for losses that are means over
     their targets (sum_r n_r L_r / sum_r n_r is the mean over all targets), whatever the split;
  3. clipping (one global norm of identical gradients) and the optimizer then run identically on every rank, so
     parameters and optimizer state stay identical with no more communication, and an update that is not finite
     is skipped, or undone, on every rank alike.

The buffer, in the gradients' dtype and on their device, (P + 6,):
    [ n_r g_1 ... n_r g_P | n_r L_r | n_r | bad | SIGINT SIGTERM SIGHUP ]
bad is 1 on a rank whose loss or gradients are not finite, so every rank skips that update; a signal's slot is 1 on
a rank that received it, so every rank stops after the same batch.

Transports (`allreduce=`):
    mpi             NumPy buffers through MPI; GPU buffers staged through host memory (two copies per update)
    cuda-aware-mpi  the GPU buffer handed to MPI as it is (needs an MPI built with CUDA support)
    nccl            the GPU buffer through NCCL (cupy.cuda.nccl), the unique id broadcast over MPI
    auto            mpi for NumPy arrays; nccl for GPU arrays when CuPy has NCCL, else mpi
The GPU transports follow CuPy's and mpi4py's documented APIs but have not run on a GPU here: CI proves the CPU path.

Failure: an error that every rank raises at the same point (an update that is not finite under nan_policy="raise",
a bad option found before training: `together`, `on_root`, `collective`) stops every rank together, rank 0
reporting it once. One rank's own error (bad data, a failed write, a second Ctrl-C) is printed by that rank, which
then calls MPI_Abort, so no rank waits forever in a collective (`run`).
mpi4py is imported on first use: `import gpurnn.distributed` needs no MPI.
"""
import contextlib
import signal
import sys
import time
import traceback

import numpy as np

from .backend import array_module, to_host

TRANSPORTS = ("auto", "mpi", "cuda-aware-mpi", "nccl")
SIGNALS = tuple(getattr(signal, name, None) for name in ("SIGINT", "SIGTERM", "SIGHUP"))    # the trainer's stops
TAIL = 3 + len(SIGNALS)            # n_r L_r, n_r, bad, one slot per signal


def mpi():
    """mpi4py's MPI module (MPI is initialised on its first import); ImportError saying what to install."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError(f"distributed training needs mpi4py and an MPI library: pip install 'gpurnn[mpi]' "
                          f"({e})") from None
    return MPI


def shard_rows(n, rank, size):
    """The rows of a batch of n that `rank` of `size` takes: rank, rank + size, ... (a slice). ValueError when a
    rank would get none."""
    if n < size:
        raise ValueError(f"a batch of {n} rows cannot be split over {size} processes (each needs at least one row)")
    return slice(rank, n, size)


def take_rows(a, rows, axis):
    """a's `rows` (a slice) along `axis`."""
    index = [slice(None)] * a.ndim
    index[axis] = rows
    return a[tuple(index)]


class Stopped(Exception):
    """Raised on every rank but 0 when a check failed on some rank: rank 0 reports it, the others stop quietly."""


class RankError(Exception):
    """Rank 0's report of an error raised on another rank (in `together`)."""


class Agreed:
    """What one update's allreduce gave every rank: the whole batch's mean loss, whether every rank's loss and
    gradients were finite, the stop signal some rank received (None if none) and the number of targets in all."""
    __slots__ = ("loss", "finite", "signum", "count")

    def __init__(self, loss, finite, signum, count):
        self.loss, self.finite, self.signum, self.count = loss, finite, signum, count


def signal_of(error):
    """The signal an error stands for: an Interrupted's, SIGINT for a bare KeyboardInterrupt, else None."""
    signum = getattr(error, "signum", None)
    return signal.SIGINT if signum is None and isinstance(error, KeyboardInterrupt) else signum


def describe(error, user_errors=()):
    """One line for an error: a user error's message, else its type and message."""
    signum = signal_of(error)
    if signum is not None:
        return f"{signal.Signals(signum).name}: stopped at once"
    text = str(error).splitlines()[0] if str(error) else ""
    return text if isinstance(error, user_errors + (RankError,)) and text else \
        type(error).__name__ + (f": {text}" if text else "")


class DataParallel:
    """This process's place in a data-parallel job: rank, size, and the collectives the trainer needs.

    comm: an mpi4py communicator (default MPI.COMM_WORLD); allreduce: one of TRANSPORTS. Run without a launcher,
    a process is a job of one.
    """

    def __init__(self, comm=None, allreduce="auto"):
        if allreduce not in TRANSPORTS:
            raise ValueError(f"allreduce must be one of {', '.join(TRANSPORTS)}; got {allreduce!r}")
        MPI = mpi()
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.allreduce = allreduce
        self.seconds = 0.0          # spent in the gradient allreduce, waiting for the slowest rank included
        self._layout = self._buffer = self._transport = None
        self._collective = []       # errors every rank raised at the same point
        self.user_errors = (ValueError, TypeError, OSError)     # reported by their message alone (see run)

    def __repr__(self):
        return f"DataParallel(rank {self.rank} of {self.size}, allreduce={self.allreduce!r})"

    @property
    def is_root(self):
        return self.rank == 0

    def rows(self, n):
        """This rank's rows of a batch of n: see shard_rows."""
        return shard_rows(n, self.rank, self.size)

    def shard(self, data, axes=(1, 1)):
        """data(step, rng) -> (inputs, target[, forward kwargs]) as one process would draw it (every rank draws the
        same global batch from the same seeded rng), cut to this rank's rows of every array. axes: the batch axis
        of each input and then of the target ((1, 1): x (T, B, ...), y (T, B); a Classifier's x (T, B, I) and y (B,):
        (1, 0)); forward kwargs (lengths (B,)) are cut on axis 0."""
        def local(step, rng):
            batch = data(step, rng)
            inputs, target = batch[0], batch[1]
            inputs = inputs if isinstance(inputs, tuple) else (inputs,)
            if len(axes) != len(inputs) + 1:
                raise ValueError(f"axes must give the batch axis of each of the {len(inputs)} inputs and of the "
                                 f"target, got {axes!r}")
            rows = self.rows(inputs[0].shape[axes[0]])
            cut = tuple(take_rows(a, rows, axis) for a, axis in zip(inputs + (target,), axes))
            kwargs = {k: take_rows(v, rows, 0) if hasattr(v, "ndim") else v for k, v in batch[2].items()} \
                if len(batch) == 3 else None
            return (cut[:-1] if len(cut) > 2 else cut[0], cut[-1]) + ((kwargs,) if kwargs is not None else ())
        return local

    # --- the flat buffer ---
    def buffer(self, arrays):
        """The preallocated (P + TAIL,) buffer for these arrays, made with its transport on first use (and again
        for other shapes: another model); self.spans holds the (start, end) of each array in it."""
        layout = tuple((tuple(a.shape), a.dtype.str, array_module(a).__name__) for a in arrays)
        if layout != self._layout:
            if len({entry[1:] for entry in layout}) != 1:
                raise TypeError(f"distributed training needs every parameter in one dtype on one device, got "
                                f"{sorted({entry[1:] for entry in layout})}")
            xp = array_module(arrays[0])
            ends = np.cumsum([int(np.prod(shape)) for shape, _, _ in layout])
            self.spans = list(zip([0] + list(ends[:-1]), ends))
            self._buffer = xp.zeros(int(ends[-1]) + TAIL, arrays[0].dtype)
            self._transport = transport(self.allreduce, self.comm, self._buffer)
            self._layout = layout
        return self._buffer

    def broadcast_parameters(self, params):
        """Overwrite every rank's parameters (arrays, in place) with rank 0's: one broadcast of the flat buffer."""
        buf = self.buffer(params)
        P = len(buf) - TAIL
        if self.rank == 0:
            for p, (a, b) in zip(params, self.spans):
                buf[a:b] = p.reshape(-1)
        self._transport.bcast(buf[:P])
        for p, (a, b) in zip(params, self.spans):
            p[...] = buf[a:b].reshape(p.shape)

    def allreduce_gradients(self, grads, count, loss, finite, signum=None):
        """Replace every rank's gradients (arrays, in place) by the whole batch's: sum_r n_r g_r / sum_r n_r, with
        this rank's n_r = count targets, mean loss `loss`, `finite` (its loss and gradients), and the stop signal
        it received (None). One allreduce. Returns an Agreed, the same on every rank."""
        buf = self.buffer(grads)
        xp = array_module(buf)
        P = len(buf) - TAIL
        for g, (a, b) in zip(grads, self.spans):
            xp.multiply(g.reshape(-1), count, out=buf[a:b])
        tail = [count * loss if finite else 0.0, count, 0.0 if finite else 1.0] + \
            [1.0 if signum is not None and signum == s else 0.0 for s in SIGNALS]
        buf[P:] = xp.asarray(tail, dtype=buf.dtype)
        start = time.perf_counter()
        self._transport.allreduce(buf)
        tail = to_host(buf[P:]).astype(np.float64)          # one small device-to-host copy: a sync, as clipping's
        self.seconds += time.perf_counter() - start
        total = tail[1]
        for g, (a, b) in zip(grads, self.spans):
            xp.divide(buf[a:b].reshape(g.shape), total, out=g)
        agreed = next((s for s, flag in zip(SIGNALS, tail[3:]) if flag > 0), None)
        ok = tail[2] == 0
        return Agreed(float(tail[0] / total) if ok else float("nan"), bool(ok), agreed, int(round(total)))

    def all_ranks(self, flags):
        """Each of `flags` (bools) true on every rank: one small allreduce; every rank must call it."""
        MPI = mpi()
        buf = np.array(flags, np.int32)
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MIN)
        return [bool(f) for f in buf]

    def buffer_bytes(self):
        """The size of the gradient buffer (0 before the first update)."""
        return 0 if self._buffer is None else int(self._buffer.nbytes)

    def transport_name(self, gpu):
        """How gradients are summed for host (gpu False) or GPU arrays under this allreduce choice."""
        kind = resolve(self.allreduce, gpu)
        return kind + (" staged through host memory" if gpu and kind == "mpi" else "")

    def time_allreduce(self, repeats=20):
        """Median seconds of one allreduce of the gradient buffer, back to back after a barrier (no rank waits for
        another's compute): the transport's own cost. Every rank must call it; 0 before the first update."""
        if self._buffer is None:
            return 0.0
        self._buffer[...] = 0                  # repeated sums of zeros: no overflow however many ranks
        self.comm.Barrier()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            self._transport.allreduce(self._buffer)
            to_host(self._buffer[-1:])
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    # --- the carried state: the whole batch's in checkpoints, each rank's rows in training ---
    def gather_rows(self, state, axis=1):
        """The whole batch's state (an array or a tuple, batch on `axis`) from every rank's rows, as NumPy arrays,
        the same on every rank (an allgather: every rank must call it). None when any rank holds None (a rank that
        dropped a non-finite state starts its rows from zeros, so the whole batch does after a resume)."""
        parts = None if state is None else [to_host(s) for s in (state if isinstance(state, tuple) else (state,))]
        everyone = self.comm.allgather(parts)
        if any(p is None for p in everyone):
            return None
        whole = []
        for i, mine in enumerate(parts):
            n = sum(p[i].shape[axis] for p in everyone)
            out = np.empty(mine.shape[:axis] + (n,) + mine.shape[axis + 1:], mine.dtype)
            for r, p in enumerate(everyone):
                take_rows(out, shard_rows(n, r, self.size), axis)[...] = p[i]
            whole.append(out)
        return tuple(whole) if isinstance(state, tuple) else whole[0]

    def local_rows(self, state, axis=1):
        """This rank's rows of a whole batch's state (an array or a tuple, batch on `axis`), as copies."""
        if state is None:
            return None
        parts = state if isinstance(state, tuple) else (state,)
        mine = tuple(take_rows(s, self.rows(s.shape[axis]), axis).copy() for s in parts)
        return mine if isinstance(state, tuple) else mine[0]

    # --- stopping together ---
    def collective(self, error):
        """Mark `error` as raised by every rank at the same point (so `run` stops quietly, rank 0 reporting it);
        returns it."""
        self._collective.append(error)
        return error

    def is_collective(self, error):
        return any(error is e for e in self._collective)

    @contextlib.contextmanager
    def together(self):
        """A block every rank runs, its outcomes compared at its end (an allgather): when it raised on any rank,
        it raises on every rank, rank 0 the error (its own, or a RankError naming the first failing rank) and the
        others Stopped, so every rank stops together and one line is printed."""
        try:
            yield
        except Exception as e:                     # compared below, then raised on every rank
            error = e
        else:
            error = None
        failures = [(r, m) for r, m in enumerate(self.comm.allgather(None if error is None else describe(error, self.user_errors)))
                    if m is not None]
        if not failures:
            return
        if self.rank != 0:
            raise Stopped(failures[0][1]) from error
        if error is None:
            r, message = failures[0]
            error = RankError(f"rank {r} of {self.size}: {message}")
        raise self.collective(error)

    def on_root(self, fn):
        """fn() on rank 0 only, its result (pickled) sent to every rank; when it raises, every rank stops (see
        together)."""
        result = None
        with self.together():
            if self.rank == 0:
                result = fn()
        return self.comm.bcast(result, root=0)

    def run(self, fn, prog, user_errors=()):
        """fn() as this rank's whole job; returns its result. An error every rank raised together is re-raised on
        rank 0 (for the caller to report) and ends the others quietly with 2. Any other error is this rank's own:
        it prints it (one line naming the rank, after a traceback unless it is one of user_errors or a signal) and
        calls MPI_Abort, which ends every rank of the job at once (exit 2, or 128 + the signal)."""
        self.user_errors = tuple(user_errors) + (ValueError, TypeError, OSError)
        try:
            return fn()
        except Stopped:
            return 2
        except (Exception, KeyboardInterrupt) as e:
            if self.is_collective(e):
                if self.rank == 0:
                    raise
                return 2
            signum = signal_of(e)
            if signum is None and not isinstance(e, self.user_errors):
                traceback.print_exc()
            print(f"{prog}: error: rank {self.rank} of {self.size}: {describe(e, self.user_errors)}; stopping "
                  f"every rank", file=sys.stderr, flush=True)
            code = 2 if signum is None else 128 + signum
            self.comm.Abort(code)
            return code

    def use_local_gpu(self):
        """Make this rank's current CUDA device the (local rank mod device count)-th of its node, so ranks sharing
        a node use different GPUs; returns its index."""
        import cupy
        MPI = mpi()
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        index = local.Get_rank() % cupy.cuda.runtime.getDeviceCount()
        local.Free()
        cupy.cuda.Device(index).use()
        return index


class Transport:
    """allreduce(buf): sum buf over the ranks in place; bcast(buf): rank 0's buf on every rank."""

    def __init__(self, comm):
        self.comm, self.MPI = comm, mpi()

    def allreduce(self, buf):
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)

    def bcast(self, buf):
        self.comm.Bcast(buf, root=0)


class Staged(Transport):
    """MPI on a host copy of a GPU buffer."""

    def __init__(self, comm, buf):
        super().__init__(comm)
        self.host = np.empty(buf.shape, buf.dtype)

    def through_host(self, op, buf):
        host = self.host[:len(buf)]
        buf.get(out=host)
        op(host)
        buf.set(host)

    def allreduce(self, buf):
        self.through_host(super().allreduce, buf)

    def bcast(self, buf):
        self.through_host(super().bcast, buf)


def current_stream():
    import cupy
    return cupy.cuda.get_current_stream()


class CudaAwareMPI(Transport):
    """MPI on the GPU buffer itself (mpi4py takes CuPy arrays); the stream is synchronised first, as MPI reads the
    memory outside it."""

    def allreduce(self, buf):
        current_stream().synchronize()
        super().allreduce(buf)

    def bcast(self, buf):
        current_stream().synchronize()
        super().bcast(buf)


class NCCL(Transport):
    """NCCL on the GPU buffer, on CuPy's current stream; the communicator made from a unique id sent over MPI."""

    def __init__(self, comm, buf):
        super().__init__(comm)
        from cupy.cuda import nccl
        self.nccl = nccl
        uid = comm.bcast(nccl.get_unique_id() if comm.Get_rank() == 0 else None, root=0)
        self.nc = nccl.NcclCommunicator(comm.Get_size(), uid, comm.Get_rank())
        self.dtype = {"float16": nccl.NCCL_FLOAT16, "float32": nccl.NCCL_FLOAT32,
                      "float64": nccl.NCCL_FLOAT64}[buf.dtype.name]

    def allreduce(self, buf):
        self.nc.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self.dtype, self.nccl.NCCL_SUM, current_stream().ptr)

    def bcast(self, buf):
        self.nc.bcast(buf.data.ptr, buf.size, self.dtype, 0, current_stream().ptr)


def nccl_available():
    try:
        from cupy.cuda import nccl
    except ImportError:
        return False
    return getattr(nccl, "available", True)


def resolve(kind, gpu):
    """The transport `kind` (one of TRANSPORTS) names for host (gpu False) or GPU arrays."""
    if not gpu and kind in ("nccl", "cuda-aware-mpi"):
        raise ValueError(f"allreduce={kind!r} needs the parameters on a GPU; these are NumPy arrays")
    if kind == "auto":
        return "nccl" if gpu and nccl_available() else "mpi"
    return kind


def transport(kind, comm, buf):
    """The Transport for `kind` (one of TRANSPORTS) and a buffer on the host or a GPU."""
    gpu = array_module(buf) is not np
    kind = resolve(kind, gpu)
    if kind == "nccl":
        return NCCL(comm, buf)
    if kind == "cuda-aware-mpi":
        return CudaAwareMPI(comm)
    return Staged(comm, buf) if gpu else Transport(comm)
