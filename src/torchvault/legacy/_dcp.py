"""Existing torch.distributed.checkpoint (DCP) folders, read in one process without
unpickling anything.

Two layouts are read:

* ``FileSystemWriter`` folders: a ``.metadata`` pickle (read by :mod:`._dcp_metadata`) and
  ``__R_I.distcp`` files in which every item is a ``torch.save`` archive at a byte range the
  metadata records; each is read by the restricted legacy reader, its zip CRCs checked;
* ``HuggingFaceStorageWriter(save_distributed=True)`` folders: ``shard-*.safetensors`` files
  whose ``DCP_SHARDING_INFO`` metadata gives each tensor's offsets in the global tensor
  (without ``save_distributed`` the writer makes an ordinary Hugging Face folder).

Every tensor comes back whole: its chunks must tile the global shape exactly (no overlap, no
gap, nothing out of bounds) or the read fails naming the file and key. Tensors are assembled
one at a time; a tensor saved as one chunk is that chunk's tensor, not a copy. Keys are
nested as DCP flattened them when the metadata records the mapping (``planner_data``, which
``dcp.save``'s default planner writes); otherwise they stay flat, dotted as DCP wrote them.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import stat
from collections.abc import Iterator
from typing import Any, cast

import torch

from .._chunks import Chunk, Offsets, TensorEntry, assemble, check_tiling, conflict, nest
from .._file import _gc_paused
from .._format import Deferred
from .._placement import MapLocation, Where
from .._report import CheckpointInfo, TensorInfo, VerifyReport
from ..errors import (
    CorruptCheckpointError,
    TorchVaultError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
)
from ._dcp_metadata import (
    METADATA as METADATA,
)
from ._dcp_metadata import BytesEntry, DcpMetadata, Location, parse, table
from ._reader import Session, kind_of, open_mapped, read, sniff

MAX_METADATA_BYTES = 1 << 30
HF_SHARD = re.compile(r"shard-[0-9]+-model-[0-9]+-of-[0-9]+\.safetensors")
SHARDING_INFO = "DCP_SHARDING_INFO"


def is_dcp_folder(folder: str) -> bool:
    """A FileSystemWriter folder (a ``.metadata`` pickle) or a distributed
    HuggingFaceStorageWriter folder (``shard-*-model-*.safetensors`` files)."""
    meta = os.path.join(folder, METADATA)
    if os.path.isfile(meta):
        with open(meta, "rb") as file:
            return kind_of(file.read(512), os.fstat(file.fileno()).st_size) == "pickle"
    return any(HF_SHARD.fullmatch(n) for n in _names(folder))


def _names(folder: str) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except OSError:
        return []


# -- the .metadata pickle ------------------------------------------------------------------


def read_metadata(folder: str) -> DcpMetadata:
    """The checked metadata of a FileSystemWriter folder.

    Raises:
        UnsafeCheckpointError: the pickle names a global other than DCP's metadata classes.
        CorruptCheckpointError: malformed, or a field of the wrong type or value.
    """
    path = os.path.join(folder, METADATA)
    name, data = open_mapped(path)
    if len(data) > MAX_METADATA_BYTES:
        raise CorruptCheckpointError(f"{name}: the metadata is over 1 GiB", path=name)
    session = dcp_session(name)
    with _gc_paused():
        obj = read(session, data, scan=True)  # scan: it is a .metadata, read by our table
    return parse(name, obj)


def dcp_session(path: str, *, permissive: bool = False) -> Session:
    """A legacy reader session whose allowlist is DCP's metadata classes alone."""
    session = Session(path, permissive=permissive)
    session.table = table()
    return session


# -- FileSystemWriter folders --------------------------------------------------------------


class _Folder:
    """One read of a FileSystemWriter folder: its metadata and its data files, mapped once."""

    def __init__(self, folder: str, map_location: Where = "cpu") -> None:
        self.folder = folder
        self.meta = read_metadata(folder)
        self.map_location = map_location
        self.files: dict[str, Any] = {}
        self.crcs = True

    def data(self, key: str, where: Location) -> memoryview:
        path = os.path.join(self.folder, where.file)
        if where.transforms:
            raise UnsupportedFormatError(
                f"{path}: {key!r:.80} was written through DCP extensions {list(where.transforms)} "
                "(compression?); torchvault reads items stored as plain torch.save archives",
                path=path,
            )
        mapped = self.files.get(where.file)
        if mapped is None:
            try:
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    raise CorruptCheckpointError(f"{path}: not a regular file", path=path)
            except FileNotFoundError:
                raise CorruptCheckpointError(
                    f"{path}: missing; the metadata stores {key!r:.80} in it", path=path
                ) from None
            mapped = open_mapped(path)[1]
            self.files[where.file] = mapped
        if where.offset + where.length > len(mapped):
            raise CorruptCheckpointError(
                f"{path}: {key!r:.80} is at bytes {where.offset}-{where.offset + where.length}, "
                f"past the end of the file ({len(mapped)} bytes)",
                path=path,
            )
        return memoryview(mapped)[where.offset : where.offset + where.length]

    def item(self, key: str, where: Location) -> object:
        """One torch.save archive of the folder, read by the restricted legacy reader."""
        path = os.path.join(self.folder, where.file)
        data = self.data(key, where)
        session = Session(path, map_location=self.map_location)
        try:
            with _gc_paused():  # the reader takes any buffer; a slice keeps it zero-copy
                obj = read(session, cast("bytes", data))
        except TorchVaultError as exc:
            raise _about(exc, path, key) from exc
        self.crcs = self.crcs and sniff(cast("bytes", data)) == "zip"
        return obj

    def location(self, key: str, offsets: Offsets | None) -> Location:
        where = self.meta.locations.get((key, offsets))
        if where is None:
            raise CorruptCheckpointError(
                f"{self.folder}: {key!r:.80} (chunk at {offsets}) has no location in the metadata",
                path=os.path.join(self.folder, METADATA),
            )
        return where

    def tensor(self, key: str, entry: TensorEntry) -> torch.Tensor:
        """One global tensor, its chunks read one at a time and copied into place."""
        check_tiling(os.path.join(self.folder, METADATA), key, entry)
        return assemble(key, entry, self._chunks(key, entry))

    def _chunks(self, key: str, entry: TensorEntry) -> Iterator[tuple[Chunk, torch.Tensor]]:
        for chunk in entry.chunks:
            where = self.location(key, chunk.offsets)
            value = self.item(key, where)
            path = os.path.join(self.folder, where.file)
            yield chunk, _chunk_tensor(path, key, value, entry, chunk)

    def value(self, key: str, entry: TensorEntry | BytesEntry) -> object:
        if isinstance(entry, TensorEntry):
            return self.tensor(key, entry)
        return self.item(key, self.location(key, None))

    def flat(self) -> Iterator[tuple[str, object]]:
        for key, entry in self.meta.entries.items():
            yield key, self.value(key, entry)


def _about(exc: TorchVaultError, path: str, key: str) -> TorchVaultError:
    """``exc`` naming the data file and the key whose bytes it came from."""
    message = f"{path}: item {key!r:.80}: {exc.message.removeprefix(path + ': ')}"
    if isinstance(exc, UnsafeCheckpointError):
        return UnsafeCheckpointError(message, global_name=exc.global_name, path=path)
    return type(exc)(message, path=path)


def _chunk_tensor(
    path: str, key: str, value: object, entry: TensorEntry, chunk: Chunk
) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise CorruptCheckpointError(
            f"{path}: item {key!r:.80} holds a {type(value).__name__}, not a tensor chunk",
            path=path,
        )
    if value.dtype != entry.dtype or tuple(value.shape) != chunk.sizes:
        raise CorruptCheckpointError(
            f"{path}: the chunk of {key!r:.80} at {list(chunk.offsets)} is "
            f"{str(value.dtype).removeprefix('torch.')} {list(value.shape)}; the metadata "
            f"says {str(entry.dtype).removeprefix('torch.')} {list(chunk.sizes)}",
            path=path,
        )
    return value


# -- HuggingFaceStorageWriter(save_distributed=True) folders -------------------------------


def _hf_shards(
    folder: str, map_location: Where
) -> Iterator[tuple[str, dict[str, torch.Tensor], dict[str, Any]]]:
    from .._contents import open_file
    from .._file import load_native
    from .._placement import check

    for name in _names(folder):
        if not HF_SHARD.fullmatch(name):
            continue
        path = os.path.join(folder, name)
        header = open_file(path)[0].header
        raw = header.metadata.get(SHARDING_INFO)
        try:
            info = json.loads(raw) if raw is not None else {}
        except ValueError:
            info = None
        placement = check(cast("MapLocation", map_location))
        tensors = load_native(path, placement, lazy=False, verify=True, restore_dtype=False)
        if not isinstance(info, dict) or not isinstance(tensors, dict):
            raise CorruptCheckpointError(f"{path}: {SHARDING_INFO} is not a map", path=path)
        yield path, tensors, info


def _hf_load(folder: str, map_location: Where = "cpu") -> dict[str, torch.Tensor]:
    return {
        key: assemble(key, entry, parts)
        for key, (entry, parts) in _hf_entries(folder, map_location).items()
    }


def _hf_entries(
    folder: str, map_location: Where
) -> dict[str, tuple[TensorEntry, list[tuple[Chunk, torch.Tensor]]]]:
    """Each tensor's checked entry and its chunks, as the shards map them (no copy)."""
    chunks: dict[str, list[tuple[Chunk, torch.Tensor, str]]] = {}
    for path, tensors, info in _hf_shards(folder, map_location):
        for key, tensor in tensors.items():
            record = info.get(key, {"saved_offsets": [0] * tensor.dim()})
            offsets = record.get("saved_offsets") if isinstance(record, dict) else None
            if not (
                isinstance(offsets, list)
                and len(offsets) == tensor.dim()
                and all(type(o) is int and 0 <= o < 2**63 for o in offsets)
            ):
                raise CorruptCheckpointError(
                    f"{path}: {SHARDING_INFO} has no offsets for {key!r:.80}", path=path
                )
            chunks.setdefault(key, []).append(
                (Chunk(tuple(offsets), tuple(tensor.shape)), tensor, path)
            )
    entries = {}
    for key, parts in chunks.items():
        dtypes = {t.dtype for _, t, _ in parts}
        path = parts[0][2]
        shape = tuple(max(c.offsets[d] + c.sizes[d] for c, _, _ in parts)
                      for d in range(len(parts[0][0].sizes)))  # fmt: skip
        if len(dtypes) != 1:
            raise CorruptCheckpointError(
                f"{path}: the chunks of {key!r:.80} differ in dtype", path=path
            )
        entry = TensorEntry(dtypes.pop(), shape, tuple(c for c, _, _ in parts))
        check_tiling(path, key, entry)
        entries[key] = (entry, [(c, t) for c, t, _ in parts])
    return entries


# -- the API the dispatch calls ------------------------------------------------------------


def load(folder: str, *, map_location: Where = "cpu") -> object:
    """The whole, unsharded state of a DCP folder."""
    if not os.path.isfile(os.path.join(folder, METADATA)):
        return _hf_load(folder, map_location)
    reader = _Folder(folder, map_location)
    return nest(dict(reader.flat()), reader.meta.paths, os.path.join(folder, METADATA))


def deferred(folder: str) -> dict[str, Deferred] | None:
    """A DCP folder as the flat state dict :func:`load` would give, each tensor read and
    assembled only when asked for, so a writer holds one at a time; None when the folder is
    not such a dict (nested state, or a value that is not a tensor).

    Every chunk layout is checked first, from the metadata alone, so a bad one fails
    before anything is written.

    Raises:
        CorruptCheckpointError, UnsafeCheckpointError: as :func:`load`.
    """
    if not os.path.isfile(os.path.join(folder, METADATA)):
        # the shards are mapped, not read: only the assembly of each tensor costs memory
        return {
            key: Deferred(entry.dtype, entry.shape, functools.partial(assemble, key, entry, parts))
            for key, (entry, parts) in _hf_entries(folder, "cpu").items()
        }
    reader = _Folder(folder)
    meta = reader.meta
    names = {key: (meta.paths or {}).get(key, (key,)) for key in meta.entries}
    if not all(isinstance(e, TensorEntry) for e in meta.entries.values()) or not all(
        len(path) == 1 and type(path[0]) is str for path in names.values()
    ):
        return None
    plan: dict[str, Deferred] = {}
    for key, entry in meta.entries.items():
        entry = cast("TensorEntry", entry)
        check_tiling(os.path.join(folder, METADATA), key, entry)
        name = cast("str", names[key][0])
        if name in plan:
            raise conflict(os.path.join(folder, METADATA), key)
        plan[name] = Deferred(
            entry.dtype, entry.shape, functools.partial(reader.tensor, key, entry)
        )
    return plan


def deferred_tree(folder: str) -> object:
    """What :func:`load` gives, each tensor a :class:`Deferred` assembled only when it is
    written (values are read now): a torchvault file is written from it one tensor at a
    time. Every chunk layout is checked first.

    Raises:
        CorruptCheckpointError, UnsafeCheckpointError: as :func:`load`.
    """
    if not os.path.isfile(os.path.join(folder, METADATA)):
        return deferred(folder)
    reader = _Folder(folder)
    meta = reader.meta
    where = os.path.join(folder, METADATA)
    flat: dict[str, object] = {}
    for key, entry in meta.entries.items():
        if isinstance(entry, TensorEntry):
            check_tiling(where, key, entry)
            flat[key] = Deferred(
                entry.dtype, entry.shape, functools.partial(reader.tensor, key, entry)
            )
        else:
            flat[key] = reader.value(key, entry)
    return nest(flat, meta.paths, where)


def verify(folder: str) -> VerifyReport:
    """Every item read (every zip CRC checked) and every tensor's chunks tiled."""
    if not os.path.isfile(os.path.join(folder, METADATA)):
        state = _hf_load(folder)
        size = sum(
            os.path.getsize(os.path.join(folder, n))
            for n in _names(folder)
            if HF_SHARD.fullmatch(n)
        )
        return VerifyReport(folder, len(state), size, False)
    reader = _Folder(folder)
    tensors = sum(isinstance(v, torch.Tensor) for _, v in reader.flat())
    checked = sum(len(m) for m in reader.files.values())
    return VerifyReport(folder, tensors, checked, reader.crcs and bool(reader.files))


def inspect(folder: str) -> CheckpointInfo:
    """Keys, dtypes and global shapes from the metadata alone (no tensor data read)."""
    if not os.path.isfile(os.path.join(folder, METADATA)):
        state = _hf_load(folder)
        infos = tuple(_info(k, t.dtype, tuple(t.shape)) for k, t in state.items())
        return _checkpoint_info(folder, "dcp-hf", infos)
    meta = read_metadata(folder)
    shaped = {k: e for k, e in meta.entries.items() if isinstance(e, TensorEntry)}
    names = _nested_names(meta)
    infos = tuple(_info(names[k], e.dtype, e.shape) for k, e in shaped.items())
    return _checkpoint_info(folder, "dcp", infos)


def _nested_names(meta: DcpMetadata) -> dict[str, str]:
    """Each flat key's dotted path in the loaded (nested) state, as ``tv.inspect`` names it."""
    from .._tree import flatten

    marks = {key: _Mark(key) for key in meta.entries}
    tree = nest(dict(marks), meta.paths, METADATA)
    return {mark.key: name for name, mark in flatten(tree) if isinstance(mark, _Mark)}


class _Mark:
    def __init__(self, key: str) -> None:
        self.key = key


def _info(key: str, dtype: torch.dtype, shape: Offsets) -> TensorInfo:
    return TensorInfo(
        key, str(dtype).removeprefix("torch."), shape, math.prod(shape) * dtype.itemsize
    )


def _checkpoint_info(folder: str, kind: str, infos: tuple[TensorInfo, ...]) -> CheckpointInfo:
    size = sum(
        os.path.getsize(os.path.join(folder, n))
        for n in _names(folder)
        if os.path.isfile(os.path.join(folder, n))
    )
    return CheckpointInfo(
        path=folder, format=kind, format_version=None, tensors=infos, file_bytes=size,
        metadata={}, versions={}, created=None,
    )  # fmt: skip


def folder_of(path: str) -> str | None:
    """The DCP folder when ``path`` is its ``.metadata`` file, else None."""
    if os.path.basename(path) == METADATA and os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        return folder if is_dcp_folder(folder) else None
    return None
