"""The data-parallel cases of tests/test_distributed.py: small float64 models trained by Trainer, either on the whole
batch in one process (`run(name)`, the reference) or on each rank's rows of it
(`mpiexec -n N python tests/distributed_cases.py OUT.npz`: every case, rank 0 writing the results to OUT.npz).

Every rank draws the same global batch from the trainer's seeded rng and takes its rows (DataParallel.shard), so the
two runs see the same data; only the gradient's summation order differs."""
import sys

import numpy as np

from gpurnn import models, nn, optim
from gpurnn.checks import NonFiniteError
from gpurnn.trainer import Callback, Trainer

T, I, H, O = 10, 3, 7, 4
CLIP = 1e-3                       # below every gradient norm here: clipping acts on every update

# cell, optimizer, batches, global batch B, TBPTT and carried state, a NaN at this batch (in the last row), the
# nan_policy
CASES = {
    "lstm_sgd_1": dict(cell="lstm", opt="sgd", steps=1, batch=6),
    "gru_sgd_1": dict(cell="gru", opt="sgd", steps=1, batch=6),
    "lstm_adam_20": dict(cell="lstm", opt="adam", steps=20, batch=6, tbptt=True),
    "gru_adam_20": dict(cell="gru", opt="adam", steps=20, batch=6, tbptt=True),
    "gru_adam_uneven": dict(cell="gru", opt="adam", steps=4, batch=5, tbptt=True),
    "lstm_nan_skip": dict(cell="lstm", opt="adam", steps=4, batch=6, tbptt=True, nan_at=1),
    "lstm_nan_raise": dict(cell="lstm", opt="adam", steps=4, batch=6, tbptt=True, nan_at=2, nan_policy="raise"),
    "classifier_lengths": dict(cell="gru", opt="adam", steps=4, batch=7, classifier=True),
}


class Norms(Callback):
    """The pre-clip gradient norm of every update (the whole batch's, after the allreduce)."""

    def __init__(self):
        self.norms = []

    def on_update(self, trainer, info):
        self.norms.append(info["grad_norm"])


def tagger_data(batch, nan_at=None):
    def data(step, rng):
        x = rng.standard_normal((T, batch, I))                                    # (T, B, I)
        y = rng.integers(0, O, (T, batch))                                        # (T, B)
        if step == nan_at:
            x[3, batch - 1, 0] = np.nan
        return x, y
    return data


def classifier_data(batch):
    def data(step, rng):
        x = rng.standard_normal((T, batch, I))                                    # (T, B, I)
        lengths = rng.integers(1, T + 1, batch)                                   # (B,)
        return x, x[0, :, :1] * 2 + lengths[:, None] / T, {"lengths": lengths}    # y (B, 1)
    return data


def run(name, group=None):
    """Train case `name` (on this rank's rows when group is a DataParallel). Returns its parameters, losses,
    pre-clip norms, skipped windows, targets per batch, the batch rows this process read and the step at which
    NonFiniteError stopped it (-1: none)."""
    c = CASES[name]
    norms = Norms()
    if c.get("classifier"):
        model = models.Classifier(I, H, 1, cell=c["cell"], num_layers=2, dtype="float64", seed=1)
        loss, data, axes, extra = nn.MSELoss(), classifier_data(c["batch"]), (1, 0), {}
    else:
        model = models.Tagger(I, H, O, cell=c["cell"], num_layers=2, dtype="float64", seed=1)
        loss, data, axes = nn.SoftmaxCrossEntropy(), tagger_data(c["batch"], c.get("nan_at")), (1, 1)
        extra = dict(tbptt=(4, 6), stateful=True) if c.get("tbptt") else {}
    opt = optim.SGD(model, lr=0.5) if c["opt"] == "sgd" else optim.Adam(model, lr=0.01)
    trainer = Trainer(model, loss, opt, clip_norm=CLIP, seed=3, callbacks=[norms], distributed=group,
                      nan_policy=c.get("nan_policy", "skip"), **extra)
    local, rows = data if group is None else group.shard(data, axes), []

    def counted(step, rng):
        batch = local(step, rng)
        rows.append(batch[0].shape[1])
        return batch
    stopped = -1
    try:
        trainer.fit(counted, c["steps"])
    except NonFiniteError as e:
        stopped = trainer.step
        if group is not None:
            assert group.is_collective(e), "a NonFiniteError of the trainer is every rank's"
    params = np.concatenate([p.data.ravel() for p in model.parameters()])
    return dict(params=params, loss=np.array([s["loss"] for s in trainer.history]), norms=np.array(norms.norms),
                skipped=np.array(trainer.skipped), tokens=np.array([s["tokens"] for s in trainer.history]),
                rows=np.array(rows), stopped=np.array(stopped))


def main(out):
    from gpurnn.distributed import DataParallel
    group = DataParallel()
    results = {}
    for name in CASES:
        result = run(name, group)
        everyone = group.comm.allgather(result)
        result["rank_spread"] = np.array(max(np.abs(r["params"] - result["params"]).max() for r in everyone))
        result["rank_rows"] = np.array([r["rows"] for r in everyone])                 # (ranks, batches)
        result["rank_stopped"] = np.array([r["stopped"] for r in everyone])
        results.update({f"{name}.{k}": v for k, v in result.items()})
    if group.is_root:
        np.savez(out, **results)


if __name__ == "__main__":
    main(sys.argv[1])
