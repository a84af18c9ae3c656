"""Fault injection on a tiny `gpurnn train` run in a child process: SIGKILL at seeded points (between batches and
inside every phase of a save), single-bit flips of a checkpoint, a file-size limit standing in for a full disk,
two runs on one folder, SIGTERM and SIGHUP. After each fault the checkpoint loads, and a resumed run ends
bit-identical to an uninterrupted one.

The child stops at a chosen point deterministically: a hook (in the harness below, not in gpurnn) prints READY
there and waits, so the test acts at a known moment and no outcome depends on how fast the machine is."""
import json
import os
import select
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest

from gpurnn import checkpoint, cli
from gpurnn.checkpoint import CheckpointError, CheckpointWarning
from util import assert_same

pytestmark = pytest.mark.skipif(os.name != "posix", reason="signals, flock and rlimits are POSIX")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x = 0\n    y = 1\n" * 20
STEPS = 8
OPTIONS = ["--hidden", "6", "--embedding", "3", "--seq-len", "10", "--batch", "3", "--no-progress", "--samples", "0",
           "--checkpoint-every", "2"]
KEEP = {"checkpoint.npz", "checkpoint.prev.npz", "loss.png", ".gpurnn.lock"}

# The child: gpurnn's CLI with hooks that stop it at a chosen point. plan["at"]: "step" (after batch n), or
# "<call>:before" / "<call>:after" around the n-th call of os.replace, os.link, os.fsync or np.savez (the phases
# of an atomic save); "wait": after batch n, wait until a signal has reached the trainer. plan["fsize"]: a file
# size limit set after batch plan["fsize_after"] (0: before anything).
HARNESS = r"""
import json, os, resource, sys, time
import numpy as np
from gpurnn import cli

plan = json.loads(sys.argv[1])
calls = {}

def ready():
    sys.stdout.write("READY\n")
    sys.stdout.flush()

def hang():
    ready()
    while True:
        time.sleep(60)

def limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (plan["fsize"], resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

def wrap(owner, name):
    real = getattr(owner, name)
    def hooked(*args, **kwargs):
        mine = plan["at"].split(":")[0] == name
        if mine:
            calls[name] = calls.get(name, 0) + 1
        if mine and plan["at"].endswith(":before") and calls[name] == plan["n"]:
            hang()
        out = real(*args, **kwargs)
        if mine and plan["at"].endswith(":after") and calls[name] == plan["n"]:
            hang()
        return out
    setattr(owner, name, hooked)

for owner, name in ((os, "replace"), (os, "link"), (os, "fsync"), (np, "savez")):
    wrap(owner, name)
real_on_step = cli.Reporter.on_step

def on_step(self, trainer, stats):
    real_on_step(self, trainer, stats)
    if stats["step"] == plan.get("n") and plan["at"] == "step":
        hang()
    if stats["step"] == plan.get("n") and plan["at"] == "wait":
        ready()
        while trainer._interrupted is None:
            time.sleep(0.01)
    if stats["step"] == plan.get("fsize_after"):
        limit_file_size()

cli.Reporter.on_step = on_step
if plan.get("fsize_after") == 0:
    limit_file_size()
sys.exit(cli.main(plan["argv"]))
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "code.py"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


def argv(corpus, out, *extra):
    """A new run of STEPS batches; with --resume, a bare resume (to the planned total)."""
    steps = [] if "--resume" in extra else ["--steps", str(STEPS)]
    return ["train", "--data", corpus, "--out", str(out), *OPTIONS, *steps, *extra]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The payload of the uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert cli.main(argv(corpus, out)) == 0
    return checkpoint.load(out)


class Child:
    """The harness running `gpurnn train` under a plan. Its stderr is a pipe (a file would fall under the file
    size limit too); a tiny run writes far less than a pipe holds."""

    def __init__(self, plan, tmp_path):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen([sys.executable, "-c", HARNESS, json.dumps(plan)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
        self.stderr = None

    def ready(self):
        """True once the child stopped at its point (False when it exited first)."""
        if not select.select([self.proc.stdout], [], [], 600)[0]:      # a safety net, not a timing assertion
            self.proc.kill()
            raise AssertionError("the child neither stopped nor exited in 10 minutes")
        return self.proc.stdout.readline() == "READY\n"

    def stop(self, signum):
        self.proc.send_signal(signum)
        return self.finish()

    def finish(self):
        _, self.stderr = self.proc.communicate(timeout=600)
        return self.proc.returncode


def load_without_fallback(out):
    """The latest checkpoint in out (None when there is none), failing if it needed the previous one."""
    if not (out / "checkpoint.npz").exists():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        return checkpoint.load(out)


def assert_equals_reference(out, reference, where=None):
    final = checkpoint.load(out)
    assert final["trainer"]["step"] == STEPS
    assert [s["loss"] for s in final["trainer"]["history"]] == [s["loss"] for s in reference["trainer"]["history"]]
    assert_same(reference["model"], final["model"])
    assert_same(reference["optimizer"], final["optimizer"])
    assert_same(reference["trainer"]["rng"], final["trainer"]["rng"])
    assert set(os.listdir(out)) <= KEEP, (where, os.listdir(out))   # no temp file left behind


def finish_run(corpus, out, payload):
    """Run the interrupted training to its end in this process: --resume when a checkpoint exists."""
    if payload is None:
        assert cli.main(argv(corpus, out)) == 0
    elif payload["trainer"]["step"] < STEPS:
        assert cli.main(argv(corpus, out, "--resume")) == 0


def kill_points(seed=20240601, count=20):
    """Seeded kill points: a few between batches, the rest inside each phase of a save (checkpoint or plot)."""
    rng = np.random.default_rng(seed)
    phases = [f"{call}:{when}" for call in ("savez", "fsync", "link", "replace") for when in ("before", "after")]
    points = [("step", int(n)) for n in rng.integers(1, STEPS, 4)]
    points += [(phases[i % len(phases)], int(rng.integers(1, 7))) for i in range(count - len(points))]
    return points


def test_sigkill_at_seeded_points_never_loses_the_run(corpus, reference, tmp_path, capsys):
    stopped = 0
    for k, (at, n) in enumerate(kill_points()):
        out = tmp_path / f"run{k}"
        child = Child({"at": at, "n": n, "argv": argv(corpus, out)}, tmp_path)
        if child.ready():
            stopped += 1
            assert child.stop(signal.SIGKILL) == -signal.SIGKILL
        else:
            assert child.finish() == 0, child.stderr
        payload = load_without_fallback(out)
        if (out / "loss.png").exists():                                # complete, never truncated
            assert (out / "loss.png").read_bytes().endswith(b"IEND\xaeB`\x82"), (at, n)
        finish_run(corpus, out, payload)
        assert_equals_reference(out, reference, (at, n))
    assert stopped >= 15                                               # most points lie inside the run


def flipped(data, bit):
    data = bytearray(data)
    data[bit // 8] ^= 1 << (bit % 8)
    return bytes(data)


def test_single_bit_flips_are_refused_or_harmless(reference, tmp_path):
    path = tmp_path / "x.npz"
    checkpoint.save(path, reference)
    data = path.read_bytes()
    original = checkpoint.read(str(path))
    rng = np.random.default_rng(7)
    bits = set(rng.choice(8 * len(data), 600, replace=False).tolist()) | set(range(8 * 64)) | \
        set(range(8 * (len(data) - 64), 8 * len(data)))               # the zip headers and directory in full
    refused = harmless = 0
    for bit in sorted(bits):
        path.write_bytes(flipped(data, bit))
        try:
            payload = checkpoint.read(str(path))
        except CheckpointError as e:
            assert "\n" not in str(e) and str(path) in str(e)
            refused += 1
            continue
        assert_same(original, payload)                                 # loaded: then exactly the same
        harmless += 1
    assert refused + harmless == len(bits) and refused > len(bits) // 2


def test_a_flipped_latest_checkpoint_resumes_from_the_previous_one(corpus, reference, tmp_path, capsys):
    out = tmp_path / "run"
    child = Child({"at": "step", "n": 5, "argv": argv(corpus, out)}, tmp_path)
    assert child.ready()
    child.stop(signal.SIGKILL)
    latest = out / "checkpoint.npz"
    latest.write_bytes(flipped(latest.read_bytes(), 8 * (latest.stat().st_size // 2)))
    capsys.readouterr()
    finish_run(corpus, out, {"trainer": {"step": 2}})
    err = capsys.readouterr().err
    assert f"gpurnn train: warning: {latest} is corrupt" in err and "loaded the previous checkpoint" in err
    assert_equals_reference(out, reference)


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    child = Child({"at": "none", "fsize_after": 3, "fsize": 2000, "argv": argv(corpus, out)}, tmp_path)
    assert child.finish() == 2
    errors = [line for line in child.stderr.splitlines() if "error" in line or "Traceback" in line]
    assert errors == [f"gpurnn train: error: could not write a checkpoint at step 4 in {out} (File too large); "
                      f"the previous checkpoint {out / 'checkpoint.npz'} (step 2) is intact"]
    assert load_without_fallback(out)["trainer"]["step"] == 2
    assert set(os.listdir(out)) <= KEEP


def test_a_folder_that_cannot_take_a_byte_is_refused_before_training(corpus, tmp_path):
    child = Child({"at": "none", "fsize_after": 0, "fsize": 0, "argv": argv(corpus, tmp_path / "run")}, tmp_path)
    assert child.finish() == 2, child.stderr
    assert child.stderr == f"gpurnn train: error: --out {tmp_path / 'run'} is not a writable folder (File too large)\n"


def test_a_second_run_on_a_folder_is_refused_and_a_killed_first_run_does_not_block(corpus, reference, tmp_path,
                                                                                  capsys):
    out = tmp_path / "run"
    first = Child({"at": "step", "n": 3, "argv": argv(corpus, out)}, tmp_path)
    assert first.ready()
    before = (out / "checkpoint.npz").read_bytes()
    capsys.readouterr()
    assert cli.main(argv(corpus, out, "--resume")) == 2
    assert capsys.readouterr().err == f"gpurnn train: error: another run (PID {first.proc.pid}) is using {out}\n"
    assert (out / "checkpoint.npz").read_bytes() == before
    first.stop(signal.SIGKILL)
    finish_run(corpus, out, load_without_fallback(out))
    assert_equals_reference(out, reference)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_save_after_the_batch(corpus, reference, tmp_path, signum):
    out = tmp_path / "run"
    child = Child({"at": "wait", "n": 3, "argv": argv(corpus, out)}, tmp_path)
    assert child.ready()
    assert child.stop(signum) == 128 + signum
    assert f"{signal.Signals(signum).name} at step 3: checkpoint saved in {out}" in child.stderr
    payload = load_without_fallback(out)
    assert payload["trainer"]["step"] == 3
    finish_run(corpus, out, payload)
    assert_equals_reference(out, reference)
