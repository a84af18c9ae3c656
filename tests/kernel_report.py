"""The static report of every numba-backend kernel, compiled once per test session for sm_80 and sm_90:
`python -m gpurnn.kernels.sass --json 80` and `... 90` (Numba -> PTX -> ptxas -> nvdisasm), one process per target
running side by side, with NUMBA_ENABLE_CUDASIM=0 since compile_ptx does not exist in the simulator. It needs NVVM
and libdevice, ptxas and nvdisasm (NVIDIA's wheels from the test extra) and fails, never skips, without them.
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
    procs = [subprocess.Popen([sys.executable, "-m", "gpurnn.kernels.sass", "--json", target[3:]], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for target in TARGETS]
    rows = []
    for proc in procs:
        out, err = proc.communicate(timeout=1800)
        assert proc.returncode == 0, f"kernel compilation failed:\n{out[-2000:]}\n{err[-4000:]}"
        rows += [json.loads(line) for line in out.splitlines()]
    return {(r["target"], r["dtype"], r["kernel"]): r for r in rows}
