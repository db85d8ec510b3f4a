"""``StorageReader``: torch.distributed.checkpoint's loads, from a torchvault run.

The manifest is sealed JSON, checked field by field (``run/_sharded.parse``: chunks tile
their tensors, objects match their boxes) before DCP's ``Metadata`` is rebuilt from it; no
pickle is read. Each rank maps and verifies every object its plan reads before it copies
anything into a target, so a damaged object leaves the caller's tensors untouched.
Resharding is DCP's: its load planner intersects each local shard with the saved chunks.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader as _DcpReader

from .. import _args
from .._chunks import Chunk
from .._file import _gc_paused
from .._sources import open_run, resolve_step
from ..errors import CorruptCheckpointError, UnsupportedFormatError
from ..run._readers import StepRef, check_ref
from ..run._sharded import Sharded, chunk_tensor, is_sharded, parse, values
from ..run._store import RunStore
from ._layout import metadata_of


class StorageReader(_DcpReader):
    """Read checkpoint ``step`` of a torchvault run with ``torch.distributed.checkpoint``.

    Args:
        run: the run folder.
        step: ``"latest"``, ``"best"`` or a step number. Every rank must resolve it to the
            same checkpoint (checked); while a writer is saving, pass a number.

    Raises (inside ``dcp.load``, which wraps them for every rank):
        CheckpointNotFoundError: no run, or no such step.
        CorruptCheckpointError: a manifest or object that fails its checks; nothing was
            copied into the state when an object fails.
        UnsupportedFormatError: the step was saved by one process (read it with
            ``tv.load("RUN@STEP")`` or ``CheckpointManager.restore``).

    Example:
        >>> dcp.load(state, storage_reader=StorageReader("runs/exp1", step="latest"))
    """

    def __init__(self, run: str | os.PathLike[str], step: StepRef = "latest") -> None:
        super().__init__()
        self._run = _args.path(run, "run")
        self._ref = check_ref(step)
        self._step: int | None = None
        self._store: RunStore | None = None
        self._sharded: Sharded | None = None
        self._where: dict[MetadataIndex, int] = {}
        self._values: dict[str, object] | None = None
        self._path = ""
        self._error: Exception | None = None

    @property
    def step(self) -> int | None:
        """The step read (known once ``dcp.load`` has read the metadata)."""
        return self._step

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None and os.fspath(checkpoint_id) != self._run:
            raise ValueError(
                f"checkpoint_id {checkpoint_id!r:.80} differs from the reader's run "
                f"{self._run}; pass one or the other"
            )

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """DCP's ``Metadata``, rebuilt from the checked manifest.

        ``dcp.load`` swallows an exception raised here (it logs it, retries, then raises an
        ``AssertionError`` that hides it), so inside ``dcp.load`` a failure is kept and
        raised by :meth:`set_up_storage_reader`, which DCP reports for every rank; the
        metadata returned meanwhile is empty.
        """
        self._error = None
        try:
            return self._metadata()
        except Exception as exc:  # any failure: a bad run, and the OSError of an unreadable one
            self._error = exc
            return Metadata(state_dict_metadata={})

    def _metadata(self) -> Metadata:
        store = open_run(self._run)
        step = resolve_step(store, self._ref)
        manifest = store.manifest(step)
        path = str(store.manifest_path(step))
        if not is_sharded(manifest):
            raise UnsupportedFormatError(
                f"step {step} of {self._run} was saved by one process, not through "
                f"torch.distributed.checkpoint; read it with tv.load('{self._run}@{step}') or "
                "CheckpointManager.restore",
                path=path,
            )
        self._store, self._step, self._path = store, step, path
        self._sharded = parse(manifest, path)
        metadata, self._where = metadata_of(self._sharded)
        return metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        if self._error is not None:
            raise self._error  # read_metadata's, kept from DCP's fallback (see there)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return dataclasses.replace(plan, storage_data=self._step)

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        steps = {plan.storage_data for plan in plans}
        if len(steps) > 1:
            raise ValueError(
                f"the ranks read different checkpoints of {self._run} ({sorted(steps)}): "
                f"{self._ref!r} moved while they read it; pass a step number"
            )
        return plans

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> torch.futures.Future[None]:
        """Verify every object the plan reads, then copy each requested box into place."""
        store, sharded = self._store, self._sharded
        assert store is not None
        assert sharded is not None
        with _gc_paused():
            wanted = [
                sharded.blobs[self._index(req.storage_index)]
                for req in plan.items
                if req.type == LoadItemType.TENSOR
            ]
            mapped = store.map_objects(wanted)  # every hash checked before any copy
            if any(req.type == LoadItemType.BYTE_IO for req in plan.items):
                self._decoded()  # and every value decoded and checked, likewise
            for req in plan.items:
                if req.type == LoadItemType.BYTE_IO:
                    planner.load_bytes(req, self._value_bytes(req.storage_index.fqn))
                    continue
                fqn = req.storage_index.fqn
                blob = sharded.blobs[self._index(req.storage_index)]
                entry = sharded.tensors[fqn].entry
                source = chunk_tensor(mapped[blob.digest], entry, Chunk((), blob.shape))
                for dim, (start, length) in enumerate(
                    zip(req.storage_offsets, req.lengths, strict=True)
                ):
                    source = source.narrow(dim, start, length)
                target = planner.resolve_tensor(req).detach()
                if target.shape != source.shape:
                    raise CorruptCheckpointError(
                        f"{self._path}: {fqn!r:.80} is planned as {list(target.shape)} but the "
                        f"checkpoint holds {list(source.shape)} there",
                        path=self._path,
                    )
                target.copy_(source)
                planner.commit_tensor(req, target)
        future: torch.futures.Future[None] = torch.futures.Future()
        future.set_result(None)
        return future

    def _index(self, index: MetadataIndex) -> int:
        found = self._where.get(MetadataIndex(index.fqn, index.offset))
        if found is None:
            raise CorruptCheckpointError(
                f"{self._path}: no object holds {index.fqn!r:.80} at {list(index.offset or ())}",
                path=self._path,
            )
        return found

    def _decoded(self) -> dict[str, object]:
        """Every non-tensor value of the checkpoint, decoded once (objects verified)."""
        if self._values is None:
            assert self._store is not None
            assert self._sharded is not None
            self._values = values(self._store, self._sharded, self._path)
        return self._values

    def _value_bytes(self, fqn: str) -> io.BytesIO:
        """A non-tensor value for ``planner.load_bytes``, which ``torch.load``s it: the
        pickle is made here from the decoded, checked value, never read from the run."""
        buffer = io.BytesIO()
        torch.save(self._decoded()[fqn], buffer)
        buffer.seek(0)
        return buffer
