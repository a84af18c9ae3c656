"""Sequential: modules run in order, each one's output the next one's input (Embedding -> LSTM -> Linear ...),
with the stateful protocol of the recurrent layers, so a chain trains like a model.

    y, state_n, ctx = seq.forward(x, state=None, lengths=None, training=None)
    dx, dstate0 = seq.backward(ctx, dy, dstate=None)

Stateful children (recurrent layers, nested Sequentials) get `lengths` and their part of `state`; the other
blocks (Linear, Dropout, Embedding) act on every position alike. `state` (and `dstate`, and what comes back) is
the recurrent child's own state when there is one, a list with one entry per recurrent child when there are
several, and None when there is none. An Embedding (its input takes no gradient) may only come first.
"""
from dataclasses import dataclass

from . import checks
from .module import Module


@dataclass
class ChainCtx:
    """What a chain's forward leaves for its backward: one ctx per module, in order."""
    owner: object
    ctxs: list


def chain_forward(blocks, x, states, lengths, training):
    """Run `blocks` in order: y, [state_n of each stateful block], [ctx of each block]."""
    states = iter(states)
    states_n, ctxs = [], []
    for m in blocks:
        if m.stateful:
            x, state_n, ctx = m.forward(x, next(states), lengths, training=training)
            states_n.append(state_n)
        else:
            x, ctx = m.forward(x, training=training)
        ctxs.append(ctx)
    return x, states_n, ctxs


def chain_backward(blocks, ctxs, dy, dstates):
    """Backward of chain_forward: dx (None when the first block takes ids), [dstate0 of each stateful block]."""
    dstates = list(dstates)
    dstates0 = []
    for m, ctx in reversed(list(zip(blocks, ctxs))):
        if m.stateful:
            dy, dstate0 = m.backward(ctx, dy, dstates.pop())
            dstates0.append(dstate0)
        else:
            dy = m.backward(ctx, dy)
    return dy, dstates0[::-1]


class Sequential(Module):
    """Sequential(m0, m1, ...) or Sequential({"name": m, ...}): children named "0", "1", ... or as given."""
    stateful = True

    def __init__(self, *modules):
        named = list(modules[0].items()) if len(modules) == 1 and isinstance(modules[0], dict) else \
            [(str(i), m) for i, m in enumerate(modules)]
        if not named:
            raise ValueError("Sequential needs at least one module")
        for i, (name, m) in enumerate(named):
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"Sequential's module names must be non-empty strings without '.', got {name!r}")
            if not isinstance(m, Module):
                raise TypeError(f"Sequential's module {name!r} must be a gpurnn Module, got {type(m).__name__}")
            if i and not getattr(m, "input_grad", True):
                raise ValueError(f"Sequential's module {name!r} ({type(m).__name__}) takes ids, so it can only come "
                                 "first")
        super().__init__()
        for name, m in named:
            setattr(self, name, m)

    @property
    def config(self):
        return {"kind": "Sequential", "modules": [[name, m.config] for name, m in self._modules.items()]}

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, index):
        return list(self._modules.values())[index]

    def split(self, state, name):
        """`state` as one entry per stateful child."""
        n = sum(m.stateful for m in self._modules.values())
        if n == 1:
            return [state]
        if state is None:
            return [None] * n
        if n == 0:
            raise ValueError(f"{name} must be None: this Sequential has no recurrent module")
        if not isinstance(state, list) or len(state) != n:
            raise TypeError(f"{name} must be a list with one entry per recurrent module ({n}), "
                            f"got {type(state).__name__}")
        return state

    @staticmethod
    def join(states):
        return states[0] if len(states) == 1 else (states or None)

    def forward(self, x, state=None, lengths=None, training=None):
        """y, state_n, ctx."""
        training = self.is_training(training)
        states = self.split(state, "state")
        if lengths is not None and not any(m.stateful for m in self._modules.values()):
            raise ValueError("lengths needs a recurrent module in the Sequential")
        y, states_n, ctxs = chain_forward(list(self._modules.values()), x, states, lengths, training)
        return y, self.join(states_n), (ChainCtx(self, ctxs) if training else None)

    def backward(self, ctx, dy, dstate=None):
        """dx (None when the first module takes ids), dstate0."""
        ctxs = checks.check_ctx(ctx, self, ChainCtx).ctxs
        dx, dstates0 = chain_backward(list(self._modules.values()), ctxs, dy, self.split(dstate, "dstate"))
        return dx, self.join(dstates0)
