"""Every durable change torchvault makes to a file system goes through this module.

* ``atomic_file``: publish one file. Write a uniquely named temp file in the destination
  folder, fsync it, rename it over the destination, fsync the folder. A crash or exception at
  any point leaves either the old file or the new one, never a partial one; an exception also
  removes the temp file.
* ``atomic_files``: publish a batch of files nothing refers to yet (a run's new objects): all
  written first, then all fsynced, renamed, and each folder fsynced once.
* ``remove`` and ``make_dirs``: unlink or mkdir, then fsync the parent folder.

Temp files live beside their destination (never in /tmp), so a rename never turns into a copy
across file systems, and they are created with the usual 0o666 & ~umask mode, not mkstemp's
0o600. Fault-injection tests patch this module's ``os`` and ``_writer``: one seam for every
operation that changes the file system.

Replacing or deleting a large file does not free it on the caller's thread: ``_freeing`` holds
the old file open across the rename or unlink and closes it on a background thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import io
import os
import secrets
import socket
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from . import _freeing
from .errors import CheckpointWriteError

TEMP_MARK = ".tvtmp-"
_HOST = "".join(c for c in socket.gethostname() if c.isalnum())[:32] or "host"
_BUFFER = 1 << 20
_KICK = 32 << 20
_SYNC_FILE_RANGE_WRITE = 2


class _WritebackFile(io.BufferedWriter):
    """A buffered file that starts the kernel's writeback every 32 MiB written.

    Without it the page cache holds every byte until the final fsync, which then waits for
    the whole file; started early, the disk writes while later bytes are still being copied
    (measured here: write + fsync of 1 GiB 0.31 s instead of 0.53 s). Only a hint: the final
    fsync is what makes the file durable.
    """

    def __init__(self, raw: io.FileIO) -> None:
        super().__init__(raw, _BUFFER)
        self._unkicked = 0

    def write(self, data: Any, /) -> int:
        written = super().write(data)
        self._unkicked += written
        if self._unkicked >= _KICK:
            self._unkicked = 0
            _start_writeback(self.fileno())
        return written


def _writer(fd: int) -> BinaryIO:
    """The buffered handle a save writes through (one seam for fault-injection tests)."""
    return _WritebackFile(io.FileIO(fd, "wb"))


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return function


def _start_writeback(fd: int) -> None:
    function = _sync_file_range()
    if function is not None:
        function(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # errors ignored: fsync still follows


def temp_name(path: Path) -> Path:
    """A fresh, unique temp path beside ``path``; readers ignore names containing TEMP_MARK."""
    return path.with_name(f".{path.name}{TEMP_MARK}{_HOST}-{os.getpid()}-{secrets.token_hex(6)}")


def _create_temp(dest: Path) -> tuple[Path, int]:
    """Create a fresh temp file beside ``dest`` (O_EXCL, mode 0o666 & ~umask) for writing."""
    tmp = temp_name(dest)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    return tmp, os.open(tmp, flags, 0o666)


def remove_orphans(path: Path) -> None:
    """Delete temp files of ``path`` left by killed saves on this host.

    A temp file is an orphan when the process that made it is gone; those of live processes
    and of other hosts (a shared folder) are left alone.
    """
    for candidate in path.parent.glob(f".{glob.escape(path.name)}{TEMP_MARK}{_HOST}-*"):
        pid = candidate.name.rsplit("-", 2)[-2]
        # ASCII digits only (isdigit also takes '²' and '٣'), small enough for a pid_t
        if _pid(pid) and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                candidate.unlink()


def _pid(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 10 and int(text) < 2**31


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


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
    remove_orphans(dest)
    old = _freeing.hold(dest, drop_cache=True)
    try:
        yield from _publish(dest)
    finally:
        _freeing.free_later(old)


def _publish(dest: Path) -> Generator[BinaryIO, None, None]:
    """The body of :func:`atomic_file`: temp file, fsync, rename, folder fsync."""
    try:
        tmp, fd = _create_temp(dest)
    except OSError as exc:
        raise write_error(dest, exc) from exc
    try:
        with _writer(fd) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, dest)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointWriteError):
            raise write_error(dest, exc) from exc
        raise
    try:
        fsync_dir(dest.parent)
    except OSError as exc:
        raise CheckpointWriteError(
            f"saved {dest}, but syncing its folder failed ({exc.strerror or exc}): the new "
            "file is in place but may not survive a power loss. Save again to be sure.",
            path=dest,
            errno=exc.errno,
        ) from exc


def atomic_files(items: Iterable[tuple[Path, Iterable[Any]]]) -> None:
    """Publish several files at once: each appears whole or not at all, all are durable when
    this returns.

    The batched form of :func:`atomic_file` for files nothing refers to yet (the run store's
    objects, published before the manifest that names them): every temp file is written first,
    with the kernel's writeback started as each one ends, then all are fsynced, renamed, and
    each folder is fsynced once. The disk works while later files are still being copied, and
    fsyncs find most data already written. ``items`` is consumed lazily, one file at a time.

    Raises:
        CheckpointWriteError: a write, fsync or rename failed; no temp file is left, and files
            already renamed are complete but may not survive a power loss.
    """
    staged: list[tuple[Path, Path]] = []
    where = Path()  # the file an error is about
    try:
        for where, chunks in items:
            tmp, fd = _create_temp(where)
            staged.append((tmp, where))
            with _writer(fd) as handle:
                for chunk in chunks:
                    handle.write(chunk)
                handle.flush()
                _start_writeback(handle.fileno())
        for tmp, where in staged:  # noqa: B007 - `where` names the file in an error
            fsync_file(tmp)
        for tmp, where in staged:
            os.replace(tmp, where)
        for where in sorted({dest.parent for _, dest in staged}):
            fsync_dir(where)
    except BaseException as exc:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointWriteError):
            raise write_error(where, exc) from exc
        raise


def fsync_file(path: Path) -> None:
    """Flush a file's data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened).

    Raises:
        OSError: the folder's fsync failed (file systems that cannot sync folders are skipped).
    """
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EISDIR, errno.EINVAL, errno.ENOTSUP):
            return  # folders cannot be opened here (Windows, some network file systems)
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def write_error(
    dest: Path,
    exc: OSError,
    doing: str = "save",
    outcome: str = "Nothing was written; any previous file at that path is intact.",
) -> CheckpointWriteError:
    reason = {
        errno.ENOSPC: "the disk is full; free space and try again",
        errno.EDQUOT: "the disk quota is exhausted; free space and try again",
        errno.ENOENT: "the folder does not exist; create it first",
        errno.EACCES: "permission denied; choose a folder you can write to",
        errno.EROFS: "the file system is read-only",
    }.get(exc.errno or 0, f"{exc.strerror or exc}")
    return CheckpointWriteError(
        f"could not {doing} {dest}: {reason}. {outcome}", path=dest, errno=exc.errno
    )


def remove(path: str | os.PathLike[str]) -> None:
    """Delete a file durably (unlink, then fsync its folder); a missing file is fine.

    Raises:
        CheckpointWriteError: the unlink or the folder fsync failed.
    """
    target = Path(path)
    old = _freeing.hold(target, drop_cache=False)
    try:
        try:
            os.unlink(target)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise write_error(target, exc, "delete", "The file is still there.") from exc
        try:
            fsync_dir(target.parent)
        except OSError as exc:
            raise write_error(target, exc, "delete", "It may reappear after a power loss.") from exc
    finally:
        _freeing.free_later(old)


def make_dirs(path: str | os.PathLike[str]) -> None:
    """Make sure a folder and its parents exist durably.

    Each new folder's parent is synced. An existing folder's parent is synced too, once per
    process: a killed writer may have created the folder without syncing it, and a file saved
    into it would vanish with it at a power loss.

    Raises:
        CheckpointWriteError: a mkdir or fsync failed.
    """
    folder = Path(path)
    if folder in _durable_dirs and folder.is_dir():
        return
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    if folder not in _durable_dirs:
        _sync_entry(folder)
    for new in reversed(missing):
        try:
            os.mkdir(new)
        except FileExistsError:
            pass
        except OSError as exc:
            raise write_error(new, exc, "create folder", "Nothing was created.") from exc
        _sync_entry(new)


def _sync_entry(folder: Path) -> None:
    """Make ``folder``'s entry in its parent durable, and remember that it is."""
    try:
        fsync_dir(folder.parent)
    except OSError as exc:
        raise write_error(
            folder, exc, "create folder", "It may vanish after a power loss."
        ) from exc
    _durable_dirs.add(folder)


_durable_dirs: set[Path] = set()  # folders whose entry this process has made durable
