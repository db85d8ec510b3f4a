"""Tensors saved as chunks (boxes of a global tensor), as torch.distributed.checkpoint writes
them: the checks that chunks tile their tensor, the assembly of a whole tensor from them, and
the nesting of flat keys by DCP's flatten mapping. Shared by the reader of existing DCP folders
(``legacy/_dcp.py``) and the run store's sharded checkpoints (``run/_sharded.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import CorruptCheckpointError

Offsets = tuple[int, ...]
PathPart = str | int


@dataclass(frozen=True)
class Chunk:
    """One saved box of a tensor: where it starts in the global tensor, and its size."""

    offsets: Offsets
    sizes: Offsets


@dataclass(frozen=True)
class TensorEntry:
    """A tensor of the checkpoint: dtype, global shape and the chunks that tile it."""

    dtype: torch.dtype
    shape: Offsets
    chunks: tuple[Chunk, ...]


def check_tiling(path: str, key: str, entry: TensorEntry) -> None:
    """The chunks of ``entry`` cover its shape exactly once (else CorruptCheckpointError)."""
    shape = entry.shape
    total = 0
    for chunk in entry.chunks:
        if len(chunk.offsets) != len(shape) or len(chunk.sizes) != len(shape):
            raise _tiling(path, key, f"a chunk at {list(chunk.offsets)} has another rank")
        if any(o + s > n for o, s, n in zip(chunk.offsets, chunk.sizes, shape, strict=True)):
            raise _tiling(
                path, key, f"the chunk at {list(chunk.offsets)} of size {list(chunk.sizes)} "
                f"reaches past the shape {list(shape)}"
            )  # fmt: skip
        total += math.prod(chunk.sizes)
    # in bounds, pairwise disjoint and as many elements as the tensor: an exact tiling
    boxes = [c for c in entry.chunks if 0 not in c.sizes]
    # sweep along the dim the chunks are cut most along, so a sharding does not cost n**2
    d = max(range(len(shape)), key=lambda i: len({c.offsets[i] for c in boxes}), default=0)
    boxes.sort(key=lambda c: c.offsets[d] if shape else 0)
    for i, a in enumerate(boxes):
        for j in range(i + 1, len(boxes)):
            b = boxes[j]
            if shape and b.offsets[d] >= a.offsets[d] + a.sizes[d]:
                break  # no later chunk starts before a ends along d
            if all(
                bo < ao + asz and ao < bo + bsz
                for ao, asz, bo, bsz in zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=True)
            ):
                raise _tiling(
                    path, key, f"chunks at {list(a.offsets)} and {list(b.offsets)} overlap"
                )
    numel: int = math.prod(shape)
    if total != numel or not entry.chunks:
        raise _tiling(
            path, key, f"the chunks hold {total} elements, the shape {list(shape)} "
            f"{numel}: they leave a gap"
        )  # fmt: skip


def _tiling(path: str, key: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path}: the chunks of {key!r:.80} do not tile the tensor: {what}", path=path
    )


def assemble(
    key: str, entry: TensorEntry, parts: Iterable[tuple[Chunk, torch.Tensor]]
) -> torch.Tensor:
    """The global tensor from checked chunks that tile it: the chunk itself when it is the
    whole tensor. ``parts`` may make each chunk as it is asked for: each is let go once
    copied, so the peak is the tensor and one chunk."""
    whole: torch.Tensor | None = None
    for chunk, tensor in parts:
        if len(entry.chunks) == 1 and tensor.shape == entry.shape:
            return tensor
        if whole is None:
            whole = torch.empty(entry.shape, dtype=entry.dtype, device=tensor.device)
        view = whole
        for dim, (start, size) in enumerate(zip(chunk.offsets, chunk.sizes, strict=True)):
            view = view.narrow(dim, start, size)
        view.copy_(tensor)
        del tensor  # the generator reads the next chunk before the loop rebinds this name
    if whole is None:
        return torch.empty(entry.shape, dtype=entry.dtype)
    return whole


def nest(
    flat: dict[str, object], paths: dict[str, tuple[PathPart, ...]] | None, path: str
) -> object:
    """The state as DCP's flatten mapping nests it (lists where the indices are 0..n-1),
    or ``flat`` when there is no mapping."""
    if paths is None:
        return flat
    root: dict[PathPart, Any] = {}
    for key, value in flat.items():
        node = root
        parts = paths[key]
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if type(child) is not dict:
                raise conflict(path, key)
            node = child
        if parts[-1] in node:
            raise conflict(path, key)
        node[parts[-1]] = value
    return _lists(root)


def conflict(path: str, key: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path}: planner_data puts {key!r:.80} where another key already is", path=path
    )


def _lists(node: object) -> object:
    if type(node) is not dict:
        return node
    items = {k: _lists(v) for k, v in node.items()}
    if items and all(type(k) is int for k in items) and sorted(items) == list(range(len(items))):
        return [items[i] for i in range(len(items))]
    return items
