"""Where a checkpoint comes from or goes to: a path, bytes in memory, or a binary file object.

Readers work on paths (they map the file, and the restricted legacy reader sniffs it), so
bytes and file objects are first copied once into a private, anonymous in-memory file (Linux
``memfd``; elsewhere an unlinked temporary file), which every reader then opens through its
``/proc/self/fd`` path exactly as it opens a file. That one copy is deliberate: the caller's
buffer may be mutable (a ``bytearray``, a ``BytesIO``) or shared, and the checksums verified
must be those of the very bytes the loaded tensors hold, so nothing loaded may alias memory
the caller can still change. An open regular file read from its start is not copied: its
file is mapped directly, as a path would be.

Writes to a file object go where the object's position is, as ``torch.save`` does; only a
path gets the atomic, durable replace of :mod:`torchvault._commit`.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from typing import BinaryIO, cast

from .errors import TorchVaultError

PathLike = str | os.PathLike[str]
Readable = PathLike | bytes | bytearray | memoryview | BinaryIO
_COPY_CHUNK = 16 << 20
_PROC_FD = "/proc/self/fd"
_READS = (
    "a path (str or os.PathLike), bytes, bytearray, memoryview, or a binary file object open "
    "for reading (open(..., 'rb'), io.BytesIO)"
)
_WRITES = (
    "a path (str or os.PathLike) or a seekable binary file object open for writing "
    "(open(..., 'wb'), io.BytesIO())"
)


def is_path(source: object) -> bool:
    """True for what names a file (``str`` or ``os.PathLike``); bytes are contents, not names."""
    return isinstance(source, str | os.PathLike)


def is_source(source: object) -> bool:
    """True for anything :func:`reading` accepts without a TypeError."""
    return (
        is_path(source)
        or isinstance(source, bytes | bytearray | memoryview)
        or _has(source, "read")
    )


def display_name(source: object) -> str:
    """How errors and reports name ``source``: the path, the file object's name, or its kind."""
    if is_path(source):
        return os.fspath(cast(PathLike, source))
    name = getattr(source, "name", None)
    if isinstance(name, str) and not isinstance(source, bytes | bytearray | memoryview):
        return name
    return f"<{type(source).__name__}>"


@contextlib.contextmanager
def reading(source: object, argument: str = "path") -> Iterator[tuple[PathLike, str]]:
    """A path that readers can open for ``source``, and the name to show for it.

    For bytes and file objects the path is a private copy, alive until the block ends (maps
    taken inside it stay valid after). Errors raised inside the block that name the private
    copy are renamed to ``source``'s name.

    Raises:
        TypeError: ``source`` is none of the accepted kinds, or a file object in text mode.
        ValueError: a file object that is closed or not open for reading.
    """
    if is_path(source):
        yield cast(PathLike, source), os.fspath(cast(PathLike, source))
        return
    name = display_name(source)
    with _private_copy(source, argument) as copy:
        try:
            yield copy, name
        except TorchVaultError as exc:
            _rename(exc, copy, name)
            raise


def _rename(exc: TorchVaultError, copy: str, name: str) -> None:
    """Name ``source`` where ``exc`` names its private copy (messages are built deep inside
    readers that only ever see a path)."""
    exc.message = exc.message.replace(copy, name)
    if exc.path == copy:
        exc.path = name
    if isinstance(exc, OSError):
        exc.filename = exc.path
    exc.args = (exc.message,)


@contextlib.contextmanager
def _private_copy(source: object, argument: str) -> Iterator[str]:
    if _has(source, "read"):
        direct = _direct_path(cast(BinaryIO, source), argument)
        if direct is not None:
            yield direct
            cast(BinaryIO, source).seek(0, os.SEEK_END)  # consumed, as a read would leave it
            return
    with _anonymous_file() as (path, target):
        if isinstance(source, bytes | bytearray | memoryview):
            target.write(_flat_bytes(source, argument))
        else:
            _copy_stream(cast(BinaryIO, source), target, argument)
        target.flush()
        yield path


def _flat_bytes(source: bytes | bytearray | memoryview, argument: str) -> memoryview:
    view = memoryview(source)
    try:
        return view.cast("B")
    except TypeError as exc:
        raise TypeError(
            f"`{argument}` is a memoryview that is not C-contiguous ({exc}); pass "
            "bytes(view) or a contiguous view."
        ) from exc


def _copy_stream(source: BinaryIO, target: BinaryIO, argument: str) -> None:
    """Copy from ``source``'s position to its end; a ``BytesIO`` without an extra copy."""
    check_readable(source, argument)
    if isinstance(source, io.BytesIO):
        start = source.tell()
        with source.getbuffer() as view:
            target.write(view[start:])
        source.seek(0, os.SEEK_END)
    else:
        first = source.read(_COPY_CHUNK)
        if not isinstance(first, bytes | bytearray | memoryview):
            raise TypeError(
                f"`{argument}`.read() returned {type(first).__name__}, not bytes; open the "
                "file in binary mode ('rb')."
            )
        target.write(first)
        shutil.copyfileobj(source, target, _COPY_CHUNK)
    if target.tell() == 0 and _at_end(source):
        raise ValueError(
            f"`{argument}` is a file object at its end: there is nothing after its position "
            "to read. A file object is read from its current position; after writing to it, "
            "call seek(0) (or the position the checkpoint starts at) first."
        )


def _at_end(source: BinaryIO) -> bool:
    """True for a non-empty seekable stream read to its end (rather than an empty one)."""
    try:
        return source.tell() > 0
    except (OSError, ValueError, AttributeError):
        return False


def _direct_path(source: BinaryIO, argument: str) -> str | None:
    """The ``/proc`` path of an open regular file read from its start: mapped, not copied."""
    check_readable(source, argument)
    if not isinstance(getattr(source, "raw", source), io.FileIO):
        return None  # its fileno() may be another file's (GzipFile gives the compressed one)
    try:
        fd = source.fileno()
        at_start = source.tell() == 0
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except (OSError, AttributeError, ValueError, io.UnsupportedOperation):
        return None
    path = f"{_PROC_FD}/{fd}"
    return path if at_start and regular and os.access(path, os.R_OK) else None


def check_readable(source: object, argument: str) -> None:
    """Refuse a file object that cannot give bytes: text mode, closed, or write-only.

    Raises:
        TypeError: text mode or no ``read`` method.
        ValueError: closed or not open for reading.
    """
    _check_stream(source, argument, "read", _READS)
    readable = getattr(source, "readable", None)
    if callable(readable) and not readable():
        raise ValueError(f"`{argument}` is a file object not open for reading; open it with 'rb'.")


def check_writable(target: object, argument: str) -> None:
    """Refuse a file object :func:`torchvault.save` cannot write: text mode, closed,
    read-only, or unable to seek (the header is written last, over its placeholder).

    Raises:
        TypeError: text mode, or no ``write``/``seek``/``tell`` methods.
        ValueError: closed, not open for writing, or not seekable.
    """
    _check_stream(target, argument, "write", _WRITES)
    if not (_has(target, "seek") and _has(target, "tell")):
        raise TypeError(f"`{argument}` has no seek() and tell(); pass a seekable binary file.")
    writable = getattr(target, "writable", None)
    if callable(writable) and not writable():
        raise ValueError(f"`{argument}` is a file object not open for writing; open it with 'wb'.")
    mode = getattr(target, "mode", None)
    if isinstance(mode, str) and "a" in mode:
        raise ValueError(
            f"`{argument}` is open in append mode ({mode!r}), where every write goes to the "
            "end whatever the position, and save writes its header last; open it with 'wb' "
            "or 'r+b'."
        )
    seekable = getattr(target, "seekable", None)
    if callable(seekable) and not seekable():
        raise ValueError(
            f"`{argument}` is a file object that cannot seek (a pipe or a socket); save writes "
            "the header after the tensors. Save to an io.BytesIO() and write its getvalue()."
        )


def whole_writes(target: BinaryIO) -> BinaryIO:
    """``target``, or for an unbuffered raw stream (``open(..., buffering=0)``), a wrapper
    whose ``write`` loops: a raw ``write`` may take fewer bytes than it was given."""
    return cast(BinaryIO, _WholeWrites(target)) if isinstance(target, io.RawIOBase) else target


class _WholeWrites:
    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            written = self._raw.write(view)
            if not written:  # None: a non-blocking stream that would block
                raise BlockingIOError(
                    f"{display_name(self._raw)} took no bytes; use a blocking file"
                )
            view = view[written:]
        return total

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def flush(self) -> None:
        self._raw.flush()


def _check_stream(stream: object, argument: str, method: str, accepts: str) -> None:
    if isinstance(stream, io.TextIOBase):
        raise TypeError(
            f"`{argument}` is a text-mode file ({type(stream).__name__}); checkpoints are "
            f"binary: open it with '{method[0]}b'."
        )
    if not _has(stream, method):
        raise TypeError(f"`{argument}` must be {accepts}; got {type(stream).__name__}.")
    if getattr(stream, "closed", False) is True:
        raise ValueError(f"`{argument}` is a closed file object.")


def _has(obj: object, method: str) -> bool:
    return callable(getattr(obj, method, None))


@contextlib.contextmanager
def _anonymous_file() -> Iterator[tuple[str, BinaryIO]]:
    """A file with no name in any folder, and a path to open it by while the block runs."""
    memfd = getattr(os, "memfd_create", None)
    if memfd is not None and os.path.isdir(_PROC_FD):
        fd = memfd("torchvault-source", getattr(os, "MFD_CLOEXEC", 0))
        with open(fd, "w+b") as handle:
            yield f"{_PROC_FD}/{fd}", cast(BinaryIO, handle)
        return
    folder = tempfile.mkdtemp(prefix="torchvault-source-")
    path = os.path.join(folder, "source")
    try:
        with open(path, "w+b") as handle:
            yield path, cast(BinaryIO, handle)
    finally:  # maps taken inside the block keep the data; the name goes
        with contextlib.suppress(OSError):
            os.remove(path)
        with contextlib.suppress(OSError):
            os.rmdir(folder)
