"""An in-memory run folder: for tests, and for runs that need no disk."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator

from ..errors import RunLockedError
from ._lock import held_here


class MemoryStorage:
    """Objects in a dict. ``put`` builds the object fully before publishing it under its name,
    so readers on other threads never see a partial object. Nothing survives the process."""

    def __init__(self, label: str = "memory") -> None:
        self.label = label
        self._objects: dict[str, bytes] = {}
        self._mutex = threading.Lock()
        self._locked = False

    def put(self, name: str, chunks: Iterable[bytes | memoryview]) -> None:
        data = b"".join(bytes(chunk) for chunk in chunks)
        with self._mutex:
            self._objects[name] = data

    def put_many(self, items: Iterable[tuple[str, Iterable[bytes | memoryview]]]) -> None:
        for name, chunks in items:
            self.put(name, chunks)

    def get(self, name: str, *, limit: int) -> bytes:
        data = self._read(name)
        if len(data) > limit:
            raise ValueError(f"{self.describe(name)} is larger than {limit} bytes")
        return data

    def map(self, name: str) -> memoryview:
        return memoryview(bytearray(self._read(name)))

    def size(self, name: str) -> int | None:
        with self._mutex:
            data = self._objects.get(name)
        return None if data is None else len(data)

    def list(self, prefix: str) -> list[str]:
        with self._mutex:
            return sorted(name for name in self._objects if name.startswith(prefix))

    def delete(self, name: str) -> None:
        with self._mutex:
            self._objects.pop(name, None)

    def clean(self) -> None:
        """Nothing to do: a put publishes whole objects only."""

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        with self._mutex:
            if self._locked:
                raise RunLockedError(held_here(self.label))  # memory is never shared
            self._locked = True
        try:
            yield
        finally:
            with self._mutex:
                self._locked = False

    def describe(self, name: str) -> str:
        return f"{self.label}:{name}"

    def _read(self, name: str) -> bytes:
        with self._mutex:
            data = self._objects.get(name)
        if data is None:
            raise FileNotFoundError(f"{self.describe(name)} does not exist")
        return data
