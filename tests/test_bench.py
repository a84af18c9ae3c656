"""`gpurnn bench`: the FLOP count, the comparison rows and the profile, on tiny sizes (no timing is asserted)."""
import json

import pytest

from gpurnn import bench
from gpurnn.backend import gpu_available


@pytest.mark.parametrize("cell, gates", [("lstm", 4), ("gru", 3), ("rnn_tanh", 1)])
def test_gemm_flops_counts_three_passes_of_every_gemm(cell, gates):
    T, B, H, I = 7, 3, 5, 2
    # forward: x W_ih^T (T*B x I x G*H) and h W_hh^T (T*B x H x G*H), 2 FLOPs per multiply-add
    forward = 2 * T * B * I * gates * H + 2 * T * B * H * gates * H
    assert bench.gemm_flops(cell, T, B, H, I, train=False) == forward
    assert bench.gemm_flops(cell, T, B, H, I) == 3 * forward


def test_json_rows_are_consistent(capsys):
    assert bench.main(["--cells", "rnn_tanh", "gru", "--sizes", "3,2,4", "--repeats", "1", "--mode", "train",
                       "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["cell"] for r in result["rows"]] == ["rnn_tanh", "gru"]
    for r in result["rows"]:
        assert (r["T"], r["B"], r["H"], r["mode"], r["sweep"]) == (3, 2, 4, "train", "auto")
        assert r["gflops"] == pytest.approx(bench.gemm_flops(r["cell"], 3, 2, 4) / r["ours_ms"] / 1e6)
        if r["peer_ms"] is not None:
            assert r["ratio"] == pytest.approx(r["ours_ms"] / r["peer_ms"])


@pytest.mark.parametrize("workspace", [[], ["--workspace"]])
def test_profile_lists_every_part_of_each_step(capsys, workspace):
    assert bench.main(["--profile", "--cells", "lstm", "rnn_relu", "--sizes", "4,2,3", "--repeats", "2",
                       "--json"] + workspace) == 0
    result = json.loads(capsys.readouterr().out)
    assert [(p["cell"], p["T"], p["B"], p["H"]) for p in result["profiles"]] == [("lstm", 4, 2, 3),
                                                                                ("rnn_relu", 4, 2, 3)]
    for p in result["profiles"]:
        names = [part["part"] for part in p["parts"]]
        assert names[0].startswith("input projection") and names[-1] == "whole step"
        assert any(n.startswith("backward sweep") for n in names)
        whole = p["parts"][-1]
        assert whole["gflop"] == pytest.approx(bench.gemm_flops(p["cell"], 4, 2, 3) / 1e9)
        assert sum(part["ms"] for part in p["parts"][:-1]) == pytest.approx(whole["ms"])
        assert all(part["ms"] > 0 for part in p["parts"] if part["gflop"])


def test_profile_table_names_the_cell_and_device(capsys):
    assert bench.main(["--profile", "--cells", "gru", "--sizes", "2,1,2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "gru T=2 B=1 H=I=2" in out and "whole step" in out and "device:" in out
    assert "fresh buffers" in out and "Numba threads" in out


def test_table_says_whether_the_workspace_is_on(capsys):
    assert bench.main(["--cells", "lstm", "--sizes", "2,2,3", "--repeats", "1", "--mode", "train",
                       "--workspace"]) == 0
    out = capsys.readouterr().out
    assert "workspace on" in out and "Numba threads" in out and "lstm" in out


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--backend", "cupy"], ["--profile", "--backend", "numba"]])
def test_bad_requests_exit_2(argv, capsys):
    if argv == ["--backend", "cupy"] and gpu_available():
        pytest.skip("a GPU is present, so the cupy backend is a valid request")
    assert bench.main(argv + ["--sizes", "2,1,2"]) == 2
    assert "gpurnn bench: error:" in capsys.readouterr().err


def test_bad_size_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--sizes", "2,1"])
    assert exit_.value.code == 2
    assert "T,B,H" in capsys.readouterr().err


@pytest.mark.parametrize("backend, sweeps", [("numpy", ["step"]), ("cupy", ["persistent"])])
def test_sweep_is_checked_against_the_backend(capsys, backend, sweeps):
    assert bench.main(["--backend", backend, "--sweep", *sweeps]) == 2
    assert "--sweep for backend" in capsys.readouterr().err


@pytest.mark.skipif(not gpu_available(), reason="times the numba backend's sweeps on a GPU")
def test_step_and_persistent_side_by_side(capsys):
    assert bench.main(["--backend", "numba", "--sweep", "step", "persistent", "--cells", "gru", "--sizes", "4,2,8",
                       "--repeats", "1", "--mode", "inference", "--json"]) == 0
    assert [r["sweep"] for r in json.loads(capsys.readouterr().out)["rows"]] == ["step", "persistent"]


def test_memory_rows_report_both_modes(capsys):
    """--memory: our training step timed in both memory modes and its peak memory measured in each (fresh
    processes); the LayerNorm cells have no peer."""
    assert bench.main(["--cells", "lnlstm", "lstm", "--sizes", "6,2,4", "--repeats", "1", "--mode", "train",
                       "--memory", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["cell"] for r in rows] == ["lnlstm", "lstm"] and rows[0]["peer_ms"] is None
    for r in rows:
        assert r["ckpt_ms"] > 0 and r["ckpt_time_ratio"] == pytest.approx(r["ckpt_ms"] / r["ours_ms"])
        assert r["ours_peak_mib"] >= 0 and r["ckpt_peak_mib"] >= 0
    assert bench.gemm_flops("lnlstm", 6, 2, 4) == bench.gemm_flops("lstm", 6, 2, 4)


def test_profile_refuses_the_layer_norm_cells(capsys):
    assert bench.main(["--profile", "--cells", "lnlstm", "--sizes", "2,1,2"]) == 2
    assert "--profile" in capsys.readouterr().err
