"""The command line, in-process with tiny settings: train (checkpoint, plot with held-out curve, samples, exact
resume, --steps and --lr on resume, signals), the folder rules (no overwrite without --overwrite, --out checked
first, one run per folder, stray temp files), sample, info, diagnose, bench, and the error contract: every bad
invocation is one line on stderr and exit 2."""
import os
import signal
import subprocess
import sys
import types

import numpy as np
import pytest

import gpurnn
from gpurnn import checkpoint, cli, models, nn, optim
from gpurnn.files import RunLock
from gpurnn.trainer import Trainer

TEXT = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x = 0\n    y = 1\n" * 20
TINY = ["--hidden", "8", "--embedding", "4", "--seq-len", "12", "--batch", "4", "--no-progress",
        "--samples", "1", "--sample-length", "40", "--checkpoint-every", "5"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "code.py"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


def train(tmp_path, corpus, steps, out="run", *extra):
    steps = [] if steps is None else ["--steps", str(steps)]
    return cli.main(["train", "--data", corpus, "--out", str(tmp_path / out), *steps, *TINY, *extra])


def saved(tmp_path, out="run"):
    return checkpoint.load(tmp_path / out)


def losses(tmp_path, out):
    return [s["loss"] for s in saved(tmp_path, out)["trainer"]["history"]]


def test_train_writes_checkpoint_plot_and_samples(tmp_path, corpus, capsys):
    assert train(tmp_path, corpus, 12, "run", "--tbptt", "4,8") == 0
    out, err = capsys.readouterr()
    payload = saved(tmp_path)
    assert payload["trainer"]["step"] == 12 and payload["model_config"]["kind"] == "CharLM"
    assert payload["trainer"]["tbptt"] == (4, 8)
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path / "run")) == [".gpurnn.lock", "checkpoint.npz", "checkpoint.prev.npz",
                                                   "loss.png"]
    sample = out.split("--- sample 1 (temperature 0.8) ---\n")[1].rstrip("\n")
    assert len(sample) == 40 and set(sample) <= set(TEXT)
    assert "trained to step 12" in err


def test_held_out_loss_is_evaluated_at_each_checkpoint_and_plotted_with_a_title(tmp_path, corpus, capsys):
    assert train(tmp_path, corpus, 12) == 0
    held_out = saved(tmp_path)["extra"]["held_out"]
    assert [step for step, _ in held_out] == [5, 10, 12]
    model = gpurnn.load(tmp_path / "run")                 # the last point is the final model's held-out loss
    ids = model.encode(TEXT)
    assert held_out[-1][1] == pytest.approx(cli.evaluate(model, cli.held_out_batches(ids[int(len(ids) * 0.95):])))
    history = saved(tmp_path)["trainer"]["history"]
    fig = cli.plot_losses(history, held_out, str(tmp_path / "p.png"), "the title")
    ax = fig.axes[0]
    assert ax.get_title() == "the title"
    assert [line.get_label() for line in ax.get_lines()] == ["training batch", "held-out text"]
    np.testing.assert_array_equal(ax.get_lines()[1].get_xdata(), [5, 10, 12])


def test_resume_with_steps_trains_that_many_more_exactly(tmp_path, corpus, capsys):
    assert train(tmp_path, corpus, 10, "whole") == 0
    assert train(tmp_path, corpus, 6, "split") == 0
    assert train(tmp_path, corpus, 4, "split", "--resume") == 0
    assert saved(tmp_path, "split")["trainer"]["step"] == 10
    assert losses(tmp_path, "split") == losses(tmp_path, "whole")
    for k, v in saved(tmp_path, "whole")["model"].items():
        np.testing.assert_array_equal(saved(tmp_path, "split")["model"][k], v)


def test_a_bare_resume_of_a_complete_run_is_an_error_not_a_silent_success(tmp_path, corpus, capsys):
    assert train(tmp_path, corpus, 6) == 0
    capsys.readouterr()
    assert train(tmp_path, corpus, None, "run", "--resume") == 2
    err = capsys.readouterr().err
    assert err == f"gpurnn train: error: the run in {tmp_path / 'run'} is complete (step 6 of 6); pass --steps N " \
                  f"to train N more\n"


class SignalAtStep:
    """Patches the CLI's Reporter so the run sends itself `signum` right after batch `step` (deterministic)."""

    def __init__(self, monkeypatch, step, signum):
        real = cli.Reporter.on_step

        def on_step(reporter, trainer, stats):
            real(reporter, trainer, stats)
            if stats["step"] == step:
                signal.raise_signal(signum)

        monkeypatch.setattr(cli.Reporter, "on_step", on_step)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_saves_and_a_bare_resume_finishes_the_planned_run(tmp_path, corpus, capsys, monkeypatch, signum):
    assert train(tmp_path, corpus, 9, "whole") == 0
    SignalAtStep(monkeypatch, 3, signum)
    assert train(tmp_path, corpus, 9, "cut") == 128 + signum
    err = capsys.readouterr().err
    assert f"{signal.Signals(signum).name} at step 3: checkpoint saved in {tmp_path / 'cut'}" in err
    assert saved(tmp_path, "cut")["trainer"]["step"] == 3
    monkeypatch.undo()
    assert train(tmp_path, corpus, None, "cut", "--resume") == 0
    assert losses(tmp_path, "cut") == losses(tmp_path, "whole")


def test_resume_with_lr_applies_and_records_it(tmp_path, corpus, capsys):
    assert train(tmp_path, corpus, 4, "a") == 0
    assert train(tmp_path, corpus, 4, "b") == 0
    capsys.readouterr()
    assert train(tmp_path, corpus, 3, "a", "--resume", "--lr", "0.02") == 0
    assert "learning rate 0.02 from now on (the checkpoint's: 0.003)" in capsys.readouterr().err
    assert train(tmp_path, corpus, 3, "b", "--resume") == 0
    a, b = saved(tmp_path, "a"), saved(tmp_path, "b")
    assert a["optimizer"]["hyper"]["lr"] == 0.02 and a["extra"]["options"]["lr"] == 0.02
    assert b["optimizer"]["hyper"]["lr"] == 0.003
    assert losses(tmp_path, "a")[:5] == losses(tmp_path, "b")[:5]          # the same until the new lr acts
    assert losses(tmp_path, "a")[5:] != losses(tmp_path, "b")[5:]
    assert train(tmp_path, corpus, 1, "a", "--resume") == 0                # kept on the next resume
    assert saved(tmp_path, "a")["optimizer"]["hyper"]["lr"] == 0.02


def test_a_folder_holding_a_checkpoint_is_refused_without_resume_or_overwrite(tmp_path, corpus, capsys):
    assert train(tmp_path, corpus, 6) == 0
    before = (tmp_path / "run" / "checkpoint.npz").read_bytes()
    capsys.readouterr()
    assert train(tmp_path, corpus, 3) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a checkpoint (checkpoint.npz); pass --resume" in err
    assert (tmp_path / "run" / "checkpoint.npz").read_bytes() == before
    assert train(tmp_path, corpus, 3, "run", "--overwrite") == 0
    assert saved(tmp_path)["trainer"]["step"] == 3
    assert not (tmp_path / "run" / "checkpoint.prev.npz").exists()      # the old run is gone, not a backup
    assert train(tmp_path, corpus, 3, "run", "--overwrite", "--resume") == 2


@pytest.fixture
def no_training(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("training started")
    monkeypatch.setattr(Trainer, "fit", fail)


@pytest.mark.parametrize("out, message", [("file", "is a file, not a folder"),
                                          ("file/sub", "is not a writable folder"),
                                          ("", "--out must name a folder, got ''")])
def test_an_unusable_out_is_refused_before_training(tmp_path, corpus, capsys, no_training, out, message):
    (tmp_path / "file").write_text("x")
    args = ["train", "--data", corpus, "--out", str(tmp_path / out) if out else "", "--steps", "3", *TINY]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_is_refused_before_training(tmp_path, corpus, capsys, no_training):
    (tmp_path / "ro").mkdir(mode=0o500)
    assert train(tmp_path, corpus, 3, "ro") == 2
    assert "is not a writable folder (Permission denied)" in capsys.readouterr().err


def test_a_second_run_on_one_folder_is_refused_naming_the_first(tmp_path, corpus, capsys, no_training):
    (tmp_path / "run").mkdir()
    with RunLock(str(tmp_path / "run")):
        assert train(tmp_path, corpus, 3) == 2
    assert capsys.readouterr().err == \
        f"gpurnn train: error: another run (PID {os.getpid()}) is using {tmp_path / 'run'}\n"


def test_stray_temp_files_of_killed_runs_are_removed_at_start(tmp_path, corpus, capsys):
    (tmp_path / "run").mkdir()
    stray = ["run/.checkpoint.npz.abc.gpurnn-tmp", "run/.loss.png.x.gpurnn-tmp", "run/.checkpoint-old.tmp"]
    for name in stray:
        (tmp_path / name).write_bytes(b"half")
    assert train(tmp_path, corpus, 2) == 0
    assert not any((tmp_path / name).exists() for name in stray)


def test_a_plot_that_cannot_be_written_is_a_warning(tmp_path, corpus, capsys, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "plot_losses", no_space)
    assert train(tmp_path, corpus, 6) == 0
    err = capsys.readouterr().err
    assert f"gpurnn train: warning: could not write {tmp_path / 'run' / 'loss.png'} (No space left on device); " \
           f"training goes on\n" in err
    assert saved(tmp_path)["trainer"]["step"] == 6


def test_sample_prints_the_prime_and_its_continuation(tmp_path, corpus, capsys):
    assert train(tmp_path, corpus, 5) == 0
    capsys.readouterr()
    for where in ("run", "run/checkpoint.npz"):
        args = ["sample", "--checkpoint", str(tmp_path / where), "--length", "30", "--prime", "def ", "--seed", "3"]
        assert cli.main(args) == 0
        first = capsys.readouterr().out
        assert cli.main(args) == 0
        assert capsys.readouterr().out == first
        assert first.startswith("def ") and len(first.rstrip("\n")) == 34


def test_sample_falls_back_to_the_previous_checkpoint_with_a_one_line_warning(tmp_path, corpus, capsys):
    assert train(tmp_path, corpus, 6) == 0
    latest = tmp_path / "run" / "checkpoint.npz"
    os.truncate(latest, 100)
    capsys.readouterr()
    assert cli.main(["sample", "--checkpoint", str(tmp_path / "run"), "--length", "5", "--seed", "1"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"gpurnn sample: warning: {latest} is corrupt or truncated")
    assert "loaded the previous checkpoint" in err


def test_sample_on_nonfinite_weights_says_so(tmp_path, corpus, capsys):
    assert train(tmp_path, corpus, 5) == 0
    payload = saved(tmp_path)
    payload["model"]["head.weight"][0, 0] = np.nan
    checkpoint.save(tmp_path / "nan", payload)                # a valid checksum over NaN weights
    capsys.readouterr()
    assert cli.main(["sample", "--checkpoint", str(tmp_path / "nan")]) == 2
    err = capsys.readouterr().err
    assert "the checkpoint's weights are not finite" in err and err.count("\n") == 1


def test_info_lists_backends_and_versions(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends: " in out and "numpy" in out.split("backends: ")[1]
    assert f"numpy: {np.__version__}" in out


def test_diagnose_writes_a_png_and_nothing_else(tmp_path, capsys):
    path = tmp_path / "flow.png"
    assert cli.main(["diagnose", "--out", str(path), "--steps", "8"]) == 0
    assert path.read_bytes()[:4] == b"\x89PNG" and os.listdir(tmp_path) == ["flow.png"]


def test_bench_delegates_to_the_bench_module(monkeypatch):
    seen = []
    fake = types.ModuleType("gpurnn.bench")
    fake.main = lambda argv=None: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "gpurnn.bench", fake)
    monkeypatch.setattr("gpurnn.bench", fake, raising=False)
    assert cli.main(["bench", "--quick"]) == 7
    assert seen == [["--quick"]]


def test_bench_prints_progress_before_each_measurement(capsys):
    from gpurnn import bench
    assert bench.main(["--cells", "rnn_tanh", "gru", "--sizes", "3,2,4", "--repeats", "1", "--mode", "train",
                       "--json"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[:2] == ["gpurnn bench: rnn_tanh T,B,H=3,2,4 train (1/2)", "gpurnn bench: gru T,B,H=3,2,4 train (2/2)"]
    assert err[2] == "gpurnn bench: measuring this machine's SGEMM rate"


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize("content, message", [(None, "no such file"), (b"", "is empty"),
                                              (b"ok \xff\xfe bad", "not UTF-8")])
def test_bad_corpus_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    path = str(tmp_path / "missing.txt") if content is None else write(tmp_path, "data.txt", content)
    assert train(tmp_path, path, 3) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


def test_checkpoint_of_another_model_is_exit_2(tmp_path, corpus, capsys):
    model = models.Tagger(2, 3, 2, seed=0)
    trainer = Trainer(model, nn.MSELoss(), optim.SGD(model.modules(), lr=0.1), checkpoint_dir=tmp_path / "tagger")
    trainer.save()
    assert cli.main(["sample", "--checkpoint", str(tmp_path / "tagger")]) == 2
    assert "another model" in capsys.readouterr().err
    assert train(tmp_path, corpus, 3, "tagger", "--resume") == 2
    assert "another model" in capsys.readouterr().err
    assert train(tmp_path, corpus, 3) == 0
    capsys.readouterr()
    for option in (["--hidden", "9"], ["--batch", "3"], ["--seed", "5"]):
        assert train(tmp_path, corpus, 6, "run", "--resume", *option) == 2
        err = capsys.readouterr().err
        assert "another model or data layout" in err and " ".join(option) in err and err.count("\n") == 1
    assert saved(tmp_path)["trainer"]["step"] == 3


def run_cli(argv, capsys):
    """(exit code, stderr) of cli.main, argparse's SystemExit included."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


BAD_TRAIN = [["--clip", "inf"], ["--clip", "0"], ["--seed", "-1"], ["--seed", "1.5"], ["--hidden", "1000000000"],
             ["--embedding", "1000000000"], ["--hidden", "abc"], ["--samples", "-1"], ["--samples", "-3"],
             ["--lr", "inf"], ["--lr", "nan"], ["--lr", "1e30"], ["--lr", "0"], ["--steps", "0"],
             ["--steps", "2.5"], ["--tbptt", "9,3"], ["--tbptt", "4,20"], ["--cell", "lstmx"], ["--bogus"],
             ["--checkpoint-every", "-5"], ["--resume"], ["--data", "{tmp}/missing.txt"], ["--out", ""],
             ["--out", "{tmp}/code.py"], ["--out", "{tmp}/code.py/sub"], ["--sample-length", "0"]]
BAD_OTHER = [[], ["nonsense"], ["sample", "--checkpoint", "{tmp}/ckpt.bin"], ["sample", "--checkpoint", "{tmp}/nope"],
             ["sample", "--checkpoint", "{tmp}"], ["sample", "--temperature", "0"], ["sample", "--temperature", "inf"],
             ["sample", "--length", "-1"], ["sample", "--seed", "-2", "--checkpoint", "{tmp}"],
             ["diagnose", "--out", "{tmp}/missing/dir/x.png"], ["diagnose", "--out", "{tmp}/flow.txt"],
             ["diagnose", "--out", "{tmp}"], ["diagnose", "--out", "{tmp}/code.py/x.png"],
             ["diagnose", "--steps", "0"], ["diagnose", "--steps", "1000000000"],
             ["bench", "--sizes", "2,1"], ["bench", "--repeats", "0", "--sizes", "2,1,2"], ["bench", "--cells", "x"]]


@pytest.mark.parametrize("argv", [["train", "--data", "{corpus}", "--out", "{tmp}/run", *TINY[:8], *bad]
                                  for bad in BAD_TRAIN] + BAD_OTHER, ids=lambda a: " ".join(a[8:] or a))
def test_every_bad_invocation_is_one_line_on_stderr_and_exit_2(tmp_path, corpus, capsys, no_training, argv):
    (tmp_path / "ckpt.bin").write_bytes(b"\x00" * 64)
    argv = [a.format(tmp=tmp_path, corpus=corpus) for a in argv]
    code, err = run_cli(argv, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("gpurnn") and ": error: " in err, err
    assert not (tmp_path / "run" / "checkpoint.npz").exists() and not (tmp_path / "flow.txt").exists()


def test_error_messages_speak_english(capsys):
    code, err = run_cli(["train", "--hidden", "x"], capsys)
    assert "argument --hidden: expected an integer >= 1, got 'x'" in err and "a int" not in err


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "gpurnn", "info"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "backends:" in done.stdout


def test_a_bad_invocation_of_the_real_command_has_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "gpurnn", "train", "--clip", "inf", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_train_takes_the_variants_and_resumes_exactly_under_the_other_memory_mode(tmp_path, corpus, capsys):
    """lnlstm with zoneout, DropConnect and a projection; a checkpointed run resumed in full memory mode trains
    exactly as one uninterrupted run (the modes' gradients are the same bit for bit)."""
    variant = ["--cell", "lnlstm", "--zoneout", "0.1", "--weight-drop", "0.2", "--proj-size", "5"]
    assert train(tmp_path, corpus, 8, "whole", *variant) == 0
    assert train(tmp_path, corpus, 5, "split", *variant, "--memory", "checkpoint") == 0
    config = saved(tmp_path, "split")["model_config"]
    assert (config["cell"], config["zoneout"], config["weight_drop"], config["proj_size"], config["memory"]) == \
        ("lnlstm", 0.1, 0.2, 5, "checkpoint")
    assert train(tmp_path, corpus, 3, "split", "--resume", "--memory", "full") == 0
    assert losses(tmp_path, "split") == losses(tmp_path, "whole")
    for k, v in saved(tmp_path, "whole")["model"].items():
        np.testing.assert_array_equal(saved(tmp_path, "split")["model"][k], v)


@pytest.mark.parametrize("extra,words", [
    (["--cell", "gru", "--proj-size", "4"], "--proj-size 4 needs --cell lstm or lnlstm"),
    (["--proj-size", "8"], "must be smaller than --hidden (8)"),
    (["--zoneout", "1"], "expected a number in [0, 1)"),
    (["--weight-drop", "-0.1"], "expected a number in [0, 1)"),
    (["--memory", "disk"], "invalid choice")])
def test_bad_variant_options_exit_2(tmp_path, corpus, capsys, extra, words):
    code, err = run_cli(["train", "--data", corpus, "--out", str(tmp_path / "run"), "--steps", "2", *TINY, *extra],
                        capsys)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


def test_resume_refuses_another_zoneout(tmp_path, corpus, capsys):
    assert train(tmp_path, corpus, 3, "run", "--zoneout", "0.1") == 0
    assert train(tmp_path, corpus, 2, "run", "--resume", "--zoneout", "0.2") == 2
    assert "--zoneout 0.2 (checkpoint: 0.1)" in capsys.readouterr().err
