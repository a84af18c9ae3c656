import os
import shutil

# Without a GPU (unless the caller chose already), Numba's CUDA kernels run in its simulator and the CUDA C kernels
# of the cupy backend run on the CPU harness (kernels/cuda_host.py), both on NumPy arrays.
_NO_GPU = "0" if shutil.which("nvidia-smi") else "1"
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", _NO_GPU)
os.environ.setdefault("GPURNN_CUDA_HOST", _NO_GPU)

import pytest  # noqa: E402

from util import BACKENDS  # noqa: E402


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Every backend that runs its own kernels here: numpy always; numba and cupy on a GPU; cupy on the CPU harness
    without one (the numba simulator is too slow for the whole suite: tests/test_numba_cuda.py covers it)."""
    return request.param
