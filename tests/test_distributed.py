"""Data-parallel training (gpurnn.distributed) in jobs of 2 processes started here with `mpiexec -n 2`:
- equivalence with one process on the whole batch (the oracle: the plain Trainer, in this process), float64: LSTM
  and GRU with clipping active after one step, Adam loss curves over 20 steps, a split into unequal shares, a batch
  task with lengths, a NaN on one rank skipped (or raised) on both, the ranks' parameters identical throughout;
- `gpurnn train --distributed`: a run resumed from 2 processes on 1 and back on 2 continues as one process would;
- failure: one rank raising ends the job with one line naming it and its checkpoint intact; a signal on one rank
  stops both after the same batch, saved; an error every rank meets is printed once;
- the README's distributed example, as a job of 2.
Each job has a generous time limit that only catches a hang; nothing here depends on the machine's speed."""
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import distributed_cases as cases
from gpurnn import checkpoint, cli
from gpurnn.corpus import CharBatches
from gpurnn.distributed import shard_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
MPIEXEC = shutil.which("mpiexec", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
needs_mpi = pytest.mark.skipif(MPIEXEC is None or importlib.util.find_spec("mpi4py") is None,
                               reason="needs mpi4py and mpiexec: pip install '.[mpi]'")
HANG = 600                         # seconds: only a hung job takes this long
TEXT = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x = 0\n    y = 1\n" * 20
TINY = ["--hidden", "8", "--embedding", "4", "--seq-len", "12", "--batch", "4", "--no-progress", "--samples", "0",
        "--checkpoint-every", "2"]


def mpiexec(n, *args, stdout=False):
    """`mpiexec -n n python args...` with one BLAS thread per process: (exit code, stderr[, stdout]). A job still
    running after HANG seconds is killed whole and fails the test."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([MPIEXEC, "-n", str(n), sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=HANG)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the job of {n} processes hung:\n{err}")
    return (proc.returncode, err, out) if stdout else (proc.returncode, err)


def train(n, corpus, out, *extra, fault=None):
    """`gpurnn train --distributed` in a job of n processes (tests/distributed_train.py: with a fault on one)."""
    argv = ["train", "--distributed", "--data", corpus, "--out", str(out), *TINY, *extra]
    return mpiexec(n, os.path.join(TESTS, "distributed_train.py"), json.dumps(dict(argv=argv, **(fault or {}))))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "code.py"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every case of tests/distributed_cases.py trained by 2 processes: name -> rank 0's results."""
    out = tmp_path_factory.mktemp("cases") / "cases.npz"
    code, err = mpiexec(2, os.path.join(TESTS, "distributed_cases.py"), str(out))
    assert code == 0, err
    with np.load(out) as z:
        return {name: {k.split(".", 1)[1]: z[k] for k in z.files if k.split(".", 1)[0] == name}
                for name in cases.CASES}


def assert_same_run(dist, ref, rtol_params):
    """Two ranks' results equal one process's: rows split in two, parameters (to rtol_params), losses (to
    1e-12), norms, skipped windows and targets; the two ranks' parameters bitwise identical."""
    assert dist["rank_spread"] == 0
    np.testing.assert_array_equal(dist["rank_rows"].sum(axis=0), ref["rows"])           # each row on one rank
    assert dist["rank_rows"].min() >= 1
    np.testing.assert_allclose(dist["params"], ref["params"], rtol=rtol_params, atol=1e-15)
    np.testing.assert_allclose(dist["loss"], ref["loss"], rtol=1e-12)
    np.testing.assert_allclose(dist["norms"], ref["norms"], rtol=1e-12)
    assert dist["skipped"] == ref["skipped"]
    np.testing.assert_array_equal(dist["tokens"], ref["tokens"])


@needs_mpi
@pytest.mark.parametrize("name", ["lstm_sgd_1", "gru_sgd_1"])
def test_one_step_on_two_ranks_is_one_step_on_the_whole_batch(two_ranks, name):
    ref = cases.run(name)
    assert ref["norms"].min() > cases.CLIP                                                 # clipping acted
    assert ref["params"].size > 0 and np.ptp(ref["params"]) > 0
    assert_same_run(two_ranks[name], ref, rtol_params=1e-12)


@needs_mpi
@pytest.mark.parametrize("name", ["lstm_adam_20", "gru_adam_20"])
def test_twenty_adam_steps_give_one_process_loss_curve(two_ranks, name):
    ref = cases.run(name)
    assert len(ref["loss"]) == 20 and ref["norms"].min() > cases.CLIP
    assert_same_run(two_ranks[name], ref, rtol_params=1e-9)


@needs_mpi
@pytest.mark.parametrize("name", ["gru_adam_uneven", "classifier_lengths"])
def test_unequal_shares_are_weighted_by_their_targets(two_ranks, name):
    """5 rows as 3 + 2 (a Tagger), 7 as 4 + 3 (a Classifier whose target and lengths have the batch on axis 0)."""
    ref = cases.run(name)
    dist = two_ranks[name]
    np.testing.assert_array_equal(dist["rank_rows"][:, 0], [(cases.CASES[name]["batch"] + 1) // 2,
                                                            cases.CASES[name]["batch"] // 2])
    assert_same_run(dist, ref, rtol_params=1e-9)


@needs_mpi
def test_a_nan_on_one_rank_is_skipped_on_every_rank(two_ranks):
    """The NaN is in the last row, rank 1's: both ranks skip its windows and drop the carried state, as one
    process does."""
    ref = cases.run("lstm_nan_skip")
    assert ref["skipped"] > 0
    assert_same_run(two_ranks["lstm_nan_skip"], ref, rtol_params=1e-9)


@needs_mpi
def test_nan_policy_raise_stops_every_rank_at_the_same_step(two_ranks):
    ref = cases.run("lstm_nan_raise")
    dist = two_ranks["lstm_nan_raise"]
    assert ref["stopped"] == cases.CASES["lstm_nan_raise"]["nan_at"]
    np.testing.assert_array_equal(dist["rank_stopped"], [ref["stopped"]] * 2)
    assert_same_run(dist, ref, rtol_params=1e-9)


def losses(out):
    return np.array([s["loss"] for s in checkpoint.load(out)["trainer"]["history"]])


@needs_mpi
def test_resume_from_two_processes_on_one_and_back(tmp_path, corpus):
    """4 steps on 2 processes, 4 more on 1, 4 more on 2: the loss curve and weights of 12 steps on 1 process (up
    to float32 rounding: the gradient is summed in another order), the carried state the whole batch's."""
    assert cli.main(["train", "--data", corpus, "--out", str(tmp_path / "one"), *TINY, "--steps", "12"]) == 0
    code, err = train(2, corpus, tmp_path / "run", "--steps", "4")
    assert code == 0, err
    assert "2 processes, effective batch 4 x 12" in err
    assert cli.main(["train", "--data", corpus, "--out", str(tmp_path / "run"), *TINY, "--resume", "--steps",
                     "4"]) == 0
    code, err = train(2, corpus, tmp_path / "run", "--resume", "--steps", "4")
    assert code == 0, err
    run, one = checkpoint.load(tmp_path / "run"), checkpoint.load(tmp_path / "one")
    assert run["trainer"]["step"] == 12
    assert [s["step"] for s in run["trainer"]["history"]] == list(range(1, 13))
    np.testing.assert_allclose(losses(tmp_path / "run"), losses(tmp_path / "one"), rtol=1e-5)
    for k, v in one["model"].items():
        np.testing.assert_allclose(run["model"][k], v, rtol=1e-4, atol=1e-6)
    h, c = run["trainer"]["state"]
    assert h.shape == c.shape == (1, 4, 8)                                # (layers, the whole batch, hidden)
    np.testing.assert_allclose(h, one["trainer"]["state"][0], rtol=1e-4, atol=1e-6)


@needs_mpi
def test_one_rank_raising_ends_the_job_with_one_line_and_the_checkpoint_intact(tmp_path, corpus):
    code, err = train(2, corpus, tmp_path / "run", "--steps", "8", fault=dict(rank=1, step=5, fault="raise"))
    assert code == 2
    # (the ranks' stderr reach mpiexec's separately: a line of rank 0's may be cut by rank 1's, written between)
    assert err.count("gpurnn train: error: rank 1 of 2: bad data in batch 6; stopping every rank") == 1
    assert "Traceback" not in err
    payload = checkpoint.load(tmp_path / "run")                   # checksum verified, no fallback needed
    assert payload["trainer"]["step"] == 4                        # saved before rank 1 read batch 6
    assert checkpoint.read(str(tmp_path / "run" / "checkpoint.prev.npz"))["trainer"]["step"] == 2
    assert cli.main(["train", "--data", corpus, "--out", str(tmp_path / "run"), *TINY, "--resume", "--steps",
                     "1"]) == 0


@needs_mpi
def test_a_signal_on_one_rank_stops_every_rank_after_the_same_batch_with_a_checkpoint(tmp_path, corpus):
    code, err = train(2, corpus, tmp_path / "run", "--steps", "8", fault=dict(rank=1, step=2, fault="sigterm"))
    assert code == 128 + signal.SIGTERM
    assert err.count("SIGTERM at step 3: checkpoint saved in") == 1
    assert checkpoint.load(tmp_path / "run")["trainer"]["step"] == 3


@needs_mpi
@pytest.mark.parametrize("problem", ["batch", "folder"])
def test_an_error_every_rank_meets_is_one_line_from_rank_0(tmp_path, corpus, problem):
    """--batch 1 cannot be split (every rank finds it); --out holds a checkpoint (rank 0 finds it)."""
    if problem == "folder":
        assert cli.main(["train", "--data", corpus, "--out", str(tmp_path / "run"), *TINY, "--steps", "1"]) == 0
        code, err = train(2, corpus, tmp_path / "run", "--steps", "1")
        expected = "already holds a checkpoint"
    else:
        code, err = train(2, corpus, tmp_path / "run", "--steps", "1", "--batch", "1")
        expected = "--batch 1 cannot be split over 2 processes"
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("gpurnn train: error: ") and expected in err


@needs_mpi
def test_the_readme_example_trains_as_a_job_of_two(tmp_path):
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    code = re.search(r"<!-- readme-example: distributed -->\n```python\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "train_dp.py").write_text(code, encoding="utf-8")
    status, err, out = mpiexec(2, str(tmp_path / "train_dp.py"), stdout=True)
    assert status == 0, err
    first, last = map(float, re.fullmatch(r"2 process\(es\): loss (\S+) -> (\S+)\n", out).groups())
    assert last < first / 2


def test_rows_are_strided_and_char_batches_read_only_theirs():
    assert [range(7)[shard_rows(7, r, 3)] for r in range(3)] == [range(0, 7, 3), range(1, 7, 3), range(2, 7, 3)]
    with pytest.raises(ValueError, match="batch of 2 rows cannot be split over 3 processes"):
        shard_rows(2, 0, 3)
    ids = np.arange(500) % 37
    whole = CharBatches(ids, 5, 7)
    for r in range(2):
        mine = CharBatches(ids, 5, 7, rows=shard_rows(5, r, 2))
        assert mine.chunks == whole.chunks
        for step in (0, 3, whole.chunks + 1):
            for a, b in zip(mine(step), whole(step)):
                np.testing.assert_array_equal(a, b[:, r::2])


def test_distributed_imports_no_mpi_and_allreduce_needs_distributed(capsys):
    probe = "import sys, gpurnn.distributed; print('mpi4py' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.stdout.strip() == "False"
    assert cli.main(["train", "--allreduce", "mpi"]) == 2
    assert capsys.readouterr().err == "gpurnn train: error: --allreduce needs --distributed\n"
