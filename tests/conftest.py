import os
import shutil

# Without a GPU (unless the caller chose already), Numba's CUDA kernels run in its simulator and the CUDA C kernels
# of the cupy backend run on the CPU harness (kernels/cuda_host.py), both on NumPy arrays.
_NO_GPU = "0" if shutil.which("nvidia-smi") else "1"
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", _NO_GPU)
os.environ.setdefault("GPURNN_CUDA_HOST", _NO_GPU)

import sys  # noqa: E402

# The simulators run one Python thread per CUDA thread, and Numba's polls them while they wait at a barrier: with
# CPython's default 5 ms GIL switch interval every barrier costs milliseconds of waiting for the poller to let go.
sys.setswitchinterval(1e-4)

import pytest  # noqa: E402

from util import BACKENDS  # noqa: E402


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Every backend that runs its own kernels here: numpy always; numba and cupy on a GPU; cupy on the CPU harness
    without one (the numba simulator is too slow for the whole suite: tests/test_numba_cuda.py covers it)."""
    return request.param


@pytest.fixture
def launches(monkeypatch):
    """A Counter of the numba backend's kernel launches by kernel name, under the simulator: its two launchers
    (Numba's own, and numba_sim.launch for cooperative grids, counted as "persistent_<name>") wrapped; device-function
    calls are not launches."""
    import collections

    from numba.cuda.simulator import kernel as sim_kernel

    from gpurnn.kernels import numba_sim
    counter = collections.Counter()
    numba_call, sim_launch = sim_kernel.FakeCUDAKernel.__call__, numba_sim.launch

    def counted_call(self, *args):
        if not self._device and sim_kernel._get_kernel_context() is None:
            counter[self.fn.__name__] += 1
        return numba_call(self, *args)

    def counted_launch(kernel, *args, **kwargs):
        counter["persistent_" + kernel.py_func.__name__] += 1
        return sim_launch(kernel, *args, **kwargs)
    monkeypatch.setattr(sim_kernel.FakeCUDAKernel, "__call__", counted_call)
    monkeypatch.setattr(numba_sim, "launch", counted_launch)
    return counter
