"""Sharded checkpoints of a run: what ``torchvault.distributed`` writes, read back in one
process without torch.distributed.

A sharded checkpoint is a manifest like any other (sealed JSON in ``checkpoints/``, objects in
``objects/``), marked ``"layout": "sharded"`` and ``"format": 2``, with a ``shards`` section
instead of a tree and tensor table::

    "world_size": 4,                                   ranks that saved it
    "blobs": [[digest, dtype, shape, nbytes], ...],    every object, as in any manifest
    "shards": {
      "tensors": {"model.w": ["F32", [1024, 64], [[[0, 0], 3], [[512, 0], 4]]]},
                  # flat key: dtype, global shape, chunks as [offsets in the global tensor,
                  # index of the object holding the box]; the box's sizes are the object's shape
      "values": [[tree, table, [object indices]], ...],
                  # non-tensor values, one group per writing rank: a typed JSON tree
                  # (``_tree``) of {flat key: value}, its tensor table and its objects
      "paths": {"model.w": ["model", "w"]}             DCP's flatten mapping (planner_data)
    }

Chunks must tile their tensor exactly; a flat key is a tensor or a value, never both, and
every key has a path when the mapping is present. :func:`parse` checks all of it before any
object is read, so a bad manifest is a :class:`CorruptCheckpointError`, never wrong data.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import _dtypes, _format, _tree
from .._chunks import Chunk, PathPart, TensorEntry, assemble, check_tiling, nest
from .._file import _gc_paused
from .._format import Deferred
from .._placement import MapLocation, Placement, check
from .._tensors import TensorTable
from ..errors import CorruptCheckpointError
from ._store import RunStore, StoredBlob, blobs_of

LAYOUT = "sharded"
FORMAT = 2
MAX_WORLD = 1 << 20
MAX_PATH = 100  # nesting of one flat key, as the legacy reader bounds it


@dataclass(frozen=True)
class ShardedTensor:
    """A global tensor: dtype, shape and chunks, and the object holding each chunk."""

    entry: TensorEntry
    blobs: tuple[StoredBlob, ...]


@dataclass(frozen=True)
class ValueGroup:
    """Non-tensor values one rank wrote: ``{flat key: value}`` as a typed JSON tree."""

    tree: _tree.Json
    table: list[Any]
    blobs: tuple[StoredBlob, ...]


@dataclass(frozen=True)
class Sharded:
    """A checked ``shards`` section."""

    world_size: int
    tensors: dict[str, ShardedTensor]
    values: tuple[ValueGroup, ...]
    paths: dict[str, tuple[PathPart, ...]] | None
    blobs: tuple[StoredBlob, ...]


def is_sharded(manifest: dict[str, Any]) -> bool:
    return manifest.get("layout") == LAYOUT


def _bad(path: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path}: {what}; the sharded checkpoint's manifest is damaged or crafted.", path=path
    )


def parse(manifest: dict[str, Any], path: str) -> Sharded:
    """The ``shards`` section of a sealed manifest, every field checked.

    Raises:
        CorruptCheckpointError: a malformed field; chunks that overlap, leave a gap, reach
            past the global shape or disagree with their object's dtype and shape.
    """
    world = manifest.get("world_size")
    if type(world) is not int or not 1 <= world <= MAX_WORLD:
        raise _bad(path, f"its world size {world!r:.40} is not a rank count")
    blobs = blobs_of(manifest, path)
    section = manifest.get("shards")
    if not isinstance(section, dict) or set(section) - {"tensors", "values", "paths"}:
        raise _bad(path, "its shards section is malformed")
    raw_tensors = section.get("tensors", {})
    raw_values = section.get("values", [])
    if not isinstance(raw_tensors, dict) or not isinstance(raw_values, list):
        raise _bad(path, "its shards section is malformed")
    tensors = {key: _tensor(path, key, spec, blobs) for key, spec in raw_tensors.items()}
    if len(raw_values) > world:  # each rank writes at most one group of values
        raise _bad(path, f"it has {len(raw_values)} value groups but {world} ranks wrote it")
    values = tuple(_group(path, i, spec, blobs) for i, spec in enumerate(raw_values))
    paths = _paths(path, section.get("paths"))
    if paths is not None and set(tensors) - set(paths):
        missing = sorted(set(tensors) - set(paths))[0]
        raise _bad(path, f"{missing!r:.80} has no path in the flatten mapping")
    return Sharded(world, tensors, values, paths, tuple(blobs))


def _tensor(path: str, key: object, spec: object, blobs: list[StoredBlob]) -> ShardedTensor:
    if not isinstance(key, str) or not isinstance(spec, list) or len(spec) != 3:
        raise _bad(path, f"tensor {key!r:.80} is malformed")
    dtype_name, shape, chunks = spec
    dtype = _dtypes.SAFETENSORS_DTYPE.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise _bad(path, f"tensor {key!r:.80} has an unknown dtype {dtype_name!r:.20}")
    if not _format.int_list(shape, _format.MAX_DIMS) or not _format.fits_int64(
        shape, dtype.itemsize
    ):
        raise _bad(path, f"tensor {key!r:.80} has a malformed shape")
    if not isinstance(chunks, list) or not chunks or len(chunks) > len(blobs):
        raise _bad(path, f"tensor {key!r:.80} has a malformed chunk list")
    boxes, stored = [], []
    for chunk in chunks:
        if (
            not isinstance(chunk, list)
            or len(chunk) != 2
            or not _format.int_list(chunk[0], len(shape))
            or len(chunk[0]) != len(shape)
            or type(chunk[1]) is not int
            or not 0 <= chunk[1] < len(blobs)
        ):
            raise _bad(path, f"a chunk of {key!r:.80} is malformed: {str(chunk)[:80]}")
        blob = blobs[chunk[1]]
        if blob.dtype != dtype_name or len(blob.shape) != len(shape):
            raise _bad(
                path, f"the chunk of {key!r:.80} at {chunk[0]} is stored as {blob.dtype} "
                f"{list(blob.shape)}, not as a box of a {dtype_name} {shape} tensor"
            )  # fmt: skip
        boxes.append(Chunk(tuple(chunk[0]), blob.shape))
        stored.append(blob)
    entry = TensorEntry(dtype, tuple(shape), tuple(boxes))
    check_tiling(path, key, entry)
    return ShardedTensor(entry, tuple(stored))


def _group(path: str, index: int, spec: object, blobs: list[StoredBlob]) -> ValueGroup:
    if (
        not isinstance(spec, list)
        or len(spec) != 3
        or not isinstance(spec[1], list)
        or not isinstance(spec[2], list)
        or not all(type(i) is int and 0 <= i < len(blobs) for i in spec[2])
    ):
        raise _bad(path, f"value group {index} is malformed")
    return ValueGroup(spec[0], spec[1], tuple(blobs[i] for i in spec[2]))


def _paths(path: str, raw: object) -> dict[str, tuple[PathPart, ...]] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _bad(path, "its flatten mapping is not an object")
    out: dict[str, tuple[PathPart, ...]] = {}
    for key, parts in raw.items():
        if (
            not isinstance(parts, list)
            or not 1 <= len(parts) <= MAX_PATH
            or not all(isinstance(p, str) or (type(p) is int and p >= 0) for p in parts)
        ):
            raise _bad(path, f"the path of {key!r:.80} is malformed")
        out[key] = tuple(parts)
    return out


# -- reading -------------------------------------------------------------------------------


def chunk_tensor(mapped: torch.Tensor, entry: TensorEntry, chunk: Chunk) -> torch.Tensor:
    """An object's bytes (a uint8 tensor) as the box ``chunk`` of ``entry``."""
    if mapped.numel() == 0:
        return torch.empty(chunk.sizes, dtype=entry.dtype)
    return mapped.view(entry.dtype).view(chunk.sizes)


def values(
    store: RunStore, sharded: Sharded, path: str, map_location: MapLocation | Placement = None
) -> dict[str, object]:
    """Every non-tensor value of the checkpoint by flat key, its objects verified."""
    placement = check(map_location)

    def source(group: ValueGroup) -> Callable[[int], object]:
        by_digest = {blob.digest: blob for blob in group.blobs}
        table = TensorTable(
            group.table,
            tuple(b.entry() for b in group.blobs),
            lambda e: store.map_objects([by_digest[e.name]])[e.name],
            path,
            placement,
        )
        return table.get

    return _decode_values(sharded, path, source)


def described_values(
    sharded: Sharded, path: str, leaf: Callable[[torch.dtype, tuple[int, ...]], object]
) -> dict[str, object]:
    """:func:`values` from the manifest alone: each tensor among them is ``leaf(dtype,
    shape)``, its entry checked and no object read (``inspect``)."""

    def source(group: ValueGroup) -> Callable[[int], object]:
        table = TensorTable(group.table, tuple(b.entry() for b in group.blobs), no_data, path)
        return lambda index: leaf(*table.describe(index)[:2])

    return _decode_values(sharded, path, source)


def no_data(entry: object) -> torch.Tensor:
    # describe() validates entries without fetching; a fetch here would be a bug
    raise CorruptCheckpointError(f"a description reads no object (asked for {entry!r:.80})")


def _decode_values(
    sharded: Sharded, path: str, source: Callable[[ValueGroup], Callable[[int], object]]
) -> dict[str, object]:
    out: dict[str, object] = {}
    for number, group in enumerate(sharded.values):
        decoded = _tree.decode(group.tree, source(group))
        if not isinstance(decoded, dict) or not all(isinstance(k, str) for k in decoded):
            raise _bad(path, f"value group {number} is not a map of flat keys")
        for key, value in decoded.items():
            if key in out or key in sharded.tensors:
                raise _bad(path, f"{key!r:.80} is stored twice")
            if sharded.paths is not None and key not in sharded.paths:
                raise _bad(path, f"{key!r:.80} has no path in the flatten mapping")
            out[key] = value
    return out


def _chunks(store: RunStore, tensor: ShardedTensor) -> Iterator[tuple[Chunk, torch.Tensor]]:
    for chunk, blob in zip(tensor.entry.chunks, tensor.blobs, strict=True):
        mapped = store.map_objects([blob])[blob.digest]
        yield chunk, chunk_tensor(mapped, tensor.entry, chunk)


def tensor(store: RunStore, key: str, sharded: ShardedTensor) -> torch.Tensor:
    """One global tensor, its objects mapped and verified one at a time."""
    return assemble(key, sharded.entry, _chunks(store, sharded))


def load_state(
    store: RunStore,
    manifest: dict[str, Any],
    path: str,
    map_location: MapLocation = None,
    *,
    under: Sequence[tuple[PathPart, ...]] | None = None,
    sharded: Sharded | None = None,
) -> object:
    """The whole, unsharded state of a sharded checkpoint: every tensor assembled from its
    verified objects (one at a time), values decoded, keys nested as they were saved. With
    ``under``, only the keys whose nested path starts with one of these prefixes;
    ``sharded``: the manifest already parsed."""
    sharded = parse(manifest, path) if sharded is None else sharded
    placement = check(map_location)

    def wanted(key: str) -> bool:
        if under is None:
            return True
        parts = (sharded.paths or {}).get(key, (key,))
        return any(parts[: len(prefix)] == prefix for prefix in under)

    with _gc_paused():
        flat = {k: v for k, v in values(store, sharded, path, placement).items() if wanted(k)}
        for key, spec in sharded.tensors.items():
            if wanted(key):
                flat[key] = placement.place(tensor(store, key, spec), "cpu")
    paths = sharded.paths
    if paths is not None:
        paths = {key: parts for key, parts in paths.items() if key in flat}
    return nest(flat, paths, path)


def deferred(store: RunStore, manifest: dict[str, Any], path: str) -> dict[str, Deferred]:
    """The checkpoint's tensors by dotted nested name, each assembled only when read (so a
    converter holds one at a time); non-tensor values are left out."""
    sharded = parse(manifest, path)
    names = _nested_names(sharded, path)
    return {
        names[key]: Deferred(
            spec.entry.dtype, spec.entry.shape, functools.partial(tensor, store, key, spec)
        )
        for key, spec in sharded.tensors.items()
    }


def _nested_names(sharded: Sharded, path: str) -> dict[str, str]:
    """Each flat tensor key's dotted path in the nested state (``tv.inspect``'s names)."""
    marks: dict[str, object] = {key: _Mark(key) for key in sharded.tensors}
    tree = nest(marks, {k: p for k, p in (sharded.paths or {}).items() if k in marks}
                if sharded.paths is not None else None, path)  # fmt: skip
    return {m.key: name for name, m in _tree.flatten(tree) if isinstance(m, _Mark)}


class _Mark:
    def __init__(self, key: str) -> None:
        self.key = key
