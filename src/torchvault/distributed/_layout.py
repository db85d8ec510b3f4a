"""Where the bytes of a sharded checkpoint go, and the manifest that says so.

Objects are cut at **fixed global block boundaries** along dim 0 (``block_rows``), not at the
boundaries of the sharding: a chunk that rank r owns is stored as the pieces it has in common
with the global blocks ``[k*B, (k+1)*B)``. The blocks of a tensor do not depend on the world
size, so a run resumed on another number of ranks writes the same objects for unchanged rows
and dedup survives resharding, as long as the shards hold whole blocks (benchmarks/
RESULTS-distributed.md measures the layouts: with 16 MiB blocks and 4-8 MiB shards nothing
survived a 4 -> 2 resume, with 4 MiB blocks everything did). Smaller blocks cost more objects
(files), hence 4 MiB.
Each piece is a box of the global tensor, so readers need no notion of blocks: the manifest's
chunks are the pieces, and DCP's load planner intersects them like any chunks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from .._dtypes import SAFETENSORS_NAME
from ..run._sharded import Sharded

BLOCK_BYTES = 4 << 20


def block_rows(shape: Sequence[int], itemsize: int, block_bytes: int | None) -> int | None:
    """Rows of dim 0 per block of a tensor of global ``shape``: the largest power of two
    whose rows hold at most ``block_bytes`` (at least one row); None: do not cut.

    A power of two, because sharding cuts at multiples of ``ceil(rows / world_size)``: with
    power-of-two shapes and world sizes, every shard boundary is then a block boundary,
    whatever the world size, as long as a shard holds at least a block. A shard smaller
    than a block is one object, as with ``block_bytes=None``."""
    if block_bytes is None or not shape:
        return None
    row = math.prod(shape[1:]) * itemsize
    if not row:
        return None
    rows = max(1, block_bytes // row)
    return 1 << (rows.bit_length() - 1)


def pieces(offsets: Sequence[int], sizes: Sequence[int], rows: int | None) -> list[tuple[int, int]]:
    """The (start, length) ranges of dim 0, relative to the chunk, that its pieces cover."""
    if rows is None or not sizes or sizes[0] == 0:
        return [(0, sizes[0] if sizes else 1)]
    start, end = offsets[0], offsets[0] + sizes[0]
    out = []
    while start < end:
        cut = min(end, (start // rows + 1) * rows)
        out.append((start - offsets[0], cut - start))
        start = cut
    return out


def dtype_name(dtype: torch.dtype) -> str:
    name = SAFETENSORS_NAME.get(dtype)
    if name is None:
        raise TypeError(f"torchvault cannot store tensors of dtype {dtype} in a sharded checkpoint")
    return name


def metadata_of(sharded: Sharded) -> tuple[Metadata, dict[MetadataIndex, int]]:
    """DCP's ``Metadata`` rebuilt from a checked manifest (no pickle), and for every chunk
    the index of its object in ``sharded.blobs``."""
    entries: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    where: dict[MetadataIndex, int] = {}
    position = {id(blob): i for i, blob in enumerate(sharded.blobs)}
    for key, spec in sharded.tensors.items():
        chunks = []
        for chunk, blob in zip(spec.entry.chunks, spec.blobs, strict=True):
            chunks.append(
                ChunkStorageMetadata(
                    offsets=torch.Size(chunk.offsets), sizes=torch.Size(chunk.sizes)
                )
            )
            where[MetadataIndex(key, torch.Size(chunk.offsets))] = position[id(blob)]
        entries[key] = TensorStorageMetadata(
            properties=TensorProperties(dtype=spec.entry.dtype),
            size=torch.Size(spec.entry.shape),
            chunks=chunks,
        )
    for key in value_keys(sharded):
        entries[key] = BytesStorageMetadata()
    planner_data: Any = (
        {key: tuple(parts) for key, parts in sharded.paths.items()}
        if sharded.paths is not None
        else None
    )
    return Metadata(state_dict_metadata=entries, planner_data=planner_data), where


def value_keys(sharded: Sharded) -> list[str]:
    """The flat keys of the non-tensor values, from the trees alone (nothing decoded)."""
    keys: list[str] = []
    for group in sharded.values:
        tree = group.tree
        if isinstance(tree, dict) and len(tree) == 1 and "dict" in tree:
            payload = tree["dict"]
            if isinstance(payload, dict):
                keys.extend(payload)
    return keys
