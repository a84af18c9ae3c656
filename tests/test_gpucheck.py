"""`gpurnn check-gpu`: its CPU side. Without a GPU it says so and exits 0 (also as a plain-checkout command); the
report is built right from fake phase results (test summaries, sanitizer output, timing rows, budgets, exit
status); the timing loop alternates and takes medians; and the sanitizer's workload launches every kernel of both
GPU backends (run here on the simulator and the CPU harness)."""
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpurnn import backend, cli, gpucheck
from gpurnn.kernels import cuda_host, cupy_raw, graphs

ROOT = Path(__file__).resolve().parent.parent


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gpucheck, "no_gpu_reason", lambda: "CUDA reports 0 devices")
    assert cli.main(["check-gpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# gpurnn check-gpu: no GPU") and "CUDA reports 0 devices" in out
    assert (tmp_path / "report.md").read_text() == out


@pytest.mark.skipif(backend.gpu_available(), reason="a GPU is here")
def test_the_plain_checkout_command_runs_without_a_gpu(tmp_path):
    done = subprocess.run([sys.executable, "-m", "gpurnn.gpucheck", "--out", str(tmp_path)], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH="."), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "No GPU here" in done.stdout and (tmp_path / "report.md").exists()


PYTEST_OUTPUT = """..F.s
FAILED tests/test_gemm.py::test_matmul_of_every_layout[bf16-shape0-c] - AssertionError: x
ERROR tests/test_graphs.py::test_x - RuntimeError
=========== 1 failed, 3 passed, 1 skipped, 1 error in 12.34s ===========
"""


def test_pytest_summary():
    summary, failed = gpucheck.pytest_summary(PYTEST_OUTPUT)
    assert summary == "1 failed, 3 passed, 1 skipped, 1 error in 12.34s"
    assert failed == ["tests/test_gemm.py::test_matmul_of_every_layout[bf16-shape0-c]", "tests/test_graphs.py::test_x"]
    assert gpucheck.pytest_summary("Killed\n") == ("", [])
    text = gpucheck.tests_section(1, 12.0, PYTEST_OUTPUT, 100)
    assert "FAILED (exit 1)" in text and "- failed: `tests/test_graphs.py::test_x`" in text
    assert "stopped after 100 s" in gpucheck.tests_section(None, 100.0, "", 100)


def test_pytest_summary_of_a_stopped_run():
    output = ("tests/test_gemm.py::test_a PASSED [ 1%]\ntests/test_gemm.py::test_b FAILED [ 2%]\n"
              "tests/test_graphs.py::test_c PASSED [ 3%]\n")
    assert gpucheck.pytest_summary(output) == ("2 passed, 1 failed so far", ["tests/test_gemm.py::test_b"])


def test_a_child_out_of_time_is_stopped_with_its_children(tmp_path):
    marker = tmp_path / "late"
    rc, seconds, _ = gpucheck.run_child(["sh", "-c", f"(sleep 3; touch {marker}) & sleep 30"], 1, tmp_path / "log")
    assert rc is None and seconds < 10
    rc, _, output = gpucheck.run_child([sys.executable, "-c", "print('hi')"], 30, tmp_path / "log")
    assert rc == 0 and output == "hi\n"
    time.sleep(3)
    assert not marker.exists()                                   # the grandchild was killed too


SANITIZER = """========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 4 bytes
=========     at step_forward+0x1a0
========= Error: process didn't terminate successfully
========= ERROR SUMMARY: 2 errors
"""


def test_sanitizer_summary_and_section():
    errors, first = gpucheck.sanitizer_summary(SANITIZER)
    assert errors == 2 and first[0] == "========= Invalid __global__ read of size 4 bytes"
    assert gpucheck.sanitizer_summary("========= ERROR SUMMARY: 0 errors\n") == (0, [])
    text = gpucheck.sanitizer_section({"memcheck": (99, 3.0, SANITIZER, 60), "racecheck": (None, 60.0, "", 60)})
    assert "- memcheck: 2 errors (exit 99), 3 s" in text and "- racecheck: stopped after 60 s" in text
    assert "not found" in gpucheck.sanitizer_section("compute-sanitizer was not found")


ROW = dict(cell="lstm", T=100, B=64, H=512, I=512, math="tf32", mode="train", sweep="step", ours_ms=2.5,
           cudnn_ms=2.0, ratio=1.25, rel_diff=3e-4, graphs={"captured": 2})


def test_timing_section_and_rows_file(tmp_path):
    rows = tmp_path / "timings.jsonl"
    rows.write_text(json.dumps(ROW) + "\n" + json.dumps({**ROW, "B": 256}) + "\n")
    read = gpucheck.read_rows(rows)
    text = gpucheck.timing_section(read, None, 150.0, 150, 60)
    assert "2 of 60 rows in 150 s; stopped after 150 s" in text
    assert "| lstm | 64 | tf32 | train | step | 2.500 | 2.000 | 1.25 | 3.0e-04 |" in text
    assert gpucheck.read_rows(tmp_path / "absent.jsonl") == []


def test_alternate_warms_up_alternates_and_takes_medians():
    calls = []

    def timer(name, ms):
        return lambda k: calls.append((name, k)) or ms[len([c for c in calls if c[0] == name]) - 1]
    a = timer("a", [100, 100, 1, 2, 3, 4, 50])      # two warm-up calls, then five rounds
    b = timer("b", [100, 100, 5, 5, 6, 7, 8])
    assert gpucheck.alternate([a, b], 2, 5, 3) == [3.0, 6.0]
    timed = calls[4:]
    assert [n for n, _ in timed] == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]
    assert [k for _, k in timed][::2] == [0, 1, 2, 0, 1]


def test_budget_shares():
    assert gpucheck.share("tests", [], 100) == pytest.approx(40)
    assert gpucheck.share("timing", [], 60) == pytest.approx(60 * 0.4 / 0.6)
    assert gpucheck.share("sanitizer", [], 20) == pytest.approx(20)
    assert gpucheck.share("tests", ["timing", "sanitizer"], 100) == pytest.approx(100)
    assert sum(gpucheck.SHARES.values()) == pytest.approx(1)


def test_with_a_gpu_the_phases_fill_the_report(tmp_path, capsys, monkeypatch):
    """The orchestration with every phase faked: budgets passed down, sections in order, the exit status."""
    monkeypatch.setattr(gpucheck, "no_gpu_reason", lambda: None)
    monkeypatch.setattr(gpucheck, "versions", lambda: {"device": "Fake GPU", "commit": "abc123"})
    monkeypatch.setattr(gpucheck, "sanitizer_path", lambda: "/opt/cuda/bin/compute-sanitizer")
    seen, now = [], [0.0]
    monkeypatch.setattr(gpucheck, "clock", lambda: now[0])

    def fake_child(cmd, timeout, log, env=None):
        seen.append((cmd, timeout))
        now[0] += timeout                                        # the worst case: every child runs out its time
        if "--timing-child" in cmd:
            Path(cmd[cmd.index("--timing-child") + 1]).write_text(json.dumps(ROW) + "\n")
            return 0, 10.0, ""
        if cmd[0].endswith("compute-sanitizer"):
            assert env["GPURNN_CUDA_GRAPHS"] == "0"
            return 0, 5.0, "========= ERROR SUMMARY: 0 errors\n"
        return 1, 20.0, PYTEST_OUTPUT
    monkeypatch.setattr(gpucheck, "run_child", fake_child)
    assert gpucheck.main(["--out", str(tmp_path), "--budget", "300"]) == 1          # a test failed
    report = capsys.readouterr().out
    order = [report.index(h) for h in ("## Device and libraries", "## GPU test suite: FAILED", "## Timing",
                                       "## compute-sanitizer over")]
    assert order == sorted(order) and "- memcheck: 0 errors (exit 0)" in report and "abc123" in report
    assert (tmp_path / "report.md").read_text() == report
    timeouts = [t for _, t in seen]
    assert timeouts[0] == pytest.approx(0.4 * 295) and now[0] <= 300       # within --budget
    assert [c[1] for c, _ in seen[2:]] == ["--tool", "--tool"] and [c[2] for c, _ in seen[2:]] == ["memcheck",
                                                                                                   "racecheck"]


@pytest.mark.skipif(not (backend.cuda_simulator() and backend.cuda_host()),
                    reason="runs the workload on the simulator and the CPU harness")
def test_the_sanitizer_workload_launches_every_kernel(monkeypatch, launches):
    monkeypatch.setattr(gpucheck, "xp_for_backend", lambda b: "cpu")
    monkeypatch.setattr(graphs, "ENABLED", False)                # as GPURNN_CUDA_GRAPHS=0 sets it for the sanitizer
    before = collections.Counter(cuda_host.launched)
    gpucheck.workload((2, 2, 3))
    cupy_ran = set(cuda_host.launched - before)
    assert set(cupy_raw.kernel_names()) | {"f32_to_bf16"} <= cupy_ran
    assert set(launches) == {"step_forward", "step_backward", "jordan_hidden", "jordan_output",
                          "jordan_output_backward", "jordan_hidden_backward", "persistent_forward",
                          "persistent_backward", "row_forward", "row_backward", "proj_forward", "proj_backward"}
