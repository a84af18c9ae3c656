"""The `gpurnn` command: train | sample | diagnose | info | bench.

`gpurnn train` with no arguments trains a character LSTM language model on Python standard-library sources and
ends by printing generated Python. Every user error (a bad option, a missing/empty/non-UTF-8 file, an unusable
--out, a checkpoint of another model, a diverged run) prints one line on stderr and exits 2. SIGINT (Ctrl-C),
SIGTERM and SIGHUP during training save a checkpoint after the batch in flight, then exit 128 + the signal.
`mpiexec -n N gpurnn train --distributed` trains data-parallel (gpurnn.distributed): --batch is the whole batch,
each process takes its rows, rank 0 alone holds --out, prints and writes.
"""
import argparse
import contextlib
import math
import os
import signal
import sys
import time
import warnings

import numpy as np

MODEL_OPTIONS = ("cell", "hidden", "layers", "embedding", "zoneout", "weight_drop", "proj_size")
FIXED_ON_RESUME = MODEL_OPTIONS + ("batch", "seq_len", "seed")     # the checkpoint's model, state and data layout
TRAIN_DEFAULTS = dict(steps=1500, cell="lstm", hidden=256, layers=1, embedding=64, seq_len=64, batch=32, lr=3e-3,
                      tbptt=None, clip=1.0, seed=0, zoneout=0.0, weight_drop=0.0, proj_size=0, memory="full")
NEWER_OPTIONS = ("zoneout", "weight_drop", "proj_size", "memory")   # checkpoints from before them hold the defaults
CELLS = ("lstm", "gru", "lnlstm", "lngru", "rnn_tanh", "rnn_relu", "rnn_sigmoid")
MAX_DIAGNOSE_STEPS = 10_000


class CliError(Exception):
    """A problem the user can fix: reported as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, with a bad invocation reported in one line (no usage block) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def integer(minimum=1, maximum=None):
    """An argparse type: an integer in [minimum, maximum]."""
    bounds = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer {bounds}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected an integer {bounds}, got {text!r}")
        return value
    return parse


def number(high=math.inf):
    """An argparse type: a finite number in (0, high]."""
    bounds = "a finite number > 0" if high == math.inf else f"a number in (0, {high:g}]"

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {bounds}, got {text!r}") from None
        if not (0 < value <= high and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected {bounds}, got {text!r}")
        return value
    return parse


def probability(text):
    """An argparse type: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def build_parser():
    parser = Parser(prog="gpurnn", description="Fused RNN kernels: train, sample, diagnose, bench.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a character language model (default: on Python stdlib sources)")
    t.add_argument("--steps", type=integer(), metavar="N",
                   help=f"batches to train (default {TRAIN_DEFAULTS['steps']}); with --resume, N MORE batches "
                        f"(--resume without --steps finishes the run's planned total)")
    t.add_argument("--cell", choices=CELLS, help="recurrent cell (default lstm; lnlstm and lngru: LayerNormLSTM, "
                                                 "LayerNormGRU)")
    t.add_argument("--hidden", type=integer(), help="hidden units per layer (default 256)")
    t.add_argument("--layers", type=integer(), help="stacked layers (default 1)")
    t.add_argument("--embedding", type=integer(), help="character embedding size (default 64)")
    t.add_argument("--zoneout", type=probability, metavar="P",
                   help="zoneout: each unit of the state keeps its value with probability P in training (default 0)")
    t.add_argument("--weight-drop", type=probability, metavar="P",
                   help="DropConnect on the recurrent weights W_hh with probability P in training (default 0)")
    t.add_argument("--proj-size", type=integer(0), metavar="P",
                   help="LSTM projection: h is P wide (P < --hidden; lstm and lnlstm; default 0, none)")
    t.add_argument("--memory", choices=("full", "checkpoint"),
                   help="BPTT memory: full keeps every step, checkpoint every ~sqrt(T) steps and recomputes "
                        "(same gradients bit for bit; default full; may change on --resume)")
    t.add_argument("--seq-len", type=integer(), help="steps per batch (default 64)")
    t.add_argument("--batch", type=integer(), help="sequences per batch (default 32)")
    t.add_argument("--lr", type=number(high=1.0), help="Adam learning rate in (0, 1] (default 3e-3); with --resume "
                                                       "it replaces the checkpoint's from the first step on")
    t.add_argument("--tbptt", metavar="K1,K2", help="truncated BPTT: update every K1 steps through K2 steps "
                                                   "(default: K1 = K2 = --seq-len)")
    t.add_argument("--clip", type=number(), help="clip the global gradient norm to this (default 1.0)")
    t.add_argument("--data", metavar="FILE", help="a UTF-8 text file to train on instead of the stdlib sources")
    t.add_argument("--resume", nargs="?", const=True, metavar="DIR",
                   help="continue the run whose checkpoint is in DIR (default: in --out)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the checkpoint --out holds (without it, train refuses to touch one)")
    t.add_argument("--out", default=os.path.join("runs", "charlm"),
                   help="checkpoint and plot directory (default runs/charlm); one run at a time")
    t.add_argument("--seed", type=integer(0), help="seed for parameters and sampling (default 0)")
    t.add_argument("--backend", default="auto", choices=("auto", "numpy", "numba", "cupy"),
                   help="where to run (default: the fastest present for the data's device)")
    t.add_argument("--checkpoint-every", type=integer(), default=250, metavar="N",
                   help="save a checkpoint (and evaluate on held-out text) every N steps (default 250)")
    t.add_argument("--samples", type=integer(0), default=2, help="samples printed at the end (default 2)")
    t.add_argument("--sample-length", type=integer(), default=400, help="characters per sample (default 400)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--distributed", action="store_true",
                   help="data-parallel over the processes of `mpiexec -n N` (or srun): --batch is the whole batch, "
                        "split by rows; needs mpi4py (pip install 'gpurnn[mpi]')")
    t.add_argument("--allreduce", choices=("auto", "mpi", "nccl", "cuda-aware-mpi"),
                   help="with --distributed: how gradients are summed (default auto: MPI for CPU arrays, NCCL for "
                        "GPU arrays when CuPy has it)")

    s = sub.add_parser("sample", help="generate text from a trained checkpoint")
    s.add_argument("--checkpoint", default=os.path.join("runs", "charlm"), metavar="PATH",
                   help="a folder written by gpurnn train, or a checkpoint file (default runs/charlm)")
    s.add_argument("--length", type=integer(), default=500, help="characters to generate (default 500)")
    s.add_argument("--temperature", type=number(), default=0.8,
                   help="softmax temperature: lower is more conservative (default 0.8)")
    s.add_argument("--prime", default="", help="text to feed in before generating")
    s.add_argument("--seed", type=integer(0), help="sampling seed (default: fresh randomness)")

    d = sub.add_parser("diagnose", help="plot ||dL/dh_t|| back through time for Elman vs LSTM")
    d.add_argument("--out", default="gradient_flow.png", metavar="FILE.png",
                   help="the PNG to write, in an existing folder (default gradient_flow.png)")
    d.add_argument("--steps", type=integer(1, MAX_DIAGNOSE_STEPS), default=65,
                   help="steps back through time (default 65)")

    sub.add_parser("info", help="backends, devices and library versions")
    sub.add_parser("bench", help="side-by-side speed table (see gpurnn bench --help)", add_help=False)
    sub.add_parser("check-gpu", help="GPU report: tests, compute-sanitizer, timing against cuDNN (see --help)",
                   add_help=False)
    return parser


def user_errors():
    """The errors a user can cause, each reported as one line."""
    from .checkpoint import CheckpointError
    from .checks import NonFiniteError
    from .corpus import CorpusError
    from .distributed import RankError
    from .files import LockedError
    return CliError, CorpusError, CheckpointError, LockedError, NonFiniteError, RankError


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from . import bench
        return bench.main(argv[1:])
    if argv[:1] == ["check-gpu"]:
        from . import gpucheck
        return gpucheck.main(argv[1:])
    args = build_parser().parse_args(argv)

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"gpurnn {args.command}: warning: {message}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.showwarning = one_line_warning
        try:
            return {"train": train, "sample": sample, "diagnose": diagnose, "info": info}[args.command](args)
        except user_errors() as e:
            print(f"gpurnn {args.command}: error: {e}", file=sys.stderr)
        except MemoryError as e:
            print(f"gpurnn {args.command}: error: out of memory ({e})", file=sys.stderr)
        except OSError as e:
            print(f"gpurnn {args.command}: error: {e.strerror or e}" +
                  (f": {e.filename}" if e.filename else ""), file=sys.stderr)
    return 2


def device_for(backend):
    from .backend import gpu_available
    if backend == "auto":
        return "cuda" if gpu_available() else "cpu"
    if backend != "numpy" and not gpu_available():
        raise CliError(f"--backend {backend} needs a CUDA GPU with CuPy; none is available here")
    return "cpu" if backend == "numpy" else "cuda"


def prepare_out(out):
    """--out created and test-written (a file written, fsynced and deleted) before anything else happens."""
    from .files import check_writable
    if not out:
        raise CliError("--out must name a folder, got ''")
    if os.path.exists(out) and not os.path.isdir(out):
        raise CliError(f"--out {out} is a file, not a folder")
    try:
        check_writable(out)
    except OSError as e:
        raise CliError(f"--out {out} is not a writable folder ({e.strerror or e})") from None
    return out


def train_options(args, given, source):
    """The run's options and the checkpoint to resume (None for a new run): defaults, then the checkpoint's
    (on --resume), then the command line's. Options that fix the model, its state or the data layout must
    match the checkpoint's."""
    opts = dict(TRAIN_DEFAULTS)
    if source is None:
        opts.update(given)
        return opts, None
    from . import checkpoint
    saved = checkpoint.load(source)
    config = saved.get("model_config")
    extra = saved.get("extra")
    previous = extra.get("options") if isinstance(extra, dict) else None
    if not isinstance(config, dict) or config.get("kind") != "CharLM" or not isinstance(previous, dict) or \
            not TRAIN_DEFAULTS.keys() - set(NEWER_OPTIONS) <= previous.keys():
        kind = config.get("kind") if isinstance(config, dict) else None
        raise CliError(f"the checkpoint in {source} holds another model ({kind}), not a gpurnn train language model")
    clash = [f"--{k.replace('_', '-')} {given[k]} (checkpoint: {previous.get(k, TRAIN_DEFAULTS[k])})"
             for k in FIXED_ON_RESUME if k in given and given[k] != previous.get(k, TRAIN_DEFAULTS[k])]
    if clash:
        raise CliError(f"the checkpoint in {source} is from another model or data layout: {', '.join(clash)}")
    opts.update(previous)
    opts.update(given)
    if args.data is None:
        args.data = extra.get("data")
    return opts, saved


def load_corpus(path):
    from .corpus import read_text, stdlib_text
    if path is None:
        return stdlib_text()
    text = read_text(path)
    return text, f"{path} ({len(text):,} characters)"


def training_bytes(vocab_size, opts):
    """About the memory training a CharLM takes: float32 weights, gradients and Adam's two buffers, plus the
    float64 draw that initialises the largest weight matrix."""
    G = {"lstm": 4, "lnlstm": 4, "gru": 3, "lngru": 3}.get(opts["cell"], 1)
    V, E, H, L = vocab_size, opts["embedding"], opts["hidden"], opts["layers"]
    P = opts["proj_size"] or H
    rnn = sum(G * H * (inputs + P + 4) + (P * H if P != H else 0) for inputs in [E] + [P] * (L - 1))
    largest = max(V * E, G * H * max(E, P), P * V)
    return 4 * 4 * (V * E + rnn + H * V + V) + 8 * largest


def check_fits(vocab_size, opts):
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return
    need = training_bytes(vocab_size, opts)
    if need > memory:
        raise CliError(f"--hidden {opts['hidden']} --embedding {opts['embedding']} --layers {opts['layers']}: "
                       f"training this model needs about {need / 2**30:,.1f} GiB (weights, gradients, Adam's "
                       f"state); this machine has {memory / 2**30:,.1f} GiB")


def held_out_batches(ids):
    """Up to 16 rows of at most 128 steps over the held-out ids (None when there are too few)."""
    from .corpus import CharBatches
    rows = max(1, min(16, (len(ids) - 1) // 130))
    steps = min(128, (len(ids) - 1) // rows - 2)
    return CharBatches(ids, rows, steps) if steps >= 1 else None


def train(args):
    from .files import RunLock
    if args.allreduce is not None and not args.distributed:
        raise CliError("--allreduce needs --distributed")
    # A file-size limit (ulimit -f) then fails a write with EFBIG, reported in one line, instead of killing us.
    previous_xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN) if hasattr(signal, "SIGXFSZ") else None
    try:
        if args.distributed:
            return train_distributed(args)
        out = prepare_out(args.out)
        with RunLock(out):
            return train_in(args, out)
    finally:
        if previous_xfsz is not None:
            signal.signal(signal.SIGXFSZ, previous_xfsz)


def train_distributed(args):
    """`gpurnn train --distributed` on one rank: rank 0 checks and locks --out, every rank trains. An error all
    ranks meet is printed once by rank 0; one rank's own error is printed by it and ends the job (MPI_Abort)."""
    from .distributed import DataParallel
    from .files import RunLock
    try:
        group = DataParallel(allreduce=args.allreduce or "auto")
    except ImportError as e:
        raise CliError(str(e)) from None

    def job():
        with contextlib.ExitStack() as lock:
            def claim():
                out = prepare_out(args.out)
                lock.enter_context(RunLock(out))
                return out
            return train_in(args, group.on_root(claim), group)
    return group.run(job, "gpurnn train", user_errors())


def read_run(args, out):
    """The folder rules, the run's options, the checkpoint to resume (or None) and the corpus: what rank 0 reads
    and checks. Returns (opts, given, saved, present checkpoint files, source, text, description, data path)."""
    from . import checkpoint
    from .files import remove_stray_temps
    remove_stray_temps(out)
    present = checkpoint.existing(out)
    in_place = args.resume is True or (args.resume and os.path.abspath(args.resume) == os.path.abspath(out))
    if args.overwrite and in_place:
        raise CliError("--overwrite would delete the checkpoint that --resume continues; pass one of them")
    if present and not (in_place or args.overwrite):
        raise CliError(f"{out} already holds a checkpoint ({os.path.basename(present[0])}); pass --resume to "
                       f"continue that run, --overwrite to replace it, or another --out")
    given = {k: getattr(args, k) for k in TRAIN_DEFAULTS if getattr(args, k) is not None}
    source = None if not args.resume else out if args.resume is True else args.resume
    opts, saved = train_options(args, given, source)
    text, description = load_corpus(args.data)
    return opts, given, saved, present, source, text, description, args.data


def train_in(args, out, group=None):
    """`gpurnn train` while holding the lock on --out; distributed (group), on every rank, rank 0 holding it."""
    from .backend import resolve
    from .trainer import Interrupted

    root = group is None or group.is_root
    read = (lambda: read_run(args, out))
    opts, given, saved, present, source, text, description, args.data = \
        read() if group is None else group.on_root(read)
    with contextlib.nullcontext() if group is None else group.together():     # every rank builds, or all stop
        trainer, model, data, device = build_run(args, out, group, opts, given, saved, source, text)
    if args.overwrite and root:
        for file in present:
            os.unlink(file)
    if root:
        print(f"gpurnn train: {model!r}, {model.num_parameters():,} parameters, vocabulary {len(model.vocab)}, "
              f"on {device} ({resolve(model.rnn.backend, device)}); corpus: {description}", file=sys.stderr)
    meter = None
    if group is not None and root:
        meter = Throughput(group)
        trainer.callbacks.insert(0, meter)
        print(f"gpurnn train: {group.size} process{'es' if group.size > 1 else ''}, effective batch "
              f"{opts['batch']} x {opts['seq_len']} characters, {data.rows.shape[1]} rows per batch on rank 0; "
              f"gradients summed by one allreduce ({group.transport_name(device == 'cuda')}) per update",
              file=sys.stderr)
    start = time.perf_counter()
    try:
        trainer.fit(lambda step, rng: tuple(model.xp.asarray(a) for a in data(step)), opts["steps"])
    except Interrupted as e:
        if group is not None and not group.is_collective(e):
            raise                              # one rank's second signal: group.run ends the job
        done = f"checkpoint saved in {out} (continue with --resume)" if e.saved else \
            f"stopped at once; the last checkpoint in {out} is kept"
        if root:
            print(("\n" if sys.stderr.isatty() else "") + f"{signal.Signals(e.signum).name} at step {trainer.step}: "
                  + done, file=sys.stderr)
        return 128 + e.signum
    wall = time.perf_counter() - start
    alone = group.time_allreduce() if group is not None else None
    if not root:
        return 0
    if meter is not None:
        print(meter.report(alone), file=sys.stderr)
    recent = [s["loss"] for s in trainer.history[-50:]]
    held_out = trainer.extra["held_out"][-1][1] if trainer.extra["held_out"] else float("nan")
    print(f"trained to step {trainer.step} in {wall:.1f} s: loss {np.mean(recent):.3f} nats/char "
          f"(mean of the last {len(recent)} batches), held-out {held_out:.3f}; skipped {trainer.skipped}; "
          f"checkpoint and loss.png in {out}", file=sys.stderr)
    for n in range(args.samples):
        print(f"--- sample {n + 1} (temperature 0.8) ---")
        print(model.sample(args.sample_length, temperature=0.8, prime="\n"))
    return 0


def build_run(args, out, group, opts, given, saved, source, text):
    """The model, its data (this rank's rows when distributed), the device and the trainer, resumed from `saved`
    when given. Returns (trainer, model, data, device)."""
    from . import checkpoint, optim
    from .corpus import CharBatches, build_vocab
    from .models import CharLM
    from .nn import SoftmaxCrossEntropy
    from .trainer import Trainer, parse_tbptt
    root = group is None or group.is_root
    vocab = saved["model_config"]["vocab"] if saved else build_vocab(text)
    if not isinstance(vocab, str) or len(vocab) < 2:
        raise CliError("the text needs at least 2 distinct characters")
    try:
        tbptt = parse_tbptt(opts["tbptt"] or str(opts["seq_len"]))
    except ValueError as e:
        raise CliError(f"--tbptt: {e}") from None
    if tbptt[1] > opts["seq_len"]:
        raise CliError(f"--tbptt K2 ({tbptt[1]}) must not exceed --seq-len ({opts['seq_len']})")
    device = device_for(args.backend)
    rows = slice(None)
    if group is not None:
        if opts["batch"] < group.size:
            raise CliError(f"--batch {opts['batch']} cannot be split over {group.size} processes: each needs at "
                           f"least one row")
        if device == "cpu" and args.allreduce in ("nccl", "cuda-aware-mpi"):
            raise CliError(f"--allreduce {args.allreduce} needs the model on a GPU; this run is on the CPU")
        if device == "cuda":
            group.use_local_gpu()
        rows = group.rows(opts["batch"])
    if opts["proj_size"] and (opts["cell"] not in ("lstm", "lnlstm") or opts["proj_size"] >= opts["hidden"]):
        raise CliError(f"--proj-size {opts['proj_size']} needs --cell lstm or lnlstm and must be smaller than "
                       f"--hidden ({opts['hidden']}); got --cell {opts['cell']}")
    check_fits(len(vocab), opts)
    try:
        model = CharLM(vocab, hidden_size=opts["hidden"], num_layers=opts["layers"], cell=opts["cell"],
                       embedding_dim=opts["embedding"], backend=args.backend, seed=opts["seed"],
                       zoneout=opts["zoneout"], weight_drop=opts["weight_drop"], proj_size=opts["proj_size"],
                       memory=opts["memory"]).to(device)
        ids = model.encode(text)
    except ValueError as e:
        raise CliError(f"the corpus does not fit the model: {e}") from None
    split = int(len(ids) * 0.95)
    data = CharBatches(ids[:split], opts["batch"], opts["seq_len"], rows=rows)
    reporter = Reporter(out, opts, held_out_batches(ids[split:]))
    trainer = Trainer(model, SoftmaxCrossEntropy(), optim.Adam(model.modules(), lr=opts["lr"]), tbptt=tbptt,
                      stateful=True, clip_norm=opts["clip"], checkpoint_dir=out,
                      checkpoint_every=args.checkpoint_every, progress=False if args.no_progress else None,
                      seed=opts["seed"], callbacks=[reporter] if root else [], distributed=group)
    trainer.extra = {"data": args.data, "held_out": []}
    if saved is not None:
        try:
            trainer.load_state_dict(saved)
        except ValueError as e:
            raise CliError(f"{checkpoint.checkpoint_path(source)}: {e}") from None
        trainer.extra["held_out"] = list(saved["extra"].get("held_out") or [])
        if "lr" in given and given["lr"] != trainer.optimizer.lr:
            if root:
                print(f"gpurnn train: learning rate {given['lr']:g} from now on (the checkpoint's: "
                      f"{trainer.optimizer.lr:g})", file=sys.stderr)
            trainer.optimizer.lr = given["lr"]
        opts["lr"] = trainer.optimizer.lr
        if "steps" in given:
            opts["steps"] = trainer.step + given["steps"]
        elif opts["steps"] <= trainer.step:
            raise CliError(f"the run in {source} is complete (step {trainer.step} of {opts['steps']}); "
                           f"pass --steps N to train N more")
    trainer.extra["options"] = {k: opts[k] for k in TRAIN_DEFAULTS}
    reporter.every = max(1, opts["steps"] // 10)
    return trainer, model, data, device


class Throughput:
    """Rank 0 of a distributed run: characters per second over this run's batches after the first (which loads
    compiled kernels; each batch's own time, without evaluation and checkpoints), and the share of that time
    spent in the gradient allreduce, waiting for the slowest rank included."""

    def __init__(self, group):
        self.group, self.first, self.chars, self.seconds = group, None, 0, 0.0

    def on_step(self, trainer, stats):
        if self.first is None:
            self.first = self.group.seconds
            return
        self.chars += stats["tokens"]
        self.seconds += stats["tokens"] / stats["tokens_per_s"]

    def report(self, alone):
        """One line, with `alone` the seconds of one allreduce with no rank waiting for another."""
        if not self.seconds:
            return "gpurnn train: too few batches to measure the throughput"
        comm = self.group.seconds - self.first
        size = self.group.size
        return (f"gpurnn train: {size} process{'es' if size > 1 else ''}: {self.chars / self.seconds:,.0f} "
                f"chars/s after the first batch; gradient allreduce {comm / self.seconds:.1%} of that time "
                f"(waiting for the slowest rank included), {alone * 1e3:.3f} ms for one allreduce of "
                f"{self.group.buffer_bytes() / 2**20:.2f} MiB alone")


def evaluate(model, batches):
    """Mean next-character loss over one pass of batches (nan when there is no held-out text)."""
    if batches is None:
        return float("nan")
    from .nn import SoftmaxCrossEntropy
    loss, state, total = SoftmaxCrossEntropy(), None, []
    for i in range(batches.chunks):
        x, y = (model.xp.asarray(a) for a in batches(i))
        out, state, _ = model.forward(x, state=state, training=False)
        total.append(loss.forward(out, y)[0])
    return float(np.mean(total))


class Reporter:
    """Evaluates on the held-out text before every checkpoint (kept in trainer.extra["held_out"] as [step, loss]
    pairs), writes loss.png after it, and prints a line every 10% when there is no progress bar."""

    def __init__(self, out, opts, held_out):
        self.out, self.opts, self.held_out = out, opts, held_out
        self.every = max(1, opts["steps"] // 10)

    def on_step(self, trainer, stats):
        step = stats["step"]
        if step % trainer.checkpoint_every == 0 or step == self.opts["steps"]:
            trainer.extra["held_out"].append([step, evaluate(trainer.model, self.held_out)])
        if trainer.progress is False or not sys.stderr.isatty():
            if step % self.every == 0:
                print(f"step {step}: loss {stats['loss']:.3f}, grad norm {stats['grad_norm']:.2f}, "
                      f"{stats['tokens_per_s']:,.0f} chars/s", file=sys.stderr, flush=True)

    def on_checkpoint(self, trainer, path):
        o = self.opts
        title = f"char LM, {o['cell']} {o['layers']}x{o['hidden']}, batch {o['batch']}x{o['seq_len']}, lr {o['lr']:g}"
        plot = os.path.join(self.out, "loss.png")
        try:
            plot_losses(trainer.history, trainer.extra["held_out"], plot, title)
        except OSError as e:
            print(f"gpurnn train: warning: could not write {plot} ({e.strerror or e}); training goes on",
                  file=sys.stderr, flush=True)


def plot_losses(history, held_out, path, title):
    """loss.png: the loss of every batch, its running mean and the held-out loss ([step, loss] pairs), written
    atomically. Returns the figure."""
    from matplotlib.figure import Figure          # no pyplot: renders with Agg, leaves the global backend alone

    from .files import atomic_write
    steps = [s["step"] for s in history]
    losses = np.array([s["loss"] for s in history])
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(steps, losses, lw=0.6, alpha=0.5, label="training batch")
    if len(losses) >= 20:
        k = 20
        ax.plot(steps[k - 1:], np.convolve(losses, np.ones(k) / k, mode="valid"), lw=1.5, label=f"mean of {k}")
    if held_out:
        ax.plot(*zip(*held_out), "o-", lw=1.5, label="held-out text")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/char)")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    return fig


def sample(args):
    from . import checkpoint
    saved = checkpoint.load(args.checkpoint)
    config = saved.get("model_config")
    if not isinstance(config, dict) or config.get("kind") != "CharLM":
        kind = config.get("kind") if isinstance(config, dict) else None
        raise CliError(f"the checkpoint in {args.checkpoint} holds another model ({kind}); "
                       f"sample needs a character language model from gpurnn train")
    model = checkpoint.model_from(saved, checkpoint.checkpoint_path(args.checkpoint))
    try:
        text = model.sample(args.length, temperature=args.temperature, prime=args.prime, seed=args.seed)
    except ValueError as e:
        raise CliError(str(e)) from None
    print(args.prime + text)
    return 0


def diagnose(args):
    from .diagnostics import plot_gradient_flow
    from .files import check_writable
    path = args.out
    folder = os.path.dirname(os.path.abspath(path))
    if not path.lower().endswith(".png"):
        raise CliError(f"--out must name a .png file, got {path!r}")
    if os.path.isdir(path):
        raise CliError(f"--out {path} is a folder; name a .png file")
    if not os.path.isdir(folder):
        raise CliError(f"--out {path}: {folder} is not an existing folder")
    try:
        check_writable(folder)
        plot_gradient_flow(path, steps=args.steps)
    except OSError as e:
        raise CliError(f"cannot write {path} ({e.strerror or e})") from None
    print(f"wrote {path}")
    return 0


def info(args):
    import platform
    from importlib import metadata

    from . import __version__
    from .backend import available, cupy_or_none
    print(f"gpurnn {__version__}, Python {platform.python_version()} on {platform.platform()}")
    for name in ("numpy", "numba", "numba-cuda", "cupy-cuda13x", "cupy-cuda12x", "cupy", "torch", "tqdm",
                 "matplotlib"):
        try:
            print(f"  {name}: {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            if name in ("numpy", "numba", "torch", "cupy"):
                print(f"  {name}: not installed")
    print(f"backends: {', '.join(available())}")
    cupy = cupy_or_none()
    if cupy is None:
        print("devices: cpu (no CUDA GPU visible to CuPy)")
    else:
        for i in range(cupy.cuda.runtime.getDeviceCount()):
            props = cupy.cuda.runtime.getDeviceProperties(i)
            print(f"device {i}: {props['name'].decode()} ({props['totalGlobalMem'] / 2**30:.1f} GiB)")
    return 0
