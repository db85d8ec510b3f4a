"""Run folders on the command line: opening one for reading, step references, the
``RUN@STEP`` syntax (``diff``, ``verify``, ``inspect``), and argument types.

Everything here reads only and takes no lock, so it works while a trainer writes the run.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os

from .. import _sources
from .._report import CheckpointInfo, CheckpointSummary, VerifyReport
from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from ..run import _consolidate, _readers
from ..run._readers import StepRef
from ..run._store import RunStore
from ._exit import UsageError

_RETRIES = 5  # listings retried when a concurrent prune deletes a checkpoint under them


def open_run(path: str | os.PathLike[str]) -> RunStore:
    """The run folder at ``path``, its marker checked; nothing is created or locked.

    Raises:
        CheckpointNotFoundError: nothing at ``path`` (exit 3).
        UnsupportedFormatError: a file, or a folder that is not a run (exit 1); a run written
            by a newer torchvault.
        CorruptCheckpointError: the run's marker is damaged (exit 1).
    """
    return _sources.open_run(path)


def summaries(store: RunStore) -> list[CheckpointSummary]:
    """``_readers.summarize``, retried when a checkpoint is deleted while it is listed."""
    for _ in range(_RETRIES - 1):
        found = _summaries_once(store)
        if found is not None:
            return found
    return _readers.summarize(store)


def _summaries_once(store: RunStore) -> list[CheckpointSummary] | None:
    try:
        return _readers.summarize(store)
    except CheckpointNotFoundError:
        if not store.exists():
            raise
        return None  # a manifest listed a moment ago was deleted: list again


def resolve(store: RunStore, ref: StepRef) -> int:
    """The committed step ``ref`` names.

    Raises:
        CheckpointNotFoundError: no such step, or the run has no checkpoint yet.
    """
    return _sources.resolve_step(store, ref)


def recorded_bests(store: RunStore) -> set[int]:
    """The steps a prune must keep as the run's best: the best as its newest checkpoint
    ranks it (see ``_readers.pick_best``), and the step its ``best`` pointer names, which a crash
    may have left behind the true best. Empty when no metric defines a best."""
    found = set()
    with contextlib.suppress(CorruptCheckpointError):
        found.add(store.ref("best"))
    steps = store.steps()
    if steps:
        found.add(_readers.best_of(store, steps)[0])
    return {step for step in found if step is not None}


# ---------------------------------------------------------------------- RUN@STEP


def parse_source(spec: str) -> tuple[str, StepRef | None]:
    """Split an operand into a path and a step reference (``None`` for a file): ``RUN@STEP``
    names a run's checkpoint (``STEP`` a number, ``latest`` or ``best``), a bare run folder
    ``RUN@latest``; any other existing file or folder is itself even if its name has an
    ``@``.

    Raises:
        UsageError: ``RUN@STEP`` of an existing folder whose ``STEP`` is not a step (exit 2).
    """
    try:
        return _sources.parse_source(spec)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def parse_step(text: str) -> StepRef:
    """``latest``, ``best`` or a step number."""
    return _sources.parse_step(text)


# ---------------------------------------------------------------------- argument types


def step_argument(text: str) -> StepRef:
    """argparse type: a step reference."""
    try:
        return parse_step(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def tolerance(text: str) -> float:
    """argparse type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0")
    return value


# ---------------------------------------------------------------------- verify and inspect


def step_info(store: RunStore, step: int, label: str) -> CheckpointInfo:
    """What checkpoint ``step`` of a run holds, as ``tv.inspect`` describes a file: its
    items' tensors by dotted key (global shapes for a sharded checkpoint), read from the
    manifest alone (no object is read)."""
    return _consolidate.describe(store, step, label)


def verify_step(store: RunStore, step: int, label: str) -> VerifyReport:
    """Check checkpoint ``step`` completely: the manifest's seal, every object against its
    hash, its tensor table and tree (or chunk layout, for a sharded checkpoint).

    Raises:
        CorruptCheckpointError: naming the manifest or object that is damaged.
        CheckpointNotFoundError: the step was pruned while it was read.
    """
    return _consolidate.verify(store, step, label)
