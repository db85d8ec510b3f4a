"""CheckpointManager: a training run's checkpoints, resumable exactly, never lost.

The manager composes the pieces and holds no storage logic itself: the tree and tensor table
(``_tree``, ``_tensors``) describe the state, the run store (``_store``) writes objects,
manifests and pointers through the one commit protocol (``_commit``), retention policies
(``retention``) decide what goes, ``_rng`` captures the generators.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import datetime
import os
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from .. import _args, _format, _placement, _tree
from .._commit import make_dirs
from .._file import _gc_paused, versions
from .._format import Blob, flat_bytes
from .._report import CheckpointSummary, ExportReport, ResumeReport
from .._tensors import MapLocation, TensorPlan
from ..errors import (
    CheckpointNotFoundError,
    CheckpointWriteError,
    ManagerClosedError,
    TorchVaultError,
)
from ..storage import Storage
from . import _rng, retention
from ._manager_args import (
    best_metric,
    check_metrics,
    kind_of,
    next_step,
    state_of,
)
from ._readers import (
    ITEMS,
    RNG,
    Ranking,
    StepRef,
    check_ref,
    export,
    load_items,
    metrics_of,
    no_tensors,
    pick_best,
    ranking_of,
    readable_ref,
    resolve,
    restore,
    summarize,
)

if TYPE_CHECKING:
    from ..distributed._collective import Group
from ._store import RunStore, blobs_of

_NOTHING = torch.empty(0, dtype=torch.uint8)


class _Record(NamedTuple):
    """What the manager keeps in memory about one committed checkpoint."""

    metrics: dict[str, float]
    digests: set[str]
    ranking: Ranking | None  # the metric that defined "best" when it was saved, if any


class CheckpointManager:
    """Saves a run's state every N steps and restores it exactly, whatever happened between.

    Args:
        directory: the run folder (created if missing), or any
            :class:`~torchvault.storage.Storage` (``MemoryStorage()`` for tests).
        keep_last, keep_best, keep_every: retention sugar, combined as a union; with none of
            them (and no ``policy``) every checkpoint is kept. The latest and the best are
            never deleted.
        monitor: the metric that defines the ``best`` checkpoint (and that ``keep_best``
            ranks by); every ``save`` must then report it in ``metrics``.
        mode: ``"min"`` or ``"max"`` for ``monitor``.
        policy: any :class:`torchvault.retention.RetentionPolicy` (united with the sugar). A
            :class:`~torchvault.retention.KeepBest` in it (also inside ``|``) defines the
            best as ``monitor`` does. Without either, the run has no best checkpoint.
        async_save: ``save`` copies the tensors into reused buffers and returns; a background
            thread writes and commits. At most one save is in flight.
        collective_timeout: under torch.distributed, the seconds a collective of the manager
            waits for the other ranks before it raises (a peer died or hangs); default 1800,
            torch.distributed's own default.

    Under torch.distributed (``init_process_group`` done), the manager is **collective**: every
    rank creates it with the same directory and calls ``save``, ``restore``, ``prune`` and
    ``close`` together. Modules and optimizers are saved sharded through
    torch.distributed.checkpoint (each rank writes only its shards; see
    :mod:`torchvault.distributed`), rank 0 holds the lock and commits once every rank's data is
    durable, and a checkpoint saved on N ranks restores on M. Every rank sees the same
    outcome: an error on one rank is raised on all.

    Raises:
        RunLockedError: another manager is writing to ``directory`` (or one of this process
            that was not closed).
        ValueError: ``monitor`` and the policy's KeepBest rank by different metrics or
            modes (the best must be one checkpoint).

    After :meth:`close` (or the end of a ``with`` block) every method raises
    :class:`ManagerClosedError`: the lock is released, so the manager writes nothing more.

    Example:
        >>> mgr = tv.CheckpointManager("runs/exp1", keep_last=3, keep_best=1, monitor="val_loss")
        >>> report = mgr.restore(model=model, optimizer=opt)
        >>> start = report.step + 1 if report else 0
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | Storage,
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        keep_every: int | None = None,
        monitor: str | None = None,
        mode: str = "min",
        policy: retention.RetentionPolicy | None = None,
        async_save: bool = False,
        collective_timeout: float | None = None,
    ) -> None:
        self._closed = True  # until the lock is held: a failed __init__ has nothing to close
        async_save = _args.flag(async_save, "async_save")  # "no" must not switch it on
        timeout = _timeout(collective_timeout)
        if not isinstance(directory, Storage):  # refuse a URL before any folder is made
            directory = _args.path(directory, "directory", also=" or a torchvault Storage")
        self._policy = retention.from_arguments(
            keep_last=keep_last,
            keep_best=keep_best,
            monitor=monitor,
            mode=mode,
            keep_every=keep_every,
            policy=policy,
        )
        self._metric = best_metric(monitor, mode, self._policy)
        self._store = RunStore(directory)
        self._lock = contextlib.ExitStack()
        self._group: Group | None = None
        if _collective_active():
            from ..distributed._collective import Group

            self._group = Group(timeout)  # collective: every rank creates the manager
            try:
                self._group.agree(self._open, "opening the run")  # rank 0 locks; all see errors
            except BaseException:
                self._group.close()
                raise
            if not self._group.coordinator:
                self._records = {step: self._record(step) for step in self._store.steps()}
                self._best_ref = readable_ref(self._store, "best")
        else:
            self._open()
        self._closed = False
        self._async = async_save
        self._executor = (
            ThreadPoolExecutor(1, "torchvault-save") if async_save and self._group is None else None
        )
        self._pending: Future[None] | None = None
        self._buffers: list[torch.Tensor] = []
        self._changed: set[int] = set()  # indices of the blobs the last save found changed
        self._sharded: tuple[Any, int] | None = None  # a distributed async save: future, step
        self._stager: Any = None  # the staging buffers of distributed async saves

    def _open(self) -> None:
        """Take the run's lock and read it: create it, clean leftovers of interrupted saves
        (temp files, unreferenced objects), repair pointers a crash left stale (the writer,
        or rank 0 of a collective run)."""
        self._lock.enter_context(self._store.storage.lock())
        try:
            self._store.create()
            self._store.remove_temp_files()
            self._records = {step: self._record(step) for step in self._store.steps()}
            # objects of saves killed before their commit (on any rank) are referenced by
            # no manifest: the writer that opens the run next removes them
            self._store.collect_garbage(self._digests())
            self._best_ref = readable_ref(self._store, "best")
            latest = self._latest()
            if latest is not None and readable_ref(self._store, "latest") != latest:
                self._store.set_ref("latest", latest)  # a save killed before its pointer
            best = self._run_best()[0]
            if best is not None and best != self._best_ref:
                self._store.set_ref("best", best)  # likewise, by the run's recorded metric
                self._best_ref = best
        except BaseException:
            self._lock.close()
            raise

    # ------------------------------------------------------------------ saving

    def save(
        self,
        step: int,
        *,
        metrics: Mapping[str, float] | None = None,
        metadata: Mapping[str, str] | None = None,
        **items: Any,
    ) -> None:
        """Commit a checkpoint of ``items`` at ``step``.

        Args:
            step: a step after the run's latest (0 to 10**12 - 1).
            metrics: numbers to rank by (``val_loss``); tensors and numpy scalars are
                converted with ``float``. Must include the manager's ``monitor``.
            metadata: strings kept with the checkpoint.
            items: objects with ``state_dict``/``load_state_dict`` (modules, optimizers,
                schedulers, GradScaler, samplers, ...), ``torch.Generator`` objects (a
                DataLoader's ``generator=``: its state and device), or plain values the
                format holds. Global random generator states and versions are added
                automatically.

        Under torch.distributed every rank calls it with the same step and item names (each
        with its own shards); the metrics and metadata of rank 0 are recorded. An error on
        any rank (an argument, a failed write) is raised on every rank, naming it.

        Raises:
            ValueError: ``step`` is at or below the latest committed step (restore first and
                continue from ``report.step + 1``, or use a new run folder), or ``metrics``
                lacks the monitored metric; nothing was written.
            TypeError: ``step``, ``metrics`` or ``metadata`` of the wrong type.
            CheckpointWriteError: the disk refused (on a rank its ``ranks`` names). Unless
                the message says the step is committed, nothing was; either way earlier
                checkpoints are intact.
            CollectiveError: another rank died or did not call ``save`` within
                ``collective_timeout``.
            ManagerClosedError: the manager was closed.
        """
        self._check_open()
        self._wait()
        prepared: builtins.list[dict[str, Any]] = []

        def check() -> tuple[int, _tree.Json, dict[str, str], dict[str, str]]:
            number = next_step(step, self._records.keys(), self._store.root)
            numbers = check_metrics(metrics)
            if self._metric is not None and self._metric[0] not in numbers:
                raise ValueError(
                    f"save(step {number}): the best checkpoint of {self._store.root} is ranked "
                    f"by {self._metric[0]!r}, but metrics has no {self._metric[0]!r}; it got "
                    f"{sorted(numbers)}. Report it (metrics={{{self._metric[0]!r}: ...}}), or "
                    "fix the monitor's spelling."
                )
            notes = _args.metadata(metadata) or {}
            kinds = {name: kind_of(item) for name, item in items.items()}
            if self._group is not None:  # a rank that cannot state its items fails them all
                from ..distributed._manager import state_to_save

                prepared.append(state_to_save(items, self._group.rank))
            return number, _tree.encode(numbers, no_tensors), notes, kinds

        if self._group is None:
            number, encoded, notes, kinds = check()
        else:  # every rank checks its arguments (same step and items); rank 0's metrics count
            number, encoded, notes, kinds = self._group.agree(
                check, "save", everywhere=True, same=lambda r: [r[0], r[3]]
            )
        numbers = metrics_of({"metrics": encoded}, str(self._store.root))
        fields = {"metrics": encoded, "metadata": notes, "items": kinds}
        if self._group is not None:
            self._save_sharded(number, fields, numbers, prepared[0])
            return
        plan, tree, blobs = _plan(items)
        manifest = {
            "torchvault": "checkpoint",
            "format": 1,
            "step": number,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **fields,
            "versions": versions(),
            "tree": tree,
            "tensors": plan.entries,
        }
        if self._executor is None:
            self._write(number, manifest, blobs, numbers)
            return
        staged, digests = self._stage(blobs)
        self._pending = self._executor.submit(
            self._write, number, manifest, staged, numbers, digests
        )

    def _save_sharded(
        self, step: int, fields: dict[str, Any], numbers: dict[str, float], state: dict[str, Any]
    ) -> None:
        """A collective save through torch.distributed.checkpoint: every rank writes its
        shards; rank 0 commits (in the writer's ``finish``) once all are durable."""
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict_saver import async_save, save

        from ..distributed._writer import StorageWriter

        assert self._group is not None
        writer = StorageWriter(self._store.root, step)
        writer.extra = fields
        writer.commit = lambda manifest: self._commit(step, manifest, numbers)
        try:
            if self._async:
                if self._stager is None:  # one stager: its CPU copies are reused every save
                    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

                    self._stager = DefaultStager(StagingOptions(False, False, False, False))
                future = async_save(
                    state,
                    storage_writer=writer,
                    process_group=self._group.pg,
                    async_stager=self._stager,
                )
                self._sharded = (future, step)
                return
            save(state, storage_writer=writer, process_group=self._group.pg)
        except (Exception, CheckpointException) as exc:
            raise self._failed(exc, step) from exc
        finally:
            if self._sharded is None:
                self._sync_records()

    def _failed(self, exc: BaseException, step: int) -> BaseException:
        """A failed collective save as every rank raises it: the peer's own argument error,
        or a CheckpointWriteError naming the failing ranks (saying so if rank 0 committed)."""
        from ..distributed._collective import peer_error, write_failure

        if isinstance(exc, TorchVaultError | TypeError | ValueError) and not hasattr(
            exc, "failures"
        ):
            return exc
        peer = peer_error(exc)
        if isinstance(peer, TypeError | ValueError) and not isinstance(peer, TorchVaultError):
            return peer
        self._sync_records()
        error = write_failure(exc, self._store.root, step)
        if step in self._records:
            return CheckpointWriteError(
                f"step {step} is committed and restore() will find it, but: {error.message}",
                path=self._store.root,
                errno=error.errno,
                ranks=error.ranks,
            )
        return error

    def _sync_records(self) -> None:
        """Every rank's view of the committed steps, after rank 0 committed or pruned."""
        if self._group is None:
            return
        steps = set(self._store.steps())
        for step in set(self._records) - steps:
            del self._records[step]
        for step in sorted(steps - set(self._records)):
            with contextlib.suppress(CheckpointNotFoundError):  # pruned meanwhile
                self._records[step] = self._record(step)
        self._best_ref = readable_ref(self._store, "best")

    def _prepare(self, sizes: list[int]) -> None:
        """Allocate and touch the staging buffers of an async save ahead of time (in the
        background), so the first save() does not pay for fresh memory's page faults."""
        del self._buffers[len(sizes) :]
        self._buffers.extend([_NOTHING] * (len(sizes) - len(self._buffers)))
        for i, size in enumerate(sizes):
            if self._buffers[i].numel() != size:
                self._buffers[i] = torch.zeros(size, dtype=torch.uint8)

    def _stage(self, blobs: list[Blob]) -> tuple[list[Blob], list[str | None]]:
        """Make the save independent of the live tensors before ``save`` returns.

        Blobs whose bytes an object of the run already holds (hashed here, straight from
        tensor memory) are passed on by digest alone; the others are copied into reused CPU
        buffers, so training may change the originals at once. Blobs that changed at the
        previous save (most of them, in ordinary training) are copied without hashing, as is
        everything when the run has no object yet: the background hashes the copies, and an
        unchanged copy is simply not written again.
        """
        known = self._digests()
        changed = self._changed
        del self._buffers[len(blobs) :]
        staged: list[Blob] = []
        digests: list[str | None] = []
        for i, blob in enumerate(blobs):
            source = flat_bytes(blob.source)
            digest = None
            if known and i not in changed and source.device.type == "cpu":
                digest = _format.hash_bytes(_format.byte_view(source))
            if digest in known:
                staged.append(blob._replace(source=_NOTHING))
                digests.append(digest)
                continue
            if i >= len(self._buffers):
                self._buffers.extend([_NOTHING] * (i + 1 - len(self._buffers)))
            if self._buffers[i].numel() != blob.nbytes:
                self._buffers[i] = torch.empty(blob.nbytes, dtype=torch.uint8)
            self._buffers[i].copy_(source)
            staged.append(blob._replace(source=self._buffers[i]))
            digests.append(None)
        return staged, digests

    def _write(
        self,
        step: int,
        manifest: dict[str, Any],
        blobs: list[Blob],
        numbers: dict[str, float],
        digests: list[str | None] | None = None,
    ) -> None:
        before = self._digests()
        stored, new = self._store.put_all(blobs, digests)
        if before:  # in a run's first checkpoint everything is new, which says nothing
            self._changed = {i for i, blob in enumerate(stored) if blob.digest not in before}
        manifest["blobs"] = [[b.digest, b.dtype, list(b.shape), b.nbytes] for b in stored]
        manifest["bytes"] = {"total": sum(b.nbytes for b in stored), "new": new}
        self._commit(step, manifest, numbers)

    def _commit(self, step: int, manifest: dict[str, Any], numbers: dict[str, float]) -> None:
        """Publish ``manifest`` (its objects durable), then pointers and retention."""
        ranking = None
        if self._metric is not None:  # readers without a manager learn "best" from here
            records = [*self._ranked(), retention.CheckpointRecord(step, numbers)]
            ranking = Ranking(*self._metric, retention.best_step(records, *self._metric))
            manifest["monitor"] = ranking.document()
        record = _Record(numbers, {blob[0] for blob in manifest["blobs"]}, ranking)
        try:
            self._store.commit(step, manifest)
        except CheckpointWriteError:
            if not self._store.committed(step):
                raise
            self._records[step] = record
            raise  # committed, but its folder sync failed: the message says so
        self._records[step] = record
        try:
            self._store.set_ref("latest", step)
            best = self._best()[0]
            if self._metric is not None and best is not None and best != self._best_ref:
                self._store.set_ref("best", best)
                self._best_ref = best
            self._prune(dry_run=False)
        except (OSError, TorchVaultError) as exc:
            raise CheckpointWriteError(
                f"step {step} is committed and restore() will find it, but updating the "
                f"run's pointers or retention failed afterwards: {exc}",
                path=self._store.root,
                errno=getattr(exc, "errno", None),
            ) from exc

    def wait(self) -> None:
        """Block until the save in flight (``async_save``) is committed; raise its error."""
        self._check_open()
        self._wait()

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()
        sharded, self._sharded = self._sharded, None
        if sharded is not None:
            future, step = sharded
            try:
                future.result()
            except BaseException as exc:
                raise self._failed(exc, step) from exc
            finally:
                self._sync_records()

    # ------------------------------------------------------------------ retention

    def prune(self, *, dry_run: bool = False) -> list[int]:
        """Apply the retention policy now; return the steps deleted (or that would be)."""
        self._check_open()
        dry_run = _args.flag(dry_run, "dry_run")  # read for its truthiness, "no" would delete
        self._wait()
        if self._group is None:
            return self._prune(dry_run=dry_run)
        doomed: list[int] = self._group.agree(lambda: self._prune(dry_run=dry_run), "prune")
        self._sync_records()
        return doomed

    def _prune(self, *, dry_run: bool) -> list[int]:
        records = self._ranked()
        protect = {s for s in (self._latest(), self._best()[0]) if s is not None}
        doomed = retention.plan_deletions(records, self._policy, protect=protect)
        if dry_run or not doomed:
            return doomed
        for step in doomed:
            self._store.delete(step)
            del self._records[step]
        self._store.collect_garbage(self._digests())
        return doomed

    # ------------------------------------------------------------------ reading

    @property
    def steps(self) -> list[int]:
        """Every committed step, ascending."""
        self._check_open()
        return sorted(self._records)

    @property
    def latest_step(self) -> int | None:
        """The newest committed step, or None in an empty run."""
        self._check_open()
        return self._latest()

    @property
    def best_step(self) -> int | None:
        """The best committed step by the metric that defines it: ``monitor`` or the
        policy's KeepBest. Without one, the run's own: the best its newest checkpoint recorded
        (recomputed by that metric if pruned), or else the step its ``best`` pointer names
        (an older run's). None when no metric defines a best, never the latest instead."""
        self._check_open()
        return self._best()[0]

    def metrics(self, step: int) -> dict[str, float]:
        """The metrics saved with ``step``."""
        self._check_open()
        _args.step(step)
        if step not in self._records:
            raise CheckpointNotFoundError(
                f"step {step} is not committed in {self._store.root}.", path=self._store.root
            )
        return dict(self._records[step].metrics)

    def list(self) -> list[CheckpointSummary]:
        """A summary of every committed checkpoint; ``best`` marks :attr:`best_step`."""
        self._check_open()
        best = self._best()[0]
        return [dataclasses.replace(c, best=c.step == best) for c in summarize(self._store)]

    def restore(
        self,
        step: StepRef = "latest",
        *,
        strict: bool = True,
        map_location: MapLocation = None,
        **items: Any,
    ) -> ResumeReport | None:
        """Load a checkpoint into ``items`` in place and restore the random generators.

        Args:
            step: ``"latest"``, ``"best"`` or a step number.
            strict: a saved item without a target, or a target without a saved item, raises
                :class:`RestoreMismatchError`; with False they are listed in the report.
            map_location: where tensors of non-module items go, as :func:`torchvault.load`
                takes it (``None``: where they were saved). Modules are copied into in place.
            items: the targets, by the names they were saved under.

        Returns:
            A :class:`ResumeReport`, or None when the run has no checkpoint yet.

        With ``async_save``, the staging buffers for these items are then prepared in the
        background, so the first save() returns as fast as later ones.

        Raises:
            CheckpointNotFoundError: no such step; ``"best"`` when no metric defines one.
            RestoreMismatchError: with ``strict``, items and targets differ.
            TypeError, ValueError: a target of the wrong kind (a ``torch.Generator`` item
                needs a generator on the same kind of device), or a bad ``step``.
        """
        self._check_open()
        strict = _args.flag(strict, "strict")  # an argument is checked before the run is read
        self._wait()
        step = self._resolve(step)
        _placement.check(map_location)  # a wrong one fails now, also when the run is empty
        if self._group is not None:
            return self._restore_collective(step, strict, map_location, items)
        report = restore(self._store, step, strict=strict, map_location=map_location, items=items)
        if self._executor is not None and items:
            sizes = [blob.nbytes for blob in _plan(items)[2]]
            self._pending = self._executor.submit(self._prepare, sizes)
        return report

    def _restore_collective(
        self, step: StepRef, strict: bool, map_location: MapLocation, items: dict[str, Any]
    ) -> ResumeReport | None:
        """Every rank restores the step rank 0 resolved; an error on any rank is raised on all."""
        from ..distributed._manager import whole_loader

        group = self._group
        assert group is not None
        chosen: int | None = group.agree(lambda: resolve(self._store, step), "restore")
        if chosen is None:
            return None

        def load() -> ResumeReport | None:
            return restore(
                self._store, chosen, strict=strict, map_location=map_location, items=items,
                load=whole_loader(items), group=group,
            )  # fmt: skip

        reports: list[ResumeReport | None] = []
        group.agree(lambda: reports.append(load()), "restore", everywhere=True)
        return reports[0]

    def load(
        self,
        step: StepRef = "latest",
        *,
        item: str | None = None,
        map_location: MapLocation = None,
    ) -> Any:
        """The saved state of a committed checkpoint, verified, without targets to load into.

        Returns a dict of its items (module and optimizer ``state_dict``s, plain values), or
        the state of one ``item``; tensors are mapped from the run's objects, not copied.
        Random generator states are not applied (that is :meth:`restore`'s job).

        A ``torch.Generator`` item comes back as ``{"device": ..., "state": uint8 tensor}``.

        Raises:
            CheckpointNotFoundError: the run has no such step (``"best"``: no metric defines
                one), or the step no such item.

        Example:
            >>> model.load_state_dict(mgr.load("best", item="model"))
        """
        self._check_open()
        self._wait()
        step = self._resolve(step)
        _placement.check(map_location)  # a wrong one fails now, also when the run is empty
        return load_items(self._store, step, item=item, map_location=map_location)[1]

    def export(
        self, step: StepRef, path: str | os.PathLike[str], *, item: str | None = None
    ) -> None:
        """Write a committed checkpoint (or one ``item`` of it) as a standalone torchvault file."""
        self._check_open()
        path = _args.path(path)
        self._wait()
        export(self._store, self._resolve(step), path, item=item)

    def export_program(
        self, step: StepRef, model: torch.nn.Module, example_inputs: Any, **options: Any
    ) -> ExportReport:
        """Attach a torch.export program of ``model`` to committed checkpoint ``step``: it runs
        without the model's class (``tv.load_program(run, step=...)``) and is deleted with
        the checkpoint. Options and report as :func:`torchvault.export_program`.

        Args:
            step: ``"latest"``, ``"best"`` or a committed step number, as :meth:`load` takes.

        Raises:
            CheckpointNotFoundError: no such step; ``"best"`` when no metric defines one.
            TypeError, ValueError: ``step`` is not a step reference.

        Example:
            >>> mgr.export_program(mgr.best_step, model, (x,), dynamic_shapes="batch")
            >>> program = tv.load_program("runs/exp1", step="best")
        """
        from ..export import export_program, program_path  # torch.export is heavy: on first use
        from ..export._program import held_run

        self._check_open()
        self._wait()
        if self._group is not None and not self._group.coordinator:
            raise ValueError(
                f"export_program writes into {self._store.root}, whose lock rank 0 holds: "
                f"call it on rank 0 only (this is rank {self._group.rank})"
            )
        resolved = self._resolve(step)  # "best" and "latest" as load() and export() take them
        number = self._latest() if resolved == "latest" else resolved
        if not isinstance(number, int) or number not in self._records:
            raise CheckpointNotFoundError(
                f"step {step} is not committed in {self._store.root}; export a committed step "
                f"({self.steps})",
                path=str(self._store.root),
            )
        path = program_path(self._store.root, number)
        make_dirs(path.parent)
        with held_run(self._store.root):  # this manager holds the run's lock already
            return export_program(model, example_inputs, path, **options)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Finish the save in flight, then release the run's lock. Calling it again does
        nothing; every other method of a closed manager raises :class:`ManagerClosedError`."""
        if self._closed:
            return
        try:
            self._wait()
        finally:
            self._closed = True
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            self._lock.close()
            if self._stager is not None:
                self._stager.close()
            if self._group is not None:
                self._group.close()

    def __enter__(self) -> CheckpointManager:
        self._check_open()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ManagerClosedError(
                f"this CheckpointManager of {self._store.root} is closed: it released the "
                "run's lock, so it saves, prunes and reads nothing more. Create a new one "
                "(tv.CheckpointManager(run)), or keep using it inside its `with` block.",
                path=self._store.root,
            )

    def _latest(self) -> int | None:
        return max(self._records, default=None)

    def _ranked(self) -> builtins.list[retention.CheckpointRecord]:
        return [retention.CheckpointRecord(s, r.metrics) for s, r in sorted(self._records.items())]

    def _best(self) -> tuple[int | None, str]:
        """The best step and, when there is none, why (as ``_readers.pick_best`` says it)."""
        if self._metric is not None:
            best = retention.best_step(self._ranked(), *self._metric)
            return best, f"no checkpoint has a usable (present, non-NaN) {self._metric[0]!r}."
        return self._run_best()

    def _run_best(self) -> tuple[int | None, str]:
        """The best as readers without a manager see it (``_readers.pick_best``)."""
        steps = sorted(self._records)
        latest = self._records[steps[-1]].ranking if steps else None
        return pick_best(steps, latest, self._best_ref, lambda s: self._records[s].metrics)

    def _resolve(self, step: StepRef) -> StepRef:
        """``"best"`` as this manager defines it (its metric may be newer than the run's
        newest checkpoint); other references as every reader resolves them."""
        check_ref(step)
        if step != "best" or not self._records:
            return step
        best, why = self._best()
        if best is None:
            raise CheckpointNotFoundError(
                f"{self._store.root} has no best checkpoint: {why}", path=self._store.root
            )
        return best

    def _digests(self) -> set[str]:
        """The objects the committed checkpoints refer to."""
        return set().union(*(record.digests for record in self._records.values()))

    def _record(self, step: int) -> _Record:
        manifest = self._store.manifest(step)
        path = str(self._store.manifest_path(step))
        return _Record(
            metrics_of(manifest, path),
            {b.digest for b in blobs_of(manifest, path)},
            ranking_of(manifest, path),
        )


def _plan(items: Mapping[str, Any]) -> tuple[TensorPlan, _tree.Json, list[Blob]]:
    """The tree, tensor table and blobs of a checkpoint of ``items`` and the RNG states."""
    state = {name: state_of(item) for name, item in items.items()}
    with _gc_paused():
        plan = TensorPlan()
        tree = _tree.encode({ITEMS: state, RNG: _rng.capture()}, plan.add)
        return plan, tree, plan.finish()


def _timeout(value: object) -> float:
    """``collective_timeout`` checked: seconds > 0, or None for the default."""
    from ..distributed._collective import DEFAULT_TIMEOUT

    if value is None:
        return DEFAULT_TIMEOUT
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"collective_timeout must be a number of seconds or None, got {type(value).__name__}"
        )
    if not 0 < value < float("inf"):
        raise ValueError(f"collective_timeout must be > 0 seconds, got {value}")
    return float(value)


def _collective_active() -> bool:
    """Whether this process is one rank of an initialized torch.distributed job."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()
