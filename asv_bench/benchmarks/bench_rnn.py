"""Layer speed per backend x cell x (T, B, H), I = H, float32. Helpers shared with `gpurnn bench`."""
from gpurnn import bench
from gpurnn.backend import gpu_available

BACKENDS = ["numpy", "numba", "cupy"]
CELLS = ["lstm", "gru", "rnn_tanh"]
SIZES = ["100,32,256", "50,64,128"]


def check_backend(backend):
    """Skip (NotImplementedError) a GPU backend where it cannot run for real."""
    if backend != "numpy" and not gpu_available():
        raise NotImplementedError(f"backend {backend!r} needs a GPU")


def dims(size):
    return tuple(int(v) for v in size.split(","))


class Sized:
    """The parameter grid every benchmark here runs over; setup skips GPU backends without a GPU."""
    params = (BACKENDS, CELLS, SIZES)
    param_names = ("backend", "cell", "T,B,H")
    timeout = 300
    repeats = 5

    def setup(self, backend, cell, size):
        check_backend(backend)
        self.T, self.B, self.H = dims(size)


class Layer(Sized):
    def setup(self, backend, cell, size):
        super().setup(backend, cell, size)
        T, B, H = self.T, self.B, self.H
        self.forward = bench.make_ours(backend, cell, T, B, H, train=False)
        self.train_step = bench.make_ours(backend, cell, T, B, H, train=True)
        self.train_step_workspace = bench.make_ours(backend, cell, T, B, H, train=True, workspace=True)
        self.forward()
        self.train_step()
        self.train_step_workspace()

    def time_forward(self, backend, cell, size):
        self.forward()

    def time_train_step(self, backend, cell, size):
        self.train_step()

    def time_train_step_workspace(self, backend, cell, size):
        self.train_step_workspace()

    def peakmem_train_step(self, backend, cell, size):
        self.train_step()


class Throughput(Sized):
    """GFLOP/s of a training step (GEMM FLOPs, see gpurnn.bench.gemm_flops)."""

    def setup(self, backend, cell, size):
        super().setup(backend, cell, size)
        self.ours = bench.make_ours(backend, cell, self.T, self.B, self.H)

    def track_gflops(self, backend, cell, size):
        (seconds,) = bench.time_alternating([self.ours], self.repeats)
        return bench.gemm_flops(cell, self.T, self.B, self.H) / seconds / 1e9
    track_gflops.unit = "GFLOP/s"


class VersusTorch(Sized):
    """torch's time over ours for one training step, timed alternately in one process (> 1: we are faster)."""

    def setup(self, backend, cell, size):
        super().setup(backend, cell, size)
        self.peer = bench.make_peer(backend, cell, self.T, self.B, self.H)
        if self.peer is None:
            raise NotImplementedError("torch is not installed")
        self.ours = bench.make_ours(backend, cell, self.T, self.B, self.H)

    def track_speedup_vs_torch(self, backend, cell, size):
        ours, peer = bench.time_alternating([self.ours, self.peer], self.repeats)
        return peer / ours
    track_speedup_vs_torch.unit = "x"
