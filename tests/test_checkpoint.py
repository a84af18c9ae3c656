"""Checkpoint files: round trip, atomic replacement (a crash mid-save keeps the last good file), clear errors."""
import os
import pickle

import numpy as np
import pytest

from gpurnn import checkpoint
from gpurnn.checkpoint import CheckpointError


def test_round_trip_through_a_directory(tmp_path):
    payload = {"w": np.arange(6.0).reshape(2, 3), "step": 4, "nested": {"rng": [1, 2]}}
    path = checkpoint.save(tmp_path / "run", payload)
    assert path == str(tmp_path / "run" / checkpoint.FILENAME)
    back = checkpoint.load(tmp_path / "run")
    np.testing.assert_array_equal(back["w"], payload["w"])
    assert back["step"] == 4 and back["nested"] == {"rng": [1, 2]}
    assert checkpoint.load(path)["step"] == 4


def test_a_crash_mid_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, {"step": 1})
    real_dump = pickle.dump

    def dump_then_crash(obj, f, protocol=None):
        real_dump(obj, f, protocol=protocol)
        f.truncate(10)                       # a half-written file
        raise OSError("disk full")

    monkeypatch.setattr(pickle, "dump", dump_then_crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(tmp_path, {"step": 2})
    monkeypatch.undo()
    assert checkpoint.load(tmp_path)["step"] == 1
    assert os.listdir(tmp_path) == [checkpoint.FILENAME]          # no temp file left behind


def test_save_replaces_the_previous_checkpoint(tmp_path):
    checkpoint.save(tmp_path, {"step": 1})
    checkpoint.save(tmp_path, {"step": 2})
    assert checkpoint.load(tmp_path)["step"] == 2


@pytest.mark.parametrize("content, message", [(None, "no checkpoint"), (b"not a pickle", "not a readable"),
                                              (pickle.dumps({"step": 1}), "not a gpurnn checkpoint"),
                                              (pickle.dumps({"format": checkpoint.FORMAT, "version": 99}),
                                               "version 99")])
def test_load_errors_say_what_is_wrong(tmp_path, content, message):
    if content is not None:
        (tmp_path / checkpoint.FILENAME).write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load(tmp_path)


def test_save_rejects_a_non_dict(tmp_path):
    with pytest.raises(TypeError):
        checkpoint.save(tmp_path, [1, 2])
    assert os.listdir(tmp_path) == []
