"""The README's Python examples run as written (and the classifier example learns its task)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"(?:<!-- readme-example: (\w+) -->\n)?```python\n(.*?)```", README.read_text(), re.S)


def test_the_examples_are_found():
    assert {name for name, _ in BLOCKS} >= {"classifier", "modules", "torch"}


@pytest.mark.parametrize("name, code", BLOCKS, ids=[name or f"block{i}" for i, (name, _) in enumerate(BLOCKS)])
def test_readme_example_runs(name, code, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)             # examples that write files write them here
    if "import torch" in code:
        pytest.importorskip("torch")
    if "gpurnn.distributed" in code:
        pytest.importorskip("mpi4py")
    namespace = {"__name__": "readme"}
    exec(compile(code, f"README.md:{name}", "exec"), namespace)
    if name == "classifier":
        assert namespace["accuracy"] > 0.9 and namespace["loss"] < 0.5
        assert "held-out accuracy" in capsys.readouterr().out
