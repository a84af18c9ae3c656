"""Every numba-backend kernel compiles to PTX for real GPUs (sm_80, sm_90), with or without a GPU here.

compile_ptx does not work under the CUDA simulator, so the compilation runs in a subprocess with
NUMBA_ENABLE_CUDASIM=0 (`python -m gpurnn.kernels.numba_cuda_ptx`); it needs NVVM and libdevice from a CUDA
toolkit or NVIDIA's wheels, and fails (never skips) without them.
"""
import os
import subprocess
import sys

import pytest

TARGETS = ("sm_80", "sm_90")
KERNELS = ("step_forward", "step_backward", "persistent_forward", "persistent_backward", "jordan_hidden",
           "jordan_output", "jordan_output_backward", "jordan_hidden_backward")


@pytest.fixture(scope="module")
def compiled():
    """{(target, dtype, kernel): (f64 instruction count, .entry line)} from one compile of everything."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    proc = subprocess.run([sys.executable, "-m", "gpurnn.kernels.numba_cuda_ptx", *(t[3:] for t in TARGETS)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"PTX compilation failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    result = {}
    for line in proc.stdout.splitlines():
        target, dtype, name, f64, entry = line.split(" ", 4)
        result[target, dtype, name] = (int(f64.split("=")[1]), entry)
    return result


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", KERNELS)
def test_kernel_compiles_to_ptx(compiled, target, dtype, name):
    f64_ops, entry = compiled[target, dtype, name]
    assert ".entry" in entry and name in entry
    if dtype == "float32":
        assert f64_ops == 0, f"{name} promotes float32 math to float64"
