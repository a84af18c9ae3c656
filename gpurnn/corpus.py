"""Text for the character language model: a user's file, or the Python standard library's own sources (read at
run time, so every machine with Python has it and nothing is downloaded or copied), cut into batches."""
import os

import numpy as np

from . import checks


class CorpusError(ValueError):
    """A corpus that is missing, empty or not UTF-8 text."""


def read_text(path):
    """The UTF-8 text of the file at `path`; CorpusError with one clear line when it cannot be used."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CorpusError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CorpusError(f"{path} is a directory, not a text file")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw:
        raise CorpusError(f"{path} is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    if len(text) < 2:
        raise CorpusError(f"{path} holds {len(text)} character; a language model needs at least 2")
    return text


def stdlib_text(max_chars=400_000):
    """About max_chars of Python: the public top-level modules of the standard library (the directory of `os`),
    in sorted file-name order, whole files until the budget is spent. Returns (text, description)."""
    max_chars = checks.positive_int(max_chars, "max_chars")
    directory = os.path.dirname(os.path.abspath(os.__file__))
    parts, size = [], 0
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".py") or name.startswith("_"):
            continue
        try:
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                source = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(source)
        size += len(source)
        if size >= max_chars:
            break
    if not parts:
        raise CorpusError(f"found no Python sources in {directory}; pass --data FILE")
    text = "\n".join(parts)[:max_chars]
    return text, f"{len(parts)} standard-library modules from {directory} ({len(text):,} characters)"


def build_vocab(text):
    """The sorted distinct characters of text, as a str (id i is vocab[i])."""
    return "".join(sorted(set(text)))


class CharBatches:
    """Consecutive (x, y) id batches of a text: B rows read side by side, T steps at a time, y = x shifted by one.

    Batch i is a pure function of i (rows continue from batch to batch, wrapping round), so a carried state
    follows the text and a resumed run reads exactly what it would have. Call as data(step, rng).
    rows: a slice of range(B), the rows (streams) this process reads, for data-parallel training (rank r of N:
    slice(r, B, N)); the layout, and so each row's text at every step, is the whole batch's whatever the split."""

    def __init__(self, ids, batch, seq_len, rows=slice(None)):
        self.batch = checks.positive_int(batch, "batch")
        self.seq_len = checks.positive_int(seq_len, "seq_len")
        ids = np.asarray(ids, dtype=np.int64)
        row = (len(ids) - 1) // self.batch
        self.chunks = (row - 1) // self.seq_len if row > 1 else 0
        if self.chunks < 1:
            raise CorpusError(f"the text ({len(ids)} characters) is too short for {batch} rows of "
                              f"{seq_len + 1} characters; use a smaller --batch or --seq-len")
        mine = range(self.batch)[rows]
        if not mine:
            raise ValueError(f"rows {rows} selects none of the {self.batch} rows")
        self.rows = np.stack([ids[b * row:(b + 1) * row + 1] for b in mine], axis=1)   # (row+1, rows taken)

    def __call__(self, step, rng=None):
        """x (T, b), y (T, b) for the b rows taken: chunk step mod the number of chunks."""
        a = (step % self.chunks) * self.seq_len
        return self.rows[a:a + self.seq_len], self.rows[a + 1:a + self.seq_len + 1]
