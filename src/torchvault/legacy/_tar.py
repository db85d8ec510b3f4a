"""The tar format of torch < 0.4: four members, each a run of small pickles and raw bytes.

``storages`` holds a count, then per storage a pickled ``(key, location, storage type)``
followed by an 8-byte element count and the bytes, then a pickled list of storage views;
``tensors`` holds a count, then per tensor a pickled ``(key, storage key, type)`` followed
by its dimensions, sizes, strides and offset as little-endian integers; ``pickle`` is the
object, whose persistent ids are tensor and storage keys. Every pickle goes through the
restricted unpickler and every size, stride and offset is checked against its storage.
"""

from __future__ import annotations

import mmap
import struct
import tarfile
from typing import Any

from ..errors import CorruptCheckpointError
from . import _allowlist
from ._reader import Session, bytes_tensor

MEMBERS = ("sys_info", "pickle", "tensors", "storages")
MAX_MEMBERS = 16


class _Member:
    """Reads pickles and integers from one member's bytes, in order."""

    def __init__(
        self, session: Session, data: mmap.mmap | bytes, name: str, start: int, size: int
    ) -> None:
        self.session, self.data, self.name = session, data, name
        self.at, self.end = start, start + size

    def pickle(self) -> object:
        view = memoryview(self.data)[: self.end]
        obj, self.at = self.session.unpickle(view, self.at, legacy_ids=True)
        return obj

    def ints(self, fmt: str) -> tuple[Any, ...]:
        size = struct.calcsize(fmt)
        if self.at + size > self.end:
            raise self.session.corrupt(f"the tar member {self.name} is truncated")
        values = struct.unpack_from(fmt, self.data, self.at)
        self.at += size
        return values

    def count(self) -> int:
        value = self.pickle()
        if type(value) is not int or not 0 <= value <= 1_000_000:
            raise self.session.corrupt(f"the tar member {self.name} has a malformed count")
        return value


def members(session: Session, data: mmap.mmap | bytes) -> dict[str, tuple[int, int]]:
    """(start, size) of each torch member, validated; nothing is extracted."""
    found: dict[str, tuple[int, int]] = {}
    try:
        with tarfile.open(session.path, mode="r:") as archive:
            for index, info in enumerate(archive):
                if index >= MAX_MEMBERS or info.name not in MEMBERS or not info.isreg():
                    raise session.corrupt(
                        f"the tar archive has an unexpected member {info.name!r:.60}"
                    )
                if info.name in found or info.offset_data + info.size > len(data):
                    raise session.corrupt(f"tar member {info.name} is repeated or truncated")
                found[info.name] = (info.offset_data, info.size)
    except (tarfile.TarError, EOFError, ValueError, OverflowError, UnicodeError) as exc:
        raise session.corrupt(f"not a valid tar archive ({exc})") from None
    if set(found) != set(MEMBERS):
        raise session.corrupt(f"the tar archive lacks {sorted(set(MEMBERS) - set(found))}")
    return found


def read_tar(session: Session, data: mmap.mmap | bytes) -> object:
    """The object of a torch < 0.4 tar checkpoint."""
    session.format = "torch-tar"
    where = members(session, data)
    objects: dict[str, object] = {}
    _storages(session, _Member(session, data, "storages", *where["storages"]), objects)
    _tensors(session, _Member(session, data, "tensors", *where["tensors"]), objects)

    def persistent_load(pid: object) -> object:
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":
            return pid[1]
        found = objects.get(str(pid))
        if found is None:
            raise CorruptCheckpointError(f"persistent id {pid!r:.40} names no tensor or storage")
        return found

    session.persistent = persistent_load
    obj = _Member(session, data, "pickle", *where["pickle"]).pickle()
    return obj


def _storages(session: Session, member: _Member, objects: dict[str, object]) -> None:
    for _ in range(member.count()):
        record = member.pickle()
        if not (isinstance(record, tuple) and len(record) == 3):
            raise session.corrupt("a tar storage record is not (key, location, type)")
        key, location, kind = record
        if not isinstance(kind, _allowlist.StorageType) or kind.dtype is None:
            raise session.corrupt("a tar storage has no typed storage class")
        (count,) = member.ints("<q")
        storage = session.storage(("storage", kind, str(key), location, count, None), True)
        assert isinstance(storage, _allowlist.Storage)
        if member.at + storage.nbytes > member.end:
            raise session.corrupt(f"tar storage {key} runs past its member")
        storage.data = bytes_tensor(member.data, member.at, storage.nbytes)
        member.at += storage.nbytes
        objects[str(key)] = storage
    views = member.pickle()
    if views:
        raise session.corrupt("the tar archive uses storage views, which torchvault does not read")


def _tensors(session: Session, member: _Member, objects: dict[str, object]) -> None:
    for _ in range(member.count()):
        record = member.pickle()
        if not (isinstance(record, tuple) and len(record) == 3):
            raise session.corrupt("a tar tensor record is not (key, storage, type)")
        key, storage_key, _ = record
        storage = objects.get(str(storage_key))
        (ndim, _) = member.ints("<ii")
        if not isinstance(storage, _allowlist.Storage) or not 0 <= ndim <= _allowlist.MAX_DIMS:
            raise session.corrupt(f"tar tensor {key!r:.40} names no storage or has {ndim} dims")
        sizes = member.ints(f"<{ndim}q")
        strides = member.ints(f"<{ndim}q")
        (offset,) = member.ints("<q")
        args = (storage, offset, sizes, strides, False, None)
        objects[str(key)] = _allowlist.tensor_spec(session.context, args, storage.dtype)
