"""Every numba-backend kernel compiles to PTX for real GPUs (sm_80, sm_90), with or without a GPU here."""
import pytest

from kernel_report import TARGETS, kernel_report

PERSISTENT = tuple(f"persistent_{d}_{c}" for d in ("forward", "backward") for c in ("elman", "lstm", "gru")) + \
    ("persistent_jordan_forward", "persistent_jordan_backward")
KERNELS = ("step_forward", "step_backward", "jordan_hidden", "jordan_output", "jordan_output_backward",
           "jordan_hidden_backward", "row_forward", "row_backward", "proj_forward", "proj_backward") + PERSISTENT


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", KERNELS)
def test_kernel_compiles_to_ptx(target, dtype, name):
    row = kernel_report()[target, dtype, name]
    assert row["entry"] is not None and ".entry" in row["entry"]
    if dtype == "float32":
        assert row["f64_ops"] == 0, f"{name} promotes float32 math to float64"
