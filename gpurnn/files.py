"""Files that survive a crash, a full disk and a second run: atomic writes, stray temp files, one run per folder.

An atomic write goes to a temp file in the same folder (`.<name>.<random>.gpurnn-tmp`), is flushed and fsynced,
renamed over the target (os.replace), and the folder is fsynced: a reader sees the old file or the new one, never
half of one. A run killed mid-write leaves only a temp file, which `remove_stray_temps` deletes at the next start.
"""
import errno
import glob
import os
import shutil

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


def temp_beside(path):
    """A new, unused temp file name in the folder of `path`."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.{os.urandom(6).hex()}{TMP_SUFFIX}")


def create(path):
    """A new binary file at `path` (never an existing one), with the mode open() gives under the umask."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")


def replace_with(target, fill):
    """fill(tmp) makes a temp file beside `target`, which is then renamed over it and the folder fsynced; on any
    error the temp file is removed and `target` keeps its old content. Returns target."""
    tmp = temp_beside(target)
    try:
        fill(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(tmp))
    return target


def atomic_write(path, write):
    """Call write(f) on a binary temp file beside `path`, flush and fsync it, then put it in place atomically."""
    def fill(tmp):
        with create(tmp) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    return replace_with(os.fspath(path), fill)


def atomic_copy(source, target):
    """Make `target` a copy of `source` atomically: a hard link when the filesystem has them (no data written,
    so it works on a full disk), else a copied and fsynced temp file."""
    if os.path.exists(target) and os.path.samefile(source, target):
        return              # already one file (a save killed after its copy); rename would leave the temp behind

    def fill(tmp):
        try:
            os.link(source, tmp)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
                raise
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
    replace_with(os.fspath(target), fill)


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
    tmp = temp_beside(os.path.join(directory, "write-test"))
    try:
        with create(tmp) as f:
            f.write(b"gpurnn")
            f.flush()
            os.fsync(f.fileno())
    finally:
        if os.path.lexists(tmp):
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
