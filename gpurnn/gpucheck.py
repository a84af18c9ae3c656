"""`gpurnn check-gpu` (or `python -m gpurnn.gpucheck`): everything a lent GPU should tell us, in one bounded command.

    PYTHONPATH=. python -m gpurnn.gpucheck [--out DIR] [--budget SECONDS] [--skip tests sanitizer timing]

Prints a Markdown report and writes it, with the logs and the timing rows as JSON, to --out (default gpucheck-out):
1. the device, driver and library versions;
2. the GPU test suite (GPU_TESTS: the numba and cupy backends against the float64 reference, the GEMM modes, graph
   replay against plain launches), run by pytest in a child process with the simulator and the CPU harness off;
3. compute-sanitizer memcheck and racecheck over one small sweep of every kernel (`--workload`: per-step and
   persistent, each cell, both dtypes, Jordan, the bf16 conversion), when the tool is found;
4. the timing table: training step (forward + backward, every gradient) and inference, LSTM / GRU / Elman, T = 100,
   I = H = 512, B in 1, 4, 16, 64, 256, ours (numba backend, its planner's sweep) against torch + cuDNN with the same
   weights, fp32 on both sides or tf32 on both (torch's matmul and cuDNN TF32 switches), measured as METHOD says:
   warm-up calls first (compilation, graph capture), then rounds that alternate ours and cuDNN, each call bracketed
   by CUDA events on the stream it runs on, inputs rotated over three sets, the median of the rounds; each row also
   gives the relative difference of our output from cuDNN's (correct first).
Every phase runs in a child process under its share of --budget (default 470 s, under 8 minutes in all): what a
phase had done when its time ran out is reported as such. Without a GPU it says so and exits 0. Exit status: 0 when
every phase that ran passed (tests, sanitizer errors), 1 otherwise.
"""
import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GPU_TESTS = ("tests/test_gemm.py", "tests/test_graphs.py", "tests/test_precision.py", "tests/test_cupy_backend.py",
             "tests/test_numba_cuda.py", "tests/test_nonfinite.py")      # quick ones first
CELLS = ("lstm", "gru", "rnn_tanh")
BATCHES = (64, 256, 16, 4, 1)       # measured in this order: the goal's sizes first, in case time runs out
MATHS = ("fp32", "tf32")
MODES = ("train", "inference")
T, SIZE = 100, 512
WARMUP, ROUNDS, INPUT_SETS = 3, 10, 3
SHARES = {"tests": 0.40, "timing": 0.40, "sanitizer": 0.20}    # of the budget; unused time passes to later phases
PHASES = ("tests", "timing", "sanitizer")
clock = time.monotonic


def no_gpu_reason():
    """None when CuPy sees a CUDA device, else why not."""
    try:
        import cupy
    except ImportError as e:
        return f"CuPy is not installed ({e})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:   # noqa: BLE001 - no driver, no device: any CUDA error means no GPU
        return f"CUDA reports no usable device ({type(e).__name__}: {e})"
    return None if count > 0 else "CUDA reports 0 devices"


def child_env(**extra):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", GPURNN_CUDA_HOST="0", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def run_child(cmd, timeout, log, env=None):
    """(exit code, or None when it was stopped at `timeout` seconds; seconds; output): `cmd` in a session of its own,
    its output written to `log`. At the timeout the whole session is killed (compute-sanitizer's target too)."""
    start = clock()
    with open(log, "w") as f:
        child = subprocess.Popen(cmd, cwd=ROOT, env=env or child_env(), stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            rc = child.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            rc = None
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.wait()
    return rc, clock() - start, Path(log).read_text(errors="replace")


# --- 1. environment ---
def versions():
    """Library versions, and the device as CUDA and nvidia-smi describe it (name -> text)."""
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("numba", "numba_cuda", "cupy", "torch"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:   # noqa: BLE001 - absent or broken: say so
            out[name] = f"absent ({type(e).__name__})"
    try:
        import cupy
        rt = cupy.cuda.runtime
        props = rt.getDeviceProperties(cupy.cuda.Device().id)
        out.update(device=props["name"].decode(), compute_capability=f"{props['major']}.{props['minor']}",
                   sms=str(props["multiProcessorCount"]), memory_gib=f"{props['totalGlobalMem'] / 2 ** 30:.1f}",
                   driver=str(rt.driverGetVersion()), runtime=str(rt.runtimeGetVersion()),
                   cublas=str(cupy.cuda.cublas.getVersion(cupy.cuda.get_cublas_handle())))
    except Exception as e:   # noqa: BLE001
        out["device"] = f"unknown ({type(e).__name__}: {e})"
    try:
        import torch
        out["cudnn"] = str(torch.backends.cudnn.version())
    except Exception:   # noqa: BLE001
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        query = "name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu,mig.mode.current"
        try:
            done = subprocess.run([smi, f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                                  text=True, timeout=30)
            out["nvidia-smi"] = done.stdout.strip() or done.stderr.strip()
        except subprocess.TimeoutExpired:
            out["nvidia-smi"] = "no answer in 30 s"
    out["commit"] = git_commit()
    return out


def git_commit():
    try:
        done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=30)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return done.stdout.strip() + (" (with uncommitted changes)" if dirty else "") if done.returncode == 0 \
            else "unknown (not a git checkout)"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git)"


def environment_section(info):
    return "## Device and libraries\n\n" + "\n".join(f"- {k}: {v}" for k, v in info.items())


# --- 2. tests ---
def pytest_summary(output):
    """(summary line, failed test ids) from pytest's output (-v -rfE). Without pytest's own summary (it was stopped):
    the outcomes counted from its per-test lines, and the tests that failed so far."""
    lines = output.splitlines()
    summary = next((line.strip("= ").strip() for line in reversed(lines)
                    if re.search(r"\b(passed|failed|error|errors|skipped|no tests ran)\b", line)
                    and line.startswith("=")), "")
    failed = [line.split(" ", 1)[1].split(" - ")[0] for line in lines if line.startswith(("FAILED ", "ERROR "))]
    if not summary:
        outcomes = re.findall(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", output, re.M)
        counts = {}
        for _, outcome in outcomes:
            counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
        summary = ", ".join(f"{n} {k}" for k, n in counts.items()) + " so far" if counts else ""
        failed = failed or [test for test, outcome in outcomes if outcome in ("FAILED", "ERROR")]
    return summary, failed


def tests_section(rc, seconds, output, timeout):
    summary, failed = pytest_summary(output)
    if rc is None:
        verdict = f"stopped after {timeout:.0f} s (its time share ran out)"
    else:
        verdict = "passed" if rc == 0 else f"FAILED (exit {rc})"
    lines = [f"## GPU test suite: {verdict}", "", f"`pytest {' '.join(GPU_TESTS)}` in {seconds:.0f} s: "
             f"{summary or 'no summary printed'}"]
    lines += [f"- failed: `{t}`" for t in failed[:30]]
    return "\n".join(lines)


# --- 3. compute-sanitizer ---
def sanitizer_path():
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", "compute-sanitizer"), os.X_OK):
            return os.path.join(home, "bin", "compute-sanitizer")
    return None


def sanitizer_summary(output):
    """(number of errors reported or None, the first error lines) of a compute-sanitizer run."""
    match = re.findall(r"ERROR SUMMARY:\s*(\d+)\s+error", output)
    errors = [line for line in output.splitlines() if line.startswith("========= ") and
              re.search(r"(Invalid|Race|Hazard|error|Error)", line) and "ERROR SUMMARY" not in line]
    return (int(match[-1]) if match else None), errors[:10]


def sanitizer_section(results):
    """results: tool -> (exit code or None, seconds, output, timeout), or a str saying why nothing ran."""
    if isinstance(results, str):
        return f"## compute-sanitizer: not run\n\n{results}"
    lines = ["## compute-sanitizer over one small sweep of every kernel (`--workload`)", ""]
    for tool, (rc, seconds, output, timeout) in results.items():
        errors, first = sanitizer_summary(output)
        if rc is None:
            verdict = f"stopped after {timeout:.0f} s"
        elif errors is None:
            verdict = f"no summary (exit {rc})"
        else:
            verdict = f"{errors} errors (exit {rc})"
        lines.append(f"- {tool}: {verdict}, {seconds:.0f} s")
        lines += [f"  - `{e[10:].strip()}`" for e in first]
    return "\n".join(lines)


def workload(sizes=(3, 2, 5)):
    """One small sweep of every kernel the GPU backends launch: the per-step and persistent numba sweeps and the cupy
    sweeps (the per-step ones with the variants too), forward and backward, each cell and activation, float32 and float64, ragged lengths,
    Jordan with every pair of activations, and the bf16 conversion of the GEMMs. The sanitizer runs it with
    GPURNN_CUDA_GRAPHS=0, so that each kernel runs as a plain launch (the kernels a graph replays are these)."""
    from .backend import available, xp_for
    from .kernels import ACTIVATIONS, cupy_raw, numba_cuda
    from .layers import GRU, LSTM, RNN, LayerNormGRU, LayerNormLSTM
    Tw, B, H, O = *sizes, 3
    rng = np.random.default_rng(0)
    lengths = np.array([Tw] + [max(1, Tw - 1 - b) for b in range(1, B)])
    layers = [(RNN, {"nonlinearity": a}) for a in ("tanh", "relu", "sigmoid")] + [(LSTM, {}), (GRU, {})]
    # the variants' kernels (LN, projection, zoneout), on the step sweeps (the persistent ones refuse them)
    variants = [(LayerNormLSTM, {}), (LayerNormGRU, {"zoneout": 0.3}), (LSTM, {"proj_size": 2}),
                (LayerNormLSTM, {"zoneout": 0.3, "proj_size": 2})]
    runs = [(b, s) for b, s in (("numba", "step"), ("numba", "persistent"), ("cupy", "step")) if b in available()]
    for (backend, sweep), dtype in ((r, d) for r in runs for d in ("float32", "float64")):
        device = xp_for_backend(backend)
        xp = xp_for(device)
        data = (lambda *shape: xp.asarray(rng.standard_normal(shape).astype(dtype)))
        for math in ("fp32", "bf16") if dtype == "float32" and sweep == "step" else ("fp32",):
            for make, kwargs in layers + (variants if sweep == "step" else []):
                layer = make(4, H, backend=backend, dtype=dtype, seed=0, math=math, **kwargs).to(device)
                layer.sweep = sweep
                y, _, ctx = layer.forward(data(Tw, B, 4), lengths=lengths)
                layer.backward(ctx, data(*y.shape))
        K, opts = (numba_cuda, {"sweep": sweep}) if backend == "numba" else (cupy_raw, {})
        for act in ("tanh", "relu", "sigmoid"):
            for out_act in ACTIVATIONS:
                y, y_n, ctx = K.jordan_forward(data(Tw, B, H), data(H, O), data(O, H), data(O), data(B, O),
                                               xp.asarray(lengths.astype(np.int32)), act, out_act, True, **opts)
                K.jordan_backward(ctx, data(Tw, B, O), data(B, O))


def xp_for_backend(backend):
    """Where a GPU backend's arrays live here: "cpu" on the simulator / the CPU harness, else "cuda"."""
    from .backend import cuda_host, cuda_simulator
    return "cpu" if (cuda_simulator() if backend == "numba" else cuda_host()) else "cuda"


# --- 4. timing ---
def timing_rows(deadline, out_file, cells=CELLS, batches=BATCHES, maths=MATHS, modes=MODES, T_=T, size=SIZE):
    """Measure every row (see the module docstring) until `deadline` (clock()); each row is appended to
    `out_file` as a JSON line as soon as it is measured."""
    import cupy
    import torch
    from .layers import GRU, LSTM, RNN
    from .kernels import graphs
    kinds = {"lstm": (LSTM, "LSTM", {}), "gru": (GRU, "GRU", {}), "rnn_tanh": (RNN, "RNN", {"nonlinearity": "tanh"})}
    for B in batches:
        for cell in cells:
            ours_cls, torch_name, kwargs = kinds[cell]
            for math in maths:
                for mode in modes:
                    if clock() > deadline:
                        return
                    torch.manual_seed(0)
                    peer = getattr(torch.nn, torch_name)(size, size, **kwargs).cuda()
                    ours = ours_cls(size, size, math=math, seed=0, **kwargs)
                    ours.load_state_dict({k: v.detach().cpu().numpy() for k, v in peer.state_dict().items()})
                    ours.to("cuda")
                    row = measure(cupy, torch, ours, peer, cell, B, math, mode == "train", T_, size)
                    row["graphs"] = dict(graphs.stats)
                    with open(out_file, "a") as f:
                        f.write(json.dumps(row) + "\n")


def planned_sweep(cell, B, size):
    """The sweep the numba backend's planner takes for a float32 layer of this size on this device."""
    from .kernels import GATES, numba_cuda, numba_plan
    return numba_plan.plan("auto", B, size, GATES[cell], 4, numba_cuda.current_device()).sweep


def measure(cupy, torch, ours, peer, cell, B, math, train, T_, size):
    tf32 = math == "tf32"
    rng = np.random.default_rng(B)
    xs = [rng.standard_normal((T_, B, size)).astype(np.float32) for _ in range(INPUT_SETS)]
    dys = [rng.standard_normal((T_, B, size)).astype(np.float32) for _ in range(INPUT_SETS)]
    ours_x, ours_dy = [cupy.asarray(a) for a in xs], [cupy.asarray(a) for a in dys]
    peer_x = [torch.from_numpy(a).cuda().requires_grad_(train) for a in xs]
    peer_dy = [torch.from_numpy(a).cuda() for a in dys]

    def ours_call(k):
        y, _, ctx = ours.forward(ours_x[k], training=train)
        if train:
            ours.backward(ctx, ours_dy[k])
        return y

    def peer_call(k):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        if train:
            y, _ = peer(peer_x[k])
            y.backward(peer_dy[k])
            return y
        with torch.no_grad():
            return peer(peer_x[k])[0]

    def timed_ours(k):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        ours_call(k)
        end.record()
        end.synchronize()
        return cupy.cuda.get_elapsed_time(start, end)

    def timed_peer(k):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        peer_call(k)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    y_ours, y_peer = ours_call(0), peer_call(0)
    diff = float(cupy.linalg.norm(y_ours - cupy.asarray(y_peer.detach())) / cupy.linalg.norm(cupy.asarray(
        y_peer.detach())))
    ours_ms, peer_ms = alternate([timed_ours, timed_peer], WARMUP, ROUNDS, INPUT_SETS)
    return dict(cell=cell, T=T_, B=B, H=size, I=size, math=math, mode="train" if train else "inference",
                sweep=planned_sweep(cell, B, size), ours_ms=ours_ms, cudnn_ms=peer_ms, ratio=ours_ms / peer_ms,
                rel_diff=diff)


def alternate(timers, warmup, rounds, sets):
    """Median milliseconds of each timer(k): `warmup` untimed calls of each, then `rounds` rounds calling each in
    turn (the order alternating between rounds), input set k = round % sets."""
    for i in range(warmup):
        for timer in timers:
            timer(i % sets)
    times = [[] for _ in timers]
    for r in range(rounds):
        order = range(len(timers)) if r % 2 == 0 else reversed(range(len(timers)))
        for j in order:
            times[j].append(timers[j](r % sets))
    return [float(np.median(t)) for t in times]


def timing_section(rows, rc, seconds, timeout, expected):
    head = f"## Timing: ours (numba backend) against torch + cuDNN, T = {T}, I = H = {SIZE}"
    lines = [head, "", f"{len(rows)} of {expected} rows in {seconds:.0f} s" +
             (f"; stopped after {timeout:.0f} s (its time share ran out)" if rc is None else
              "" if rc == 0 else f"; the timing process failed (exit {rc}), see timing.log"), "",
             "Median of rounds alternating ours and cuDNN after warm-up, CUDA events around each call, inputs "
             f"rotated over {INPUT_SETS} sets; fp32 rows with TF32 off on both sides, tf32 rows with it on on both. "
             "rel diff: ‖y_ours − y_cuDNN‖ / ‖y_cuDNN‖ of the forward output.", "",
             "| cell | B | math | mode | sweep | ours ms | cuDNN ms | ours / cuDNN | rel diff |",
             "|---|---:|---|---|---|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (CELLS.index(r["cell"]), r["B"], r["math"], r["mode"])):
        lines.append(f"| {r['cell']} | {r['B']} | {r['math']} | {r['mode']} | {r['sweep']} | {r['ours_ms']:.3f} | "
                     f"{r['cudnn_ms']:.3f} | {r['ratio']:.2f} | {r['rel_diff']:.1e} |")
    if rows:
        lines += ["", f"CUDA graphs (after the last row): {rows[-1].get('graphs', {})}"]
    return "\n".join(lines)


def read_rows(path):
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# --- the report ---
def report(info, sections, seconds, budget, command):
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = [f"# gpurnn check-gpu: {info.get('device', 'no GPU')}", "",
            f"{stamp}, commit {info.get('commit', 'unknown')}, {seconds:.0f} s of a {budget:.0f} s budget. "
            f"Command: `{command}`"]
    return "\n\n".join(["\n".join(head)] + [s for s in sections if s]) + "\n"


def no_gpu_report(reason):
    return (f"# gpurnn check-gpu: no GPU\n\nNo GPU here: {reason}. Nothing was measured or tested on a GPU; "
            "run this command on a machine with an NVIDIA GPU and CuPy (see the README, 'Checking a GPU').\n")


def write(out, name, text):
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(text)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="gpurnn check-gpu", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpucheck-out", help="folder for report.md, timings.jsonl and the logs")
    p.add_argument("--budget", type=float, default=470.0, help="seconds for everything (default 470: under 8 min)")
    p.add_argument("--skip", nargs="*", default=[], choices=PHASES, help="phases to leave out")
    p.add_argument("--workload", action="store_true", help=argparse.SUPPRESS)         # the sanitizer's child
    p.add_argument("--timing-child", metavar="FILE", help=argparse.SUPPRESS)        # the timing phase's child
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def share(phase, skip, remaining):
    """Seconds for `phase` out of `remaining`: its share of what the phases still to run are due."""
    left = [p for p in PHASES[PHASES.index(phase):] if p not in skip]
    return remaining * SHARES[phase] / sum(SHARES[p] for p in left)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = " ".join(["python -m gpurnn.gpucheck"] + argv)
    if args.workload:
        workload()
        print("workload done")
        return 0
    if args.timing_child:
        timing_rows(clock() + args.deadline, args.timing_child)
        return 0
    started = clock()
    out = Path(args.out)
    reason = no_gpu_reason()
    if reason is not None:
        text = no_gpu_report(reason)
        print(text, end="")
        write(out, "report.md", text)
        return 0
    info = versions()
    sections = [environment_section(info)]
    ok = True
    remaining = (lambda: args.budget - (clock() - started) - 5)
    for phase in PHASES:
        if phase in args.skip:
            continue
        seconds = share(phase, args.skip, remaining())
        print(f"gpurnn check-gpu: {phase} ({seconds:.0f} s at most)", file=sys.stderr, flush=True)
        if phase == "tests":
            missing = [t for t in GPU_TESTS if not (ROOT / t).exists()]
            if missing:
                sections.append(f"## GPU test suite: not run\n\n{', '.join(missing)} not found: run from a checkout")
                continue
            rc, took, output = run_child([sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider",
                                          *GPU_TESTS], seconds, out / "tests.log")
            ok &= rc == 0
            sections.append(tests_section(rc, took, output, seconds))
        elif phase == "timing":
            rows_file = out / "timings.jsonl"
            rows_file.unlink(missing_ok=True)
            rc, took, _ = run_child([sys.executable, "-m", "gpurnn.gpucheck", "--timing-child", str(rows_file),
                                     "--deadline", str(max(seconds - 30, 1))], seconds, out / "timing.log")
            expected = len(CELLS) * len(BATCHES) * len(MATHS) * len(MODES)
            sections.append(timing_section(read_rows(rows_file), rc, took, seconds, expected))
        else:
            tool = sanitizer_path()
            if tool is None:
                sections.append(sanitizer_section("compute-sanitizer was not found (PATH, CUDA_HOME, /usr/local/cuda)"))
                continue
            results = {}
            for name in ("memcheck", "racecheck"):
                each = seconds / (2 - len(results))
                began = clock()
                rc, took, output = run_child([tool, "--tool", name, "--error-exitcode", "99", sys.executable, "-m",
                                              "gpurnn.gpucheck", "--workload"], each, out / f"sanitizer-{name}.log",
                                             child_env(GPURNN_CUDA_GRAPHS="0"))
                seconds -= clock() - began
                results[name] = (rc, took, output, each)
                ok &= rc == 0
            sections.append(sanitizer_section(results))
        write(out, "report.md", report(info, sections, clock() - started, args.budget, command))
    text = report(info, sections, clock() - started, args.budget, command)
    print(text, end="")
    write(out, "report.md", text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
