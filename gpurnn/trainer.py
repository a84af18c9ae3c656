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
"""
import math
import signal
import threading
import time

import numpy as np

from . import checkpoint
from .backend import array_module, to_host
from .checks import NonFiniteError
from .clip import clip_grad_norm, clip_grad_value

NAN_POLICIES = ("skip", "raise")


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


class Trainer:
    """Trains `model` on batches from `data(step, rng) -> (inputs, target)`.

    inputs: an array, or a tuple of arrays passed to model.forward in order; target: what `loss` compares the
    output with. tbptt=(k1, k2) needs inputs and target with time on axis 0.
    stateful: carry the recurrent state from the end of one batch to the start of the next (gradient cut).
    clip_norm: rescale the gradients to this global L2 norm; clip_value: clamp every gradient value.
    nan_policy: "skip" (no update, counted in `skipped`) or "raise" (NonFiniteError).
    progress: show a tqdm bar (None: only when stderr is a terminal).
    checkpoint_dir / checkpoint_every: where and how often (in steps) `fit` saves; it also saves at the end
    and, on Ctrl-C, after the batch in flight (then raises KeyboardInterrupt).
    """

    def __init__(self, model, loss, optimizer, tbptt=None, stateful=False, clip_norm=None, clip_value=None,
                 nan_policy="skip", callbacks=(), progress=None, checkpoint_dir=None, checkpoint_every=0,
                 seed=0):
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
        self.state = None         # the carried recurrent state (stateful)
        self.history = []         # per batch: the stats dict of on_step
        self.extra = {}           # saved with every checkpoint (e.g. the command line's options)
        self._interrupted = False

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
        losses, weights, norms = [], [], []
        saved = {0: state}            # position -> state there (computed under the parameters of the moment)
        for j, (start, loss_from, end) in enumerate(plan):
            next_start = plan[j + 1][0] if j + 1 < len(plan) else end
            loss, norm, state_end, split_state = self.window(inputs, target, kwargs, saved[start], start, loss_from,
                                                             end, next_start)
            saved = {next_start: split_state, end: state_end}
            if loss is not None:
                losses.append(loss)
                weights.append(1 if end is None else end - loss_from)
                norms.append(norm)
        if self.stateful:
            final = saved[plan[-1][2]]
            self.state = None if final is None else map_state(lambda s: s.copy(), final)
        elapsed = time.perf_counter() - t0
        tokens = int(np.prod(target.shape))
        stats = dict(step=self.step + 1,
                     loss=float(np.average(losses, weights=weights)) if losses else math.nan,
                     grad_norm=max(norms) if norms else math.nan, tokens=tokens,
                     tokens_per_s=tokens / elapsed if elapsed > 0 else math.inf,
                     updates=self.updates, skipped=self.skipped)
        return stats

    def window(self, inputs, target, kwargs, state0, start, loss_from, end, split):
        """One update. Returns loss (None when skipped), pre-clip grad norm, the state at `end` and at `split`."""
        self.zero_grad()
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
            finite, cause = math.isfinite(loss), None
        except NonFiniteError as err:
            loss, state_n, split_state, finite, cause = math.nan, None, None, False, err
        norm = clip_grad_norm(self.modules, self.clip_norm if self.clip_norm is not None else math.inf) \
            if finite else math.nan
        info = dict(step=self.step, update=self.updates, loss=loss, grad_norm=norm, window=(start, loss_from, end))
        if not (finite and math.isfinite(norm)):
            self.emit("on_nonfinite", info)
            if self.nan_policy == "raise":
                raise NonFiniteError(f"step {self.step}: loss {loss}, gradient norm {norm} (nan_policy='raise')"
                                     + (f": {cause}" if cause else "")) from cause
            self.skipped += 1
            self.zero_grad()
            keep = (lambda s: s if s is not None and all_finite(s) else None)
            return None, norm, keep(state_n), keep(split_state)
        if self.clip_value is not None:
            clip_grad_value(self.modules, self.clip_value)
        self.emit("on_update", info)
        self.optimizer.step()
        self.updates += 1
        return loss, norm, state_n, split_state

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
        bar = self.progress_bar(steps)
        previous = self.install_interrupt_handler()
        try:
            while self.step < steps:
                stats = self.train_batch(data(self.step, self.rng))
                self.step += 1
                self.history.append(stats)
                self.emit("on_step", stats)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{stats['tokens_per_s']:.0f}", refresh=False)
                if self._interrupted:
                    if self.checkpoint_dir is not None:
                        self.save()
                    raise KeyboardInterrupt
                if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                    self.save()
            if self.checkpoint_dir is not None:
                self.save()
        finally:
            if bar is not None:
                bar.close()
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            self._interrupted = False
        return self.history

    def progress_bar(self, steps):
        import sys
        show = self.progress if self.progress is not None else sys.stderr.isatty()
        if not show or self.step >= steps:
            return None
        from tqdm import tqdm
        return tqdm(total=steps, initial=self.step, unit="step", dynamic_ncols=True)

    def install_interrupt_handler(self):
        """First Ctrl-C: finish the batch, save, raise KeyboardInterrupt. A second one interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            if self._interrupted:
                raise KeyboardInterrupt
            self._interrupted = True

        return signal.signal(signal.SIGINT, handler)

    def state_dict(self):
        """Everything needed to continue exactly: parameters, optimizer, RNGs, data position, carried state."""
        model = self.model
        sample_rng = getattr(model, "sample_rng", None)
        return dict(model_config=getattr(model, "config", {"kind": type(model).__name__}),
                    model=model.state_dict(), optimizer=self.optimizer.state_dict(),
                    trainer=dict(step=self.step, updates=self.updates, skipped=self.skipped,
                                 rng=self.rng.bit_generator.state,
                                 sample_rng=None if sample_rng is None else sample_rng.bit_generator.state,
                                 state=map_state(lambda s: to_host(s, copy=True), self.state),
                                 history=list(self.history), tbptt=self.tbptt, stateful=self.stateful))

    def load_state_dict(self, sd):
        """Restore a `state_dict()`; ValueError (nothing changed) when it belongs to another kind of model."""
        if not isinstance(sd, dict) or not {"model_config", "model", "optimizer", "trainer"} <= sd.keys():
            raise ValueError("not a trainer checkpoint: expected keys model_config, model, optimizer, trainer")
        mine = getattr(self.model, "config", {"kind": type(self.model).__name__})
        if sd["model_config"] != mine:
            diff = sorted(k for k in set(mine) | set(sd["model_config"]) if mine.get(k) != sd["model_config"].get(k))
            raise ValueError(f"the checkpoint holds another model ({sd['model_config'].get('kind')}; differs in "
                             f"{', '.join(diff)}) than this one ({mine.get('kind')})")
        self.model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])
        t = sd["trainer"]
        self.step, self.updates, self.skipped = t["step"], t["updates"], t["skipped"]
        self.rng.bit_generator.state = t["rng"]
        if t["sample_rng"] is not None and hasattr(self.model, "sample_rng"):
            self.model.sample_rng.bit_generator.state = t["sample_rng"]
        xp = self.model.xp if hasattr(self.model, "xp") else np
        self.state = map_state(xp.asarray, t["state"])
        self.history = list(t["history"])

    def save(self, extra=None):
        """Write a checkpoint to checkpoint_dir atomically; returns its path."""
        if self.checkpoint_dir is None:
            raise ValueError("this trainer has no checkpoint_dir")
        payload = self.state_dict()
        payload["extra"] = dict(self.extra if extra is None else extra)
        path = checkpoint.save(self.checkpoint_dir, payload)
        self.emit("on_checkpoint", path)
        return path

    def resume(self, path):
        """Load the checkpoint at `path` (file or directory) into this trainer; returns its `extra` dict."""
        payload = checkpoint.load(path)
        self.load_state_dict(payload)
        return payload.get("extra", {})
