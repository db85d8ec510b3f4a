"""Naming a checkpoint to read: a file, a run folder, or one checkpoint of a run as
``RUN@STEP``; opening a run for reading.

Everything here reads only and takes no lock, so it works while a trainer writes the run.
``tv.diff`` and the command line share it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CheckpointNotFoundError, UnsupportedFormatError
from .run._readers import StepRef, resolve
from .run._store import RUN_FILE, RunStore


def open_run(path: str | os.PathLike[str]) -> RunStore:
    """The run folder at ``path``, its marker checked; nothing is created or locked.

    Raises:
        CheckpointNotFoundError: nothing at ``path``.
        UnsupportedFormatError: a file, or a folder that is not a run; a run written by a
            newer torchvault.
        CorruptCheckpointError: the run's marker is damaged.
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


def resolve_step(store: RunStore, ref: StepRef) -> int:
    """The committed step ``ref`` names.

    Raises:
        CheckpointNotFoundError: no such step, or the run has no checkpoint yet.
    """
    step = resolve(store, ref)
    if step is None:
        raise CheckpointNotFoundError(
            f"{store.root} has no checkpoint yet (no step {ref!r}).", path=store.root
        )
    return step


def parse_source(spec: str) -> tuple[str, StepRef | None]:
    """Split an operand into a path and a step reference (``None`` for a file or a folder
    that is not a run).

    A bare run folder means ``RUN@latest``; any other existing file or folder (a Hugging
    Face or DCP folder) is itself, even if its name has an ``@``; else ``RUN@STEP`` names a
    run's checkpoint (``STEP`` a number, ``latest`` or ``best``); anything else is taken as
    a file path.

    Raises:
        ValueError: ``RUN@STEP`` of an existing folder whose ``STEP`` is not a step, or
            ``@STEP`` without a run.
    """
    if os.path.isfile(os.path.join(spec, RUN_FILE)):
        return spec, "latest"
    if os.path.exists(spec):
        return spec, None
    if "@" in spec:
        run, _, ref = spec.rpartition("@")
        if not run:  # "@1" would open the current folder's parent name "" as a run
            raise ValueError(f"{spec!r}: the run folder before '@' is missing; write RUN@STEP")
        try:
            return run, parse_step(ref)
        except ValueError as exc:
            if os.path.isdir(run):
                raise ValueError(f"{spec!r}: {exc}") from None
    return spec, None


def parse_step(text: str) -> StepRef:
    """``latest``, ``best`` or a step number.

    Raises:
        ValueError: anything else.
    """
    if text in ("latest", "best"):
        return text  # type: ignore[return-value]
    if text.isascii() and text.isdigit():
        return int(text)
    raise ValueError(f"{text!r} is not a step: use a step number, 'latest' or 'best'")
