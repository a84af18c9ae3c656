"""The trainer: TBPTT gradients against full BPTT and finite differences, state carry, clipping, the NaN policy,
non-finite updates undone, exact resume (also after SIGINT/SIGTERM/SIGHUP), checkpoint structure checks, a full
disk, and argument checks."""
import errno
import math
import os
import signal

import numpy as np
import pytest

from gpurnn import checkpoint, models, nn, optim
from gpurnn.checkpoint import CheckpointError
from gpurnn.trainer import Callback, Interrupted, NonFiniteError, Trainer, parse_tbptt, windows
from util import numeric_grad


class Record(Callback):
    """Keeps a copy of every update's gradients and info."""

    def __init__(self):
        self.grads, self.infos = [], []

    def on_update(self, trainer, info):
        self.grads.append({f"{i}.{k}": g.copy() for i, m in enumerate(trainer.modules) for k, g in m.grads.items()})
        self.infos.append(info)


def tagger(cell="lstm", dtype="float64"):
    return models.Tagger(2, 3, 2, cell=cell, num_layers=2, dtype=dtype, seed=4)


def random_batch(T=5, B=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((T, B, 2)), rng.integers(0, 2, (T, B))


def frozen(model, **kwargs):
    """A trainer whose updates change nothing (SGD with lr 0), recording the gradients it would apply."""
    rec = Record()
    return Trainer(model, nn.SoftmaxCrossEntropy(), optim.SGD(model.modules(), lr=0.0), callbacks=[rec],
                   progress=False, **kwargs), rec


def test_windows_follow_williams_and_peng():
    # (start, loss_from, end): loss on the k1 newest steps, backprop k2 steps from the end
    assert windows(6, 3, 3) == [(0, 0, 3), (3, 3, 6)]
    assert windows(5, 2, 3) == [(0, 0, 2), (1, 2, 4), (2, 4, 5)]
    assert windows(4, 4, 4) == [(0, 0, 4)]
    assert windows(3, 5, 8) == [(0, 0, 3)]


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("tbptt", [(5, 5), None])
def test_tbptt_over_the_whole_batch_equals_full_bptt(cell, tbptt):
    model = tagger(cell)
    trainer, rec = frozen(model, tbptt=tbptt)
    x, y = random_batch()
    trainer.train_batch((x, y))
    model.zero_grad()
    loss = nn.SoftmaxCrossEntropy()
    out, _, ctx = model.forward(x)
    _, lctx = loss.forward(out, y)
    model.backward(ctx, loss.backward(lctx))
    assert len(rec.grads) == 1
    for i, m in enumerate(model.modules()):
        for k, g in m.grads.items():
            np.testing.assert_allclose(rec.grads[0][f"{i}.{k}"], g, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_overlapping_tbptt_matches_finite_differences_of_the_truncated_loss(cell):
    # T = 5, k1 = 2, k2 = 3: windows (0, 0, 2), (1, 2, 4), (2, 4, 5). Window (1, 2, 4) starts from the state
    # after step 0, held fixed, runs steps 1..3 and scores steps 2..3 only.
    model = tagger(cell)
    trainer, rec = frozen(model, tbptt=(2, 3))
    x, y = random_batch()
    trainer.train_batch((x, y))
    loss = nn.SoftmaxCrossEntropy()
    assert [info["window"] for info in rec.infos] == windows(5, 2, 3)
    for n, (start, loss_from, end) in enumerate(windows(5, 2, 3)):
        state0 = model.forward(x[:start], training=False)[1] if start else None

        def truncated_loss():
            out = model.forward(x[start:end], state=state0, training=False)[0]
            return loss.forward(out[loss_from - start:], y[loss_from:end])[0]

        for i, m in enumerate(model.modules()):
            for k, p in m.params.items():
                np.testing.assert_allclose(rec.grads[n][f"{i}.{k}"], numeric_grad(truncated_loss, p),
                                           rtol=1e-5, atol=1e-8, err_msg=f"window {n}, {i}.{k}")


def test_stateful_carry_continues_the_sequence():
    model = tagger("lstm")
    trainer, _ = frozen(model, tbptt=(2, 2), stateful=True)
    x, y = random_batch(T=6, seed=1)
    trainer.train_batch((x[:3], y[:3]))
    trainer.train_batch((x[3:], y[3:]))
    _, (h, c), _ = model.forward(x, training=False)
    np.testing.assert_allclose(trainer.state[0], h, rtol=1e-12)
    np.testing.assert_allclose(trainer.state[1], c, rtol=1e-12)
    fresh, _ = frozen(model, tbptt=(2, 2), stateful=False)
    fresh.train_batch((x[:3], y[:3]))
    assert fresh.state is None


@pytest.mark.parametrize("clip", [dict(clip_norm=0.05), dict(clip_value=0.01)])
def test_clipping_bounds_the_applied_gradients(clip):
    model = tagger("gru")
    trainer, rec = frozen(model, **clip)
    trainer.train_batch(random_batch(seed=2))
    grads = np.concatenate([g.ravel() for g in rec.grads[0].values()])
    if "clip_norm" in clip:
        assert rec.infos[0]["grad_norm"] > 0.05                      # the unclipped norm is reported
        np.testing.assert_allclose(np.linalg.norm(grads), 0.05, rtol=1e-5)
    else:
        assert np.abs(grads).max() == pytest.approx(0.01)


def regression_data(step, rng, poison_step=None):
    x = rng.standard_normal((6, 4, 2)).astype(np.float32)
    y = rng.standard_normal((6, 4, 1)).astype(np.float32)
    if step == poison_step:
        y[3, 1, 0] = 1e38         # (pred - y)^2 overflows float32: an infinite loss
    return x, y


def regression_trainer(**kwargs):
    model = models.Tagger(2, 4, 1, cell="lstm", seed=0)
    return model, Trainer(model, nn.MSELoss(), optim.Adam(model.modules(), lr=0.01), progress=False, **kwargs)


@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("tbptt", [None, (3, 3)])
def test_nonfinite_updates_are_skipped_and_counted(tbptt):
    model, trainer = regression_trainer(tbptt=tbptt)
    trainer.fit(lambda i, rng: regression_data(i, rng), 2)
    before = model.state_dict()
    stats = trainer.train_batch(regression_data(2, trainer.rng, poison_step=2))
    assert trainer.skipped == 1 and stats["skipped"] == 1
    # the poisoned window made no update; a clean window of the same batch (TBPTT) still did
    changed = any(not np.array_equal(v, model.state_dict()[k]) for k, v in before.items())
    assert changed == (tbptt is not None)
    assert math.isfinite(stats["loss"]) == (tbptt is not None)
    trainer.fit(lambda i, rng: regression_data(i, rng), 5)
    assert trainer.skipped == 1 and all(np.isfinite(v).all() for v in model.state_dict().values())


@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("tbptt, where", [(None, "step 1: "), ((2, 2), "step 1, window t=2..3: ")])
def test_nonfinite_raises_under_the_raise_policy_saying_where(tbptt, where):
    model, trainer = regression_trainer(nan_policy="raise", tbptt=tbptt)
    before = model.state_dict()
    with pytest.raises(NonFiniteError, match=f"^{where}the loss or its gradients are not finite"):
        trainer.train_batch(regression_data(0, trainer.rng, poison_step=0))
    if tbptt is None:
        for k, v in model.state_dict().items():
            np.testing.assert_array_equal(v, before[k])


def optimizer_state(opt):
    return opt.step_count, {b: {k: a.copy() for k, a in arrays.items()} for b, arrays in opt.state.items()}


def assert_same_optimizer_state(a, b):
    assert a[0] == b[0] and a[1].keys() == b[1].keys()
    for buf in a[1]:
        for k in a[1][buf]:
            np.testing.assert_array_equal(a[1][buf][k], b[1][buf][k])


class HugeLrAt(Callback):
    """Sets the learning rate to 1e39 (infinite in float32 updates) for the updates numbered in `bad`."""

    def __init__(self, bad, lr):
        self.bad, self.lr, self.seen = bad, lr, []

    def on_update(self, trainer, info):
        trainer.optimizer.lr = 1e39 if info["update"] in self.bad and not self.seen else self.lr
        self.before = ({k: v.copy() for k, v in trainer.model.state_dict().items()},
                       optimizer_state(trainer.optimizer))

    def on_nonfinite(self, trainer, info):
        self.seen.append(info)


@pytest.mark.parametrize("make_opt", [lambda m: optim.SGD(m.modules(), lr=0.1, momentum=0.9),
                                      lambda m: optim.Adam(m.modules(), lr=0.01)])
def test_a_nonfinite_update_is_undone_counted_and_training_goes_on(make_opt):
    model = models.Tagger(2, 4, 1, cell="lstm", seed=0)
    opt = make_opt(model)
    hook = HugeLrAt({2}, opt.lr)
    trainer = Trainer(model, nn.MSELoss(), opt, callbacks=[hook], progress=False)
    trainer.fit(lambda i, rng: regression_data(i, rng), 3)          # update 2 is non-finite: undone
    params, opt_state = hook.before                                  # as they were just before update 2
    assert len(hook.seen) == 1 and trainer.skipped == 1 and trainer.updates == 2
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, params[k])
    assert_same_optimizer_state(optimizer_state(opt), opt_state)
    trainer.fit(lambda i, rng: regression_data(i, rng), 5)
    assert trainer.updates == 4 and trainer.nonfinite_in_row == 0
    assert all(np.isfinite(v).all() for v in model.state_dict().values())


def test_nonfinite_updates_in_a_row_stop_the_run_naming_the_step_and_the_learning_rate(tmp_path):
    model = models.Tagger(2, 4, 1, cell="gru", seed=0)
    trainer = Trainer(model, nn.MSELoss(), optim.Adam(model.modules(), lr=1e39), max_nonfinite_in_row=3,
                      checkpoint_dir=tmp_path, progress=False)
    before = model.state_dict()
    with pytest.raises(NonFiniteError, match=r"^step 3: the update made parameters non-finite \(undone\) .* in 3 "
                                             r"updates in a row; stopped: the learning rate \(1e\+39\) is likely"):
        trainer.fit(lambda i, rng: regression_data(i, rng), 10)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    assert trainer.skipped == 2 and trainer.optimizer.step_count == 0
    assert os.listdir(tmp_path) == []


def test_the_raise_policy_undoes_a_nonfinite_update_before_raising():
    model = models.Tagger(2, 4, 1, seed=0)
    trainer = Trainer(model, nn.MSELoss(), optim.SGD(model.modules(), lr=1e39), nan_policy="raise", progress=False)
    before = model.state_dict()
    with pytest.raises(NonFiniteError, match="step 1: the update made parameters non-finite"):
        trainer.fit(lambda i, rng: regression_data(i, rng), 1)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_a_nonfinite_model_is_never_saved(tmp_path):
    model, trainer = regression_trainer(checkpoint_dir=tmp_path)
    model.parts["head"].params["bias"][0] = np.inf
    with pytest.raises(NonFiniteError, match="not saving a checkpoint"):
        trainer.save()
    assert os.listdir(tmp_path) == []


def char_data(step, rng):
    """Random (T=8, B=4) id batches over a vocabulary of 5, drawn from the trainer's rng."""
    seq = rng.integers(0, 5, (9, 4))
    return seq[:-1], seq[1:]


def char_trainer(directory, **kwargs):
    model = models.CharLM("abcde", hidden_size=6, embedding_dim=3, num_layers=2, seed=1)
    opt = optim.Adam(model.modules(), lr=0.01)
    return Trainer(model, nn.SoftmaxCrossEntropy(), opt, tbptt=(3, 5), stateful=True, clip_norm=1.0,
                   checkpoint_dir=directory, progress=False, seed=7, **kwargs)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    whole = char_trainer(tmp_path / "whole")
    whole.fit(char_data, 6)
    first = char_trainer(tmp_path / "split")
    first.fit(char_data, 3)
    second = char_trainer(tmp_path / "split")
    second.model.sample_rng = np.random.default_rng(0)      # RNG states come from the checkpoint
    second.resume(tmp_path / "split")
    assert second.step == 3
    second.fit(char_data, 6)
    assert [s["loss"] for s in second.history] == [s["loss"] for s in whole.history]
    for k, v in whole.model.state_dict().items():
        np.testing.assert_array_equal(second.model.state_dict()[k], v)
    assert second.model.sample(20, seed=None) == whole.model.sample(20, seed=None)


class SignalAt(Callback):
    """Sends this process `signum` from inside the step callback, `times` times: signal.raise_signal delivers it
    to this thread before it returns, so the trainer sees it at a known point (no timing involved)."""

    def __init__(self, step, signum, times=1):
        self.step, self.signum, self.times = step, signum, times

    def on_step(self, trainer, stats):
        if stats["step"] == self.step:
            for _ in range(self.times):
                signal.raise_signal(self.signum)


STOP_SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]


@pytest.mark.parametrize("signum", STOP_SIGNALS)
def test_a_signal_saves_after_the_batch_then_resumes_exactly(tmp_path, signum):
    whole = char_trainer(tmp_path / "whole")
    whole.fit(char_data, 5)
    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    cut = char_trainer(tmp_path / "cut", callbacks=[SignalAt(2, signum)])
    with pytest.raises(Interrupted) as stopped:
        cut.fit(char_data, 5)
    assert isinstance(stopped.value, KeyboardInterrupt)
    assert stopped.value.signum == signum and stopped.value.saved == str(tmp_path / "cut" / "checkpoint.npz")
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == handlers
    resumed = char_trainer(tmp_path / "other")
    resumed.resume(tmp_path / "cut")
    assert resumed.step == 2
    resumed.fit(char_data, 5)
    assert [s["loss"] for s in resumed.history] == [s["loss"] for s in whole.history]
    for k, v in whole.model.state_dict().items():
        np.testing.assert_array_equal(resumed.model.state_dict()[k], v)


def test_a_second_signal_stops_at_once_without_saving(tmp_path):
    cut = char_trainer(tmp_path / "cut", callbacks=[SignalAt(2, signal.SIGTERM, times=2)])
    with pytest.raises(Interrupted) as stopped:
        cut.fit(char_data, 5)
    assert stopped.value.saved is None and not (tmp_path / "cut").exists()


def test_every_save_keeps_the_one_before(tmp_path):
    trainer = char_trainer(tmp_path, checkpoint_every=2)
    trainer.fit(char_data, 5)
    assert checkpoint.read(str(tmp_path / "checkpoint.npz"))["trainer"]["step"] == 5
    assert checkpoint.read(str(tmp_path / "checkpoint.prev.npz"))["trainer"]["step"] == 4


def test_a_full_disk_is_one_line_saying_the_previous_checkpoint_is_intact(tmp_path, monkeypatch):
    trainer = char_trainer(tmp_path, checkpoint_every=2)
    trainer.fit(char_data, 2)

    def no_space(f, **arrays):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", no_space)
    with pytest.raises(CheckpointError) as e:
        trainer.fit(char_data, 4)
    assert str(e.value) == (f"could not write a checkpoint at step 4 in {tmp_path} (No space left on device); "
                            f"the previous checkpoint {tmp_path / 'checkpoint.npz'} (step 2) is intact")
    monkeypatch.undo()
    assert checkpoint.load(tmp_path)["trainer"]["step"] == 2
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.npz", "checkpoint.prev.npz"]


def drop(keys):
    def edit(sd):
        *path, last = keys
        for k in path:
            sd = sd[k]
        del sd[last]
    return edit


def put(keys, value):
    def edit(sd):
        *path, last = keys
        for k in path:
            sd = sd[k]
        sd[last] = value(sd[last]) if callable(value) else value
    return edit


@pytest.mark.parametrize("edit, message", [
    (drop(["model"]), "missing or malformed model"),
    (drop(["trainer", "rng"]), "trainer.rng missing"),
    (put(["trainer", "step"], -3), "trainer.step must be an integer >= 0, got -3"),
    (put(["trainer", "skipped"], 1.5), "trainer.skipped must be an integer >= 0"),
    (put(["trainer", "history"], "x"), "trainer.history must be a list of dicts"),
    (put(["trainer", "rng"], {"bit_generator": "MT19937"}), "trainer.rng is not a PCG64 state"),
    (put(["model", "rnn.weight_hh_l0"], lambda w: w[:, :-1]), r"rnn.weight_hh_l0: expected shape \(24, 6\)"),
    (put(["model", "head.weight"], lambda w: w * np.nan), "weights are not finite .*head.weight"),
    (put(["trainer", "state"], lambda s: (s[0][:1], s[0][:1])), r"trainer.state has shapes"),
    (put(["trainer", "state"], lambda s: s[0] * np.inf), "trainer.state"),
    (put(["optimizer", "step"], -1), "step"),
])
def test_malformed_checkpoints_are_one_line_errors_and_change_nothing(tmp_path, edit, message):
    trainer = char_trainer(tmp_path / "a")
    trainer.fit(char_data, 2)
    payload = checkpoint.load(tmp_path / "a")
    edit(payload)
    checkpoint.save(tmp_path / "b", payload)
    fresh = char_trainer(tmp_path / "c")
    before = fresh.model.state_dict(), fresh.optimizer.state_dict(), fresh.rng.bit_generator.state
    with pytest.raises(CheckpointError, match=message) as e:
        fresh.resume(tmp_path / "b")
    assert "\n" not in str(e.value) and str(tmp_path / "b" / "checkpoint.npz") in str(e.value)
    assert fresh.step == 0 and fresh.state is None and fresh.rng.bit_generator.state == before[2]
    for k, v in before[0].items():
        np.testing.assert_array_equal(fresh.model.state_dict()[k], v)
    assert fresh.optimizer.state_dict()["step"] == before[1]["step"]


def test_resume_rejects_another_model_and_changes_nothing(tmp_path):
    trainer = char_trainer(tmp_path / "a")
    trainer.fit(char_data, 1)
    model = models.CharLM("abcde", hidden_size=7, embedding_dim=3, num_layers=2, seed=1)
    other = Trainer(model, nn.SoftmaxCrossEntropy(), optim.Adam(model.modules()), progress=False)
    before = model.state_dict()
    with pytest.raises(ValueError, match="another model"):
        other.resume(tmp_path / "a")
    assert other.step == 0
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


@pytest.mark.parametrize("bad", [dict(tbptt=(0, 2)), dict(tbptt=(3, 2)), dict(tbptt="a,b"), dict(tbptt=(1, 2, 3)),
                                 dict(clip_norm=-1.0), dict(clip_norm=math.inf), dict(clip_value=0),
                                 dict(nan_policy="ignore"), dict(checkpoint_every=-1),
                                 dict(checkpoint_every=5), dict(max_nonfinite_in_row=0)])
def test_bad_arguments_are_rejected(bad):
    model = tagger()
    with pytest.raises(ValueError):
        Trainer(model, nn.SoftmaxCrossEntropy(), optim.SGD(model.modules(), lr=0.1), **bad)


@pytest.mark.parametrize("steps", [-1, 2.5, True])
def test_fit_rejects_bad_steps_and_changes_nothing(steps):
    model = tagger()
    trainer, _ = frozen(model)
    state = trainer.rng.bit_generator.state
    with pytest.raises(ValueError, match="steps"):
        trainer.fit(lambda i, rng: random_batch(), steps)
    assert trainer.step == 0 and trainer.rng.bit_generator.state == state


def test_parse_tbptt_reads_the_command_line_form():
    assert parse_tbptt("20,40") == (20, 40)
    assert parse_tbptt("32") == (32, 32)
