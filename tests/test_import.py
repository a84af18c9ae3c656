"""`import gpurnn` is fast and pulls in no GPU stack."""
import json
import subprocess
import sys

PROBE = """
import json, sys, time
t = time.perf_counter()
import gpurnn
elapsed = time.perf_counter() - t
print(json.dumps({"seconds": elapsed, "modules": sorted(m for m in sys.modules
      if m.split('.')[0] == 'cupy' or m.startswith('numba.cuda') or m == 'numba' or m == 'torch')}))
"""


def test_import_is_fast_and_light():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={"PATH": "", "NUMBA_ENABLE_CUDASIM": "0"})
    report = json.loads(out.stdout)
    assert report["modules"] == [], f"import gpurnn imported {report['modules']}"
    assert report["seconds"] < 1.0, f"import gpurnn took {report['seconds']:.2f} s"
