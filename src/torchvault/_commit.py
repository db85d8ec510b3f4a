"""The one atomic-publish protocol for a single file.

Write a uniquely named temp file in the destination folder, fsync it, rename it over the
destination, fsync the folder. A crash or exception at any point leaves either the old file
or the new one, never a partial one; an exception also removes the temp file. The temp file
lives beside the destination (never in /tmp) so the rename never turns into a copy across
file systems, and it is created with the usual 0o666 & ~umask mode, not mkstemp's 0o600.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import CheckpointWriteError

TEMP_MARK = ".tvtmp-"
_BUFFER = 1 << 20


def temp_name(path: Path) -> Path:
    """A fresh, unique temp path beside ``path``; readers ignore names containing TEMP_MARK."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(6)}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a buffered binary file that replaces ``path`` atomically and durably on success.

    Raises:
        CheckpointWriteError: the folder is missing, the disk is full, or any write, fsync
            or rename failed. The destination is untouched and the temp file is gone.
    """
    dest = Path(path)
    if dest.is_dir():
        raise CheckpointWriteError(
            f"cannot save to {dest}: it is a folder; pass a file path such as {dest / 'model.tv'}",
            path=dest,
            errno=errno.EISDIR,
        )
    tmp = temp_name(dest)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as exc:
        raise _write_error(dest, exc) from exc
    try:
        with os.fdopen(fd, "wb", buffering=_BUFFER) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, dest)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointWriteError):
            raise _write_error(dest, exc) from exc
        raise
    fsync_dir(dest.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise _write_error(folder, exc) from exc
    finally:
        os.close(fd)


def _write_error(dest: Path, exc: OSError) -> CheckpointWriteError:
    reason = {
        errno.ENOSPC: "the disk is full; free space and save again",
        errno.EDQUOT: "the disk quota is exhausted; free space and save again",
        errno.ENOENT: "the folder does not exist; create it first",
        errno.EACCES: "permission denied; choose a folder you can write to",
        errno.EROFS: "the file system is read-only",
    }.get(exc.errno or 0, f"{exc.strerror or exc}")
    return CheckpointWriteError(
        f"could not save {dest}: {reason}. Nothing was written; any previous file at that path "
        "is intact.",
        path=dest,
        errno=exc.errno,
    )
