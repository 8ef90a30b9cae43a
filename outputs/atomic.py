"""Every output file is written whole or not at all.

A file is written under a temporary name in its own directory, flushed to disk (fsync) and
only then renamed onto its name (rename within a directory is atomic): a crash, a kill or a
full disk leaves the old file or none, never a truncated one, and no temporary file behind.
Failures raise OutputError, whose message says which file could not be written and why; a full
disk reads "no space left on device writing model_int8.pt".

Writers that need a path (a library's save(path)) use `atomic_path`; writers that take a file
object use `atomic_open`; `save_with` runs a writer into memory first, which suits torch's zip
writer: on a full disk it can fail in C++ (or abort the process) while writing to a file,
whereas writing finished bytes fails cleanly with ENOSPC.
"""
from __future__ import annotations

import errno
import io
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

STATUS_MESSAGE_CHARS = 40


class OutputError(Exception):
    """An output file could not be written; names the file. `short` fits a status message."""

    def __init__(self, path, problem, short_problem):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{problem} writing {self.path}")
        name = self.path.name
        text = f"{short_problem} writing {name}"
        if len(text) > STATUS_MESSAGE_CHARS:
            text = f"{short_problem}: {name}"
        self.short = text if len(text) <= STATUS_MESSAGE_CHARS else text[:STATUS_MESSAGE_CHARS - 1] + "…"


def output_error(error, path):
    """The OutputError for an OSError (or a library error on a full disk) writing `path`."""
    code = getattr(error, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or (code is None and _disk_full(Path(path).parent)):
        return OutputError(path, "no space left on device", "no space left")
    if code == errno.EACCES or code == errno.EPERM:
        return OutputError(path, f"permission denied ({error})", "permission denied")
    if code == errno.EROFS:
        return OutputError(path, "read-only file system", "read-only file system")
    reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return OutputError(path, f"cannot write ({type(error).__name__}: {reason})", "cannot write")


def _disk_full(directory):
    try:
        stats = os.statvfs(directory)
    except OSError:
        return False
    return stats.f_bavail == 0 or stats.f_bavail * stats.f_frsize < 4096


def _remove(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the rename is done either way
    finally:
        os.close(fd)


def _temporary_in(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes the file private (0600); outputs get the modes a plain open() would give.
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    return Path(temporary)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(temporary, path):
    os.replace(temporary, path)
    _fsync_dir(path.parent)


@contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path` for a writer that needs a path; when the block
    ends, the file is synced and renamed onto `path`. On any error the temporary file is
    removed and `path` is left as it was; an OSError (or a library's error on a full disk)
    becomes OutputError."""
    path = Path(path)
    try:
        temporary = _temporary_in(path)
    except OSError as error:
        raise output_error(error, path) from error
    try:
        yield temporary
        _fsync_file(temporary)
        _publish(temporary, path)
    except OutputError:
        _remove(temporary)
        raise
    except OSError as error:
        _remove(temporary)
        raise output_error(error, path) from error
    except Exception as error:
        _remove(temporary)
        if _disk_full(path.parent):
            raise output_error(error, path) from error
        raise
    except BaseException:
        _remove(temporary)
        raise


@contextmanager
def atomic_open(path, mode="w", **kwargs):
    """open() for writing, atomically: yields the file object of a temporary file that becomes
    `path` when the block ends without error. E.g. `with atomic_open(p, "w", newline="") as f:
    csv.writer(f)...`."""
    if not any(flag in mode for flag in "wx") or "+" in mode:
        raise ValueError(f"atomic_open writes a new file; mode {mode!r} is not a write mode")
    with atomic_path(path) as temporary:
        with open(temporary, mode.replace("x", "w"), **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def write_bytes(path, data):
    """Write `data` to `path` atomically; returns the path."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_text(path, text, encoding="utf-8"):
    """Write `text` to `path` atomically; returns the path."""
    return write_bytes(path, text.encode(encoding))


def save_with(path, writer):
    """Run `writer(file_object)` into memory, then write the bytes to `path` atomically, e.g.
    `save_with(p, lambda f: torch.jit.save(scripted, f))` or
    `save_with(p, lambda f: figure.savefig(f, format="png"))`. Returns the path."""
    buffer = io.BytesIO()
    writer(buffer)
    return write_bytes(path, buffer.getvalue())


def save_torch(obj, path):
    """torch.save(obj, path), whole or not at all."""
    import torch  # only the callers that save tensors need torch

    return save_with(path, lambda handle: torch.save(obj, handle))


def copy_file(source, path):
    """Copy `source` to `path` atomically (e.g. config.yml into the output dir)."""
    return write_bytes(path, Path(source).read_bytes())
