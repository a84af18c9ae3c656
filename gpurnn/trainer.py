"""Training loop: truncated BPTT (Williams & Peng), state carry, clipping, a NaN/Inf policy, callbacks,
a progress bar and exactly resumable checkpoints.

TBPTT(k1, k2) over a batch of T steps: after every k1 steps (and at the batch's end) one update, whose loss is
the mean over those (at most) k1 newest steps and whose gradient flows back k2 steps from the window's end
(never before the batch's start; the state there is carried, its gradient cut):
    window j: loss on [e_{j-1}, e_j),  backprop through [max(0, e_j - k2), e_j),  e_j = min(j k1, T)
k1 == k2 is the chunked case; k2 > k1 windows overlap and are recomputed from the state saved at their start,
with the parameters of the moment. k1 == k2 == T (or tbptt=None) is full BPTT over the batch.

The model protocol (the gpurnn models and recurrent layers): `out, state_n, ctx = model.forward(*inputs,
state=..., training=True)` (state only when TBPTT or stateful), `dx, dstate0 = model.backward(ctx, dout, dstate)`,
parameters in `model.modules()` (or the model itself when it is one module).

Every update is checked: a window whose loss or gradients are not finite takes no step, and a step that leaves a
parameter non-finite is undone (parameters and optimizer state restored from a copy taken before it). Under
nan_policy="skip" such windows are counted in `skipped`, and `max_nonfinite_in_row` of them in a row stop the run
with NonFiniteError naming the step and the likely cause; so no checkpoint ever holds NaN or Inf.

Data-parallel (distributed=gpurnn.distributed.DataParallel): every rank runs the same Trainer on its rows of each
batch; after backward, one allreduce gives every rank the whole batch's gradients and loss, whether any rank's
were not finite, and any rank's stop signal, so clipping, the update, its undo and stopping happen alike on every
rank. Checkpoints hold the whole batch's carried state (gathered from the ranks), and only rank 0 writes them.
"""
import math
import signal
import threading
import time

import numpy as np

from . import checkpoint
from .backend import array_module, to_host
from .checkpoint import CheckpointError
from .checks import NonFiniteError, positive_int
from .clip import clip_grad_norm, clip_grad_value

NAN_POLICIES = ("skip", "raise")
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")      # each saves after the batch in flight, then stops fit


class Interrupted(KeyboardInterrupt):
    """fit stopped by a signal (signum): after the batch in flight, with a checkpoint at `saved` (a path), or at
    once (saved None) on a second signal."""

    def __init__(self, signum, saved=None):
        super().__init__(signum, saved)
        self.signum, self.saved = signum, saved


class Callback:
    """Hooks the trainer calls; override any. `stats`/`info` are plain dicts."""

    def on_update(self, trainer, info):
        """After a window's gradients are computed and clipped, before the optimizer step."""

    def on_nonfinite(self, trainer, info):
        """A window whose loss or gradients hold NaN/Inf (skipped under nan_policy="skip")."""

    def on_step(self, trainer, stats):
        """After each batch: stats has step, loss, grad_norm, tokens, tokens_per_s, updates, skipped."""

    def on_checkpoint(self, trainer, path):
        """After a checkpoint was written to path."""


def parse_tbptt(value):
    """(k1, k2) from a pair or a "K1,K2" / "K" string; ValueError unless 1 <= k1 <= k2."""
    if isinstance(value, str):
        try:
            value = tuple(int(v) for v in value.split(","))
        except ValueError:
            raise ValueError(f"tbptt must be 'K1,K2' or 'K' with integers, got {value!r}") from None
        value = value * 2 if len(value) == 1 else value
    if not isinstance(value, (tuple, list)) or len(value) != 2 or \
            not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in value):
        raise ValueError(f"tbptt must be a pair of integers (k1, k2), got {value!r}")
    k1, k2 = int(value[0]), int(value[1])
    if not 1 <= k1 <= k2:
        raise ValueError(f"tbptt must satisfy 1 <= k1 <= k2, got k1={k1}, k2={k2}")
    return k1, k2


def windows(T, k1, k2):
    """(start, loss_from, end) of each TBPTT update over T steps."""
    ends = list(range(k1, T, k1)) + [T]
    return [(max(0, e - k2), prev, e) for prev, e in zip([0] + ends[:-1], ends)]


def map_state(fn, state):
    if state is None:
        return None
    return tuple(fn(s) for s in state) if isinstance(state, tuple) else fn(state)


def all_finite(state):
    parts = state if isinstance(state, tuple) else (state,)
    return all(bool(array_module(s).isfinite(s).all()) for s in parts)


def model_rng_state(model):
    """The generators of the model's modules (their dropout, zoneout and weight_drop masks), or None for a model
    without them."""
    return model.rng_state() if hasattr(model, "rng_state") else None


def config_differences(saved, mine):
    """The keys in which two model configs differ. A config from before the recurrent options (gpurnn.models.
    RNN_OPTIONS) holds their defaults; `memory` changes no result (checkpointed gradients are full ones bit for bit),
    so a run may resume under the other mode."""
    from .models import RNN_OPTIONS
    keys = (set(saved) | set(mine)) - {"memory"}
    return sorted(k for k in keys if saved.get(k, RNN_OPTIONS.get(k)) != mine.get(k, RNN_OPTIONS.get(k)))


class Trainer:
    """Trains `model` on batches from `data(step, rng) -> (inputs, target)`.

    inputs: an array, or a tuple of arrays passed to model.forward in order; target: what `loss` compares the
    output with. tbptt=(k1, k2) needs inputs and target with time on axis 0.
    stateful: carry the recurrent state from the end of one batch to the start of the next (gradient cut).
    clip_norm: rescale the gradients to this global L2 norm; clip_value: clamp every gradient value.
    nan_policy: "skip" (no update, counted in `skipped`) or "raise" (NonFiniteError, nothing changed);
    max_nonfinite_in_row: that many skipped windows in a row raise NonFiniteError (the run has diverged).
    progress: show a tqdm bar (None: only when stderr is a terminal).
    checkpoint_dir / checkpoint_every: where and how often (in steps) `fit` saves; it also saves at the end
    and, on SIGINT (Ctrl-C), SIGTERM or SIGHUP, after the batch in flight (then raises Interrupted, a
    KeyboardInterrupt). Each save keeps the one before as checkpoint.prev.npz.
    distributed: a gpurnn.distributed.DataParallel (see the module docstring); `data` then yields this rank's
    rows, fit, save and state_dict are collective (every rank calls them), and only rank 0 writes and shows
    progress.
    """

    def __init__(self, model, loss, optimizer, tbptt=None, stateful=False, clip_norm=None, clip_value=None,
                 nan_policy="skip", callbacks=(), progress=None, checkpoint_dir=None, checkpoint_every=0,
                 seed=0, max_nonfinite_in_row=10, distributed=None):
        self.tbptt = None if tbptt is None else parse_tbptt(tbptt)
        if clip_norm is not None and not (isinstance(clip_norm, (int, float)) and 0 < clip_norm < math.inf):
            raise ValueError(f"clip_norm must be a number > 0 or None, got {clip_norm!r}")
        if clip_value is not None and not (isinstance(clip_value, (int, float)) and 0 < clip_value < math.inf):
            raise ValueError(f"clip_value must be a number > 0 or None, got {clip_value!r}")
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {', '.join(map(repr, NAN_POLICIES))}; got {nan_policy!r}")
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be an integer >= 0 (0: only at the end), "
                             f"got {checkpoint_every!r}")
        if checkpoint_every and checkpoint_dir is None:
            raise ValueError("checkpoint_every needs a checkpoint_dir")
        self.max_nonfinite_in_row = positive_int(max_nonfinite_in_row, "max_nonfinite_in_row")
        callbacks = list(callbacks)
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self.modules = model.modules() if hasattr(model, "modules") else [model]
        self.stateful, self.clip_norm, self.clip_value = bool(stateful), clip_norm, clip_value
        self.nan_policy, self.callbacks, self.progress = nan_policy, callbacks, progress
        self.checkpoint_dir, self.checkpoint_every = checkpoint_dir, checkpoint_every
        self.rng = np.random.default_rng(seed)
        self.step = 0             # batches done: the data position
        self.updates = 0          # optimizer steps taken
        self.skipped = 0          # windows dropped for NaN/Inf
        self.nonfinite_in_row = 0
        self.state = None         # the carried recurrent state (stateful)
        self.history = []         # per batch: the stats dict of on_step
        self.extra = {}           # saved with every checkpoint (e.g. the command line's options)
        self.distributed = distributed
        self._interrupted = None  # the signal number this process received during fit
        self._agreed = None       # distributed: the signal some rank received, known to every rank

    def emit(self, hook, *args):
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(self, *args)

    def zero_grad(self):
        for m in self.modules:
            m.zero_grad()

    def train_batch(self, batch):
        """Run one batch (inputs, target[, forward kwargs]): one update per TBPTT window. Returns its stats."""
        if not isinstance(batch, tuple) or len(batch) not in (2, 3):
            raise TypeError("a batch must be a tuple (inputs, target) or (inputs, target, forward_kwargs)")
        inputs, target, kwargs = batch if len(batch) == 3 else batch + ({},)
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        if kwargs and self.tbptt is not None:
            raise ValueError("tbptt cannot slice forward keyword arguments (such as lengths); pass tbptt=None")
        t0 = time.perf_counter()
        state = self.state if self.stateful else None
        if self.tbptt is None:
            plan = [(0, 0, None)]
        else:
            if len(inputs) != 1 or inputs[0].shape[:1] != target.shape[:1]:
                raise ValueError("tbptt needs one input array and a target with the same steps on axis 0, "
                                 f"got {len(inputs)} inputs and target shape {tuple(target.shape)}")
            plan = windows(inputs[0].shape[0], *self.tbptt)
        losses, weights, norms, tokens = [], [], [], 0
        saved = {0: state}            # position -> state there (computed under the parameters of the moment)
        for j, (start, loss_from, end) in enumerate(plan):
            next_start = plan[j + 1][0] if j + 1 < len(plan) else end
            loss, norm, state_end, split_state, count = self.window(inputs, target, kwargs, saved[start], start,
                                                                    loss_from, end, next_start)
            tokens += count
            saved = {next_start: split_state, end: state_end}
            if loss is not None:
                losses.append(loss)
                weights.append(1 if end is None else end - loss_from)
                norms.append(norm)
        if self.stateful:
            final = saved[plan[-1][2]]
            self.state = None if final is None else map_state(lambda s: s.copy(), final)
        elapsed = time.perf_counter() - t0
        stats = dict(step=self.step + 1,
                     loss=float(np.average(losses, weights=weights)) if losses else math.nan,
                     grad_norm=max(norms) if norms else math.nan, tokens=tokens,
                     tokens_per_s=tokens / elapsed if elapsed > 0 else math.inf,
                     updates=self.updates, skipped=self.skipped)
        return stats

    def window(self, inputs, target, kwargs, state0, start, loss_from, end, split):
        """One update. Returns loss (None when skipped), pre-clip grad norm, the state at `end` and at `split`, and
        the number of targets its loss is the mean over (over all ranks)."""
        self.zero_grad()
        count = int(np.prod(target.shape if end is None else target[loss_from:end].shape))
        try:
            if end is None:       # whole batch, any model
                carry = {"state": state0} if self.stateful else {}
                out, state_n, ctx = self.model.forward(*inputs, **carry, **kwargs, training=True)
                loss, lctx = self.loss.forward(out, target)
                dout = self.loss.backward(lctx)
                self.model.backward(ctx, dout)
                split_state = state_n
            else:
                loss, state_n, split_state = self.truncated(inputs[0], target, state0, start, loss_from, end, split)
            finite, cause = math.isfinite(loss), ""
        except NonFiniteError as err:      # raised by a layer's checks: NaN/Inf in the data, a parameter or overflow
            loss, state_n, split_state, finite, cause = math.nan, None, None, False, f": {err}"
        if self.distributed is not None:
            loss, finite, count = self.allreduce(loss, finite, count)
        norm = clip_grad_norm(self.modules, self.clip_norm if self.clip_norm is not None else math.inf) \
            if finite else math.nan
        info = dict(step=self.step, update=self.updates, loss=loss, grad_norm=norm, window=(start, loss_from, end))
        if not (finite and math.isfinite(norm)):
            return self.nonfinite(info, "the loss or its gradients are not finite" + cause, state_n,
                                  split_state) + (count,)
        if self.clip_value is not None:
            clip_grad_value(self.modules, self.clip_value)
        self.emit("on_update", info)
        before = self.snapshot()
        with np.errstate(over="ignore", invalid="ignore"):        # checked right after, and undone if need be
            self.optimizer.step()
        if not self.parameters_finite():
            self.restore(before)
            return self.nonfinite(info, "the update made parameters non-finite (undone)", state_n,
                                  split_state) + (count,)
        self.updates += 1
        self.nonfinite_in_row = 0
        return loss, norm, state_n, split_state, count

    def allreduce(self, loss, finite, count):
        """Distributed: every rank's gradients replaced by the whole batch's (one allreduce, see
        gpurnn.distributed). Returns the whole batch's loss, whether every rank's loss and gradients were finite,
        and its number of targets; a stop signal any rank received is kept for stop_signal."""
        grads = [m.grads[k] for m in self.modules for k in m.params]
        agreed = self.distributed.allreduce_gradients(grads, count, loss, finite, self._interrupted)
        if self._agreed is None:
            self._agreed = agreed.signum
        return agreed.loss, agreed.finite, agreed.count

    def collective(self, error):
        """`error`, marked (when distributed) as raised by every rank at the same point."""
        return error if self.distributed is None else self.distributed.collective(error)

    def stop_signal(self):
        """The signal fit stops on: this process's, or, distributed, the first one any rank received (known to
        every rank at the same update, so all stop after the same batch)."""
        return self._interrupted if self.distributed is None else self._agreed

    def nonfinite(self, info, what, state_n, split_state):
        """A window that made no update: raise (policy "raise", or too many in a row) or count it and go on."""
        self.emit("on_nonfinite", info)
        self.nonfinite_in_row += 1
        start, _, end = info["window"]
        where = f"step {self.step + 1}" + (f", window t={start}..{end - 1}" if end is not None else "")
        values = f"loss {info['loss']:.4g}, gradient norm {info['grad_norm']:.4g}"
        self.zero_grad()
        if self.nan_policy == "raise":
            raise self.collective(NonFiniteError(f"{where}: {what} ({values}; nan_policy='raise')"))
        if self.nonfinite_in_row >= self.max_nonfinite_in_row:
            lr = getattr(self.optimizer, "lr", None)
            cause = "the learning rate" + (f" ({lr:g})" if isinstance(lr, (int, float)) else "")
            raise self.collective(NonFiniteError(
                f"{where}: {what} ({values}) in {self.nonfinite_in_row} updates in a row; stopped: {cause} is "
                f"likely too high" + ("" if "update" in what else ", or the data holds NaN/Inf")))
        self.skipped += 1
        keep = [s is not None and all_finite(s) for s in (state_n, split_state)]
        if self.distributed is not None:         # a state some rank drops, every rank drops, as one process would
            keep = self.distributed.all_ranks(keep)
        return None, info["grad_norm"], state_n if keep[0] else None, split_state if keep[1] else None

    def parameters(self):
        return [p for m in self.modules for p in m.params.values()]

    def parameters_finite(self):
        """True when every parameter is finite: one isfinite reduction per array, one host sync per device."""
        flags = {}
        for p in self.parameters():
            xp = array_module(p)
            flags.setdefault(xp, []).append(xp.isfinite(p).all())
        return all(bool(xp.stack(f).all()) for xp, f in flags.items())

    def snapshot(self):
        """Copies of the parameters and of the optimizer's buffers and step count, for `restore`."""
        opt = self.optimizer
        return ([p.copy() for p in self.parameters()],
                {buf: {k: a.copy() for k, a in arrays.items()} for buf, arrays in opt.state.items()},
                opt.step_count)

    def restore(self, snap):
        """Undo an optimizer step: parameters written back in place, the optimizer's state put back."""
        params, buffers, count = snap
        for p, saved in zip(self.parameters(), params):
            p[...] = saved
        self.optimizer.state, self.optimizer.step_count = buffers, count

    def truncated(self, x, y, state0, start, loss_from, end, split):
        """Forward [start, end) from state0 in pieces cut at `split`, loss on [loss_from, end), backward through
        all pieces (state gradients chained between them, cut at start). Returns loss, state at end and split."""
        cuts = [start] + ([split] if start < split < end else []) + [end]
        ctxs, outs, state = [], [], state0
        states = {start: state0}
        for a, b in zip(cuts[:-1], cuts[1:]):
            out, state, ctx = self.model.forward(x[a:b], state=state, training=True)
            outs.append(out)
            ctxs.append(ctx)
            states[b] = state
        xp = array_module(outs[0])
        out = xp.concatenate(outs) if len(outs) > 1 else outs[0]               # (end - start, B, ...)
        loss, lctx = self.loss.forward(out[loss_from - start:], y[loss_from:end])
        dout = xp.zeros_like(out)
        dout[loss_from - start:] = self.loss.backward(lctx)
        dstate = None
        for (a, b), ctx in reversed(list(zip(zip(cuts[:-1], cuts[1:]), ctxs))):
            _, dstate = self.model.backward(ctx, dout[a - start:b - start], dstate)
        return loss, state, states.get(split, state)

    def fit(self, data, steps):
        """Train until `steps` batches are done in all (so a resumed trainer continues to the same total)."""
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        if not callable(data):
            raise TypeError(f"data must be a callable data(step, rng) -> (inputs, target), got {type(data).__name__}")
        if self.distributed is not None:
            self.distributed.broadcast_parameters(self.parameters())
        bar = self.progress_bar(steps)
        previous = self.install_signal_handlers()
        last = None                   # (step, path) of this fit's latest checkpoint
        try:
            while self.step < steps and self.stop_signal() is None:
                stats = self.train_batch(data(self.step, self.rng))
                self.step += 1
                self.history.append(stats)
                self.emit("on_step", stats)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{stats['tokens_per_s']:.0f}", refresh=False)
                if self.checkpoint_every and self.step % self.checkpoint_every == 0 and self.stop_signal() is None:
                    last = (self.step, self.save())
            if self.checkpoint_dir is not None and (last is None or last[0] != self.step):
                last = (self.step, self.save())
            if self.stop_signal() is not None:
                raise self.collective(Interrupted(self.stop_signal(), last and last[1]))
        finally:
            if bar is not None:
                bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            self._interrupted = self._agreed = None
        return self.history

    def progress_bar(self, steps):
        import sys
        show = self.progress if self.progress is not None else sys.stderr.isatty()
        if not show or self.step >= steps or (self.distributed is not None and self.distributed.rank != 0):
            return None
        from tqdm import tqdm
        return tqdm(total=steps, initial=self.step, unit="step", dynamic_ncols=True)

    def install_signal_handlers(self):
        """The first SIGINT/SIGTERM/SIGHUP: finish the batch, save, raise Interrupted. A second one interrupts at
        once. Returns the previous handlers (none off the main thread, where signals cannot be caught)."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self._interrupted is not None:
                raise Interrupted(signum)
            self._interrupted = signum

        return {sig: signal.signal(sig, handler) for sig in
                (getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name))}

    def state_dict(self):
        """Everything needed to continue exactly: parameters, optimizer, RNGs (the trainer's, the sampler's and the
        model's modules', which draw dropout, zoneout and weight_drop masks), data position, carried state.
        Distributed: the whole batch's carried state, gathered from every rank (so every rank must call it), and no
        other per-rank state, so a run resumes on any number of ranks."""
        model = self.model
        state = self.state if self.distributed is None else self.distributed.gather_rows(self.state)
        sample_rng = getattr(model, "sample_rng", None)
        return dict(model_config=getattr(model, "config", {"kind": type(model).__name__}),
                    model=model.state_dict(), optimizer=self.optimizer.state_dict(),
                    trainer=dict(step=self.step, updates=self.updates, skipped=self.skipped,
                                 rng=self.rng.bit_generator.state, model_rng=model_rng_state(model),
                                 sample_rng=None if sample_rng is None else sample_rng.bit_generator.state,
                                 state=map_state(lambda s: to_host(s, copy=True), state),
                                 history=list(self.history), tbptt=self.tbptt, stateful=self.stateful))

    def load_state_dict(self, sd):
        """Restore a `state_dict()`. ValueError, one line, with nothing changed, when it is malformed (missing
        keys, negative counts, shapes that do not fit, NaN/Inf weights) or belongs to another kind of model."""
        problems = state_problems(sd)
        if problems:
            raise ValueError("not a usable trainer checkpoint: " + "; ".join(problems))
        mine = getattr(self.model, "config", {"kind": type(self.model).__name__})
        diff = config_differences(sd["model_config"], mine)
        if diff:
            raise ValueError(f"the checkpoint holds another model ({sd['model_config'].get('kind')}; differs in "
                             f"{', '.join(diff)}) than this one ({mine.get('kind')})")
        t = sd["trainer"]
        sample_rng = getattr(self.model, "sample_rng", None)
        for name, owner in (("rng", self.rng), ("sample_rng", sample_rng)):
            if owner is None or (name == "sample_rng" and t[name] is None):
                continue
            probe = type(owner.bit_generator)()
            try:
                probe.state = t[name]
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"trainer.{name} is not a {type(probe).__name__} state ({e})") from None
        carried = self.carried_state(t["state"])
        if self.distributed is not None:
            carried = self.distributed.local_rows(carried)          # this rank's rows of the whole batch's
        model_before, optimizer_before = self.model.state_dict(), self.optimizer.state_dict()
        try:
            self.model.load_state_dict(sd["model"])
            self.optimizer.load_state_dict(sd["optimizer"])
            if t.get("model_rng") is not None and model_rng_state(self.model) is not None:
                self.model.load_rng_state(t["model_rng"])      # dropout, zoneout and weight_drop masks go on alike
        except (TypeError, ValueError):
            self.model.load_state_dict(model_before)
            self.optimizer.load_state_dict(optimizer_before)
            raise
        self.step, self.updates, self.skipped = t["step"], t["updates"], t["skipped"]
        self.rng.bit_generator.state = t["rng"]
        if t["sample_rng"] is not None and sample_rng is not None:
            sample_rng.bit_generator.state = t["sample_rng"]
        self.state = carried
        self.history = list(t["history"])
        self.nonfinite_in_row = 0

    def carried_state(self, saved):
        """A saved carried state on the model's device, checked: finite, and (L*D, B, H) for the model's rnn."""
        if saved is None:
            return None
        parts = saved if isinstance(saved, tuple) else (saved,)
        if not all(isinstance(s, np.ndarray) and s.dtype.kind == "f" for s in parts):
            raise ValueError("trainer.state (the carried recurrent state) must be float arrays")
        rnn = getattr(self.model, "rnn", None)
        if rnn is not None:
            want = [(L, "batch", size) for L, _, size in rnn.state_shapes(0)]      # h (P wide), and c for the LSTMs
            if len(parts) != len(want) or \
                    any(s.ndim != 3 or (s.shape[0], s.shape[2]) != (w[0], w[2]) for s, w in zip(parts, want)):
                raise ValueError(f"trainer.state has shapes {[s.shape for s in parts]}, the model's state is "
                                 + " and ".join(f"({L}, batch, {size})" for L, _, size in want))
        if not all(np.isfinite(s).all() for s in parts):
            raise ValueError("trainer.state (the carried recurrent state) holds NaN or Inf")
        xp = self.model.xp if hasattr(self.model, "xp") else np
        return map_state(xp.asarray, saved)

    def checkpoint_path(self):
        return checkpoint.checkpoint_path(self.checkpoint_dir)

    def save(self, extra=None):
        """Write a checkpoint to checkpoint_dir atomically, keeping the one before; returns its path.
        NonFiniteError when a parameter is not finite; CheckpointError (saying which earlier checkpoint is
        intact) when the file cannot be written. Distributed: every rank calls it, rank 0 writes (the others
        return None)."""
        if self.checkpoint_dir is None:
            raise ValueError("this trainer has no checkpoint_dir")
        if not self.parameters_finite():
            raise self.collective(NonFiniteError(f"step {self.step}: not saving a checkpoint, the parameters are "
                                                 f"not finite"))
        payload = self.state_dict()
        if self.distributed is not None and self.distributed.rank != 0:
            return None
        payload["extra"] = dict(self.extra if extra is None else extra)
        try:
            path = checkpoint.save(self.checkpoint_dir, payload, keep_previous=True)
        except OSError as e:
            raise CheckpointError(f"could not write a checkpoint at step {self.step} in {self.checkpoint_dir} "
                                  f"({e.strerror or e}); {checkpoint.describe_intact(self.checkpoint_dir)}") \
                from None
        self.emit("on_checkpoint", path)
        return path

    def resume(self, path):
        """Load the checkpoint at `path` (file or folder) into this trainer; returns its `extra` dict.
        CheckpointError naming the file when it is unusable (nothing changed then)."""
        payload = checkpoint.load(path)
        try:
            self.load_state_dict(payload)
        except ValueError as e:
            raise CheckpointError(f"{checkpoint.checkpoint_path(path)}: {e}") from None
        return payload.get("extra", {})


def is_count(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0


def state_problems(sd):
    """What makes `sd` unusable as a Trainer.state_dict(): [] when nothing."""
    if not isinstance(sd, dict):
        return [f"expected a dict, got {type(sd).__name__}"]
    missing = [k for k in ("model_config", "model", "optimizer", "trainer") if not isinstance(sd.get(k), dict)]
    if missing:
        return [f"missing or malformed {', '.join(missing)}"]
    t = sd["trainer"]
    problems = [f"trainer.{k} missing" for k in ("step", "updates", "skipped", "rng", "sample_rng", "state",
                                                 "history") if k not in t]
    problems += [f"trainer.{k} must be an integer >= 0, got {t[k]!r}" for k in ("step", "updates", "skipped")
                 if k in t and not is_count(t[k])]
    if "history" in t and not (isinstance(t["history"], list) and all(isinstance(h, dict) for h in t["history"])):
        problems.append("trainer.history must be a list of dicts")
    bad = checkpoint.nonfinite_weights(sd["model"]) if all(hasattr(v, "dtype") for v in sd["model"].values()) \
        else ["(not arrays)"]
    if bad:
        problems.append(f"the checkpoint's weights are not finite or not arrays ({', '.join(bad[:3])})")
    return problems
