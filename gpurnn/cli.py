"""The `gpurnn` command: train | sample | diagnose | info | bench.

`gpurnn train` with no arguments trains a character LSTM language model on Python standard-library sources and
ends by printing generated Python. A user error (missing/empty/non-UTF-8 file, a checkpoint of another model)
prints one line on stderr and exits 2; Ctrl-C during training saves a checkpoint, then exits 130.
"""
import argparse
import os
import sys
import time

import numpy as np

MODEL_OPTIONS = ("cell", "hidden", "layers", "embedding")
TRAIN_DEFAULTS = dict(steps=1500, cell="lstm", hidden=256, layers=1, embedding=64, seq_len=64, batch=32, lr=3e-3,
                      tbptt=None, clip=1.0, seed=0)
CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu", "rnn_sigmoid")


class CliError(Exception):
    """A problem the user can fix: reported as one line, exit code 2."""


def positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
        return value
    return parse


def build_parser():
    parser = argparse.ArgumentParser(prog="gpurnn", description="Fused RNN kernels: train, sample, diagnose, bench.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a character language model (default: on Python stdlib sources)")
    t.add_argument("--steps", type=positive(int), help=f"total batches to train (default {TRAIN_DEFAULTS['steps']})")
    t.add_argument("--cell", choices=CELLS, help="recurrent cell (default lstm)")
    t.add_argument("--hidden", type=positive(int), help="hidden units per layer (default 256)")
    t.add_argument("--layers", type=positive(int), help="stacked layers (default 1)")
    t.add_argument("--embedding", type=positive(int), help="character embedding size (default 64)")
    t.add_argument("--seq-len", type=positive(int), help="steps per batch (default 64)")
    t.add_argument("--batch", type=positive(int), help="sequences per batch (default 32)")
    t.add_argument("--lr", type=positive(float), help="Adam learning rate (default 3e-3)")
    t.add_argument("--tbptt", metavar="K1,K2", help="truncated BPTT: update every K1 steps through K2 steps "
                                                   "(default: K1 = K2 = --seq-len)")
    t.add_argument("--clip", type=positive(float), help="clip the global gradient norm to this (default 1.0)")
    t.add_argument("--data", metavar="FILE", help="a UTF-8 text file to train on instead of the stdlib sources")
    t.add_argument("--resume", nargs="?", const=True, metavar="DIR",
                   help="continue from the checkpoint in DIR (default: in --out)")
    t.add_argument("--out", default=os.path.join("runs", "charlm"), help="checkpoint and plot directory")
    t.add_argument("--seed", type=int, help="seed for parameters and sampling (default 0)")
    t.add_argument("--backend", default="auto", choices=("auto", "numpy", "numba", "cupy"),
                   help="where to run (default: the fastest present for the data's device)")
    t.add_argument("--checkpoint-every", type=positive(int), default=250, metavar="N",
                   help="save a checkpoint every N steps (default 250)")
    t.add_argument("--samples", type=int, default=2, help="samples printed at the end")
    t.add_argument("--sample-length", type=positive(int), default=400, help="characters per sample (default 400)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("sample", help="generate text from a trained checkpoint")
    s.add_argument("--checkpoint", default=os.path.join("runs", "charlm"), metavar="DIR",
                   help="directory written by gpurnn train (default runs/charlm)")
    s.add_argument("--length", type=positive(int), default=500, help="characters to generate (default 500)")
    s.add_argument("--temperature", type=positive(float), default=0.8,
                   help="softmax temperature: lower is more conservative (default 0.8)")
    s.add_argument("--prime", default="", help="text to feed in before generating")
    s.add_argument("--seed", type=int, help="sampling seed (default: fresh randomness)")

    d = sub.add_parser("diagnose", help="plot ||dL/dh_t|| back through time for Elman vs LSTM")
    d.add_argument("--out", default="gradient_flow.png", metavar="FILE.png", help="where to write the plot")
    d.add_argument("--steps", type=positive(int), default=65, help="steps back through time (default 65)")

    sub.add_parser("info", help="backends, devices and library versions")
    sub.add_parser("bench", help="side-by-side speed table (see gpurnn bench --help)", add_help=False)
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from . import bench
        return bench.main(argv[1:])
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .corpus import CorpusError
    try:
        return {"train": train, "sample": sample, "diagnose": diagnose, "info": info}[args.command](args)
    except (CliError, CorpusError, CheckpointError) as e:
        print(f"gpurnn {args.command}: error: {e}", file=sys.stderr)
        return 2


def device_for(backend):
    from .backend import gpu_available
    if backend == "auto":
        return "cuda" if gpu_available() else "cpu"
    if backend != "numpy" and not gpu_available():
        raise CliError(f"--backend {backend} needs a CUDA GPU with CuPy; none is available here")
    return "cpu" if backend == "numpy" else "cuda"


def train_options(args):
    """The run's options: defaults, then the checkpoint's (on --resume), then the command line's."""
    given = {k: getattr(args, k) for k in TRAIN_DEFAULTS if getattr(args, k) is not None}
    opts = dict(TRAIN_DEFAULTS)
    saved = None
    if args.resume:
        from . import checkpoint
        directory = args.out if args.resume is True else args.resume
        saved = checkpoint.load(directory)
        previous = saved.get("extra", {}).get("options")
        if saved.get("model_config", {}).get("kind") != "CharLM" or previous is None:
            raise CliError(f"the checkpoint in {directory} holds another model "
                           f"({saved.get('model_config', {}).get('kind')}), not a gpurnn train language model")
        clash = [f"--{k} {given[k]} (checkpoint: {previous[k]})" for k in MODEL_OPTIONS
                 if k in given and given[k] != previous[k]]
        if clash:
            raise CliError(f"the checkpoint in {directory} is from another model: {', '.join(clash)}")
        opts.update(previous)
        opts["steps"] = TRAIN_DEFAULTS["steps"]
    opts.update(given)
    if args.data is None and saved is not None:
        args.data = saved["extra"].get("data")
    return opts, saved


def load_corpus(path):
    from .corpus import read_text, stdlib_text
    if path is None:
        return stdlib_text()
    text = read_text(path)
    return text, f"{path} ({len(text):,} characters)"


def train(args):
    from . import optim
    from .corpus import CharBatches, build_vocab
    from .models import CharLM
    from .nn import SoftmaxCrossEntropy
    from .backend import resolve
    from .trainer import Trainer, parse_tbptt

    opts, saved = train_options(args)
    text, description = load_corpus(args.data)
    vocab = saved["model_config"]["vocab"] if saved else build_vocab(text)
    if len(vocab) < 2:
        raise CliError("the text needs at least 2 distinct characters")
    try:
        tbptt = parse_tbptt(opts["tbptt"] or str(opts["seq_len"]))
    except ValueError as e:
        raise CliError(f"--tbptt: {e}") from None
    if tbptt[1] > opts["seq_len"]:
        raise CliError(f"--tbptt K2 ({tbptt[1]}) must not exceed --seq-len ({opts['seq_len']})")
    device = device_for(args.backend)
    model = CharLM(vocab, hidden_size=opts["hidden"], num_layers=opts["layers"], cell=opts["cell"],
                   embedding_dim=opts["embedding"], backend=args.backend, seed=opts["seed"]).to(device)
    try:
        ids = model.encode(text)
    except ValueError as e:
        raise CliError(f"the corpus does not fit the checkpoint's model: {e}") from None
    split = int(len(ids) * 0.95)
    data = CharBatches(ids[:split], opts["batch"], opts["seq_len"])
    xp = model.xp
    trainer = Trainer(model, SoftmaxCrossEntropy(), optim.Adam(model.modules(), lr=opts["lr"]), tbptt=tbptt,
                      stateful=True, clip_norm=opts["clip"], checkpoint_dir=args.out,
                      checkpoint_every=args.checkpoint_every, progress=False if args.no_progress else None,
                      seed=opts["seed"], callbacks=[Reporter(args.out, opts["steps"])])
    trainer.extra = {"options": {k: opts[k] for k in TRAIN_DEFAULTS}, "data": args.data}
    if saved is not None:
        try:
            trainer.load_state_dict(saved)
        except ValueError as e:
            raise CliError(str(e)) from None
    print(f"gpurnn train: {model!r}, {model.num_parameters():,} parameters, vocabulary {len(vocab)}, "
          f"on {device} ({resolve(model.rnn.backend, device)}); corpus: {description}", file=sys.stderr)
    start = time.perf_counter()
    try:
        trainer.fit(lambda step, rng: tuple(xp.asarray(a) for a in data(step)), opts["steps"])
    except KeyboardInterrupt:
        print(f"\ninterrupted at step {trainer.step}; checkpoint saved in {args.out} "
              f"(continue with --resume)", file=sys.stderr)
        return 130
    wall = time.perf_counter() - start
    recent = [s["loss"] for s in trainer.history[-50:]]
    held_out = evaluate(model, CharBatches(ids[split:], 1, min(256, len(ids) - split - 2))
                        if len(ids) - split > 3 else None)
    print(f"trained to step {trainer.step} in {wall:.1f} s: loss {np.mean(recent):.3f} nats/char "
          f"(mean of the last {len(recent)} batches), held-out {held_out:.3f}; skipped {trainer.skipped}; "
          f"checkpoint and loss.png in {args.out}", file=sys.stderr)
    for n in range(args.samples):
        print(f"--- sample {n + 1} (temperature 0.8) ---")
        print(model.sample(args.sample_length, temperature=0.8, prime="\n"))
    return 0


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
    """Writes loss.png at every checkpoint; prints a line every 10% when there is no progress bar."""

    def __init__(self, out, steps):
        self.out, self.every = out, max(1, steps // 10)

    def on_step(self, trainer, stats):
        if trainer.progress is False or not sys.stderr.isatty():
            if stats["step"] % self.every == 0:
                print(f"step {stats['step']}: loss {stats['loss']:.3f}, grad norm {stats['grad_norm']:.2f}, "
                      f"{stats['tokens_per_s']:,.0f} chars/s", file=sys.stderr, flush=True)

    def on_checkpoint(self, trainer, path):
        plot_losses(trainer.history, os.path.join(self.out, "loss.png"))


def plot_losses(history, path):
    from matplotlib.figure import Figure          # no pyplot: renders with Agg, leaves the global backend alone
    steps = [s["step"] for s in history]
    losses = np.array([s["loss"] for s in history])
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(steps, losses, lw=0.6, alpha=0.5, label="batch")
    if len(losses) >= 20:
        k = 20
        ax.plot(steps[k - 1:], np.convolve(losses, np.ones(k) / k, mode="valid"), lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/char)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)


def sample(args):
    from . import checkpoint
    from .models import build_model
    saved = checkpoint.load(args.checkpoint)
    config = saved.get("model_config", {})
    if config.get("kind") != "CharLM":
        raise CliError(f"the checkpoint in {args.checkpoint} holds another model ({config.get('kind')}); "
                       f"sample needs a character language model from gpurnn train")
    model = build_model(config)
    try:
        model.load_state_dict(saved["model"])
        text = model.sample(args.length, temperature=args.temperature, prime=args.prime, seed=args.seed)
    except ValueError as e:
        raise CliError(str(e)) from None
    print(args.prime + text)
    return 0


def diagnose(args):
    from .diagnostics import plot_gradient_flow
    plot_gradient_flow(args.out, steps=args.steps)
    print(f"wrote {args.out}")
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
