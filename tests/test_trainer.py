"""The trainer: TBPTT gradients against full BPTT and finite differences, state carry, clipping, the NaN policy,
exact resume (also after Ctrl-C) and argument checks."""
import math
import os
import signal

import numpy as np
import pytest

from gpurnn import models, nn, optim
from gpurnn.trainer import Callback, NonFiniteError, Trainer, parse_tbptt, windows
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
def test_nonfinite_raises_under_the_raise_policy():
    model, trainer = regression_trainer(nan_policy="raise")
    before = model.state_dict()
    with pytest.raises(NonFiniteError):
        trainer.train_batch(regression_data(0, trainer.rng, poison_step=0))
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


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


class InterruptAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step(self, trainer, stats):
        if stats["step"] == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_saves_after_the_batch_then_resumes_exactly(tmp_path):
    whole = char_trainer(tmp_path / "whole")
    whole.fit(char_data, 5)
    cut = char_trainer(tmp_path / "cut", callbacks=[InterruptAt(2)])
    with pytest.raises(KeyboardInterrupt):
        cut.fit(char_data, 5)
    resumed = char_trainer(tmp_path / "other")
    resumed.resume(tmp_path / "cut")
    assert resumed.step == 2
    resumed.fit(char_data, 5)
    assert [s["loss"] for s in resumed.history] == [s["loss"] for s in whole.history]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


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
                                 dict(checkpoint_every=5)])
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
