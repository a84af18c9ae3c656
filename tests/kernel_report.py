"""The static report of every numba-backend kernel, compiled once per test session for sm_80 and sm_90:
`python -m gpurnn.kernels.sass --json 80 90` (Numba -> PTX -> ptxas -> nvdisasm), in a subprocess with
NUMBA_ENABLE_CUDASIM=0 since compile_ptx does not exist in the simulator. It needs NVVM and libdevice, ptxas and
nvdisasm (NVIDIA's wheels from the test extra) and fails, never skips, without them.
"""
import functools
import json
import os
import subprocess
import sys

TARGETS = ("sm_80", "sm_90")


@functools.lru_cache(maxsize=None)
def kernel_report():
    """{(target, dtype, kernel): row} with the row fields of gpurnn.kernels.sass.analyse."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    proc = subprocess.run([sys.executable, "-m", "gpurnn.kernels.sass", "--json", *(t[3:] for t in TARGETS)],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"kernel compilation failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    return {(r["target"], r["dtype"], r["kernel"]): r for r in rows}
