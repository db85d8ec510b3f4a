"""``StorageWriter``: torch.distributed.checkpoint's saves, into a torchvault run.

DCP plans the save (who writes which shard, replicated tensors written once) and gathers
the results; this writer stores each rank's chunks as content-addressed objects of the run
(cut at fixed global blocks, ``_layout``), skips every object the run already holds, and has
the coordinator commit one sealed JSON manifest once every rank's objects are durable. No
pickle is written: non-tensor values become typed JSON (``_tree``), DCP's metadata the
manifest's ``shards`` section.
"""

from __future__ import annotations

import datetime
import io
import os
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter as _DcpWriter
from torch.distributed.checkpoint.storage import WriteResult

from .. import _args, _tree
from .._file import _gc_paused, versions
from .._format import Blob
from .._tensors import TensorPlan
from ..errors import CheckpointWriteError
from ..run._manager_args import next_step
from ..run._sharded import FORMAT, LAYOUT
from ..run._store import RunStore
from ..storage import Storage
from ._layout import BLOCK_BYTES, block_rows, dtype_name, pieces

Commit = Callable[[dict[str, Any]], None]


class StorageWriter(_DcpWriter):
    """Write a ``torch.distributed.checkpoint`` save as checkpoint ``step`` of a torchvault run.

    Every rank passes one to ``dcp.save`` (or ``dcp.async_save``); the coordinator commits
    the checkpoint after every rank's objects are durable, so a failed or killed save
    commits nothing. Objects already in the run (unchanged or frozen tensors, on any rank,
    at any earlier step) are not written again.

    Args:
        run: the run folder (created when missing).
        step: the checkpoint's step: above the run's latest (0 to 10**12 - 1).
        block_bytes: tensors are stored in blocks of at most this many bytes (4 MiB), cut
            at fixed rows of the global tensor (a power of two of them), so that unchanged
            blocks are shared across steps even when the world size changes; ``None``
            stores each rank's chunk whole (objects then follow the sharding).

    Raises:
        TypeError, ValueError: a bad argument (naming it); in ``dcp.save``, a step at or
            below the run's latest (before anything is written).
        RunLockedError: in ``dcp.save``, a CheckpointManager is writing the run.

    Example:
        >>> dcp.save(state, storage_writer=StorageWriter("runs/exp1", step=100))
    """

    def __init__(
        self,
        run: str | os.PathLike[str] | Storage,
        step: int,
        *,
        block_bytes: int | None = BLOCK_BYTES,
    ) -> None:
        super().__init__()
        if not isinstance(run, Storage):
            run = _args.path(run, "run", also=" or a torchvault Storage")
        _args.step(step)
        if block_bytes is not None:
            what = "block_bytes must be an int >= 1, or None to store each rank's chunk whole"
            if isinstance(block_bytes, bool) or not isinstance(block_bytes, int):
                raise TypeError(f"{what}; got {type(block_bytes).__name__} {block_bytes!r:.40}")
            if block_bytes < 1:
                raise ValueError(f"{what}; got {block_bytes}")
        self._store = RunStore(run)
        self._step = step
        self._block_bytes = block_bytes
        self._rank = 0
        self._coordinator = False
        self.extra: dict[str, Any] = {}  # manifest fields the manager adds (metrics, items)
        self.commit: Commit | None = None  # the manager commits itself (it holds the lock)

    @property
    def step(self) -> int:
        return self._step

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None and os.fspath(checkpoint_id) != str(self._store.root):
            raise ValueError(
                f"checkpoint_id {checkpoint_id!r:.80} differs from the writer's run "
                f"{self._store.root}; pass one or the other"
            )

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._coordinator = is_coordinator
        self._rank = int(kwargs.get("rank", 0))
        if is_coordinator and self.commit is None:
            # refuse before any rank writes: a held run, or a step that cannot follow
            with self._store.storage.lock():
                self._store.create()
                next_step(self._step, self._store.steps(), self._store.root)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def storage_meta(self) -> None:
        return None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False  # never picked by DCP on its own: pass StorageWriter(...) explicitly

    # ------------------------------------------------------------------ writing

    def write_data(
        self, plan: SavePlan, planner: SavePlanner
    ) -> torch.futures.Future[list[WriteResult]]:
        """Store this rank's chunks and values; each result carries the objects it used."""
        blobs: list[Blob] = []
        owners: list[tuple[int, list[int]]] = []  # per tensor blob: item, piece offsets
        items: list[Any] = []
        values: dict[str, object] = {}
        with _gc_paused():
            for item in plan.items:
                if item.type == WriteItemType.BYTE_IO:
                    values[item.index.fqn] = _value(planner, item)
                    continue
                assert item.tensor_data is not None
                tensor = planner.resolve_data(item)
                assert isinstance(tensor, torch.Tensor)
                tensor = tensor.detach()
                chunk = item.tensor_data.chunk
                name = dtype_name(tensor.dtype)
                rows = block_rows(item.tensor_data.size, tensor.element_size(), self._block_bytes)
                for start, length in pieces(chunk.offsets, chunk.sizes, rows):
                    piece = tensor.narrow(0, start, length) if tensor.dim() else tensor
                    offsets = list(chunk.offsets)
                    if offsets:
                        offsets[0] += start
                    blobs.append(
                        Blob(item.index.fqn, name, tuple(piece.shape), piece,
                             piece.numel() * piece.element_size())
                    )  # fmt: skip
                    owners.append((len(items), offsets))
                items.append(item)
            group_plan = TensorPlan()
            tree = _tree.encode(values, group_plan.add) if values else None
            value_blobs = group_plan.finish() if values else []
        try:
            stored, written = self._store.put_all(blobs + value_blobs)
        except OSError as exc:  # the storage's own, or a CheckpointWriteError naming the file
            raise self._failed(exc, "could not write its shards") from exc
        results: list[dict[str, Any]] = [{"pieces": []} for _ in items]
        for (owner, offsets), blob in zip(owners, stored, strict=False):
            results[owner]["pieces"].append(
                [offsets, blob.digest, blob.dtype, list(blob.shape), blob.nbytes]
            )
        out = [
            WriteResult(index=item.index, size_in_bytes=sum(p[4] for p in r["pieces"]),
                        storage_data=r)
            for item, r in zip(items, results, strict=True)
        ]  # fmt: skip
        rank_data: dict[str, Any] = {"new": written, "rank": self._rank}
        if values:
            rank_data["group"] = [
                tree,
                group_plan.entries,
                [[b.digest, b.dtype, list(b.shape), b.nbytes] for b in stored[len(blobs) :]],
            ]
        index = MetadataIndex(f"torchvault/rank{self._rank}")
        out.append(WriteResult(index=index, size_in_bytes=0, storage_data=rank_data))
        future: torch.futures.Future[list[WriteResult]] = torch.futures.Future()
        future.set_result(out)
        return future

    # ------------------------------------------------------------------ committing

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Commit (coordinator): the manifest of every rank's objects, sealed, published
        last; then the ``latest`` pointer."""
        manifest = self.manifest(metadata, results)
        if self.commit is not None:
            self.commit(manifest)
            return
        with self._store.storage.lock():
            try:
                self._store.create()
                next_step(self._step, self._store.steps(), self._store.root)
                check_objects(self._store, manifest)
                self._store.commit(self._step, manifest)
            except OSError as exc:
                if not self._store.committed(self._step):
                    raise self._failed(exc, "could not commit the manifest") from exc
                raise self._failed(exc, "committed the manifest", committed=True) from exc
            try:
                self._store.set_ref("latest", self._step)
            except OSError as exc:
                raise self._failed(
                    exc, "could not move the latest pointer", committed=True
                ) from exc

    def _failed(self, exc: OSError, what: str, *, committed: bool = False) -> CheckpointWriteError:
        """``exc`` as the error every rank's ``dcp.save`` reports: which rank, what it was
        doing, and whether the step is committed (DCP names the rank only in its traceback)."""
        path = exc.path if isinstance(exc, CheckpointWriteError) else exc.filename
        detail = str(exc) if isinstance(exc, CheckpointWriteError) else exc.strerror or str(exc)
        outcome = (
            f"Step {self._step} is committed all the same: readers find it (`latest` "
            "resolves to the highest committed step)."
            if committed
            else f"Nothing was committed on any rank; step {self._step} can be saved again."
        )
        return CheckpointWriteError(
            f"rank {self._rank} {what} for step {self._step} of {self._store.root}: "
            f"{detail.rstrip('.')}. {outcome}",
            path=str(path) if path is not None else str(self._store.root),
            errno=exc.errno,
        )

    def manifest(self, metadata: Metadata, results: list[list[WriteResult]]) -> dict[str, Any]:
        """The sharded manifest of a save (see ``run/_sharded.py`` for its fields)."""
        blobs: list[list[Any]] = []
        position: dict[tuple[str, str, tuple[int, ...]], int] = {}

        def index(digest: str, dtype: str, shape: list[int], nbytes: int) -> int:
            key = (digest, dtype, tuple(shape))  # one object may hold boxes of several ranks
            if key not in position:
                position[key] = len(blobs)
                blobs.append([digest, dtype, shape, nbytes])
            return position[key]

        tensors: dict[str, list[Any]] = {}
        groups: list[list[Any]] = []
        new = 0
        for rank_results in results:
            for result in rank_results:
                data = result.storage_data
                if "pieces" not in data:
                    new += data["new"]
                    if "group" in data:
                        tree, table, objects = data["group"]
                        groups.append([tree, table, [index(*b) for b in objects]])
                    continue
                fqn = result.index.fqn
                entry = metadata.state_dict_metadata[fqn]
                assert isinstance(entry, TensorStorageMetadata)
                spec = tensors.setdefault(
                    fqn, [dtype_name(entry.properties.dtype), list(entry.size), []]
                )
                spec[2].extend([offsets, index(*rest)] for offsets, *rest in data["pieces"])
        for spec in tensors.values():
            spec[2].sort(key=lambda chunk: chunk[0])
        missing = [
            k for k, e in metadata.state_dict_metadata.items()
            if isinstance(e, TensorStorageMetadata) and k not in tensors
        ]  # fmt: skip
        if missing:
            raise CheckpointWriteError(
                f"{self._store.root}: no rank wrote {missing[0]!r:.80}; nothing was committed",
                path=str(self._store.root),
                errno=None,
            )
        shards: dict[str, Any] = {"tensors": tensors, "values": groups}
        paths = metadata.planner_data
        if isinstance(paths, dict) and all(isinstance(p, tuple) for p in paths.values()):
            shards["paths"] = {key: list(parts) for key, parts in paths.items()}
        return {
            "torchvault": "checkpoint",
            "format": FORMAT,
            "layout": LAYOUT,
            "step": self._step,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
            "world_size": len(results),
            "metrics": {},
            "metadata": {},
            **self.extra,
            "shards": shards,
            "blobs": blobs,
            "bytes": {"total": sum(b[3] for b in blobs), "new": new},
        }


def check_objects(store: RunStore, manifest: dict[str, Any]) -> None:
    """Every object the manifest names is in place (a concurrent prune of a run whose
    writer does not hold the lock could have removed one), before it is committed."""
    for digest, _, _, nbytes in manifest["blobs"]:
        if store.storage.size(f"objects/{digest}") != nbytes:
            where = store.storage.describe(f"objects/{digest}")
            raise CheckpointWriteError(
                f"{where} vanished before step {manifest['step']} was committed (pruned by "
                "another writer?); nothing was committed. Save again.",
                path=where,
                errno=None,
            )


def _value(planner: SavePlanner, item: Any) -> object:
    """A non-tensor value as the caller's state holds it: the default planner's lookup, or
    (another planner) the ``torch.save`` bytes it made, read without unpickling."""
    lookup = getattr(planner, "lookup_object", None)
    if callable(lookup):
        return lookup(item.index)
    data = planner.resolve_data(item)
    assert isinstance(data, io.BytesIO)
    from .._open import load

    return load(data.getvalue())
