"""Compile every numba-backend kernel to PTX for real GPU targets, without a GPU.

    NUMBA_ENABLE_CUDASIM=0 python -m gpurnn.kernels.numba_cuda_ptx 80 90

prints one line per (target, dtype, kernel): `sm_90 float32 step_forward f64_ops=0 <the PTX .entry line>`
(f64_ops: PTX instructions on float64, which a float32 kernel must not have), and exits 1 on the first
compile error or when a kernel's PTX has no `.entry` naming it. The per-step kernels take the cell as an
argument, so one compile per kernel and dtype covers every cell (the variants' kernels, numba_variant_kernels, with
every variant on); the persistent kernels are built per cell
(`persistent_forward_lstm`, ..., `persistent_jordan_forward`). Needs NVVM and libdevice (a CUDA toolkit or NVIDIA's wheels).
"""
import sys
from types import SimpleNamespace

import numpy as np
from numba import cuda, float32, float64, int32, int64

from .numba_cuda_kernels import CELL_CODES, build, float32_activations
from .numba_persistent import build as build_persistent, build_jordan
from .numba_variant_kernels import build as build_variants

PERSISTENT_CELLS = {"elman": CELL_CODES["rnn_tanh"], "lstm": CELL_CODES["lstm"], "gru": CELL_CODES["gru"]}


def signatures(F):
    """Kernel name -> argument types, as the host code launches them (C-contiguous arrays of dtype F)."""
    a1, a2, a3, lens, keys, i = F[::1], F[:, ::1], F[:, :, ::1], int32[::1], int64[::1], int64
    return {
        "step_forward": (i, i, i, a3, a2, a1, a1, lens, a2, a2, a3, a3, a3, a3),
        "step_backward": (i, i, i, a2, a2, a3, a3, a2, a3, a3, a2, a3, lens, a2, a3, a3),
        "persistent_forward": (i, i, i, i, a3, a2, a1, a1, lens, a3, a3, a2, a3, a3, a3, a3),
        "persistent_backward": (i, i, i, i, a2, lens, a2, a3, a3, a2, a3, a3, a2, a3, a2, a3, a3),
        "persistent_jordan_forward": (i, i, i, i, i, i, a3, a2, a2, a1, lens, a3, a3, a3, a3),
        "persistent_jordan_backward": (i, i, i, i, i, i, a2, a2, lens, a3, a3, a3, a2, a3, a3),
        "jordan_hidden": (i, i, a3, a2, lens, a3),
        "jordan_output": (i, i, a2, a1, lens, a3, a2),
        "jordan_output_backward": (i, i, a3, a3, lens, a2, a2, a3),
        "jordan_hidden_backward": (i, i, a2, a3, a3),
        "row_forward": (i, i, i, F, F, i, keys, a3, a2, a1, a1, lens, a1, a1, a1, a1, a2, a2, a3, a3, a3, a3, a3, a3,
                        a3, a3),
        "row_backward": (i, i, i, keys, a2, a2, a3, a3, a2, a3, a3, a2, a3, lens, a2, a3, a3, a1, a1, a1, a1, a3, a3,
                         a3, a2, a3),
        "proj_forward": (i, F, i, keys, a2, lens, a2, a3),
        "proj_backward": (i, keys, a2, a2, a3, lens, a3),
    }


def without_device(cc):
    """Let kernels that call device functions compile with no GPU: Numba compiles a device function for the
    current device's compute capability, so stand in a device of the target's."""
    from numba.cuda import dispatcher
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=cc)


def kernels(dtype):
    """Kernel name -> (dispatcher, argument types) for every kernel of `dtype`."""
    sigs = signatures(float32 if dtype == np.float32 else float64)
    step = build(dtype)
    variants = build_variants(dtype, True, True, True)       # every variant on: all of the kernels' code
    found = {name: (getattr(step, name, None) or getattr(variants, name), sig) for name, sig in sigs.items()
             if not name.startswith("persistent")}
    jordan = build_jordan(dtype)
    found["persistent_jordan_forward"] = (jordan.forward, sigs["persistent_jordan_forward"])
    found["persistent_jordan_backward"] = (jordan.backward, sigs["persistent_jordan_backward"])
    for cell, code in PERSISTENT_CELLS.items():
        persistent = build_persistent(dtype, code)
        found[f"persistent_forward_{cell}"] = (persistent.forward, sigs["persistent_forward"])
        found[f"persistent_backward_{cell}"] = (persistent.backward, sigs["persistent_backward"])
    return found


def activation_ptx(cc):
    """{"sigmoid" | "tanh": PTX} of the float32 activations (numba_cuda_kernels.float32_activations), each behind a
    kernel that applies it to one element of an array."""
    if not cuda.is_available():
        without_device(cc)
    sigmoid, tanh = float32_activations().sigmoid, float32_activations().tanh

    def apply_sigmoid(x, y):
        y[0] = sigmoid(x[0])

    def apply_tanh(x, y):
        y[0] = tanh(x[0])
    return {name: cuda.compile_ptx(fn, (float32[::1], float32[::1]), cc=cc)[0]
            for name, fn in (("sigmoid", apply_sigmoid), ("tanh", apply_tanh))}


def compile_all(ccs):
    """Yield (cc, dtype name, kernel name, Python function name, PTX text) for every kernel, dtype and target,
    compiled with the launch bounds the kernel's dispatcher carries."""
    for cc in ccs:
        if not cuda.is_available():
            without_device(cc)
        for dtype in (np.float32, np.float64):
            for name, (kernel, sig) in kernels(dtype).items():
                bounds = kernel.targetoptions.get("launch_bounds")
                ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=cc, launch_bounds=bounds)
                yield cc, np.dtype(dtype).name, name, kernel.py_func.__name__, ptx


def main(argv):
    ccs = [(int(a[:-1]), int(a[-1])) for a in (argv or ["80", "90"])]
    for cc, dtype, name, function, ptx in compile_all(ccs):
        entries = [line for line in ptx.splitlines() if ".entry" in line and function in line]
        if not entries:
            print(f"sm_{cc[0]}{cc[1]} {dtype} {name}: no .entry in the PTX", file=sys.stderr)
            return 1
        f64_ops = sum(".f64" in line for line in ptx.splitlines())
        print(f"sm_{cc[0]}{cc[1]} {dtype} {name} f64_ops={f64_ops} {entries[0].strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
