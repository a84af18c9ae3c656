"""Small sequence models built from the layers: many-to-many (Tagger, CharLM), many-to-one (Classifier),
one-to-many (Generator) and encoder-decoder (Seq2Seq), and `build_model(config)` for every module kind.

Every model is a Module in the layers' style: `out, state_n, ctx = model(x, ..., training=None)` and
`dx, dstate0 = model.backward(ctx, dout, dstate=None)` (gradients accumulate into each sub-module's `grads`).
Its parts are children (`model.rnn`, `model.head`, ...), so `named_parameters()` gives "rnn.weight_ih_l0" and
`state_dict()` / `load_state_dict()` cover all of them; `config` is the dict `build_model(config)` turns back
into the same model (a checkpoint stores it).
dropout=p: on the embedding's output, between stacked recurrent layers and on the recurrent output before the
head (the recipe of PyTorch's word language model), in training only. cell: "lstm", "gru", "lnlstm"
(LayerNormLSTM), "lngru" (LayerNormGRU), "rnn_tanh" | "rnn_relu" | "rnn_sigmoid"; zoneout, weight_drop, proj_size
(the LSTMs) and memory go to the recurrent layer(s) (see gpurnn.layers).
Time-major shapes: x (T, B, I) or ids (T, B) ((B, T, ...) with batch_first); state as the recurrent layer's
(h, or (h, c) for the LSTM).
A model's ctx serves one backward unless forward had `retain=True` (its parts' ctxs are retained, so the model's
own ctx counts); a backward that raised leaves it usable, though the parts it had run may have added to their
`grads` (the trainer zeroes them after a failed window).
"""
import inspect

import numpy as np

from . import checks
from .backend import to_host
from .layers import GRU, LSTM, RNN, JordanRNN, LayerNormGRU, LayerNormLSTM
from .module import Module
from .nn import Dropout, Embedding, Linear, SavedCtx, saved
from .sequential import Sequential, chain_backward, chain_forward, retained

RNN_CELLS = ("lstm", "gru", "lnlstm", "lngru", "rnn_tanh", "rnn_relu", "rnn_sigmoid")
LAYERS = {"lstm": LSTM, "gru": GRU, "lnlstm": LayerNormLSTM, "lngru": LayerNormGRU}
RNN_OPTIONS = dict(zoneout=0.0, weight_drop=0.0, proj_size=0, memory="full")   # the recurrent layer's, with defaults


def make_rnn(cell, input_size, hidden_size, num_layers, dropout, dtype, backend, seed, batch_first=False, **options):
    """The recurrent layer for a cell name: "lstm", "gru", "lnlstm" (LayerNormLSTM), "lngru" (LayerNormGRU) or
    "rnn_<tanh|relu|sigmoid>". options: the layer's zoneout, weight_drop, proj_size (LSTMs), memory."""
    kwargs = dict(num_layers=num_layers, dropout=dropout if num_layers > 1 else 0.0, batch_first=batch_first,
                  dtype=dtype, backend=backend, seed=seed, **{k: v for k, v in options.items() if v != RNN_OPTIONS[k]})
    if cell.startswith("rnn_"):
        return RNN(input_size, hidden_size, nonlinearity=cell[4:], **kwargs)
    return LAYERS[cell](input_size, hidden_size, **kwargs)


def rnn_options(cell, zoneout, weight_drop, proj_size, memory):
    """The recurrent options of a model's config, checked (as the layer would, before anything is built)."""
    lstm = is_lstm(cell)
    if lstm and isinstance(zoneout, (tuple, list)):
        if len(zoneout) != 2:
            raise ValueError(f"zoneout must be a number or a pair (p_h, p_c), got {zoneout!r}")
        zoneout = [checks.number(p, f"zoneout[{k}]", 0.0, 1.0, high_open=True) for k, p in enumerate(zoneout)]
    else:
        zoneout = checks.number(zoneout, "zoneout", 0.0, 1.0, high_open=True)
    proj_size = checks.positive_int(proj_size, "proj_size", minimum=0)
    if proj_size and not lstm:
        raise ValueError(f"proj_size is an LSTM option (cell 'lstm' or 'lnlstm'), got cell {cell!r}")
    return dict(zoneout=zoneout, weight_drop=checks.number(weight_drop, "weight_drop", 0.0, 1.0, high_open=True),
                proj_size=proj_size, memory=checks.choice(memory, "memory", ("full", "checkpoint")))


def rnn_kwargs(zoneout, weight_drop, proj_size, memory):
    return dict(zoneout=zoneout, weight_drop=weight_drop, proj_size=proj_size, memory=memory)


def is_lstm(cell):
    return cell in ("lstm", "lnlstm")


def sub_seeds(seed, n):
    """n independent integer seeds from one (random ones when seed is None)."""
    return [int(s) for s in np.random.SeedSequence(checks.seed(seed)).generate_state(n)]


def model_config(kind, sizes, cell, num_layers, dropout, dtype, options, **extra):
    """The validated config of a model: sizes (name -> positive int, or None where allowed), the recurrent layer's
    options (RNN_OPTIONS) and the rest."""
    config = {"kind": kind}
    for name, (value, optional) in sizes.items():
        config[name] = None if (optional and value is None) else checks.positive_int(value, name)
    config.update(cell=checks.choice(cell, "cell", RNN_CELLS), num_layers=checks.positive_int(num_layers, "num_layers"),
                  dropout=checks.number(dropout, "dropout", 0.0, 1.0), dtype=checks.float_dtype(dtype).name)
    config.update(rnn_options(cell, **options))
    config.update(extra)
    return config


def check_ids(ids, name, batch_first=False):
    """ids must be a 2-D integer array, (T, B) or (B, T) with batch_first."""
    shape = np.shape(ids) if isinstance(ids, (list, tuple)) else tuple(getattr(ids, "shape", ()))
    if len(shape) != 2:
        want = "(B, T) (batch, time)" if batch_first else "(T, B) (time, batch)"
        raise ValueError(f"{name} must be token ids of shape {want}, got shape {shape}; "
                         "for one sequence use ids[:, None]" + ("" if not batch_first else ".T"))


class SequenceModel(Module):
    """Named parts (children) plus the config that rebuilds the model."""
    stateful = True

    def __init__(self, config, parts):
        super().__init__()
        self._config = config
        for name, m in parts.items():
            setattr(self, name, m)

    @property
    def config(self):
        return dict(self._config)

    @property
    def parts(self):
        """name -> sub-module, in order."""
        return self._modules

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self._config.items() if k not in ("kind", "vocab") and
                         (k not in RNN_OPTIONS or v != RNN_OPTIONS[k]))
        return f"{type(self).__name__}({args})"

    def recurrent_blocks(self, embedding="embedding", rnn="rnn"):
        """[embedding, dropout] (when there is an embedding), then the recurrent layer."""
        parts = self._modules
        drop = [parts["dropout"]] if "dropout" in parts else []
        return ([parts[embedding]] + drop if embedding in parts else []) + [parts[rnn]]

    def head_blocks(self):
        """[dropout], then the head."""
        parts = self._modules
        return ([parts["dropout"]] if "dropout" in parts else []) + [parts["head"]]


def lstm_state(rnn, h, xp):
    """The layer's state for an initial h (L, B, P): h, or (h, zeros (L, B, H)) for the LSTMs."""
    return (h, xp.zeros(h.shape[:2] + (rnn.hidden_size,), h.dtype)) if rnn.cell == "lstm" else h


def state_h(state):
    return state[0] if isinstance(state, tuple) else state


def build_stack(config, backend, seed):
    """[embedding ->] rnn -> head [, dropout], as named parts (seeds as before dropout existed)."""
    s = sub_seeds(seed, 5)
    c = config
    dtype, parts = c["dtype"], {}
    rnn_in = c["input_size"]
    if c["embedding_dim"] is not None:
        parts["embedding"] = Embedding(c["input_size"], c["embedding_dim"], dtype=dtype, seed=s[0])
        rnn_in = c["embedding_dim"]
    parts["rnn"] = make_rnn(c["cell"], rnn_in, c["hidden_size"], c["num_layers"], c["dropout"], dtype, backend,
                            s[1], c.get("batch_first", False), **{k: c.get(k, v) for k, v in RNN_OPTIONS.items()})
    parts["head"] = Linear(parts["rnn"].state_size, c["output_size"], dtype=dtype, seed=s[2])
    if c["dropout"]:
        parts["dropout"] = Dropout(c["dropout"], seed=s[4])
    return parts


class Tagger(SequenceModel):
    """Many-to-many: a score vector per step. x (T, B, input_size) floats, or ids (T, B) when embedding_dim is
    given (input_size is then the vocabulary size). out (T, B, output_size); (B, T, ...) with batch_first."""

    def __init__(self, input_size, hidden_size, output_size, cell="lstm", num_layers=1, embedding_dim=None,
                 dropout=0.0, batch_first=False, dtype="float32", backend="auto", seed=None, zoneout=0.0,
                 weight_drop=0.0, proj_size=0, memory="full"):
        config = model_config(type(self).__name__, dict(input_size=(input_size, False),
                              hidden_size=(hidden_size, False), output_size=(output_size, False),
                              embedding_dim=(embedding_dim, True)), cell, num_layers, dropout, dtype,
                              rnn_kwargs(zoneout, weight_drop, proj_size, memory),
                              batch_first=checks.flag(batch_first, "batch_first"))
        super().__init__(config, build_stack(config, backend, seed))

    def blocks(self):
        return self.recurrent_blocks() + self.head_blocks()

    def forward(self, x, state=None, lengths=None, training=None, retain=False):
        """out (T, B, O), state_n, ctx."""
        training = self.is_training(training)
        if "embedding" in self._modules:
            check_ids(x, "x", self._config.get("batch_first", False))
        out, (state_n,), ctxs = chain_forward(self.blocks(), x, [state], lengths, training)
        return out, state_n, (SavedCtx(self, ctxs, retain) if training else None)

    @checks.consumes_ctx
    def backward(self, ctx, dout, dstate=None):
        """dx (None for ids), dstate0. dout: (T, B, O)."""
        dx, (dstate0,) = chain_backward(self.blocks(), saved(ctx, self), dout, [dstate])
        return dx, dstate0


def rollout(blocks, token, state, steps, choose):
    """Feed each chosen token back in: `steps` ids (steps, B). token (B,) starts it; choose(logits (B, O)) -> ids."""
    out = []
    for _ in range(steps):
        logits, (state,), _ = chain_forward(blocks, token[None], [state], None, False)
        token = choose(logits[-1])
        out.append(token)
    return blocks[-1].xp.stack(out), state


def greedy(logits):
    return logits.argmax(axis=-1)


class CharLM(Tagger):
    """Character language model: Embedding -> stacked RNN/LSTM/GRU -> Linear, predicting the next character.

    vocab: the characters, in id order (a str). forward(ids (T, B)) -> logits (T, B, len(vocab)).
    """

    def __init__(self, vocab, hidden_size=256, num_layers=1, cell="lstm", embedding_dim=64, dropout=0.0,
                 dtype="float32", backend="auto", seed=None, zoneout=0.0,
                 weight_drop=0.0, proj_size=0, memory="full"):
        if not isinstance(vocab, str) or len(vocab) < 2 or len(set(vocab)) != len(vocab):
            raise ValueError(f"vocab must be a str of at least 2 distinct characters, got {vocab!r:.60}")
        super().__init__(len(vocab), hidden_size, len(vocab), cell, num_layers, embedding_dim, dropout,
                         dtype=dtype, backend=backend, seed=seed, zoneout=zoneout, weight_drop=weight_drop,
                         proj_size=proj_size, memory=memory)
        c = self._config
        self._config = dict(kind="CharLM", vocab=vocab, hidden_size=c["hidden_size"], num_layers=c["num_layers"],
                            cell=c["cell"], embedding_dim=c["embedding_dim"], dropout=c["dropout"], dtype=c["dtype"],
                            **{k: c[k] for k in RNN_OPTIONS})
        self.vocab = vocab
        self.index = {ch: i for i, ch in enumerate(vocab)}
        self.sample_rng = np.random.default_rng(sub_seeds(seed, 4)[3])

    def encode(self, text):
        """ids (N,) int64 for the characters of text; ValueError naming characters outside the vocabulary."""
        unknown = sorted(set(text) - set(self.index))
        if unknown:
            raise ValueError(f"text holds characters outside the model's vocabulary: {''.join(unknown)[:20]!r}")
        return np.fromiter((self.index[ch] for ch in text), dtype=np.int64, count=len(text))

    def decode(self, ids):
        return "".join(self.vocab[int(i)] for i in np.asarray(ids).ravel())

    def sample(self, n, temperature=1.0, prime="", seed=None):
        """n characters drawn one at a time from softmax(logits / temperature), after reading `prime`.

        Draws from the model's own `sample_rng` unless `seed` is given."""
        n = checks.positive_int(n, "n", minimum=0)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        if not isinstance(prime, str):
            raise TypeError(f"prime must be a str, got {type(prime).__name__}")
        prime_ids = self.encode(prime)
        rng = self.sample_rng if seed is None else np.random.default_rng(checks.seed(seed))
        xp = self.xp

        def draw(logits):                                             # (1, V) -> (1,)
            z = to_host(logits).astype(np.float64)[0] / temperature
            p = np.exp(z - z.max())
            return xp.asarray([rng.choice(len(p), p=p / p.sum())])

        state = None
        token = xp.asarray([int(rng.integers(len(self.vocab)))])
        if len(prime_ids) > 1:
            _, state, _ = self.forward(xp.asarray(prime_ids[:-1, None]), training=False)
        if len(prime_ids):
            token = xp.asarray(prime_ids[-1:])
        if n == 0:
            return ""
        ids, _ = rollout(self.blocks(), token, state, n, draw)
        return self.decode(to_host(ids))


class Classifier(SequenceModel):
    """Many-to-one: scores (B, output_size) from each sequence's last valid step (under `lengths`).

    x (T, B, input_size) floats, or ids (T, B) when embedding_dim is given ((B, T, ...) with batch_first). The
    scores are class logits or, with MSELoss, regression values."""

    def __init__(self, input_size, hidden_size, output_size, cell="lstm", num_layers=1, embedding_dim=None,
                 dropout=0.0, batch_first=False, dtype="float32", backend="auto", seed=None, zoneout=0.0,
                 weight_drop=0.0, proj_size=0, memory="full"):
        config = model_config("Classifier", dict(input_size=(input_size, False), hidden_size=(hidden_size, False),
                              output_size=(output_size, False), embedding_dim=(embedding_dim, True)),
                              cell, num_layers, dropout, dtype, rnn_kwargs(zoneout, weight_drop, proj_size, memory),
                              batch_first=checks.flag(batch_first, "batch_first"))
        super().__init__(config, build_stack(config, backend, seed))

    def forward(self, x, state=None, lengths=None, training=None, retain=False):
        """out (B, O), state_n, ctx."""
        training = self.is_training(training)
        batch_first = self._config["batch_first"]
        if "embedding" in self._modules:
            check_ids(x, "x", batch_first)
        xp = self.xp
        y, (state_n,), rctxs = chain_forward(self.recurrent_blocks(), x, [state], lengths, training)  # (T, B, H)
        T, B = (y.shape[1], y.shape[0]) if batch_first else y.shape[:2]
        last = xp.full(B, T - 1) if lengths is None else xp.asarray(lengths).astype(np.int64) - 1   # (B,)
        rows = (xp.arange(B), last) if batch_first else (last, xp.arange(B))
        out, _, hctxs = chain_forward(self.head_blocks(), y[rows], [], None, training)             # (B, O)
        return out, state_n, (SavedCtx(self, (rctxs, hctxs, rows, y.shape), retain) if training else None)

    @checks.consumes_ctx
    def backward(self, ctx, dout, dstate=None):
        """dx (None for ids), dstate0. dout: (B, O)."""
        rctxs, hctxs, rows, shape = saved(ctx, self)
        dlast, _ = chain_backward(self.head_blocks(), hctxs, dout, [])          # (B, H)
        dy = self.xp.zeros(shape, self.dtype)                                  # (T, B, H): only last steps
        dy[rows] = dlast
        dx, (dstate0,) = chain_backward(self.recurrent_blocks(), rctxs, dy, [dstate])
        return dx, dstate0


class Decoder:
    """Teacher-forced token decoder shared by Generator and Seq2Seq: parts "embedding" (vocab + 1 rows, the last
    the start token), "rnn", "head" (and "dropout"). Step t reads token t-1 of the target (the start token at
    t = 0)."""

    def __init__(self, model, vocab_size, name):
        self.model, self.start, self.name = model, vocab_size, name

    def blocks(self):
        return self.model.recurrent_blocks() + self.model.head_blocks()

    def inputs(self, targets):
        """(T, B) ids: start, then targets[:-1], with padding (negative ids) read as the start token."""
        check_ids(targets, self.name)
        xp = self.model.xp
        targets = xp.asarray(targets)
        if targets.dtype.kind not in "iu":
            raise TypeError(f"{self.name} must hold integer ids, got dtype {targets.dtype.name}")
        if targets.size and int(targets.max()) >= self.start:
            raise ValueError(f"{self.name} must hold ids in 0..{self.start - 1} (negative for padding), "
                             f"got {int(targets.max())}")
        prev = xp.concatenate([xp.full((1,) + targets.shape[1:], self.start, targets.dtype), targets[:-1]])
        return xp.where(prev < 0, self.start, prev)

    def forward(self, inputs, state0, training):
        """logits, state_n, ctxs for inputs(targets)."""
        out, (state_n,), ctxs = chain_forward(self.blocks(), inputs, [state0], None, training)
        return out, state_n, ctxs

    def backward(self, ctxs, dout, dstate):
        return chain_backward(self.blocks(), ctxs, dout, [dstate])[1][0]

    def greedy(self, state0, batch, steps):
        xp = self.model.xp
        return rollout(self.blocks(), xp.full(batch, self.start), state0, steps, greedy)[0]


def decoder_parts(config, vocab_size, backend, seed):
    """A decoder's parts over vocab_size for a model's config (its cell, sizes and recurrent options)."""
    c = config
    return build_stack(dict(c, input_size=vocab_size + 1, output_size=vocab_size), backend, seed)


class Generator(SequenceModel):
    """One-to-many: a vector v (B, input_size) sets the initial state h0 = tanh(v W^T + b) of every layer; the
    decoder then emits ids over vocab_size, reading its previous token (the target's in training, its own
    choice at inference). forward(v, targets (T, B)) -> logits (T, B, vocab_size); targets < 0 are padding."""

    def __init__(self, input_size, hidden_size, vocab_size, cell="lstm", num_layers=1, embedding_dim=16,
                 dropout=0.0, dtype="float32", backend="auto", seed=None, zoneout=0.0,
                 weight_drop=0.0, proj_size=0, memory="full"):
        c = model_config("Generator", dict(input_size=(input_size, False), hidden_size=(hidden_size, False),
                         vocab_size=(vocab_size, False), embedding_dim=(embedding_dim, False)),
                         cell, num_layers, dropout, dtype, rnn_kwargs(zoneout, weight_drop, proj_size, memory))
        s = sub_seeds(seed, 2)
        P = c["proj_size"] or c["hidden_size"]
        parts = {"init": Linear(c["input_size"], c["num_layers"] * P, dtype=dtype, seed=s[0])}
        parts.update(decoder_parts(c, c["vocab_size"], backend, s[1]))
        super().__init__(c, parts)
        self.decoder = Decoder(self, c["vocab_size"], "targets")

    def initial_state(self, v, training):
        """state0 from v (B, I): h0 (L, B, P) = tanh(v W^T + b), c0 = 0 (P = proj_size or hidden_size)."""
        L, P = self.rnn.num_layers, self.rnn.state_size
        pre, ictx = self.parts["init"].forward(v, training=training)            # (B, L*P)
        retained(ictx)
        h0 = self.xp.ascontiguousarray(self.xp.tanh(pre).reshape(-1, L, P).transpose(1, 0, 2))   # (L, B, P)
        return lstm_state(self.rnn, h0, self.xp), (ictx, h0)

    def forward(self, v, targets, training=None, retain=False):
        """logits (T, B, vocab_size), state_n, ctx."""
        training = self.is_training(training)
        inputs = self.decoder.inputs(targets)
        state0, ictx = self.initial_state(v, training)
        out, state_n, dctxs = self.decoder.forward(inputs, state0, training)
        return out, state_n, (SavedCtx(self, (ictx, dctxs), retain) if training else None)

    @checks.consumes_ctx
    def backward(self, ctx, dout, dstate=None):
        """dv (B, I), None. dout: (T, B, vocab_size)."""
        (ictx, h0), dctxs = saved(ctx, self)
        dh0 = state_h(self.decoder.backward(dctxs, dout, dstate))             # (L, B, P)
        # h0 = tanh(pre):  dpre = dh0 (1 - h0^2), laid back out as (B, L*P)
        dpre = (dh0 * (1 - h0 * h0)).transpose(1, 0, 2).reshape(h0.shape[1], -1)
        return self.parts["init"].backward(ictx, self.xp.ascontiguousarray(dpre)), None

    def generate(self, v, steps):
        """ids (steps, B): greedy decoding, each step reading the model's own previous choice."""
        steps = checks.positive_int(steps, "steps")
        state0, _ = self.initial_state(v, False)
        return self.decoder.greedy(state0, v.shape[0], steps)


class Seq2Seq(SequenceModel):
    """Encoder-decoder: the encoder reads src ids (S, B) (under src_lengths); its final state starts the decoder,
    which is teacher-forced in training (forward(src, tgt) -> logits (T, B, tgt_vocab)) and decodes greedily at
    inference (generate)."""

    def __init__(self, src_vocab, tgt_vocab, hidden_size, cell="lstm", num_layers=1, embedding_dim=16,
                 dropout=0.0, dtype="float32", backend="auto", seed=None, zoneout=0.0,
                 weight_drop=0.0, proj_size=0, memory="full"):
        c = model_config("Seq2Seq", dict(src_vocab=(src_vocab, False), tgt_vocab=(tgt_vocab, False),
                         hidden_size=(hidden_size, False), embedding_dim=(embedding_dim, False)),
                         cell, num_layers, dropout, dtype, rnn_kwargs(zoneout, weight_drop, proj_size, memory))
        s = sub_seeds(seed, 4)
        E, H, L = c["embedding_dim"], c["hidden_size"], c["num_layers"]
        parts = {"src_embedding": Embedding(c["src_vocab"], E, dtype=dtype, seed=s[0]),
                 "encoder": make_rnn(c["cell"], E, H, L, c["dropout"], dtype, backend, s[1],
                                     **{k: c[k] for k in RNN_OPTIONS})}
        parts.update(decoder_parts(c, c["tgt_vocab"], backend, s[2]))
        super().__init__(c, parts)
        self.decoder = Decoder(self, c["tgt_vocab"], "tgt")

    def encode(self, src, src_lengths, training):
        check_ids(src, "src")
        blocks = self.recurrent_blocks("src_embedding", "encoder")
        y, (state,), ctxs = chain_forward(blocks, src, [None], src_lengths, training)
        return state, (ctxs, y.shape)

    def forward(self, src, tgt, src_lengths=None, training=None, retain=False):
        """logits (T, B, tgt_vocab), decoder state_n, ctx. tgt: (T, B) ids, < 0 for padding."""
        training = self.is_training(training)
        inputs = self.decoder.inputs(tgt)
        state, ectx = self.encode(src, src_lengths, training)
        out, state_n, dctxs = self.decoder.forward(inputs, state, training)
        return out, state_n, (SavedCtx(self, (ectx, dctxs), retain) if training else None)

    @checks.consumes_ctx
    def backward(self, ctx, dout, dstate=None):
        """None, None (ids take no gradient). dout: (T, B, tgt_vocab)."""
        (ectxs, shape), dctxs = saved(ctx, self)
        dstate_enc = self.decoder.backward(dctxs, dout, dstate)
        chain_backward(self.recurrent_blocks("src_embedding", "encoder"), ectxs, self.xp.zeros(shape, self.dtype),
                       [dstate_enc])
        return None, None

    def generate(self, src, steps, src_lengths=None):
        """ids (steps, B) by greedy decoding."""
        steps = checks.positive_int(steps, "steps")
        state, _ = self.encode(src, src_lengths, False)
        return self.decoder.greedy(state, np.shape(src)[1], steps)


KINDS = {cls.__name__: cls for cls in (Tagger, CharLM, Classifier, Generator, Seq2Seq, RNN, LSTM, GRU, LayerNormLSTM,
                                       LayerNormGRU, JordanRNN, Linear, Embedding, Dropout, Sequential)}
MODELS = KINDS      # the name older code used


def register(cls):
    """Make build_model rebuild instances of a Module subclass of your own: its `config` (a JSON-able dict with
    "kind": cls.__name__) must hold its constructor's keyword arguments. Usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Module)):
        raise TypeError(f"register takes a Module subclass, got {cls!r}")
    KINDS[cls.__name__] = cls
    return cls


def build_model(config, backend="auto", seed=None):
    """The module a config describes (as `obj.config` wrote it: a layer, block, Sequential or model), with fresh
    parameters; `backend` goes to the recurrent layers, `seed` seeds the draw."""
    if not isinstance(config, dict) or config.get("kind") not in KINDS:
        raise ValueError(f"config must be a module config with kind in {', '.join(KINDS)}, got {config!r:.80}")
    kind = config["kind"]
    if kind == "Sequential":
        modules = config.get("modules")
        if not isinstance(modules, (list, tuple)) or \
                not all(isinstance(e, (list, tuple)) and len(e) == 2 for e in modules):
            raise ValueError("a Sequential config needs 'modules': a list of [name, config] pairs")
        seeds = sub_seeds(seed, len(modules))
        return Sequential({name: build_model(c, backend, s) for (name, c), s in zip(modules, seeds)})
    cls = KINDS[kind]
    kwargs = {k: v for k, v in config.items() if k != "kind"}
    params = inspect.signature(cls).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for name, value in (("backend", backend), ("seed", seed)):
        if name in params or takes_any:
            kwargs[name] = value
    return cls(**kwargs)
