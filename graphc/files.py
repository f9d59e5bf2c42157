"""Output files (checkpoints, renderings, benchmark JSON): checked before the work, written atomically,
and every OSError (read-only file system, full disk, no permission, ...) turned into one OutputError line.

    path = check_writable("run.npz", "checkpoint")          # before training: fails now, not after an epoch
    atomic_write(path, lambda f: np.savez(f, **arrays), "checkpoint")

An atomic write goes to ``.NAME.PID.XXXX.tmp`` in the destination's directory, is flushed and fsync'ed,
then ``os.replace``-d over NAME: an interrupted or failed write leaves the previous file (or nothing),
never a half-written one. A writer killed outright (``kill -9``, power loss) leaves its temp file behind;
the next write of the same NAME removes the temp files of writers that are no longer running.
"""
from __future__ import annotations

import errno
import os
import tempfile
import time
from pathlib import Path

from graphc.errors import OutputError

__all__ = ["check_writable", "atomic_write", "write_error", "clean_stale_temps"]

#: A temp file without a writer PID in its name (written by an older graphc) is stale after this long.
STALE_SECONDS = 3600

_REASONS = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
            errno.EDQUOT: "disk quota exceeded", errno.ENOENT: "no such directory",
            errno.EISDIR: "it is a directory", errno.ENOTDIR: "a parent is not a directory",
            errno.EIO: "input/output error", errno.ENAMETOOLONG: "the name is too long"}


def write_error(path, err: OSError, what="file") -> OutputError:
    """One-line OutputError for an OSError met while writing `path`."""
    reason = _REASONS.get(err.errno, err.strerror or str(err) or type(err).__name__)
    code = errno.errorcode.get(err.errno)
    return OutputError(f"cannot write {what} {os.fspath(path)}: {reason}" + (f" ({code})" if code else ""))


def _directory(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def check_writable(path, what="file") -> Path:
    """Checks, before any work, that `path` can be written: its directory exists and accepts a new file
    (a probe file is created and removed). Returns `path` as a Path; raises OutputError otherwise."""
    path = Path(os.path.expanduser(os.fspath(path)))
    directory = _directory(path)
    if path.is_dir():
        raise OutputError(f"cannot write {what} {path}: it is a directory; give a file name")
    if not directory.is_dir():
        raise OutputError(f"cannot write {what} {path}: directory {directory} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise write_error(path, e, what) from None
    return path


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":            # os.kill(pid, 0) would terminate it there; judge by age instead
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                # EPERM: alive, another user's
        return True
    return True


def clean_stale_temps(path) -> list:
    """Removes the ``.NAME.*.tmp`` files next to `path` whose writer is gone (its PID is not running, or,
    for names without a PID, older than STALE_SECONDS). Returns the paths removed."""
    path = Path(path)
    directory, prefix = _directory(path), f".{path.name}."
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        parts = name[len(prefix):-len(".tmp")].split(".")
        try:
            if len(parts) == 2 and parts[0].isdigit():          # .NAME.PID.RANDOM.tmp
                stale = int(parts[0]) != os.getpid() and not _pid_alive(int(parts[0]))
            elif len(parts) == 1:                               # .NAME.RANDOM.tmp (older graphc)
                stale = time.time() - entry.stat().st_mtime > STALE_SECONDS
            else:                                               # another file's temp (NAME.x)
                continue
            if stale:
                os.unlink(entry.path)
                removed.append(entry.path)
        except OSError:
            pass
    return removed


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write, what="file", binary=True) -> Path:
    """Calls ``write(fileobj)`` on a temp file next to `path`, fsyncs it and replaces `path` with it.
    OSError -> OutputError (one line); any failure (Ctrl-C included) removes the temp file."""
    path = Path(os.path.expanduser(os.fspath(path)))
    directory = _directory(path)
    if not directory.is_dir():
        raise OutputError(f"cannot write {what} {path}: directory {directory} does not exist")
    clean_stale_temps(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise write_error(path, e, what) from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    _fsync_dir(directory)
    return path
