"""Run folders on the command line: opening one for reading, step references, the
``RUN@STEP`` syntax of ``diff``, and argument types.

Everything here reads only and takes no lock, so it works while a trainer writes the run.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import _run
from .._report import CheckpointSummary
from .._run import StepRef
from .._store import RUN_FILE, RunStore
from ..errors import CheckpointNotFoundError, CorruptCheckpointError, UnsupportedFormatError
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
    root = Path(path)
    name = os.fspath(path)
    if not root.exists():
        raise CheckpointNotFoundError(
            f"no run at {name}: the folder does not exist. Check the path.", path=name
        )
    if not root.is_dir():
        raise UnsupportedFormatError(
            f"{name} is a file, not a run folder; `torchvault inspect` reads checkpoint files.",
            path=name,
        )
    store = RunStore(root)
    if not store.exists():
        raise UnsupportedFormatError(
            f"{name} is not a torchvault run folder (it has no {RUN_FILE}); a run is the "
            "folder given to tv.CheckpointManager.",
            path=name,
        )
    store.check()
    return store


def summaries(store: RunStore) -> list[CheckpointSummary]:
    """``_run.summarize``, retried when a checkpoint is deleted while it is listed."""
    for _ in range(_RETRIES - 1):
        found = _summaries_once(store)
        if found is not None:
            return found
    return _run.summarize(store)


def _summaries_once(store: RunStore) -> list[CheckpointSummary] | None:
    try:
        return _run.summarize(store)
    except CheckpointNotFoundError:
        if not store.exists():
            raise
        return None  # a manifest listed a moment ago was deleted: list again


def resolve(store: RunStore, ref: StepRef) -> int:
    """The committed step ``ref`` names.

    Raises:
        CheckpointNotFoundError: no such step, or the run has no checkpoint yet.
    """
    step = _run.resolve(store, ref)
    if step is None:
        raise CheckpointNotFoundError(
            f"{store.root} has no checkpoint yet (no step {ref!r}).", path=store.root
        )
    return step


def recorded_bests(store: RunStore) -> set[int]:
    """The steps a prune must keep as the run's best: the best as its newest checkpoint
    ranks it (see ``_run.pick_best``), and the step its ``best`` pointer names, which a crash
    may have left behind the true best. Empty when no metric defines a best."""
    found = set()
    with contextlib.suppress(CorruptCheckpointError):
        found.add(store.ref("best"))
    steps = store.steps()
    if steps:
        found.add(_run.best_of(store, steps)[0])
    return {step for step in found if step is not None}


# ---------------------------------------------------------------------- RUN@STEP


@dataclass(frozen=True)
class Source:
    """One side of ``diff``: a checkpoint file, or one checkpoint of a run."""

    spec: str
    kind: str  # "file" or "run"
    path: str
    step: int | None = None

    def label(self) -> str:
        if self.kind == "file":
            return self.spec
        return f"{self.spec} (step {self.step})"

    def as_json(self) -> dict[str, Any]:
        return {"source": self.spec, "kind": self.kind, "path": self.path, "step": self.step}


def parse_source(spec: str) -> tuple[str, StepRef | None]:
    """Split a ``diff`` operand into a path and a step reference (``None`` for a file).

    An existing file is a file even if its name has an ``@``; ``RUN@STEP`` names a run's
    checkpoint (``STEP`` a number, ``latest`` or ``best``); a bare run folder means
    ``RUN@latest``; anything else is taken as a file path.
    """
    if os.path.isfile(spec):
        return spec, None
    if "@" in spec:
        run, _, ref = spec.rpartition("@")
        try:
            return run, parse_step(ref)
        except ValueError as exc:
            if os.path.isdir(run):
                raise UsageError(f"{spec!r}: {exc}") from None
    if os.path.isdir(spec):
        return spec, "latest"
    return spec, None


def parse_step(text: str) -> StepRef:
    """``latest``, ``best`` or a step number."""
    if text in ("latest", "best"):
        return text  # type: ignore[return-value]
    if text.isascii() and text.isdigit():
        return int(text)
    raise ValueError(f"{text!r} is not a step: use a step number, 'latest' or 'best'")


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
