"""Small sequence models built from the layers: many-to-many (Tagger, CharLM), many-to-one (Classifier),
one-to-many (Generator) and encoder-decoder (Seq2Seq).

Every model follows the layers' style: `out, state_n, ctx = model.forward(x, ..., training=True)` and
`dx, dstate0 = model.backward(ctx, dout, dstate=None)` (gradients accumulate into each sub-module's `grads`).
`modules()` lists the sub-modules for an optimizer; `state_dict()` / `load_state_dict()` cover all of them;
`config` is the dict `build_model(config)` turns back into the same model (a checkpoint stores it).
Time-major shapes: x (T, B, I) or ids (T, B); state as the recurrent layer's (h, or (h, c) for the LSTM).
"""
import numpy as np

from . import checks
from .backend import to_host
from .layers import GRU, LSTM, RNN
from .nn import Embedding, Linear

RNN_CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu", "rnn_sigmoid")


def make_rnn(cell, input_size, hidden_size, num_layers, dtype, backend, seed):
    """The recurrent layer for a cell name: "lstm", "gru" or "rnn_<tanh|relu|sigmoid>"."""
    checks.choice(cell, "cell", RNN_CELLS)
    kwargs = dict(num_layers=num_layers, dtype=dtype, backend=backend, seed=seed)
    if cell.startswith("rnn_"):
        return RNN(input_size, hidden_size, nonlinearity=cell[4:], **kwargs)
    return (LSTM if cell == "lstm" else GRU)(input_size, hidden_size, **kwargs)


def sub_seeds(seed, n):
    """n independent integer seeds from one (random ones when seed is None)."""
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(n)]


class SequenceModel:
    """Named sub-modules (`parts`) plus the config that rebuilds the model."""

    def __init__(self, config, parts):
        self.config = config
        self.parts = parts          # name -> Module, in a fixed order

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if k not in ("kind", "vocab"))
        return f"{type(self).__name__}({args})"

    def modules(self):
        return list(self.parts.values())

    @property
    def rnn(self):
        return self.parts["rnn"]

    @property
    def xp(self):
        return self.rnn.xp

    @property
    def dtype(self):
        return self.rnn.dtype

    @property
    def device(self):
        return self.rnn.device

    def zero_grad(self):
        for m in self.modules():
            m.zero_grad()

    def num_parameters(self):
        return sum(m.num_parameters() for m in self.modules())

    def to(self, device):
        for m in self.modules():
            m.to(device)
        return self

    def state_dict(self):
        """{"<part>.<param>": NumPy copy} over every sub-module."""
        return {f"{name}.{k}": v for name, m in self.parts.items() for k, v in m.state_dict().items()}

    def load_state_dict(self, mapping):
        """Copy every parameter from `mapping`; checks all keys and shapes first, so a mismatch changes nothing."""
        own = {f"{name}.{k}": p for name, m in self.parts.items() for k, p in m.params.items()}
        problems = checks.mapping_problems(own, mapping)
        if problems:
            raise ValueError(f"load_state_dict for {type(self).__name__}: " + "; ".join(problems))
        for name, m in self.parts.items():
            m.load_state_dict({k: mapping[f"{name}.{k}"] for k in m.params})

    def save(self, path):
        """Write config and weights to `path` (a .npz file, or a folder); `gpurnn.load(path)` rebuilds the model."""
        from .checkpoint import save_model
        return save_model(self, path)


def lstm_state(cell, h, xp):
    """The layer's state for an initial h (L, B, H): h, or (h, zeros) for the LSTM."""
    return (h, xp.zeros_like(h)) if cell == "lstm" else h


def state_h(state):
    return state[0] if isinstance(state, tuple) else state


class Tagger(SequenceModel):
    """Many-to-many: a score vector per step. x (T, B, input_size) floats, or ids (T, B) when embedding_dim is
    given (input_size is then the vocabulary size). out (T, B, output_size)."""

    def __init__(self, input_size, hidden_size, output_size, cell="lstm", num_layers=1, embedding_dim=None,
                 dtype="float32", backend="auto", seed=None):
        config = dict(kind=type(self).__name__, input_size=input_size, hidden_size=hidden_size,
                      output_size=output_size, cell=cell, num_layers=num_layers, embedding_dim=embedding_dim,
                      dtype=np.dtype(dtype).name)
        super().__init__(config, build_stack(input_size, hidden_size, output_size, cell, num_layers,
                                             embedding_dim, dtype, backend, seed))

    def forward(self, x, state=None, lengths=None, training=True):
        """out (T, B, O), state_n, ctx."""
        return stack_forward(self.parts, x, state, lengths, training)

    def backward(self, ctx, dout, dstate=None):
        """dx (None for ids), dstate0. dout: (T, B, O)."""
        return stack_backward(self.parts, ctx, dout, dstate)


def build_stack(input_size, hidden_size, output_size, cell, num_layers, embedding_dim, dtype, backend, seed):
    """[embedding ->] rnn -> head, as named parts."""
    s = sub_seeds(seed, 3)
    parts = {}
    rnn_in = input_size
    if embedding_dim is not None:
        parts["embedding"] = Embedding(input_size, embedding_dim, dtype=dtype, seed=s[0])
        rnn_in = embedding_dim
    parts["rnn"] = make_rnn(cell, rnn_in, hidden_size, num_layers, dtype, backend, s[1])
    parts["head"] = Linear(hidden_size, output_size, dtype=dtype, seed=s[2])
    return parts


def embed_and_run(parts, x, state, lengths, training):
    """[embedding ->] rnn: y (T, B, H), state_n, (embedding ctx or None, rnn ctx)."""
    ectx = None
    if "embedding" in parts:
        x, ectx = parts["embedding"].forward(x)                      # (T, B, E)
    y, state_n, rctx = parts["rnn"].forward(x, state, lengths, training)   # (T, B, H)
    return y, state_n, (ectx, rctx)


def run_and_embed_backward(parts, ctx, dy, dstate):
    """Backward of embed_and_run: dx (None for ids), dstate0."""
    ectx, rctx = ctx
    dx, dstate0 = parts["rnn"].backward(rctx, dy, dstate)
    if ectx is not None:
        dx = parts["embedding"].backward(ectx, dx)
    return dx, dstate0


def stack_forward(parts, x, state, lengths, training):
    y, state_n, ctx = embed_and_run(parts, x, state, lengths, training)
    out, hctx = parts["head"].forward(y)                              # (T, B, O)
    return out, state_n, ((ctx, hctx) if training else None)


def stack_backward(parts, ctx, dout, dstate):
    rctx, hctx = ctx
    return run_and_embed_backward(parts, rctx, parts["head"].backward(hctx, dout), dstate)


def stack_rollout(parts, token, state, steps, choose):
    """Feed each chosen token back in: `steps` ids (steps, B). token (B,) starts it; choose(logits (B, O)) -> ids."""
    out = []
    for _ in range(steps):
        logits, state, _ = stack_forward(parts, token[None], state, None, training=False)
        token = choose(logits[-1])
        out.append(token)
    return parts["rnn"].xp.stack(out), state


def greedy(logits):
    return logits.argmax(axis=-1)


class CharLM(Tagger):
    """Character language model: Embedding -> stacked RNN/LSTM/GRU -> Linear, predicting the next character.

    vocab: the characters, in id order (a str). forward(ids (T, B)) -> logits (T, B, len(vocab)).
    """

    def __init__(self, vocab, hidden_size=256, num_layers=1, cell="lstm", embedding_dim=64, dtype="float32",
                 backend="auto", seed=None):
        if not isinstance(vocab, str) or len(vocab) < 2 or len(set(vocab)) != len(vocab):
            raise ValueError(f"vocab must be a str of at least 2 distinct characters, got {vocab!r:.60}")
        super().__init__(len(vocab), hidden_size, len(vocab), cell, num_layers, embedding_dim, dtype, backend,
                         seed)
        self.config = dict(kind="CharLM", vocab=vocab, hidden_size=hidden_size, num_layers=num_layers, cell=cell,
                           embedding_dim=embedding_dim, dtype=np.dtype(dtype).name)
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
        rng = self.sample_rng if seed is None else np.random.default_rng(seed)
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
        ids, _ = stack_rollout(self.parts, token, state, n, draw)
        return self.decode(to_host(ids))


class Classifier(SequenceModel):
    """Many-to-one: scores (B, output_size) from each sequence's last valid step (under `lengths`).

    x (T, B, input_size) floats, or ids (T, B) when embedding_dim is given. The scores are class logits or,
    with MSELoss, regression values."""

    def __init__(self, input_size, hidden_size, output_size, cell="lstm", num_layers=1, embedding_dim=None,
                 dtype="float32", backend="auto", seed=None):
        config = dict(kind="Classifier", input_size=input_size, hidden_size=hidden_size, output_size=output_size,
                      cell=cell, num_layers=num_layers, embedding_dim=embedding_dim, dtype=np.dtype(dtype).name)
        super().__init__(config, build_stack(input_size, hidden_size, output_size, cell, num_layers,
                                             embedding_dim, dtype, backend, seed))

    def forward(self, x, state=None, lengths=None, training=True):
        """out (B, O), state_n, ctx."""
        xp = self.xp
        y, state_n, rctx = embed_and_run(self.parts, x, state, lengths, training)   # (T, B, H)
        T, B = y.shape[:2]
        last = xp.full(B, T - 1) if lengths is None else xp.asarray(lengths).astype(np.int64) - 1   # (B,)
        out, hctx = self.parts["head"].forward(y[last, xp.arange(B)])              # (B, O)
        return out, state_n, ((rctx, hctx, last, y.shape) if training else None)

    def backward(self, ctx, dout, dstate=None):
        """dx (None for ids), dstate0. dout: (B, O)."""
        rctx, hctx, last, shape = ctx
        xp = self.xp
        dlast = self.parts["head"].backward(hctx, dout)                        # (B, H)
        dy = xp.zeros(shape, self.dtype)                                       # (T, B, H): only last steps
        dy[last, xp.arange(shape[1])] = dlast
        return run_and_embed_backward(self.parts, rctx, dy, dstate)


class Decoder:
    """Teacher-forced token decoder shared by Generator and Seq2Seq: parts "embedding" (vocab + 1 rows, the last
    the start token), "rnn", "head". Step t reads token t-1 of the target (the start token at t = 0)."""

    def __init__(self, parts, vocab_size):
        self.parts, self.start = parts, vocab_size

    def inputs(self, targets):
        """(T, B) ids: start, then targets[:-1], with padding (negative ids) read as the start token."""
        xp = self.parts["rnn"].xp
        targets = xp.asarray(targets)
        prev = xp.concatenate([xp.full((1,) + targets.shape[1:], self.start, targets.dtype), targets[:-1]])
        return xp.where(prev < 0, self.start, prev)

    def forward(self, targets, state0, training):
        return stack_forward(self.parts, self.inputs(targets), state0, None, training)

    def backward(self, ctx, dout, dstate):
        return stack_backward(self.parts, ctx, dout, dstate)[1]

    def greedy(self, state0, batch, steps):
        xp = self.parts["rnn"].xp
        return stack_rollout(self.parts, xp.full(batch, self.start), state0, steps, greedy)[0]


def decoder_parts(vocab_size, hidden_size, cell, num_layers, embedding_dim, dtype, backend, seed):
    return build_stack(vocab_size + 1, hidden_size, vocab_size, cell, num_layers, embedding_dim, dtype, backend,
                       seed)


class Generator(SequenceModel):
    """One-to-many: a vector v (B, input_size) sets the initial state h0 = tanh(v W^T + b) of every layer; the
    decoder then emits ids over vocab_size, reading its previous token (the target's in training, its own
    choice at inference). forward(v, targets (T, B)) -> logits (T, B, vocab_size); targets < 0 are padding."""

    def __init__(self, input_size, hidden_size, vocab_size, cell="lstm", num_layers=1, embedding_dim=16,
                 dtype="float32", backend="auto", seed=None):
        config = dict(kind="Generator", input_size=input_size, hidden_size=hidden_size, vocab_size=vocab_size,
                      cell=cell, num_layers=num_layers, embedding_dim=embedding_dim, dtype=np.dtype(dtype).name)
        s = sub_seeds(seed, 2)
        parts = {"init": Linear(input_size, num_layers * hidden_size, dtype=dtype, seed=s[0])}
        parts.update(decoder_parts(vocab_size, hidden_size, cell, num_layers, embedding_dim, dtype, backend, s[1]))
        super().__init__(config, parts)
        self.decoder = Decoder(parts, vocab_size)

    def initial_state(self, v):
        """state0 from v (B, I): h0 (L, B, H) = tanh(v W^T + b), c0 = 0."""
        L, H = self.rnn.num_layers, self.rnn.hidden_size
        pre, ictx = self.parts["init"].forward(v)                               # (B, L*H)
        h0 = self.xp.ascontiguousarray(self.xp.tanh(pre).reshape(-1, L, H).transpose(1, 0, 2))   # (L, B, H)
        return lstm_state(self.config["cell"], h0, self.xp), (ictx, h0)

    def forward(self, v, targets, training=True):
        """logits (T, B, vocab_size), state_n, ctx."""
        state0, ictx = self.initial_state(v)
        out, state_n, dctx = self.decoder.forward(targets, state0, training)
        return out, state_n, ((ictx, dctx) if training else None)

    def backward(self, ctx, dout, dstate=None):
        """dv (B, I), None. dout: (T, B, vocab_size)."""
        (ictx, h0), dctx = ctx
        dh0 = state_h(self.decoder.backward(dctx, dout, dstate))              # (L, B, H)
        # h0 = tanh(pre):  dpre = dh0 (1 - h0^2), laid back out as (B, L*H)
        dpre = (dh0 * (1 - h0 * h0)).transpose(1, 0, 2).reshape(h0.shape[1], -1)
        return self.parts["init"].backward(ictx, self.xp.ascontiguousarray(dpre)), None

    def generate(self, v, steps):
        """ids (steps, B): greedy decoding, each step reading the model's own previous choice."""
        state0, _ = self.initial_state(v)
        return self.decoder.greedy(state0, v.shape[0], checks.positive_int(steps, "steps"))


class Seq2Seq(SequenceModel):
    """Encoder-decoder: the encoder reads src ids (S, B) (under src_lengths); its final state starts the decoder,
    which is teacher-forced in training (forward(src, tgt) -> logits (T, B, tgt_vocab)) and decodes greedily at
    inference (generate)."""

    def __init__(self, src_vocab, tgt_vocab, hidden_size, cell="lstm", num_layers=1, embedding_dim=16,
                 dtype="float32", backend="auto", seed=None):
        config = dict(kind="Seq2Seq", src_vocab=src_vocab, tgt_vocab=tgt_vocab, hidden_size=hidden_size, cell=cell,
                      num_layers=num_layers, embedding_dim=embedding_dim, dtype=np.dtype(dtype).name)
        s = sub_seeds(seed, 3)
        parts = {"src_embedding": Embedding(src_vocab, embedding_dim, dtype=dtype, seed=s[0]),
                 "encoder": make_rnn(cell, embedding_dim, hidden_size, num_layers, dtype, backend, s[1])}
        parts.update(decoder_parts(tgt_vocab, hidden_size, cell, num_layers, embedding_dim, dtype, backend, s[2]))
        super().__init__(config, parts)
        self.decoder = Decoder(parts, tgt_vocab)

    def encode(self, src, src_lengths, training):
        e, ectx = self.parts["src_embedding"].forward(src)                     # (S, B, E)
        y, state, rctx = self.parts["encoder"].forward(e, None, src_lengths, training)
        return state, (ectx, rctx, y.shape)

    def forward(self, src, tgt, src_lengths=None, training=True):
        """logits (T, B, tgt_vocab), decoder state_n, ctx. tgt: (T, B) ids, < 0 for padding."""
        state, ectx = self.encode(src, src_lengths, training)
        out, state_n, dctx = self.decoder.forward(tgt, state, training)
        return out, state_n, ((ectx, dctx) if training else None)

    def backward(self, ctx, dout, dstate=None):
        """None, None (ids take no gradient). dout: (T, B, tgt_vocab)."""
        (ectx, rctx, shape), dctx = ctx
        dstate_enc = self.decoder.backward(dctx, dout, dstate)
        de, _ = self.parts["encoder"].backward(rctx, self.xp.zeros(shape, self.dtype), dstate_enc)
        self.parts["src_embedding"].backward(ectx, de)
        return None, None

    def generate(self, src, steps, src_lengths=None):
        """ids (steps, B) by greedy decoding."""
        state, _ = self.encode(src, src_lengths, False)
        return self.decoder.greedy(state, src.shape[1], checks.positive_int(steps, "steps"))


MODELS = {cls.__name__: cls for cls in (Tagger, CharLM, Classifier, Generator, Seq2Seq)}


def build_model(config, backend="auto", seed=None):
    """The model a config describes (as `model.config` wrote it), with fresh parameters."""
    if not isinstance(config, dict) or config.get("kind") not in MODELS:
        raise ValueError(f"config must be a model config with kind in {', '.join(MODELS)}, got {config!r:.80}")
    kwargs = {k: v for k, v in config.items() if k != "kind"}
    return MODELS[config["kind"]](**kwargs, backend=backend, seed=seed)
