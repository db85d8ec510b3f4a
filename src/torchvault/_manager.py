"""CheckpointManager: a training run's checkpoints, resumable exactly, never lost.

The manager composes the pieces and holds no storage logic itself: the tree and tensor table
(``_tree``, ``_tensors``) describe the state, the run store (``_store``) writes objects,
manifests and pointers through the one commit protocol (``_commit``), retention policies
(``retention``) decide what goes, ``_rng`` captures the generators.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any, Literal

import torch

from . import _format, _rng, _tree, retention
from ._file import _gc_paused, save, versions
from ._format import Blob, flat_bytes
from ._load_into import load_into
from ._report import CheckpointSummary, LoadReport, ResumeReport
from ._store import RunStore, blobs_of
from ._tensors import MapLocation, TensorPlan, TensorTable
from .errors import (
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    RestoreMismatchError,
    TorchVaultError,
)
from .storage import Storage

StepRef = int | Literal["latest", "best"]
_NOTHING = torch.empty(0, dtype=torch.uint8)
_RNG = "rng"
_ITEMS = "items"


class CheckpointManager:
    """Saves a run's state every N steps and restores it exactly, whatever happened between.

    Args:
        directory: the run folder (created if missing), or any
            :class:`~torchvault.storage.Storage` (``MemoryStorage()`` for tests).
        keep_last, keep_best, keep_every: retention sugar, combined as a union; with none of
            them (and no ``policy``) every checkpoint is kept. The latest and the best are
            never deleted.
        monitor: the metric ``keep_best`` and the ``best`` pointer rank by.
        mode: ``"min"`` or ``"max"`` for ``monitor``.
        policy: any :class:`torchvault.retention.RetentionPolicy` (united with the sugar).
        async_save: ``save`` copies the tensors into reused buffers and returns; a background
            thread writes and commits. At most one save is in flight.

    Raises:
        RunLockedError: another manager is writing to ``directory``.

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
    ) -> None:
        self._policy = retention.from_arguments(
            keep_last=keep_last,
            keep_best=keep_best,
            monitor=monitor,
            mode=mode,
            keep_every=keep_every,
            policy=policy,
        )
        self._monitor, self._mode = monitor, mode
        self._store = RunStore(directory)
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(self._store.storage.lock())
        try:
            self._store.create()
            self._store.remove_temp_files()
            self._records = {step: self._record(step) for step in self._store.steps()}
            self._best_ref = _readable_ref(self._store, "best")
            latest = self.latest_step
            if latest is not None and _readable_ref(self._store, "latest") != latest:
                self._store.set_ref("latest", latest)  # a save killed before its pointer
        except BaseException:
            self._lock.close()
            raise
        self._executor = ThreadPoolExecutor(1, "torchvault-save") if async_save else None
        self._pending: Future[None] | None = None
        self._buffers: list[torch.Tensor] = []

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
            step: a step not committed yet.
            metrics: numbers to rank by (``val_loss``); tensors and numpy scalars are
                converted with ``float``.
            metadata: strings kept with the checkpoint.
            items: objects with ``state_dict``/``load_state_dict`` (modules, optimizers,
                schedulers, GradScaler, samplers, ...) or plain values the format holds.
                Random generator states and versions are added automatically.

        Raises:
            ValueError: ``step`` is already committed.
            CheckpointWriteError: the disk refused. Unless the message says the step is
                committed, nothing was; either way earlier checkpoints are intact.
        """
        self.wait()
        if step in self._records:
            raise ValueError(
                f"step {step} is already committed in {self._store.root}; "
                "save each step once (resume from report.step + 1)."
            )
        numbers = {name: float(value) for name, value in (metrics or {}).items()}
        kinds = {name: "state" if _stateful(item) else "value" for name, item in items.items()}
        state = {
            name: item.state_dict() if _stateful(item) else item for name, item in items.items()
        }
        with _gc_paused():
            plan = TensorPlan()
            tree = _tree.encode({_ITEMS: state, _RNG: _rng.capture()}, plan.add)
            blobs = plan.finish()
        manifest = {
            "torchvault": "checkpoint",
            "format": 1,
            "step": step,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "metrics": _tree.encode(numbers, _no_tensors),
            "metadata": dict(metadata or {}),
            "versions": versions(),
            "items": kinds,
            "tree": tree,
            "tensors": plan.entries,
        }
        if self._executor is None:
            self._write(step, manifest, blobs, numbers)
            return
        staged, digests = self._stage(blobs)
        self._pending = self._executor.submit(self._write, step, manifest, staged, numbers, digests)

    def _stage(self, blobs: list[Blob]) -> tuple[list[Blob], list[str | None]]:
        """Make the save independent of the live tensors before ``save`` returns.

        Blobs whose bytes an object of the run already holds (hashed here, straight from
        tensor memory) are passed on by digest alone; the others are copied into reused CPU
        buffers, so training may change the originals at once.
        """
        known = set().union(*(digests for _, digests in self._records.values()))
        del self._buffers[len(blobs) :]
        staged: list[Blob] = []
        digests: list[str | None] = []
        for i, blob in enumerate(blobs):
            source = flat_bytes(blob.source)
            digest = None
            if source.device.type == "cpu":
                digest = _format.hash_bytes(memoryview(source.numpy()))  # type: ignore[arg-type]
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
        stored, new = self._store.put_all(blobs, digests)
        manifest["blobs"] = [[b.digest, b.dtype, list(b.shape), b.nbytes] for b in stored]
        manifest["bytes"] = {"total": sum(b.nbytes for b in stored), "new": new}
        try:
            self._store.commit(step, manifest)
        except CheckpointWriteError:
            if not self._store.committed(step):
                raise
            self._records[step] = (numbers, {b.digest for b in stored})
            raise  # committed, but its folder sync failed: the message says so
        self._records[step] = (numbers, {b.digest for b in stored})
        try:
            self._store.set_ref("latest", step)
            best = self.best_step
            if self._monitor is not None and best is not None and best != self._best_ref:
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
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    # ------------------------------------------------------------------ retention

    def prune(self, *, dry_run: bool = False) -> list[int]:
        """Apply the retention policy now; return the steps deleted (or that would be)."""
        self.wait()
        return self._prune(dry_run=dry_run)

    def _prune(self, *, dry_run: bool) -> list[int]:
        records = [
            retention.CheckpointRecord(step, m) for step, (m, _) in sorted(self._records.items())
        ]
        protect = {s for s in (self.latest_step, self.best_step) if s is not None}
        doomed = retention.plan_deletions(records, self._policy, protect=protect)
        if dry_run or not doomed:
            return doomed
        for step in doomed:
            self._store.delete(step)
            del self._records[step]
        self._store.collect_garbage(set().union(*(d for _, d in self._records.values())))
        return doomed

    # ------------------------------------------------------------------ reading

    @property
    def steps(self) -> list[int]:
        """Every committed step, ascending."""
        return sorted(self._records)

    @property
    def latest_step(self) -> int | None:
        return max(self._records, default=None)

    @property
    def best_step(self) -> int | None:
        """The best step by ``monitor``; without a monitor, the step the run's ``best``
        pointer names (set by an earlier manager that had one), if it is still committed."""
        if self._monitor is None:
            return self._best_ref if self._best_ref in self._records else None
        records = [
            retention.CheckpointRecord(step, m) for step, (m, _) in sorted(self._records.items())
        ]
        return retention.best_step(records, self._monitor, self._mode)

    def metrics(self, step: int) -> dict[str, float]:
        """The metrics saved with ``step``."""
        if step not in self._records:
            raise CheckpointNotFoundError(f"step {step} is not committed in {self._store.root}.")
        return dict(self._records[step][0])

    def list(self) -> list[CheckpointSummary]:
        """A summary of every committed checkpoint."""
        return summarize(self._store)

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
            map_location: where tensors of non-module items go (``None``: where they were
                saved). Modules are copied into in place.
            items: the targets, by the names they were saved under.

        Returns:
            A :class:`ResumeReport`, or None when the run has no checkpoint yet.
        """
        self.wait()
        return restore(self._store, step, strict=strict, map_location=map_location, items=items)

    def export(
        self, step: StepRef, path: str | os.PathLike[str], *, item: str | None = None
    ) -> None:
        """Write a committed checkpoint (or one ``item`` of it) as a standalone torchvault file."""
        self.wait()
        export(self._store, step, path, item=item)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Finish the save in flight, then release the run's lock."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            self._lock.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _record(self, step: int) -> tuple[dict[str, float], set[str]]:
        manifest = self._store.manifest(step)
        path = str(self._store.manifest_path(step))
        return _metrics(manifest, path), {b.digest for b in blobs_of(manifest, path)}


# ---------------------------------------------------------------------- functions over a store


def resolve(store: RunStore, step: StepRef) -> int | None:
    """The step ``"latest"``, ``"best"`` or a number names; None when the run is empty."""
    steps = store.steps()
    if isinstance(step, int):
        if step not in steps:
            raise CheckpointNotFoundError(
                f"step {step} is not committed in {store.root}; committed: {steps[-10:]}.",
                path=store.root,
            )
        return step
    if not steps:
        return None
    if step == "latest":
        return steps[-1]  # the pointer is written after the commit: it can only lag behind
    with contextlib.suppress(CorruptCheckpointError):
        named = store.ref(step)
        if named in steps:
            return named
    return steps[-1]  # a missing or damaged best pointer: the newest committed checkpoint


def load_tree(
    store: RunStore, step: int, map_location: MapLocation = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest of ``step`` and its decoded state, every object verified."""
    manifest = store.manifest(step)
    path = str(store.manifest_path(step))
    blobs = blobs_of(manifest, path)
    by_digest = {b.digest: b for b in blobs}
    entries = manifest.get("tensors")
    if not isinstance(entries, list):
        raise CorruptCheckpointError(f"{path}: its tensor table is missing.", path=path)
    table = TensorTable(
        entries,
        tuple(b.entry() for b in blobs),
        lambda entry: store.map_object(by_digest[entry.name]),
        path,
        map_location,
    )
    with _gc_paused():
        try:
            state = _tree.decode(manifest.get("tree"), table.get)
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(f"{path}: {exc.message}", path=path, key=exc.key) from exc
        except CheckpointNotFoundError as exc:
            if step not in store.steps():
                raise CheckpointNotFoundError(
                    f"step {step} of {store.root} was pruned while it was being read.", path=path
                ) from exc
            raise CorruptCheckpointError(
                f"{path}: it refers to an object that is missing ({exc.message}); the run "
                "folder is damaged.",
                path=path,
            ) from exc
    if not isinstance(state, dict) or not isinstance(state.get(_ITEMS), dict):
        raise CorruptCheckpointError(f"{path}: it holds no items.", path=path)
    return manifest, state


def restore(
    store: RunStore,
    step: StepRef,
    *,
    strict: bool,
    map_location: MapLocation,
    items: Mapping[str, Any],
) -> ResumeReport | None:
    """``CheckpointManager.restore`` without a manager (no lock needed: reads only)."""
    chosen = resolve(store, step)
    if chosen is None:
        return None
    manifest, state = load_tree(store, chosen, map_location)
    path = str(store.manifest_path(chosen))
    saved, kinds = state[_ITEMS], manifest.get("items", {})
    stateful = {name for name in saved if kinds.get(name) == "state"}
    missing = tuple(sorted(stateful - set(items)))
    unexpected = tuple(sorted(set(items) - stateful))
    if strict and (missing or unexpected):
        raise RestoreMismatchError(
            _mismatch(path, missing, unexpected), missing=missing, unexpected=unexpected, path=path
        )
    reports: dict[str, LoadReport] = {}
    restored = []
    for name, target in items.items():
        if name not in stateful:
            continue
        if isinstance(target, torch.nn.Module):
            reports[name] = load_into(target, saved[name], strict=strict)
        else:
            target.load_state_dict(saved[name])
        restored.append(name)
    return ResumeReport(
        step=chosen,
        restored=tuple(restored),
        values={name: value for name, value in saved.items() if name not in stateful},
        missing=missing,
        unexpected=unexpected,
        rng=_rng.restore(state.get(_RNG, {}), path),
        metrics=_metrics(manifest, path),
        metadata=dict(manifest.get("metadata", {})),
        load_reports=reports,
        created=manifest.get("created"),
        versions=dict(manifest.get("versions", {})),
    )


def export(
    store: RunStore, step: StepRef, path: str | os.PathLike[str], *, item: str | None = None
) -> None:
    """Write checkpoint ``step`` (or one item of it) to a standalone torchvault file."""
    chosen = resolve(store, step)
    if chosen is None:
        raise CheckpointNotFoundError(f"{store.root} has no checkpoint to export.", path=store.root)
    _, state = load_tree(store, chosen)
    items = state[_ITEMS]
    if item is not None and item not in items:
        raise CheckpointNotFoundError(
            f"step {chosen} of {store.root} has no item {item!r}; its items: {sorted(items)}.",
            path=store.root,
        )
    metadata = {"run": str(store.root), "step": str(chosen)}
    save(items[item] if item is not None else items, path, metadata=metadata)


def summarize(store: RunStore) -> list[CheckpointSummary]:
    """Every committed checkpoint of a run, with size and pointers."""
    latest, best = resolve(store, "latest"), resolve(store, "best")
    out = []
    for step in store.steps():
        try:
            manifest = store.manifest(step)
        except CheckpointNotFoundError:
            continue  # pruned by the writer since steps() listed it
        sizes = manifest.get("bytes", {})
        out.append(
            CheckpointSummary(
                step=step,
                created=manifest.get("created"),
                metrics=_metrics(manifest, str(store.manifest_path(step))),
                total_bytes=int(sizes.get("total", 0)),
                new_bytes=int(sizes.get("new", 0)),
                latest=step == latest,
                best=step == best,
            )
        )
    return out


def _metrics(manifest: dict[str, Any], path: str) -> dict[str, float]:
    numbers = _tree.decode(manifest.get("metrics", {"dict": {}}), _no_tensors)
    if not isinstance(numbers, dict) or not all(
        isinstance(k, str) and isinstance(v, float) for k, v in numbers.items()
    ):
        raise CorruptCheckpointError(f"{path}: its metrics are not a map of numbers.", path=path)
    return numbers


def _no_tensors(*_: object) -> Any:
    raise CorruptCheckpointError("metrics hold numbers only, not tensors")


def _readable_ref(store: RunStore, name: str) -> int | None:
    try:
        return store.ref(name)
    except CorruptCheckpointError:
        return None  # a damaged pointer is rewritten by the next save


def _stateful(item: object) -> bool:
    return callable(getattr(item, "state_dict", None)) and callable(
        getattr(item, "load_state_dict", None)
    )


def _mismatch(path: str, missing: tuple[str, ...], unexpected: tuple[str, ...]) -> str:
    lines = [f"cannot restore {path} with strict=True:"]
    if missing:
        lines.append(f"  saved items given no target: {', '.join(missing)} (pass them as keywords)")
    if unexpected:
        lines.append(f"  targets with no saved item: {', '.join(unexpected)}")
    lines.append("Pass strict=False to restore what matches and list the rest in the report.")
    return "\n".join(lines)
