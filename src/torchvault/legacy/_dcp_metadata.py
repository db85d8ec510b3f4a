"""DCP's ``.metadata`` pickle, read without unpickling it.

``torch.distributed.checkpoint`` writes its metadata with ``pickle.dump`` and reads it with
``pickle.load``. Here the same bytes go through torchvault's restricted unpickler with a table
of DCP's metadata classes only (:func:`table`): each becomes a record of ours that takes its
state from BUILD and runs nothing; every other global is refused by name. :func:`parse` then
checks the records field by field and returns plain frozen dataclasses of ours
(:class:`DcpMetadata`); no DCP class is imported or built.

Exactly what torch 2.13 writes is allowed: ``Metadata``, ``TensorStorageMetadata``,
``BytesStorageMetadata``, ``ChunkStorageMetadata``, ``TensorProperties`` (its layout through
``torch.serialization._get_layout`` and its ``_MEM_FORMAT_ENCODING``), ``StorageMeta``,
``MetadataIndex``, ``filesystem._StorageInfo``, ``torch.Size``, dtypes, and the
``pathlib`` path a ``checkpoint_id`` may be (kept as text).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from .. import _dtypes
from .._chunks import Chunk, Offsets, PathPart, TensorEntry
from .._format import fits_int64
from ..errors import CorruptCheckpointError, UnsupportedFormatError
from ._unpickler import Building, Global

METADATA = ".metadata"
MAX_DIMS = 64
MAX_DEPTH = 100  # nesting of the loaded state, as the legacy reader bounds it (_finish.py)
MAX_CHUNKS = 1 << 16  # per tensor: one per rank that holds a shard of it
# a relative_path DCP writes (``__0_0.distcp``, a prefix of the caller's): a plain name in
# the folder, never a path; checked before any file is opened
FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._\-]{0,254}")
_DCP = "torch.distributed.checkpoint.metadata"
_RECORDS = (
    f"{_DCP}.Metadata",
    f"{_DCP}.TensorStorageMetadata",
    f"{_DCP}.BytesStorageMetadata",
    f"{_DCP}.ChunkStorageMetadata",
    f"{_DCP}.TensorProperties",
    f"{_DCP}.StorageMeta",
    f"{_DCP}.MetadataIndex",
    "torch.distributed.checkpoint.filesystem._StorageInfo",
)
_PATHS = ("pathlib.PosixPath", "pathlib.PurePosixPath", "pathlib.WindowsPath",
          "pathlib.PureWindowsPath", "pathlib.Path")  # fmt: skip
_MEMORY_FORMATS = (torch.contiguous_format, torch.channels_last, torch.preserve_format)


@dataclass(frozen=True)
class BytesEntry:
    """A value DCP stored with ``torch.save`` (anything that is not a tensor)."""


@dataclass(frozen=True)
class Location:
    """Where one item's bytes are: a file of the folder and a byte range of it."""

    file: str
    offset: int
    length: int
    transforms: tuple[str, ...]


@dataclass(frozen=True)
class DcpMetadata:
    """What a DCP ``.metadata`` says, checked: entries by flat key, the location of every
    item (by key and chunk offsets, ``None`` for a bytes entry), and the nested path of
    each key when the saver recorded one."""

    entries: dict[str, TensorEntry | BytesEntry]
    locations: dict[tuple[str, Offsets | None], Location]
    paths: dict[str, tuple[PathPart, ...]] | None


# -- the unpickling table ------------------------------------------------------------------


class _Record(Building):
    """An instance of one of DCP's dataclasses: NEWOBJ makes it empty, BUILD gives it its
    state once (a dict of fields, or TensorProperties' tuple); nothing else acts on it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.what = name.rsplit(".", 1)[-1]
        self.state: object = None
        self.built = False

    def build(self, state: object) -> None:
        if self.built:
            raise CorruptCheckpointError(f"pickle BUILD sets the state of a {self.what} twice")
        if not (type(state) is dict and all(isinstance(k, str) for k in state)) and not (
            type(state) is tuple and self.what == "TensorProperties"
        ):
            raise CorruptCheckpointError(f"a {self.what} gets a state that is not its fields")
        self.state, self.built = state, True

    def value(self, finish: Any) -> object:
        return self  # parse() reads the fields; nothing is finished here


class _RecordClass(Global):
    def new(self, args: tuple[Any, ...]) -> object:
        if args != ():
            raise CorruptCheckpointError(f"{self.name} is instantiated with arguments")
        return _Record(self.name)


class _Call(Global):
    def __init__(self, name: str, build: Any) -> None:
        super().__init__(name)
        self._build = build

    def call(self, args: tuple[Any, ...]) -> object:
        return self._build(args)


def _size(args: tuple[Any, ...]) -> torch.Size:
    dims = args[0] if len(args) == 1 and type(args[0]) is tuple else None
    if dims is None or len(dims) > MAX_DIMS or not all(_index(n) for n in dims):
        raise CorruptCheckpointError("torch.Size is rebuilt from values other than sizes")
    return torch.Size(dims)


def _index(value: object) -> bool:
    return type(value) is int and 0 <= value < 2**63


def _layout(args: tuple[Any, ...]) -> torch.layout:
    if args == ("torch.strided",):
        return torch.strided
    raise UnsupportedFormatError(
        f"a tensor has layout {args[:1]!r:.60}; only strided (dense) tensors are read"
    )


def _memory_format(args: tuple[Any, ...]) -> torch.memory_format:
    if len(args) == 1 and type(args[0]) is int and 0 <= args[0] < len(_MEMORY_FORMATS):
        return _MEMORY_FORMATS[args[0]]
    raise CorruptCheckpointError(f"_MEM_FORMAT_ENCODING is rebuilt from {args!r:.60}")


def _path_text(args: tuple[Any, ...]) -> str:
    # a checkpoint_id given as a Path: kept as text, no path object is made
    if args and all(type(a) is str for a in args):
        return "/".join(args)
    raise CorruptCheckpointError("a pathlib path is rebuilt from values other than text")


def table() -> dict[str, object]:
    """The globals a DCP ``.metadata`` may name, by canonical ``module.name``: records and
    calls of ours, and dtype constants. Built per read, like the legacy table."""
    entries: dict[str, object] = {name: _RecordClass(name) for name in _RECORDS}
    entries["torch.Size"] = _Call("torch.Size", _size)
    entries["torch.serialization._get_layout"] = _Call("torch.serialization._get_layout", _layout)
    encoding = f"{_DCP}._MEM_FORMAT_ENCODING"
    entries[encoding] = _Call(encoding, _memory_format)
    for name in _PATHS:
        entries[name] = _Call(name, _path_text)
    for name, dtype in _dtypes.STORABLE.items():
        entries[f"torch.{name}"] = dtype
    entries["torch.strided"] = torch.strided
    return entries


# -- checking what was built ---------------------------------------------------------------


def _bad(path: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path}: {what}; torch.distributed.checkpoint never writes this", path=path
    )


def _fields(path: str, obj: object, kind: str, allowed: set[str]) -> dict[str, object]:
    if not (isinstance(obj, _Record) and obj.what == kind):
        raise _bad(path, f"a {kind} is expected, found {type(obj).__name__}")
    state = obj.state if obj.built else {}
    if type(state) is not dict or not set(state) <= allowed:
        found = sorted(map(str, state))[:8] if type(state) is dict else type(state).__name__
        raise _bad(path, f"a {kind} has fields {found}, expected some of {sorted(allowed)}")
    return state


def _dims(path: str, value: object, what: str) -> Offsets:
    if type(value) is not torch.Size:
        raise _bad(path, f"{what} is a {type(value).__name__}, not a torch.Size")
    return tuple(value)


def parse(path: str, obj: object) -> DcpMetadata:
    """Check the records the unpickler built from ``path`` and return ours.

    Raises:
        CorruptCheckpointError: a field of the wrong type or value, naming it.
    """
    meta = _fields(path, obj, "Metadata", {"state_dict_metadata", "planner_data", "storage_data",
                                           "storage_meta", "version"})  # fmt: skip
    items = meta.get("state_dict_metadata")
    if type(items) is not dict or not all(type(k) is str for k in items):
        raise _bad(path, "state_dict_metadata is not a map of keys")
    entries = {key: _entry(path, key, value) for key, value in items.items()}
    storage = meta.get("storage_data")
    if type(storage) is not dict:
        raise _bad(path, "storage_data is not a map from items to file locations")
    locations: dict[tuple[str, Offsets | None], Location] = {}
    for index, where in storage.items():
        key = _metadata_index(path, index)
        if key in locations:
            raise _bad(path, f"item {key[0]!r:.80} at {key[1]} is stored twice")
        locations[key] = _location(path, key[0], where)
    if "storage_meta" in meta and meta["storage_meta"] is not None:
        _fields(path, meta["storage_meta"], "StorageMeta",
                {"checkpoint_id", "save_id", "load_id", "modules"})  # fmt: skip
    version = meta.get("version")
    if version is not None and type(version) is not str:
        raise _bad(path, "version is not text")
    return DcpMetadata(entries, locations, _paths(path, meta.get("planner_data"), entries))


def _entry(path: str, key: str, obj: object) -> TensorEntry | BytesEntry:
    if isinstance(obj, _Record) and obj.what == "BytesStorageMetadata":
        _fields(path, obj, "BytesStorageMetadata", set())
        return BytesEntry()
    fields = _fields(path, obj, "TensorStorageMetadata", {"properties", "size", "chunks"})
    dtype = _properties(path, key, fields.get("properties"))
    shape = _dims(path, fields.get("size"), f"the size of {key!r:.80}")
    if not fits_int64(shape, dtype.itemsize):
        raise _bad(path, f"{key!r:.80} has shape {list(shape)}, too large for any tensor")
    chunks = fields.get("chunks")
    if type(chunks) is not list or len(chunks) > MAX_CHUNKS:
        raise _bad(path, f"the chunks of {key!r:.80} are not a list of up to {MAX_CHUNKS}")
    made = []
    for chunk in chunks:
        box = _fields(path, chunk, "ChunkStorageMetadata", {"offsets", "sizes"})
        offsets = _dims(path, box.get("offsets"), f"a chunk offset of {key!r:.80}")
        sizes = _dims(path, box.get("sizes"), f"a chunk size of {key!r:.80}")
        made.append(Chunk(offsets, sizes))
    return TensorEntry(dtype, shape, tuple(made))


def _properties(path: str, key: str, obj: object) -> torch.dtype:
    if not (isinstance(obj, _Record) and obj.what == "TensorProperties"):
        raise _bad(path, f"{key!r:.80} has no TensorProperties")
    state = obj.state
    if type(state) is dict:  # written by a dataclass without __getstate__ (torch < 2.1)
        state = tuple(state.get(f) for f in ("dtype", "layout", "requires_grad",
                                             "memory_format", "pin_memory"))  # fmt: skip
    if not (type(state) is tuple and len(state) == 5):
        raise _bad(path, f"the TensorProperties of {key!r:.80} are malformed")
    dtype, layout, requires_grad, memory_format, pinned = state
    if not (isinstance(dtype, torch.dtype) and dtype in _dtypes.STORABLE.values()):
        raise _bad(path, f"{key!r:.80} has dtype {dtype!r:.40}, not a tensor dtype")
    if layout is not torch.strided or type(requires_grad) is not bool or type(pinned) is not bool:
        raise _bad(path, f"the TensorProperties of {key!r:.80} are malformed")
    if memory_format not in _MEMORY_FORMATS or isinstance(memory_format, bool):
        raise _bad(path, f"the memory format of {key!r:.80} is malformed")
    return dtype


def _metadata_index(path: str, obj: object) -> tuple[str, Offsets | None]:
    fields = _fields(path, obj, "MetadataIndex", {"fqn", "offset", "index"})
    fqn, offset = fields.get("fqn"), fields.get("offset")
    index = fields.get("index")
    if type(fqn) is not str or not (index is None or _index(index)):
        raise _bad(path, "a MetadataIndex has no key text")
    return fqn, None if offset is None else _dims(path, offset, f"an offset of {fqn!r:.80}")


def _location(path: str, key: str, obj: object) -> Location:
    fields = _fields(path, obj, "_StorageInfo",
                     {"relative_path", "offset", "length", "transform_descriptors"})  # fmt: skip
    name, offset, length = fields.get("relative_path"), fields.get("offset"), fields.get("length")
    transforms = fields.get("transform_descriptors") or ()
    if not (type(name) is str and FILE_NAME.fullmatch(name) and ".." not in name):
        raise _bad(
            path,
            f"{key!r:.80} is stored in {name!r:.80}, which is not a plain file name in the folder",
        )
    if not (type(offset) is int and _index(offset) and type(length) is int and _index(length)):
        raise _bad(path, f"{key!r:.80} has a byte range {offset!r:.30}+{length!r:.30}, not sizes")
    if not (isinstance(transforms, (list, tuple)) and all(type(t) is str for t in transforms)):
        raise _bad(path, f"the transforms of {key!r:.80} are not text")
    return Location(name, offset, length, tuple(str(t) for t in transforms))


def _paths(
    path: str, planner: object, entries: dict[str, Any]
) -> dict[str, tuple[PathPart, ...]] | None:
    """The nested path of each key (DCP's flatten mapping), or None when the saver kept none
    for exactly these keys (then the keys stay flat)."""
    if planner is None:
        return None
    if type(planner) is not dict or not all(
        type(k) is str
        and type(v) is tuple
        and 0 < len(v) <= MAX_DEPTH  # every later walk of the nested state recurses per level
        and all(type(p) in (str, int) for p in v)
        for k, v in planner.items()
    ):
        raise _bad(
            path,
            f"planner_data is not a map from keys to paths (up to {MAX_DEPTH} names and indices)",
        )
    if set(planner) != set(entries):
        return None
    return dict(planner)
