"""Files that survive a crash, a full disk and a second run: atomic writes, stray temp files, one run per folder.

An atomic write goes to a temp file in the same folder (`.<name>.<random>.gpurnn-tmp`), is flushed and fsynced,
renamed over the target (os.replace), and the folder is fsynced: a reader sees the old file or the new one, never
half of one. A run killed mid-write leaves only a temp file, which `remove_stray_temps` deletes at the next start.
"""
import errno
import glob
import os
import shutil
import tempfile

TMP_SUFFIX = ".gpurnn-tmp"
LOCK_NAME = ".gpurnn.lock"


class LockedError(RuntimeError):
    """Another process holds the run lock of a folder."""


def fsync_dir(directory):
    if os.name != "posix":      # directories cannot be opened for fsync elsewhere
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_file_mode():
    """The mode open() gives a new file under the process umask (mkstemp's temp files get 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def temp_in(directory, name):
    """(fd, path) of a new temp file beside `name` in `directory`, with the mode of a newly created file."""
    fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=TMP_SUFFIX, dir=directory)
    if hasattr(os, "fchmod"):
        os.fchmod(fd, new_file_mode())
    return fd, path


def atomic_write(path, write):
    """Call write(f) on a binary temp file beside `path`, then put it in place atomically; returns path.
    On any error the temp file is removed and `path` keeps its old content."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = temp_in(directory, os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
    return path


def atomic_copy(source, target):
    """Make `target` a copy of `source` atomically: a hard link when the filesystem has them (no data written,
    so it works on a full disk), else a copied temp file."""
    directory = os.path.dirname(os.path.abspath(target))
    if os.path.exists(target) and os.path.samefile(source, target):
        return              # already one file (a save killed after its copy); rename would leave the temp behind
    tmp = os.path.join(directory, f".{os.path.basename(target)}.{os.urandom(6).hex()}{TMP_SUFFIX}")
    try:
        try:
            os.link(source, tmp)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
                raise
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def remove_stray_temps(directory):
    """Delete the temp files that killed runs left in `directory` (also the older `.checkpoint-*.tmp` names);
    returns their paths. Call only while holding the folder's RunLock."""
    stray = glob.glob(os.path.join(glob.escape(directory), ".*" + TMP_SUFFIX)) + \
        glob.glob(os.path.join(glob.escape(directory), ".checkpoint-*.tmp"))
    for path in stray:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return stray


def check_writable(directory):
    """Create `directory` and write, fsync and delete a file in it; OSError (with the reason) when it cannot."""
    os.makedirs(directory, exist_ok=True)
    fd, tmp = temp_in(directory, "write-test")
    try:
        os.write(fd, b"gpurnn")
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(tmp)


class RunLock:
    """An advisory lock (fcntl.flock) on `directory/.gpurnn.lock` for as long as the context is open, holding the
    owner's PID. The kernel drops it when the process ends, however it ends, so a killed run never blocks the
    next one. A second holder gets LockedError naming the first one's PID. No-op where fcntl is missing."""

    def __init__(self, directory):
        self.path = os.path.join(directory, LOCK_NAME)
        self.fd = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(f"another run (PID {holder}) is using {os.path.dirname(self.path)}") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)          # closing the only descriptor releases the flock
            self.fd = None
