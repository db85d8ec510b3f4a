"""Reading a run without a lock: which step a name means, a checkpoint's state, restoring it
into targets, exporting it, summarizing the run. The CLI and CheckpointManager share these."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch

from .. import _args, _tree
from .._file import _gc_paused, save
from .._format import Entry
from .._load_into import load_into
from .._report import CheckpointSummary, LoadReport, ResumeReport
from .._tensors import MapLocation, TensorTable
from ..errors import CheckpointNotFoundError, CorruptCheckpointError, RestoreMismatchError
from . import _rng, retention
from ._sharded import is_sharded, load_state
from ._store import RunStore, StoredBlob, blobs_of

StepRef = int | Literal["latest", "best"]
RNG = "rng"
ITEMS = "items"
STATE, VALUE, GENERATOR = "state", "value", "generator"  # the kinds of items a manifest lists


def check_ref(step: object) -> StepRef:
    """``step`` if it names a checkpoint the way every reader accepts.

    Raises:
        TypeError, ValueError: not a step number >= 0, ``"latest"`` or ``"best"`` (a
            misspelt name must never quietly mean the latest).
    """
    _args.step(step, refs=True)
    return cast(StepRef, step)


def resolve(store: RunStore, step: StepRef) -> int | None:
    """The step ``"latest"``, ``"best"`` or a number names; None when the run is empty.

    Raises:
        CheckpointNotFoundError: no such step, or ``"best"`` when no metric defines one.
        TypeError, ValueError: ``step`` is not a step reference (see :func:`check_ref`).
    """
    check_ref(step)
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
    best, why = best_of(store, steps)
    if best is None:
        raise CheckpointNotFoundError(
            f"{store.root} has no best checkpoint: {why}", path=store.root
        )
    return best


# ---------------------------------------------------------------------- what "best" means


@dataclass(frozen=True)
class Ranking:
    """The metric that defines a run's best, as a manifest records it: the manager's
    ``monitor`` (or its KeepBest policy's), and the best step when that checkpoint was saved."""

    metric: str
    mode: str
    best: int | None

    def document(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "best": self.best}


def ranking_of(manifest: dict[str, Any], path: str) -> Ranking | None:
    """The ranking a manifest records, or None (saved without a metric, or before manifests
    recorded one).

    Raises:
        CorruptCheckpointError: the field is there but malformed.
    """
    raw = manifest.get("monitor")
    if raw is None:
        return None
    best = raw.get("best") if isinstance(raw, dict) else None
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("metric"), str)
        or raw.get("mode") not in ("min", "max")
        or not (best is None or (type(best) is int and best >= 0))
    ):
        raise CorruptCheckpointError(f"{path}: its monitor entry is malformed.", path=path)
    return Ranking(raw["metric"], raw["mode"], best)


def pick_best(
    steps: Sequence[int],
    latest: Ranking | None,
    pointer: int | None,
    metrics: Callable[[int], Mapping[str, float] | None],
) -> tuple[int | None, str]:
    """The best of the committed ``steps``, and why there is none when there is none.

    The newest checkpoint's ranking decides: the best it recorded if still committed, else
    the best by its metric over ``metrics(step)`` (None: pruned meanwhile). A run whose newest
    checkpoint records no metric (older runs, managers without one) keeps the step its best
    pointer names, if committed. Otherwise no metric defines a best: never the latest.
    """
    if latest is not None:
        if latest.best in steps:
            return latest.best, ""
        records = []
        for step in steps:
            found = metrics(step)
            if found is not None:
                records.append(retention.CheckpointRecord(step, found))
        best = retention.best_step(records, latest.metric, latest.mode)
        return best, f"no checkpoint has a usable (present, non-NaN) {latest.metric!r}."
    if pointer in steps:
        return pointer, ""
    return None, (
        "no metric defines it: the run was saved without monitor= or a KeepBest policy. Ask "
        "for 'latest' or a step number, or rank the run with CheckpointManager(monitor=...)."
    )


def best_of(store: RunStore, steps: Sequence[int]) -> tuple[int | None, str]:
    """:func:`pick_best` over a run read without a lock (``steps``: its committed steps)."""
    newest = steps[-1]
    latest = ranking_of(store.manifest(newest), str(store.manifest_path(newest)))

    def metrics(step: int) -> Mapping[str, float] | None:
        try:
            return metrics_of(store.manifest(step), str(store.manifest_path(step)))
        except CheckpointNotFoundError:
            return None  # pruned by the writer since it was listed

    return pick_best(steps, latest, readable_ref(store, "best"), metrics)


def read_manifest(
    store: RunStore, step: int
) -> tuple[dict[str, Any], str, list[StoredBlob], list[Any]]:
    """The sealed manifest of ``step``, its path, the objects it lists and its tensor table."""
    manifest = store.manifest(step)
    path = str(store.manifest_path(step))
    blobs = blobs_of(manifest, path)
    entries = manifest.get("tensors")
    if not isinstance(entries, list):
        raise CorruptCheckpointError(f"{path}: its tensor table is missing.", path=path)
    return manifest, path, blobs, entries


def load_tree(
    store: RunStore,
    step: int,
    map_location: MapLocation = None,
    manifest: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest of ``step`` (read here unless given) and its decoded state, every object
    verified. A sharded checkpoint comes back whole; one written by ``dcp.save`` directly
    (not by a manager) has its state's top-level keys as items."""
    manifest = store.manifest(step) if manifest is None else manifest
    path = str(store.manifest_path(step))
    with _gc_paused(), reading(store, step, path):
        if is_sharded(manifest):
            state: object = load_state(store, manifest, path, map_location)
            if isinstance(state, dict) and "items" not in manifest:
                state = {ITEMS: state}
        else:
            state = _decode(store, manifest, path, map_location)
    if not isinstance(state, dict) or not isinstance(state.get(ITEMS), dict):
        raise CorruptCheckpointError(f"{path}: it holds no items.", path=path)
    return manifest, state


def _decode(
    store: RunStore, manifest: dict[str, Any], path: str, map_location: MapLocation
) -> object:
    blobs = blobs_of(manifest, path)
    entries = manifest.get("tensors")
    if not isinstance(entries, list):
        raise CorruptCheckpointError(f"{path}: its tensor table is missing.", path=path)
    mapped = store.map_objects(blobs)
    by_digest = {blob.digest: blob for blob in blobs}

    def fetch(entry: Entry) -> torch.Tensor:
        """Each blob its own memory: equal bytes saved twice must not come back as one
        tensor (two optimizer ``step`` counters, say)."""
        tensor = mapped.pop(entry.name, None)
        if tensor is None:
            return store.map_objects([by_digest[entry.name]])[entry.name]
        return tensor

    table = TensorTable(entries, tuple(b.entry() for b in blobs), fetch, path, map_location)
    return _tree.decode(manifest.get("tree"), table.get)


@contextlib.contextmanager
def reading(store: RunStore, step: int, path: str) -> Iterator[None]:
    """Errors of a read named for the manifest; a missing object is a pruned step (the
    writer deleted it meanwhile) or a damaged run."""
    try:
        yield
    except CorruptCheckpointError as exc:
        if exc.message.startswith(path):
            raise
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


def restore(
    store: RunStore,
    step: StepRef,
    *,
    strict: bool,
    map_location: MapLocation,
    items: Mapping[str, Any],
    load: Callable[[str, Any, Any], bool] | None = None,
    group: Any = None,
) -> ResumeReport | None:
    """``CheckpointManager.restore`` without a manager (no lock needed: reads only).

    A sharded checkpoint is restored through DCP (collectively over ``group``, the
    manager's ``distributed._collective.Group``, when given). For one saved by a single
    process, ``load(name, target, saved)`` may take over loading a stateful item (True when
    it did); restored on several ranks, its one random state is given to none of them (each
    would draw the same numbers) and the report says it was resharded from 1."""
    chosen = resolve(store, step)
    if chosen is None:
        return None
    manifest = store.manifest(chosen)
    if is_sharded(manifest):  # saved on several ranks: restored through DCP
        from ..distributed._manager import restore as restore_sharded

        return restore_sharded(
            store, chosen, manifest, items=items, strict=strict, map_location=map_location,
            group=group,
        )  # fmt: skip
    manifest, state = load_tree(store, chosen, map_location, manifest)
    ranks = 1 if group is None else group.world
    if ranks > 1:
        warnings.warn(
            f"step {chosen} of {store.root} was saved by one process and is restored on "
            f"{ranks} ranks: the random generators were not restored (every rank would draw "
            "the same numbers)",
            stacklevel=5,
        )
    path = str(store.manifest_path(chosen))
    saved, kinds = state[ITEMS], manifest.get("items", {})
    stateful = {name for name in saved if kinds.get(name) in (STATE, GENERATOR)}
    missing = tuple(sorted(stateful - set(items)))
    unexpected = tuple(sorted(set(items) - stateful))
    if strict and (missing or unexpected):
        raise RestoreMismatchError(
            _mismatch(path, missing, unexpected), missing=missing, unexpected=unexpected, path=path
        )
    for name, target in items.items():  # every target checked before any is changed
        if name in stateful:
            _check_target(name, kinds.get(name), target, saved[name], path)
    reports: dict[str, LoadReport] = {}
    restored = []
    for name, target in items.items():
        if name not in stateful:
            continue
        if kinds.get(name) == GENERATOR:
            _rng.set_generator(target, saved[name], name, path)
        elif load is not None and load(name, target, saved[name]):
            pass
        elif isinstance(target, torch.nn.Module):
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
        rng=_rng.restore(state.get(RNG, {}), path) if ranks == 1 else (),
        metrics=metrics_of(manifest, path),
        metadata=dict(manifest.get("metadata", {})),
        load_reports=reports,
        created=manifest.get("created"),
        versions=dict(manifest.get("versions", {})),
        resharded_from=None if ranks == 1 else 1,
    )


def load_items(
    store: RunStore,
    step: StepRef,
    *,
    item: str | None = None,
    map_location: MapLocation = None,
) -> tuple[int, Any]:
    """The chosen step and the state of its items (or of one ``item``), every object verified."""
    chosen = resolve(store, step)
    if chosen is None:
        raise CheckpointNotFoundError(f"{store.root} has no checkpoint yet.", path=store.root)
    _, state = load_tree(store, chosen, map_location)
    items = state[ITEMS]
    if item is None:
        return chosen, items
    if item not in items:
        raise CheckpointNotFoundError(
            f"step {chosen} of {store.root} has no item {item!r}; its items: {sorted(items)}.",
            path=store.root,
        )
    return chosen, items[item]


def export(
    store: RunStore, step: StepRef, path: str | os.PathLike[str], *, item: str | None = None
) -> None:
    """Write checkpoint ``step`` (or one item of it) to a standalone torchvault file."""
    chosen, state = load_items(store, step, item=item)
    save(state, path, metadata={"run": str(store.root), "step": str(chosen)})


def summarize(store: RunStore) -> list[CheckpointSummary]:
    """Every committed checkpoint of a run, with size and pointers."""
    steps = store.steps()
    latest = steps[-1] if steps else None
    best = best_of(store, steps)[0] if steps else None
    out = []
    for step in steps:
        try:
            manifest = store.manifest(step)
        except CheckpointNotFoundError:
            continue  # pruned by the writer since steps() listed it
        sizes = manifest.get("bytes", {})
        out.append(
            CheckpointSummary(
                step=step,
                created=manifest.get("created"),
                metrics=metrics_of(manifest, str(store.manifest_path(step))),
                total_bytes=int(sizes.get("total", 0)),
                new_bytes=int(sizes.get("new", 0)),
                latest=step == latest,
                best=step == best,
            )
        )
    return out


def metrics_of(manifest: dict[str, Any], path: str) -> dict[str, float]:
    numbers = _tree.decode(manifest.get("metrics", {"dict": {}}), no_tensors)
    if not isinstance(numbers, dict) or not all(
        isinstance(k, str) and isinstance(v, float) for k, v in numbers.items()
    ):
        raise CorruptCheckpointError(f"{path}: its metrics are not a map of numbers.", path=path)
    return numbers


def no_tensors(*_: object) -> Any:
    raise CorruptCheckpointError("metrics hold numbers only, not tensors")


def readable_ref(store: RunStore, name: str) -> int | None:
    try:
        return store.ref(name)
    except CorruptCheckpointError:
        return None  # a damaged pointer is rewritten by the next save


def is_stateful(item: object) -> bool:
    return callable(getattr(item, "state_dict", None)) and callable(
        getattr(item, "load_state_dict", None)
    )


def _check_target(name: str, kind: object, target: object, saved: object, path: str) -> None:
    if kind == GENERATOR:
        _rng.check_generator(target, saved, name, path)
        return
    if not isinstance(saved, Mapping):  # a state_dict() is always a mapping
        raise CorruptCheckpointError(
            f"{path}: item {name!r} is recorded as a state but holds a "
            f"{type(saved).__name__}; the run folder is damaged.",
            path=path,
        )
    if kind == STATE and not is_stateful(target):
        raise TypeError(
            f"restore({name}=...) needs an object with load_state_dict ({name!r} was saved "
            f"from one), got {type(target).__name__}"
        )


def _mismatch(path: str, missing: tuple[str, ...], unexpected: tuple[str, ...]) -> str:
    lines = [f"cannot restore {path} with strict=True:"]
    if missing:
        lines.append(f"  saved items given no target: {', '.join(missing)} (pass them as keywords)")
    if unexpected:
        lines.append(f"  targets with no saved item: {', '.join(unexpected)}")
    lines.append("Pass strict=False to restore what matches and list the rest in the report.")
    return "\n".join(lines)
