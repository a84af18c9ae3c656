"""`import gpurnn` pulls in no GPU stack, no Numba and no torch: not even its submodules' API does (they load on
first use). Its import time is a benchmark (asv_bench/benchmarks/bench_import.py), never a test."""
import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys
import gpurnn
{touch}
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('cupy', 'numba', 'torch', 'cuda'))))
"""


@pytest.mark.parametrize("touch", ["", "gpurnn.nn, gpurnn.optim, gpurnn.models, gpurnn.trainer, dir(gpurnn)"])
def test_import_is_light(touch):
    out = subprocess.run([sys.executable, "-c", PROBE.format(touch=touch)], capture_output=True, text=True,
                         check=True, env={"PATH": "", "NUMBA_ENABLE_CUDASIM": "0"})
    assert json.loads(out.stdout) == [], f"import gpurnn imported {out.stdout}"


def test_submodules_are_attributes():
    import gpurnn
    assert gpurnn.nn.Sequential and gpurnn.optim.Adam and gpurnn.models.CharLM and gpurnn.lr_scheduler.StepLR
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        gpurnn.nope
