import os
import shutil

# Numba's CUDA kernels run in its simulator unless this machine has a GPU (or the caller chose already).
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0" if shutil.which("nvidia-smi") else "1")

import pytest  # noqa: E402

from util import BACKENDS  # noqa: E402


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Every backend that runs for real here: numpy always; numba and cupy on a GPU."""
    return request.param
