"""Safe files: atomic writes (old content or new, never half), stray temp files removed, the write test of a
folder, and the run lock (one holder, named by PID; released by the kernel when the holder is killed)."""
import os
import signal
import subprocess
import sys

import pytest

from gpurnn import files
from gpurnn.files import LockedError, RunLock


def test_atomic_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "plot.png"
    path.write_bytes(b"old")
    files.atomic_write(path, lambda f: f.write(b"new content"))
    assert path.read_bytes() == b"new content" and os.listdir(tmp_path) == ["plot.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~umask)          # as open() would have made it


def test_a_failing_write_keeps_the_old_file_and_removes_its_temp(tmp_path):
    path = tmp_path / "plot.png"
    path.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        files.atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["plot.png"]


def test_atomic_copy_makes_an_independent_copy(tmp_path):
    (tmp_path / "a").write_bytes(b"one")
    files.atomic_copy(tmp_path / "a", tmp_path / "b")
    files.atomic_write(tmp_path / "a", lambda f: f.write(b"two"))       # a new file: b keeps the old bytes
    assert (tmp_path / "b").read_bytes() == b"one" and sorted(os.listdir(tmp_path)) == ["a", "b"]


def test_atomic_copy_onto_a_hard_link_of_itself_leaves_no_temp_file(tmp_path):
    (tmp_path / "a").write_bytes(b"one")
    os.link(tmp_path / "a", tmp_path / "b")            # what a save killed right after its copy leaves
    files.atomic_copy(tmp_path / "a", tmp_path / "b")
    assert sorted(os.listdir(tmp_path)) == ["a", "b"] and (tmp_path / "b").read_bytes() == b"one"


def test_remove_stray_temps_removes_only_temp_files_of_killed_writes(tmp_path):
    keep = ["checkpoint.npz", "loss.png", ".hidden", "notes.tmp", ".gpurnn.lock"]
    stray = [".checkpoint.npz.x1y2.gpurnn-tmp", ".loss.png.abc.gpurnn-tmp", ".checkpoint-k3j4.tmp"]
    for name in keep + stray:
        (tmp_path / name).write_bytes(b"x")
    assert sorted(os.path.basename(p) for p in files.remove_stray_temps(str(tmp_path))) == sorted(stray)
    assert sorted(os.listdir(tmp_path)) == sorted(keep)


def test_check_writable_creates_the_folder_and_leaves_it_empty(tmp_path):
    files.check_writable(str(tmp_path / "a" / "b"))
    assert os.listdir(tmp_path / "a" / "b") == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        files.check_writable(str(tmp_path / "file" / "sub"))


def test_a_second_lock_on_a_folder_is_refused_naming_the_holder(tmp_path):
    with RunLock(str(tmp_path)):
        with pytest.raises(LockedError, match=f"another run \\(PID {os.getpid()}\\) is using {tmp_path}"):
            RunLock(str(tmp_path)).__enter__()
    with RunLock(str(tmp_path)):            # released on exit
        pass


HOLDER = ("import sys; from gpurnn.files import RunLock; RunLock(sys.argv[1]).__enter__(); "
          "print('locked', flush=True); sys.stdin.read()")


def test_the_lock_of_a_killed_holder_does_not_block(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(LockedError, match=f"PID {holder.pid}"):
            RunLock(str(tmp_path)).__enter__()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
        with RunLock(str(tmp_path)):
            assert open(tmp_path / files.LOCK_NAME).read() == f"{os.getpid()}\n"
    finally:
        holder.kill()
        holder.wait()
