"""Checkpoints that cannot run code and prove their integrity.

A checkpoint is one `.npz` archive (a zip of `.npy` arrays; numbers only, read with `allow_pickle=False`, so
loading one never executes code):
    header.npy     uint8, the UTF-8 JSON {"format": "gpurnn-checkpoint", "version": 2, "gpurnn": "0.1.0",
                   "payload": ...}: the payload's dicts, lists, numbers, strings and None as JSON, each array as
                   {"__array__": "a<i>"}, each tuple as {"__tuple__": [...]}
    checksum.npy   uint8, the hex SHA-256 of the header bytes, then of every array in name order (name, dtype,
                   shape, bytes)
    a0.npy a1.npy ...
Every load checks the archive's structure (each array's header against its size, numeric dtypes only) and the
checksum: a mismatch is a CheckpointError naming the file. Writes are atomic (gpurnn.files.atomic_write).

A folder holds `checkpoint.npz` (the latest) and, when saved with keep_previous=True, `checkpoint.prev.npz` (the
one before, copied only after it was read back intact). `load` falls back to the previous file, with a
CheckpointWarning, when the latest one is missing, truncated or corrupt.
"""
import hashlib
import json
import os
import warnings
import zipfile

import numpy as np

from . import files

FORMAT = "gpurnn-checkpoint"
VERSION = 2
FILENAME = "checkpoint.npz"
LEGACY = "checkpoint.pkl"          # version 1: a pickle, never loaded (unpickling runs code)
NUMERIC_KINDS = "biuf"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, corrupt, or not one of ours: one line naming the file."""


class CheckpointWarning(UserWarning):
    """The latest checkpoint was unusable and the previous one was loaded instead."""


def checkpoint_path(path):
    """The file for `path`: path itself when it ends in .npz or is an existing file, else path/checkpoint.npz."""
    path = os.fspath(path)
    if path.endswith(".npz") and not os.path.isdir(path) or os.path.isfile(path):
        return path
    return os.path.join(path, FILENAME)


def previous_path(file):
    """The backup beside a checkpoint file: X.npz -> X.prev.npz."""
    stem, ext = os.path.splitext(file)
    return f"{stem}.prev{ext or '.npz'}"


def existing(directory):
    """The checkpoint files (latest, previous, legacy pickle) present in `directory`."""
    names = (FILENAME, previous_path(FILENAME), LEGACY)
    return [os.path.join(directory, n) for n in names if os.path.exists(os.path.join(directory, n))]


def encode(obj, arrays, where="payload"):
    """obj as JSON-able data, its arrays moved into `arrays` (name -> C-contiguous NumPy array)."""
    if isinstance(obj, np.ndarray) or type(obj).__module__.split(".")[0] == "cupy":
        from .backend import to_host
        a = np.asarray(to_host(obj), order="C")          # (ascontiguousarray would make 0-d arrays 1-d)
        if a.dtype.kind not in NUMERIC_KINDS:
            raise TypeError(f"{where}: a checkpoint stores numeric arrays only, got dtype {a.dtype}")
        name = f"a{len(arrays)}"
        arrays[name] = a
        return {"__array__": name}
    if isinstance(obj, dict):
        bad = [k for k in obj if not isinstance(k, str) or k in ("__array__", "__tuple__")]
        if bad:
            raise TypeError(f"{where}: checkpoint dict keys must be strings (not __array__/__tuple__), got {bad[0]!r}")
        return {k: encode(v, arrays, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{where}: a checkpoint cannot store {type(obj).__name__}")


def decode(obj, arrays):
    if isinstance(obj, dict):
        if obj.keys() == {"__array__"}:
            return arrays[obj["__array__"]]
        if obj.keys() == {"__tuple__"}:
            return tuple(decode(v, arrays) for v in obj["__tuple__"])
        return {k: decode(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v, arrays) for v in obj]
    return obj


def digest(header, arrays):
    """Hex SHA-256 of the header bytes and of every array (name, dtype, shape, bytes) in name order."""
    h = hashlib.sha256(header)
    for name in sorted(arrays):
        a = np.asarray(arrays[name], order="C")
        h.update(f"\0{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save(path, payload, keep_previous=False):
    """Write `payload` (a dict of dicts, lists, tuples, numbers, strings, None and numeric arrays) to `path`: a
    .npz file, or a folder that gets checkpoint.npz. keep_previous: first keep the file there (when it reads back
    intact) as checkpoint.prev.npz. Returns the file written."""
    if not isinstance(payload, dict):
        raise TypeError(f"payload must be a dict, got {type(payload).__name__}")
    file = checkpoint_path(path)
    directory = os.path.dirname(os.path.abspath(file))
    os.makedirs(directory, exist_ok=True)
    arrays = {}
    data = encode(payload, arrays)
    from . import __version__
    header = json.dumps({"format": FORMAT, "version": VERSION, "gpurnn": __version__, "payload": data}).encode()
    checksum = digest(header, arrays)
    if keep_previous and os.path.exists(file):
        try:
            read(file)
        except CheckpointError as e:
            warnings.warn(f"{e}; keeping the previous checkpoint as it was", CheckpointWarning, stacklevel=2)
        else:
            files.atomic_copy(file, previous_path(file))

    def write(f):
        np.savez(f, header=np.frombuffer(header, np.uint8), checksum=np.frombuffer(checksum.encode(), np.uint8),
                 **arrays)

    return files.atomic_write(file, write)


def read_members(file):
    """name -> array of the .npz at `file`, each member's header checked against its size before reading."""
    with zipfile.ZipFile(file) as zf:
        for info in zf.infolist():
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f"member {info.filename} has .npy version {version}")
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(f)
                if dtype.hasobject or dtype.kind not in NUMERIC_KINDS:
                    raise ValueError(f"member {info.filename} has dtype {dtype}, not numbers")
                if info.file_size != f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                    raise ValueError(f"member {info.filename}: its size does not match its shape {shape}")
    with np.load(file, allow_pickle=False) as z:
        return {name: z[name] for name in z.files}


def read(file):
    """The payload stored in one checkpoint file; CheckpointError (one line naming the file) otherwise."""
    if not os.path.exists(file):
        legacy = os.path.join(os.path.dirname(file), LEGACY)
        if os.path.basename(file) == FILENAME and os.path.exists(legacy):
            raise CheckpointError(f"{legacy} is an old pickle checkpoint: gpurnn no longer loads pickles (loading "
                                  f"one can run any code); train again (gpurnn train --overwrite)")
        raise CheckpointError(f"no checkpoint at {file}")
    if os.path.isdir(file):
        raise CheckpointError(f"{file} is a directory, not a checkpoint file")
    with open(file, "rb") as f:
        magic = f.read(4)
    if magic[:1] == b"\x80":
        raise CheckpointError(f"{file} is a pickle, not a gpurnn checkpoint: gpurnn never loads pickles "
                              f"(loading one can run any code)")
    if magic != b"PK\x03\x04":
        raise CheckpointError(f"{file} is not a gpurnn checkpoint (not an .npz archive)")
    try:
        arrays = read_members(file)
        header = arrays.pop("header").tobytes()
        checksum = arrays.pop("checksum").tobytes().decode("ascii")
    except Exception as e:           # zipfile, zlib, numpy's header parser, a missing member: all corruption
        reason = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{file} is corrupt or truncated ({type(e).__name__}: {reason})") from None
    if digest(header, arrays) != checksum:
        raise CheckpointError(f"{file} is corrupt: its SHA-256 checksum does not match its contents")
    try:
        record = json.loads(header.decode("utf-8"))
    except ValueError:
        raise CheckpointError(f"{file} has an unreadable header") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a gpurnn checkpoint")
    if record.get("version") != VERSION:
        raise CheckpointError(f"{file} has checkpoint version {record.get('version')}, this gpurnn reads {VERSION}")
    try:
        payload = decode(record.get("payload"), arrays)
    except (KeyError, TypeError):
        raise CheckpointError(f"{file} refers to arrays it does not hold") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{file} holds no payload dict")
    return payload


def load(path):
    """The payload saved at `path` (file or folder). When the latest file is unusable and a previous one
    (X.prev.npz) reads back intact, returns that with a CheckpointWarning; else CheckpointError."""
    file = checkpoint_path(path)
    try:
        return read(file)
    except CheckpointError as error:
        previous = previous_path(file)
        if not os.path.exists(previous):
            raise
        try:
            payload = read(previous)
        except CheckpointError:
            raise CheckpointError(f"{error}; the previous checkpoint {previous} is unusable too") from None
        warnings.warn(f"{error}; loaded the previous checkpoint {previous} instead", CheckpointWarning,
                      stacklevel=2)
        return payload


def describe_intact(path):
    """A clause saying which checkpoint at `path` reads back intact (after a failed write)."""
    file = checkpoint_path(path)
    for f in (file, previous_path(file)):
        try:
            payload = read(f)
        except CheckpointError:
            continue
        step = payload.get("trainer", {}).get("step") if isinstance(payload.get("trainer"), dict) else None
        return f"the previous checkpoint {f}" + (f" (step {step})" if step is not None else "") + " is intact"
    return f"no intact earlier checkpoint exists at {file}"


def nonfinite_weights(state):
    """The names of the arrays of a state dict that hold NaN or Inf."""
    return [k for k, v in state.items() if np.asarray(v).dtype.kind == "f" and not np.isfinite(v).all()]


def save_model(obj, path):
    """Write a model or module (`obj.config`, a JSON-able dict with "kind", and `obj.state_dict()`) to `path`
    (a .npz file, or a folder that gets checkpoint.npz). Refuses weights holding NaN or Inf."""
    config = getattr(obj, "config", None)
    if not isinstance(config, dict) or "kind" not in config or not callable(getattr(obj, "state_dict", None)):
        raise TypeError(f"save needs a model or module with `config` (a dict with 'kind') and `state_dict()`, "
                        f"got {type(obj).__name__}")
    state = obj.state_dict()
    bad = nonfinite_weights(state)
    if bad:
        from .checks import NonFiniteError
        raise NonFiniteError(f"not saving {config['kind']}: its weights are not finite ({', '.join(bad[:3])})")
    return save(path, {"model_config": config, "model": state})


def model_from(payload, file):
    """The model a payload describes (its model_config and model weights), rebuilt with build_model."""
    config, state = payload.get("model_config"), payload.get("model")
    if not isinstance(config, dict) or not isinstance(state, dict):
        raise CheckpointError(f"{file} holds no model (missing model_config or model)")
    if not all(isinstance(v, np.ndarray) for v in state.values()):
        raise CheckpointError(f"{file}: the model's weights must all be arrays")
    bad = nonfinite_weights(state)
    if bad:
        raise CheckpointError(f"{file}: the checkpoint's weights are not finite ({', '.join(bad[:3])})")
    from .models import build_model
    try:
        model = build_model(config)
        model.load_state_dict(state)
    except (TypeError, ValueError, MemoryError) as e:
        raise CheckpointError(f"{file}: cannot rebuild its {config.get('kind')} ({e})") from None
    return model


def load_model(path):
    """The model saved at `path` by save_model, gpurnn.save or the trainer, with fresh sampling randomness."""
    return model_from(load(path), checkpoint_path(path))
