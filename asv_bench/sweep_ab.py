"""A/B timing of the fused CPU sweeps (kernels/cpu_fused.py) of a git revision against the working tree.

    python asv_bench/sweep_ab.py [REV] [--repeats N] [--sizes T,B,H ...] [--cells CELL ...]   (repository root)

The CPU sweep times before and after the exact float32 activations (issue 15), every cell, forward and backward,
side by side: ea2b864 is the last commit with the former rational activations (read with `git show`, so a
shallow clone needs that commit fetched):

    python asv_bench/sweep_ab.py ea2b864 --cells rnn_tanh rnn_relu rnn_sigmoid lstm gru

"new" is the working tree, so that times everything since ea2b864, the step-kernel rework included; the same
command in a checkout of 1d380cb (the activations' last commit before that rework) times the activations alone.

Both versions load into one process and alternate call by call (order flipped every round), so load from other
processes hits both alike; reported per cell, size and direction: median ms of each ("old" is REV, "new" the
working tree), new / old of the medians and of the minima (the minimum is the steadier figure on a busy machine).
Run it on an otherwise idle machine; the first round of each version compiles (Numba) and is not timed.
`gpurnn bench --profile` splits the current code's training step into its parts, the sweeps among them.
"""
import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpurnn.kernels import GATES, cpu_fused  # noqa: E402


def load_revision(rev):
    """kernels/cpu_fused.py as of `rev`, imported as a sibling of the current one (same relative imports)."""
    source = subprocess.run(["git", "show", f"{rev}:kernels/cpu_fused.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "cpu_fused_ab.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("gpurnn.kernels.cpu_fused_ab", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def problem(cell, T, B, H, rng):
    G = GATES[cell]
    xw = rng.standard_normal((T, B, G * H)).astype(np.float32)
    w_hh = (rng.standard_normal((G * H, H)) / np.sqrt(H)).astype(np.float32)
    b_hh = np.full(G * H, 0.1, np.float32)
    state0 = tuple(rng.standard_normal((B, H)).astype(np.float32) for _ in range(2 if cell == "lstm" else 1))
    return xw, w_hh, b_hh, state0, np.full(B, T, np.int32), rng.standard_normal((T, B, H)).astype(np.float32)


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", nargs="?", default="main")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--sizes", nargs="+", default=["100,32,256", "100,8,64"])
    parser.add_argument("--cells", nargs="+", default=["rnn_tanh", "rnn_sigmoid", "lstm", "gru"])
    args = parser.parse_args()
    modules = {"old": load_revision(args.rev), "new": cpu_fused}
    rng = np.random.default_rng(0)
    print(f"{'cell':<12}{'T,B,H':<12}{'sweep':<10}{'old ms':>9}{'new ms':>9}{'new/old':>9}{'min n/o':>9}")
    for size in args.sizes:
        T, B, H = map(int, size.split(","))
        for cell in args.cells:
            xw, w_hh, b_hh, state0, lengths, dy = problem(cell, T, B, H, rng)
            ctxs = {k: m.forward(cell, xw.copy(), w_hh, b_hh, state0, lengths)[2] for k, m in modules.items()}
            times = {(k, d): [] for k in modules for d in ("forward", "backward")}
            for r in range(args.repeats + 1):
                for k in (("old", "new") if r % 2 else ("new", "old")):
                    m, a = modules[k], xw.copy()
                    tf = timed(lambda: m.forward(cell, a, w_hh, b_hh, state0, lengths))
                    tb = timed(lambda: m.backward(ctxs[k], dy, state0))
                    if r:                                           # round 0 warms up
                        times[k, "forward"].append(tf)
                        times[k, "backward"].append(tb)
            for d in ("forward", "backward"):
                old, new = (1e3 * float(np.median(times[k, d])) for k in ("old", "new"))
                fastest = min(times["new", d]) / min(times["old", d])
                print(f"{cell:<12}{size:<12}{d:<10}{old:9.3f}{new:9.3f}{new / old:9.3f}{fastest:9.3f}")


if __name__ == "__main__":
    main()
