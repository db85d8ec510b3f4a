"""One checkpoint of a run read in one process, without a lock: what ``tv.inspect``,
``tv.verify`` and ``tv.convert`` do with ``RUN@STEP``, and the CLI with them.

A checkpoint is classic (a tree and tensor table, written by one process) or sharded (chunks
written by several ranks, ``_sharded``). Both are described from the manifest alone and
verified object by object; a sharded one is handed to a converter as
:class:`~torchvault._format.Deferred` tensors, each assembled only when it is written, so a
conversion holds one whole tensor at a time, never the whole model.

The items of a checkpoint are what ``tv.load("RUN@STEP")`` returns: ``{item: state}`` for a
manager's checkpoint, and the saved state itself for one written by ``dcp.save`` directly
(its manifest lists no items).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from .. import _sources, _tree
from .._chunks import nest
from .._format import Deferred
from .._report import CheckpointInfo, TensorInfo, VerifyReport
from .._tensors import MapLocation, TensorTable
from ..errors import CheckpointNotFoundError, CorruptCheckpointError, UnsupportedTypeError
from . import _readers, _sharded
from ._store import RunStore, blobs_of

CLASSIC, SHARDED = "torchvault-run", "torchvault-run-sharded"  # CheckpointInfo.format


def checkpoint_of(spec: str) -> tuple[RunStore, int, str] | None:
    """The run and committed step ``spec`` names, and ``RUN@STEP`` to show for it: ``spec``
    is ``RUN@STEP`` or a run folder (its latest). None for anything else: a file (even one
    whose name holds an ``@``), a model or DCP folder.

    Raises:
        ValueError: ``RUN@STEP`` of a run folder whose ``STEP`` is not a step.
        CheckpointNotFoundError, UnsupportedFormatError: no run, or no such step in it.
    """
    run, ref = _sources.parse_source(spec)
    if ref is None:
        return None
    store = _sources.open_run(run)
    step = _sources.resolve_step(store, ref)
    return store, step, f"{run}@{step}"


def load(
    store: RunStore, step: int, *, item: str | None = None, map_location: MapLocation = None
) -> Any:
    """What ``tv.load("RUN@STEP")`` returns: the checkpoint's items (or one ``item``), full
    tensors, every object verified (see ``_readers.load_items``)."""
    return _readers.load_items(store, step, item=item, map_location=map_location)[1]


class Leaf:
    """A tensor of a checkpoint known from its manifest: dtype, shape and, for a global
    tensor of a sharded checkpoint, how to assemble it (``read``)."""

    def __init__(
        self,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        read: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        self.dtype, self.shape, self.read = dtype, shape, read

    def info(self, key: str) -> TensorInfo:
        nbytes = self.dtype.itemsize * math.prod(self.shape)
        return TensorInfo(key, str(self.dtype).removeprefix("torch."), self.shape, nbytes)


def items_of(store: RunStore, manifest: dict[str, Any], path: str) -> dict[str, Any]:
    """The checkpoint's items as :func:`tv.load` nests them, every tensor a :class:`Leaf`,
    from the manifest alone (no object read); every field and chunk layout checked.

    Raises:
        CorruptCheckpointError: a malformed manifest, or one that holds no items.
    """
    if _sharded.is_sharded(manifest):
        state = _sharded_tree(store, manifest, path)
        if "items" not in manifest:  # written by dcp.save directly: the state is the items
            state = {_readers.ITEMS: state}
    else:
        blobs = blobs_of(manifest, path)
        entries = manifest.get("tensors")
        if not isinstance(entries, list):
            raise CorruptCheckpointError(f"{path}: its tensor table is missing.", path=path)
        table = TensorTable(entries, tuple(b.entry() for b in blobs), _sharded.no_data, path)
        state = _tree.decode(manifest.get("tree"), lambda i: Leaf(*table.describe(i)[:2]))
    items = state.get(_readers.ITEMS) if isinstance(state, dict) else None
    if not isinstance(items, dict):
        raise CorruptCheckpointError(f"{path}: it holds no items.", path=path)
    return items


def _sharded_tree(store: RunStore, manifest: dict[str, Any], path: str) -> object:
    sharded = _sharded.parse(manifest, path)
    flat: dict[str, object] = {
        key: Leaf(
            spec.entry.dtype,
            spec.entry.shape,
            functools.partial(_sharded.tensor, store, key, spec),
        )
        for key, spec in sharded.tensors.items()
    }
    flat.update(_sharded.described_values(sharded, path, Leaf))
    return nest(flat, sharded.paths, path)


def describe(store: RunStore, step: int, label: str) -> CheckpointInfo:
    """What checkpoint ``step`` holds, as ``tv.inspect`` describes a file: its items' tensors
    (global shapes, for a sharded one) by dotted key, as ``tv.load("RUN@STEP")`` nests them;
    read from the manifest alone (no object is read).

    Raises:
        CorruptCheckpointError: the manifest is malformed, naming it.
        CheckpointNotFoundError: the step was pruned meanwhile.
    """
    manifest = store.manifest(step)
    path = str(store.manifest_path(step))
    with _readers.reading(store, step, path):
        items = items_of(store, manifest, path)
        tensors = tuple(leaf.info(k) for k, leaf in _tree.flatten(items) if isinstance(leaf, Leaf))
        blobs = blobs_of(manifest, path)
    created = manifest.get("created")
    return CheckpointInfo(
        path=label,
        format=SHARDED if _sharded.is_sharded(manifest) else CLASSIC,
        format_version=None,
        tensors=tensors,
        file_bytes=sum(blob.nbytes for blob in {b.digest: b for b in blobs}.values()),
        metadata=_strings(manifest.get("metadata")),
        versions=_strings(manifest.get("versions")),
        created=created if isinstance(created, str) else None,
    )


def verify(store: RunStore, step: int, label: str) -> VerifyReport:
    """Check checkpoint ``step`` completely: the manifest's seal and fields, every chunk
    layout, every object against its hash (one object in memory at a time), every value.

    Raises:
        CorruptCheckpointError: naming the manifest, and the object or key that is damaged.
        CheckpointNotFoundError: the step was pruned while it was read.
    """
    manifest = store.manifest(step)
    path = str(store.manifest_path(step))
    if not _sharded.is_sharded(manifest):
        _, state = _readers.load_tree(store, step, map_location="cpu")
        tensors = sum(1 for _, leaf in _tree.flatten(state[_readers.ITEMS]) if _is_array(leaf))
    else:
        with _readers.reading(store, step, path):
            items = items_of(store, manifest, path)
            sharded = _sharded.parse(manifest, path)
            for blob in sharded.blobs:  # mapped and hashed, then let go
                store.map_objects([blob])
            _sharded.values(store, sharded, path, "cpu")
        tensors = sum(1 for _, leaf in _tree.flatten(items) if isinstance(leaf, Leaf))
    checked = sum(b.nbytes for b in {b.digest: b for b in blobs_of(manifest, path)}.values())
    return VerifyReport(label, tensors, checked, True)


def _is_array(leaf: object) -> bool:
    return isinstance(leaf, torch.Tensor | np.ndarray)


def _strings(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


# ---------------------------------------------------------------------- converting


def flat_tensors(
    store: RunStore, step: int, item: str | None
) -> tuple[str | None, dict[str, Deferred] | None]:
    """What a safetensors target takes from checkpoint ``step``: a flat state dict (names to
    tensors). ``item`` names the item; with None, the items themselves when they are such a
    dict (``dcp.save(model.state_dict())``), else the one item that is (a module's state
    among an optimizer's and other values).

    Returns:
        The item chosen (None: the items themselves), and its tensors as
        :class:`Deferred` when every one is a global tensor of a sharded checkpoint (None:
        the caller loads the item; a classic checkpoint's objects are mapped, not copied).

    Raises:
        CheckpointNotFoundError: no item ``item``.
        UnsupportedTypeError: the item is no flat state dict, or no item is.
        ValueError: ``item=None`` and several items are flat state dicts.
    """
    manifest = store.manifest(step)
    path = str(store.manifest_path(step))
    where = f"step {step} of {store.root}"
    with _readers.reading(store, step, path):
        items = items_of(store, manifest, path)
    name, chosen = _choose(items, item, where)
    if not all(leaf.read is not None for leaf in chosen.values()):
        return name, None
    return name, {
        key: Deferred(leaf.dtype, leaf.shape, functools.partial(_read, store, step, path, read))
        for key, leaf in chosen.items()
        if (read := leaf.read) is not None
    }


def deferred_items(store: RunStore, step: int, item: str | None) -> object | None:
    """What ``tv.load("RUN@STEP")`` gives (or its ``item``), every global tensor of a sharded
    checkpoint a :class:`Deferred` assembled only when written (values decoded now); None
    for a classic checkpoint, whose objects a load maps without copying.

    Raises:
        CorruptCheckpointError: as a load; CheckpointNotFoundError: no item ``item``.
    """
    manifest = store.manifest(step)
    path = str(store.manifest_path(step))
    if not _sharded.is_sharded(manifest):
        return None
    with _readers.reading(store, step, path):
        sharded = _sharded.parse(manifest, path)
        flat: dict[str, object] = {
            key: Deferred(
                spec.entry.dtype,
                spec.entry.shape,
                functools.partial(
                    _read, store, step, path, functools.partial(_sharded.tensor, store, key, spec)
                ),
            )
            for key, spec in sharded.tensors.items()
        }
        flat.update(_sharded.values(store, sharded, path, "cpu"))
        state = nest(flat, sharded.paths, path)
    items: object = state
    if "items" in manifest:  # a manager's: {"items": ..., "rng": ...}
        items = state.get(_readers.ITEMS) if isinstance(state, dict) else None
    if not isinstance(items, dict):
        raise CorruptCheckpointError(f"{path}: it holds no items.", path=path)
    if item is None:
        return items
    if item not in items:
        raise CheckpointNotFoundError(
            f"step {step} of {store.root} has no item {item!r}; its items: "
            f"{sorted(map(str, items))}.",
            path=store.root,
        )
    chosen: object = items[item]
    return chosen


def _read(store: RunStore, step: int, path: str, read: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A streamed tensor, its errors named for the manifest as a load's are (a missing
    object is a damaged run, not a missing file: the converter must not say it could not
    write)."""
    with _readers.reading(store, step, path):
        return read()


def _choose(items: dict[str, Any], item: str | None, where: str) -> tuple[str | None, Any]:
    if item is not None:
        if item not in items:
            raise CheckpointNotFoundError(
                f"{where} has no item {item!r}; its items: {sorted(map(str, items))}.",
                path=where,
            )
        if not _is_flat(items[item]):
            raise UnsupportedTypeError(
                f"item {item!r} of {where} is not a flat state dict (names to tensors), which "
                "safetensors needs; convert it with to='tv', which keeps any nesting"
            )
        return item, items[item]
    if _is_flat(items):
        return None, items
    flat = sorted(name for name, state in items.items() if _is_flat(state))
    if len(flat) == 1:
        return flat[0], items[flat[0]]
    names = ", ".join(sorted(map(str, items)))
    if not flat:
        raise UnsupportedTypeError(
            f"{where} holds no flat state dict (names to tensors) among its items ({names}), "
            "which safetensors needs; convert it with to='tv', which keeps any nesting"
        )
    raise ValueError(
        f"item=None: {where} holds several state dicts of tensors ({', '.join(flat)}); pass "
        "item= the one to convert"
    )


def _is_flat(state: object) -> bool:
    return (
        isinstance(state, Mapping)
        and bool(state)
        and all(isinstance(k, str) and isinstance(v, Leaf) for k, v in state.items())
    )
