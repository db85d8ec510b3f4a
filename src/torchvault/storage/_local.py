"""A run folder on a local (or network) file system, through the one commit protocol."""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from .. import _commit
from ..errors import UnsupportedFormatError
from ._lock import RunLock


class LocalStorage:
    """Objects are files under ``root``; names map to relative paths.

    Writes go through ``torchvault._commit`` (temp file beside the destination, fsync, rename,
    folder fsync), so atomicity and durability live in one place.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _path(self, name: str) -> Path:
        parts = name.split("/")
        if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"invalid object name {name!r}")
        return self.root.joinpath(*parts)

    def put(self, name: str, chunks: Iterable[bytes | memoryview]) -> None:
        path = self._path(name)
        _commit.make_dirs(path.parent)
        with _commit.atomic_file(path) as handle:
            for chunk in chunks:
                handle.write(chunk)

    def put_many(self, items: Iterable[tuple[str, Iterable[bytes | memoryview]]]) -> None:
        def paths() -> Iterator[tuple[Path, Iterable[bytes | memoryview]]]:
            for name, chunks in items:
                path = self._path(name)
                _commit.make_dirs(path.parent)
                yield path, chunks

        _commit.atomic_files(paths())

    def get(self, name: str, *, limit: int) -> bytes:
        with open(self._path(name), "rb") as handle:
            data = handle.read(limit + 1)
        if len(data) > limit:
            raise ValueError(f"{self.describe(name)} is larger than {limit} bytes")
        return data

    def map(self, name: str) -> memoryview:
        fd = os.open(self._path(name), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            if os.fstat(fd).st_size == 0:
                return memoryview(bytearray())
            return memoryview(mmap.mmap(fd, 0, access=mmap.ACCESS_COPY))
        finally:
            os.close(fd)

    def size(self, name: str) -> int | None:
        try:
            return self._path(name).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def list(self, prefix: str) -> list[str]:
        folder = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if not folder.is_dir():
            return []
        return sorted(
            path.relative_to(self.root).as_posix()
            for path in folder.rglob("*")
            if path.is_file() and _commit.TEMP_MARK not in path.name
        )

    def delete(self, name: str) -> None:
        _commit.remove(self._path(name))

    def clean(self) -> None:
        for path in self.root.rglob(f"*{_commit.TEMP_MARK}*"):
            _commit.remove(path)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        if self.root.exists() and not self.root.is_dir():
            raise UnsupportedFormatError(
                f"{self.root} is a file, not a run folder: a CheckpointManager writes a folder "
                "of checkpoints. Pass a folder path; tv.load reads a checkpoint file.",
                path=str(self.root),
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file on the way, a read-only parent: name the folder
            raise _commit.write_error(
                self.root, exc, "create the run folder", "Nothing was created."
            ) from exc
        held = RunLock(self.root / "lock")
        try:
            yield
        finally:
            held.release()

    def describe(self, name: str) -> str:
        return str(self._path(name)) if name else str(self.root)
