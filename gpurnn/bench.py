"""`gpurnn bench`: our layers side by side with the best peer present (torch on the CPU, torch+cuDNN on a GPU).

Both sides run in one process, timed alternately, median of `--repeats` after warm-up. GFLOP/s counts the GEMM
work: 2*T*B*G*H*(I+H) for a forward pass, three times that for a training step (forward, dgates->dx/dh, dW).
Cells: lstm, gru, rnn_<act>, and lnlstm / lngru (LayerNormLSTM / LayerNormGRU, which no peer has). `--memory` also
times our training step under memory="checkpoint" (in the same alternation) and measures the peak memory of one
training step of each side and mode in a fresh process.
The helpers here also serve the asv suite (asv_bench/benchmarks).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

from .kernels import GATES

PEER_CLASS = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}
CELLS = ("lstm", "gru", "lnlstm", "lngru", "rnn_tanh", "rnn_relu", "rnn_sigmoid")
KERNEL_CELL = {"lnlstm": "lstm", "lngru": "gru"}       # the LayerNorm layers run the LSTM's and GRU's step kernels
DEFAULT_CELLS = ("lstm", "gru", "rnn_tanh")
DEFAULT_SIZES = ("100,32,256",)


def gemm_flops(cell, T, B, H, I=None, train=True):
    """GEMM FLOPs of one forward pass (train=False) or training step (train=True) of one layer."""
    I = H if I is None else I
    return (3 if train else 1) * 2 * T * B * GATES[KERNEL_CELL.get(cell, cell)] * H * (I + H)


def synchronize(backend):
    """Wait for the device: a no-op on the CPU."""
    if backend != "numpy":
        from .backend import xp_for
        xp_for("cuda").cuda.Device().synchronize()


def device_name(backend):
    """The device a backend runs on, in words, with the thread count on a CPU."""
    if backend != "numpy":
        from .backend import xp_for
        cupy = xp_for("cuda")
        return cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} threads"


def numba_threads():
    """The threads our CPU step kernels run on, with Numba's threading layer: "N (layer)"."""
    from .kernels import cpu_fused
    return f"{cpu_fused.step_threads()} ({cpu_fused.threading_layer()})"


def sgemm_gflops(n=2048, repeats=5):
    """This machine's NumPy float32 GEMM rate (n x n x n), GFLOP/s, best of `repeats`."""
    a, b = (np.random.default_rng(0).standard_normal((n, n)).astype(np.float32) for _ in range(2))
    out = np.empty((n, n), np.float32)
    np.matmul(a, b, out=out)
    best = min(_seconds(lambda: np.matmul(a, b, out=out)) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _seconds(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def make_ours(backend, cell, T, B, H, I=None, train=True, seed=0, workspace=False, memory="full", sweep="auto"):
    """A no-argument callable running one forward (train=False) or training step of our layer; `workspace`: the
    layer reuses its buffers across calls (layer.workspace()); `memory`: the layer's memory mode; `sweep`: the GPU
    backends' sweep (layer.sweep)."""
    from .models import make_rnn
    I = H if I is None else I
    layer = make_rnn(cell, I, H, 1, 0.0, "float32", "auto", seed, memory=memory)
    layer.workspace(workspace)
    layer.sweep = sweep
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    dy = rng.standard_normal((T, B, H)).astype(np.float32)
    if backend != "numpy":
        layer.to("cuda")
        x, dy = layer.xp.asarray(x), layer.xp.asarray(dy)
    layer.backend = backend

    def step():
        y, _, ctx = layer.forward(x, training=train)
        if train:
            layer.backward(ctx, dy)
        synchronize(backend)
    return step


def torch_or_none():
    try:
        import torch
        return torch
    except ImportError:
        return None


def make_peer(backend, cell, T, B, H, I=None, train=True, seed=0):
    """The same step in torch (CPU for the numpy backend, CUDA/cuDNN otherwise); None without torch or for a
    cell torch lacks (rnn_sigmoid)."""
    torch = torch_or_none()
    if torch is None or cell not in PEER_CLASS or (backend != "numpy" and not torch.cuda.is_available()):
        return None
    I = H if I is None else I
    dev = "cpu" if backend == "numpy" else "cuda"
    torch.manual_seed(seed)
    kwargs = {"nonlinearity": cell[4:]} if cell.startswith("rnn_") else {}
    mod = getattr(torch.nn, PEER_CLASS[cell])(I, H, **kwargs).to(dev)
    x = torch.randn(T, B, I, device=dev, requires_grad=train)
    dy = torch.randn(T, B, H, device=dev)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def step():
        if train:
            y, _ = mod(x)
            y.backward(dy)
        else:
            with torch.no_grad():
                mod(x)
        sync()
    return step


def peer_name(backend):
    torch = torch_or_none()
    if torch is None:
        return None
    return f"torch {torch.__version__} " + ("CPU" if backend == "numpy" else "cuDNN")


def time_alternating(fns, repeats=10, warmup=2, pause=0.5):
    """Median seconds of each callable, the callables run in turn after `warmup` rounds. `pause` seconds of
    idle before each timed call let the other side's BLAS/OpenMP threads stop spinning (OpenBLAS spins
    about 0.1 s after a call), so neither side is timed while the other's threads still hold the cores."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            time.sleep(pause)
            times[k].append(_seconds(fn))
    return [float(np.median(t)) for t in times]


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_rss_child(side, backend, cell, T, B, H, train, memory="full"):
    """In a fresh process: peak RSS growth (bytes) of one step of `side` ("ours" | "peer") after a warm-up
    step (imports, compiled kernels, data and parameters are in place): Linux's VmHWM, reset just before
    the step through /proc/self/clear_refs, minus VmRSS at that moment. Counts every allocator alike; the
    parent sets MALLOC_MMAP_THRESHOLD_ so large blocks are mapped and unmapped, not kept by malloc.
    memory: our layer's memory mode."""
    if side == "ours":
        step = make_ours(backend, cell, T, B, H, train=train, memory=memory)
    else:
        step = make_peer(backend, cell, T, B, H, train=train)
    step()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) * 1024


def peak_rss(side, backend, cell, T, B, H, train=True, memory="full"):
    code = ("import sys, gpurnn.bench as b; print(b.peak_rss_child(*sys.argv[1:4], *map(int, sys.argv[4:7]), "
            "sys.argv[7] == '1', sys.argv[8]))")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", code, side, backend, cell, str(T), str(B), str(H), str(int(train)),
                          memory], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.split()[-1])


def run(backend="numpy", cells=DEFAULT_CELLS, sizes=((100, 32, 256),), repeats=10, modes=("train", "inference"),
        memory=False, workspace=False, sweeps=("auto",)):
    """Rows of measurements (dicts), one per cell x size x mode x sweep; a progress line on stderr before each."""
    rows = []
    total = len(cells) * len(sizes) * len(modes) * len(sweeps)
    for cell in cells:
        for T, B, H in sizes:
            for mode, sweep in ((m, s) for m in modes for s in sweeps):
                how = "" if sweep == "auto" else f" sweep {sweep}"
                progress(f"{cell} T,B,H={T},{B},{H} {mode}{how} ({len(rows) + 1}/{total})")
                train = mode == "train"
                checkpointed = memory and train
                ours = make_ours(backend, cell, T, B, H, train=train, workspace=workspace, sweep=sweep)
                ckpt = [make_ours(backend, cell, T, B, H, train=True, workspace=workspace, memory="checkpoint",
                                  sweep=sweep)] if checkpointed else []
                peer = make_peer(backend, cell, T, B, H, train=train)
                t_ours, *t_rest = time_alternating([ours] + ckpt + ([peer] if peer else []), repeats)
                t_ckpt = t_rest.pop(0) if ckpt else None
                row = dict(cell=cell, T=T, B=B, H=H, I=H, mode=mode, sweep=sweep, ours_ms=t_ours * 1e3,
                           peer_ms=t_rest[0] * 1e3 if t_rest else None,
                           ratio=t_ours / t_rest[0] if t_rest else None,
                           gflops=gemm_flops(cell, T, B, H, train=train) / t_ours / 1e9)
                if checkpointed:
                    row.update(ckpt_ms=t_ckpt * 1e3, ckpt_time_ratio=t_ckpt / t_ours)
                if checkpointed and backend == "numpy":
                    row["ours_peak_mib"] = peak_rss("ours", backend, cell, T, B, H) / 2 ** 20
                    row["ckpt_peak_mib"] = peak_rss("ours", backend, cell, T, B, H, memory="checkpoint") / 2 ** 20
                    row["ckpt_peak_ratio"] = (row["ckpt_peak_mib"] / row["ours_peak_mib"] if row["ours_peak_mib"]
                                              else None)
                    row["peer_peak_mib"] = peak_rss("peer", backend, cell, T, B, H) / 2 ** 20 if peer else None
                rows.append(row)
    return rows


def progress(message):
    """A progress line on stderr (the table or JSON goes to stdout)."""
    print(f"gpurnn bench: {message}", file=sys.stderr, flush=True)


def _sizes(text):
    try:
        T, B, H = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is T,B,H (three integers), got {text!r}") from None
    if min(T, B, H) < 1:
        raise argparse.ArgumentTypeError(f"T, B and H must be >= 1, got {text!r}")
    return T, B, H


def add_arguments(parser):
    parser.add_argument("--backend", default="numpy", choices=("numpy", "numba", "cupy"),
                        help="our backend to time (numba and cupy need a GPU)")
    parser.add_argument("--cells", nargs="+", default=list(DEFAULT_CELLS), choices=CELLS, metavar="CELL",
                        help=f"cells: {' '.join(CELLS)} (default: {' '.join(DEFAULT_CELLS)})")
    parser.add_argument("--sizes", nargs="+", type=_sizes, default=[_sizes(s) for s in DEFAULT_SIZES],
                        metavar="T,B,H", help="sizes as T,B,H with I = H (default: 100,32,256)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds per measurement (median)")
    parser.add_argument("--mode", choices=("train", "inference", "both"), default="both",
                        help="training step, forward only (no saved activations), or both")
    parser.add_argument("--memory", action="store_true",
                        help='also time our training step under memory="checkpoint", and measure peak RSS of one '
                             'training step of each side and mode in a fresh process (CPU)')
    parser.add_argument("--profile", action="store_true",
                        help="instead of the comparison, split our training step into its parts (numpy backend)")
    parser.add_argument("--workspace", action="store_true",
                        help="our layers reuse their buffers across calls (layer.workspace(), numpy backend)")
    parser.add_argument("--sweep", nargs="+", default=["auto"], choices=("auto", "step", "persistent"),
                        help="GPU backends: the sweep(s) to time side by side, e.g. --sweep step persistent "
                             "(numba: both; cupy: step)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def format_table(result):
    lines = [f"device: {result['device']}  (NumPy SGEMM {result['sgemm_gflops']:.0f} GFLOP/s; "
             f"peer: {result['peer'] or 'none'}, torch threads {result['torch_threads']}; "
             f"Numba threads {result['numba_threads']}, workspace {'on' if result['workspace'] else 'off'})"]
    head = (f"{'cell':<12}{'T,B,H':>14} {'mode':<10}{'sweep':<11}{'ours ms':>9}{'peer ms':>9}{'ratio':>7}"
            f"{'GFLOP/s':>9}{'%SGEMM':>8}")
    ckpt = any("ckpt_ms" in r for r in result["rows"])
    mem = any("ours_peak_mib" in r for r in result["rows"])
    lines.append(head + ("  ckpt ms (x full)" if ckpt else "") +
                 ("  peak MiB full / ckpt (x full) / peer" if mem else ""))
    for r in result["rows"]:
        peer = f"{r['peer_ms']:9.1f}{r['ratio']:7.2f}" if r["peer_ms"] is not None else f"{'-':>9}{'-':>7}"
        line = (f"{r['cell']:<12}{r['T']:>6},{r['B']},{r['H']:<4} {r['mode']:<10}{r['sweep']:<11}"
                f"{r['ours_ms']:9.1f}{peer}{r['gflops']:9.1f}{100 * r['gflops'] / result['sgemm_gflops']:7.0f}%")
        if "ckpt_ms" in r:
            line += f"  {r['ckpt_ms']:8.1f} ({r['ckpt_time_ratio']:.2f})"
        elif ckpt:
            line += f"  {'-':>15}"
        if "ours_peak_mib" in r:
            share = f"{r['ckpt_peak_ratio']:.2f}" if r["ckpt_peak_ratio"] is not None else "-"
            line += (f"  {r['ours_peak_mib']:.1f} / {r['ckpt_peak_mib']:.1f} ({share}) / " +
                     (f"{r['peer_peak_mib']:.1f}" if r["peer_peak_mib"] else "-"))
        lines.append(line)
    return "\n".join(lines)


def print_profiles(args):
    from .profile import format_profile, profile_step
    if args.backend != "numpy":
        print("gpurnn bench: error: --profile times the numpy backend's parts; drop --backend", file=sys.stderr)
        return 2
    result = dict(device=device_name("numpy"), numpy=np.__version__, repeats=args.repeats, profiles=[])
    for cell in args.cells:
        for T, B, H in args.sizes:
            parts = profile_step(cell, T, B, H, args.repeats, workspace=args.workspace)
            result["profiles"].append(dict(cell=cell, T=T, B=B, H=H, parts=[dict(part=n, ms=ms, gflop=g)
                                                                               for n, ms, g in parts]))
            if not args.json:
                print(format_profile(cell, T, B, H, parts, args.workspace, numba_threads()), flush=True)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"device: {result['device']}, NumPy {result['numpy']}, median of {args.repeats}")
    return 0


def main(argv=None):
    from .cli import Parser
    args = add_arguments(Parser(prog="gpurnn bench", description=__doc__.splitlines()[0])).parse_args(argv)
    if args.repeats < 1:
        print("gpurnn bench: error: --repeats must be >= 1", file=sys.stderr)
        return 2
    sweeps = list(dict.fromkeys(args.sweep))
    allowed = {"numpy": ("auto",), "cupy": ("auto", "step")}.get(args.backend, ("auto", "step", "persistent"))
    if set(sweeps) - set(allowed):
        print(f"gpurnn bench: error: --sweep for backend {args.backend!r} takes {', '.join(allowed)}", file=sys.stderr)
        return 2
    if args.backend != "numpy":
        from .backend import gpu_available
        if not gpu_available():
            print(f"gpurnn bench: error: backend {args.backend!r} needs a GPU and none is available", file=sys.stderr)
            return 2
    if args.profile:
        if any(cell not in GATES for cell in args.cells):
            print("gpurnn bench: error: --profile splits the plain cells' steps (lstm gru rnn_*)", file=sys.stderr)
            return 2
        return print_profiles(args)
    torch = torch_or_none()
    modes = ("train", "inference") if args.mode == "both" else (args.mode,)
    rows = run(args.backend, args.cells, args.sizes, args.repeats, modes, args.memory, args.workspace, sweeps)
    progress("measuring this machine's SGEMM rate")
    result = dict(device=device_name(args.backend), backend=args.backend, sgemm_gflops=sgemm_gflops(),
                  numpy=np.__version__, peer=peer_name(args.backend),
                  torch_threads=torch.get_num_threads() if torch else None, numba_threads=numba_threads(),
                  workspace=args.workspace, repeats=args.repeats, rows=rows)
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
