"""The command line, in-process with tiny settings: train (checkpoint, plot, samples, exact resume), sample, info,
diagnose, bench delegation, and one-line exit-2 errors."""
import subprocess
import sys
import types

import numpy as np
import pytest

from gpurnn import checkpoint, cli, models, nn, optim
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
    return cli.main(["train", "--data", corpus, "--out", str(tmp_path / out), "--steps", str(steps), *TINY, *extra])


def test_train_writes_checkpoint_plot_and_samples(tmp_path, corpus, capsys):
    assert train(tmp_path, corpus, 12, "run", "--tbptt", "4,8") == 0
    out, err = capsys.readouterr()
    saved = checkpoint.load(tmp_path / "run")
    assert saved["trainer"]["step"] == 12 and saved["model_config"]["kind"] == "CharLM"
    assert saved["trainer"]["tbptt"] == (4, 8)
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sample = out.split("--- sample 1 (temperature 0.8) ---\n")[1].rstrip("\n")
    assert len(sample) == 40 and set(sample) <= set(TEXT)
    assert "trained to step 12" in err


def test_resume_continues_exactly(tmp_path, corpus, capsys):
    assert train(tmp_path, corpus, 10, "whole") == 0
    assert train(tmp_path, corpus, 6, "split") == 0
    assert train(tmp_path, corpus, 10, "split", "--resume") == 0
    whole = checkpoint.load(tmp_path / "whole")["trainer"]["history"]
    split = checkpoint.load(tmp_path / "split")["trainer"]["history"]
    assert [s["loss"] for s in split] == [s["loss"] for s in whole]


def test_sample_prints_the_prime_and_its_continuation(tmp_path, corpus, capsys):
    assert train(tmp_path, corpus, 5) == 0
    capsys.readouterr()
    args = ["sample", "--checkpoint", str(tmp_path / "run"), "--length", "30", "--prime", "def ", "--seed", "3"]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert cli.main(args) == 0
    assert capsys.readouterr().out == first
    assert first.startswith("def ") and len(first.rstrip("\n")) == 34


def test_info_lists_backends_and_versions(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends: " in out and "numpy" in out.split("backends: ")[1]
    assert f"numpy: {np.__version__}" in out


def test_diagnose_writes_a_png(tmp_path, capsys):
    path = tmp_path / "flow.png"
    assert cli.main(["diagnose", "--out", str(path), "--steps", "8"]) == 0
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_bench_delegates_to_the_bench_module(monkeypatch):
    seen = []
    fake = types.ModuleType("gpurnn.bench")
    fake.main = lambda argv=None: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "gpurnn.bench", fake)
    monkeypatch.setattr("gpurnn.bench", fake, raising=False)
    assert cli.main(["bench", "--quick"]) == 7
    assert seen == [["--quick"]]


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
    assert not (tmp_path / "run").exists()


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
    assert train(tmp_path, corpus, 6, "run", "--resume", "--hidden", "9") == 2
    err = capsys.readouterr().err
    assert "another model" in err and "--hidden 9" in err and err.count("\n") == 1
    assert checkpoint.load(tmp_path / "run")["trainer"]["step"] == 3


def test_missing_checkpoint_is_exit_2(tmp_path, capsys):
    assert cli.main(["sample", "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "gpurnn", "info"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "backends:" in done.stdout
