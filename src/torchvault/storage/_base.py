"""The storage interface a run folder is written through.

Small on purpose (a test double is a dozen lines): whole objects under '/'-separated names.
A backend guarantees that ``put`` is atomic and durable: once it returns, the object is
complete under its name and survives a crash; if it fails or the process dies, readers see
the previous object or none, never a partial one. Backends without atomic rename (object
stores) meet this with their own single-request uploads; local disk with temp + fsync + rename.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable


@runtime_checkable
class Storage(Protocol):
    """Whole-object storage for a run folder."""

    def put(self, name: str, chunks: Iterable[bytes | memoryview]) -> None:
        """Write object ``name`` from ``chunks``, atomically and durably (replacing any)."""

    def put_many(self, items: Iterable[tuple[str, Iterable[bytes | memoryview]]]) -> None:
        """Write several new objects; each is atomic, all are durable when this returns.
        ``items`` may be a generator: it is consumed one object at a time."""

    def get(self, name: str, *, limit: int) -> bytes:
        """The object's bytes. Raises FileNotFoundError, or ValueError past ``limit`` bytes."""

    def map(self, name: str) -> memoryview:
        """A writable, private (copy-on-write) view of the object, for zero-copy tensors.
        Raises FileNotFoundError."""

    def size(self, name: str) -> int | None:
        """The object's size in bytes, or None when there is no such object."""

    def list(self, prefix: str) -> list[str]:
        """The names of the complete objects under ``prefix`` (a folder name ending in '/')."""

    def delete(self, name: str) -> None:
        """Remove an object durably; a missing one is fine."""

    def clean(self) -> None:
        """Remove what interrupted writes left behind (only the lock holder may call it)."""

    def lock(self) -> AbstractContextManager[None]:
        """Exclusive writer access, taken at once or refused with RunLockedError."""

    def describe(self, name: str) -> str:
        """Where ``name`` lives, for messages (a file path, a URL); ``""``: the storage itself."""
