"""Checkpoint files: one pickled dict, written atomically so a crash mid-save never loses the last good one.

Write: a temp file in the same directory, flush + fsync, os.replace over the old file, fsync the directory.
Load only checkpoints you trust: unpickling runs code named in the file.
"""
import os
import pickle
import tempfile

FORMAT = "gpurnn-checkpoint"
VERSION = 1
FILENAME = "checkpoint.pkl"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or not one of ours."""


def checkpoint_path(path):
    """The checkpoint file for `path`: path itself when it names a .pkl file, else path/checkpoint.pkl."""
    path = os.fspath(path)
    return path if path.endswith(".pkl") and not os.path.isdir(path) else os.path.join(path, FILENAME)


def fsync_dir(directory):
    if os.name != "posix":      # directories cannot be opened for fsync elsewhere
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(path, payload):
    """Write payload (a picklable dict) to `path` (a .pkl file, or a directory that gets checkpoint.pkl)."""
    if not isinstance(payload, dict):
        raise TypeError(f"payload must be a dict, got {type(payload).__name__}")
    path = checkpoint_path(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    record = {"format": FORMAT, "version": VERSION, **payload}
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(record, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
    return path


def load(path):
    """The payload dict saved at `path` (file or directory); CheckpointError with one clear line otherwise."""
    file = checkpoint_path(path)
    if not os.path.exists(file):
        raise CheckpointError(f"no checkpoint at {file}")
    try:
        with open(file, "rb") as f:
            record = pickle.load(f)
    except Exception as e:
        raise CheckpointError(f"{file} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a gpurnn checkpoint")
    if record.get("version") != VERSION:
        raise CheckpointError(f"{file} has checkpoint version {record.get('version')}, this gpurnn reads {VERSION}")
    return {k: v for k, v in record.items() if k not in ("format", "version")}
