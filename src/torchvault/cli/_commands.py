"""The subcommands: each one function taking the parsed arguments and returning an exit code,
registered with the arguments it takes.

To add a command, write its function and register it::

    @command("ls", arguments=(PATH, JSON))
    def ls(args: argparse.Namespace) -> int:
        \"\"\"List the checkpoints of a folder.\"\"\"
        ...

The first line of the function's docstring is its one-line help.
"""

from __future__ import annotations

import argparse
import inspect as inspect_module
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torchvault as tv

from ..run._readers import StepRef
from ._exit import ExitCode, message_line, one_line
from ._progress import Progress
from ._render import inspect_json, inspect_text, verify_json, verify_text
from ._runs import open_run, parse_source, resolve, step_info, verify_step

Run = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Argument:
    """One ``add_argument`` call: its flags or name, and its keyword arguments."""

    names: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Add this argument to ``parser``."""
        parser.add_argument(*self.names, **self.options)


@dataclass(frozen=True)
class Command:
    """A registered subcommand."""

    name: str
    run: Run
    arguments: tuple[Argument, ...]

    @property
    def summary(self) -> str:
        """The first line of the function's docstring."""
        return (self.run.__doc__ or "").strip().splitlines()[0]

    @property
    def description(self) -> str:
        """The function's whole docstring, for the command's ``--help``."""
        return inspect_module.cleandoc(self.run.__doc__ or "")


COMMANDS: dict[str, Command] = {}

PATH = Argument(("path",), {"metavar": "PATH", "help": "a torchvault or safetensors file"})
TARGET = Argument(
    ("path",),
    {
        "metavar": "PATH",
        "help": "a checkpoint file (torchvault, safetensors, torch.save), a run folder, or "
        "RUN@STEP (STEP: a number, latest or best)",
    },
)
JSON = Argument(("--json",), {"action": "store_true", "help": "print one JSON object"})


def command(name: str, *, arguments: Sequence[Argument]) -> Callable[[Run], Run]:
    """Register the decorated function as the subcommand ``name``."""

    def register(run: Run) -> Run:
        if name in COMMANDS:
            raise ValueError(f"the command {name!r} is registered twice")
        COMMANDS[name] = Command(name, run, tuple(arguments))
        return run

    return register


def print_json(value: object) -> None:
    """Print ``value`` as indented JSON (ASCII-only, so no byte of it can drive a terminal)."""
    print(json.dumps(value, indent=2))


@command("inspect", arguments=(TARGET, JSON))
def inspect(args: argparse.Namespace) -> int:
    """Show a checkpoint's tensors, sizes, versions and metadata (reads no tensor data).

    PATH is a checkpoint file, or a run's checkpoint as RUN@STEP (STEP: a number, latest or
    best); a bare run folder means RUN@latest.
    """
    path, ref = parse_source(args.path)
    if ref is None:
        info = tv.inspect(path)
    else:
        store = open_run(path)
        step = resolve(store, ref)
        info = step_info(store, step, f"{path}@{step}")
    if args.json:
        print_json(inspect_json(info))
    else:
        print(inspect_text(info))
    return ExitCode.OK


@command("verify", arguments=(TARGET, JSON))
def verify(args: argparse.Namespace) -> int:
    """Check a checkpoint completely: its structure and every tensor's checksum.

    PATH is a checkpoint file, RUN@STEP (one checkpoint of a run), or a run folder: then
    every committed checkpoint is checked (its manifest's seal, every object against its
    hash, its tensor table and tree) and reported on its own line. Exits 1 if anything is
    damaged.
    """
    path, ref = parse_source(args.path)
    if ref is not None:
        return _verify_run(args, path, None if path == args.path else ref)
    try:
        result = tv.verify(path)
    except (tv.CorruptCheckpointError, tv.UnsupportedFormatError) as exc:
        if args.json:
            print_json({"path": str(args.path), "ok": False, "error": exc.message, "key": exc.key})
        else:
            print(f"FAILED {_failure(str(args.path), exc.message)}", file=sys.stderr)
        return ExitCode.INVALID
    if args.json:
        print_json(verify_json(result))
    else:
        print(verify_text(result))
    return ExitCode.OK


def _verify_run(args: argparse.Namespace, path: str, ref: StepRef | None) -> int:
    """Verify one checkpoint of a run (``ref``), or every committed one (``None``)."""
    store = open_run(path)
    steps = [resolve(store, ref)] if ref is not None else store.steps()
    results: list[dict[str, Any]] = []
    for step in steps:
        label = f"{path}@{step}"
        try:
            with Progress(f"verifying {label}") as progress, progress.ticking():
                report = verify_step(store, step, label)
        except tv.CheckpointNotFoundError:
            if ref is None and step not in store.steps():
                continue  # pruned by the trainer since it was listed: nothing to vouch for
            raise
        except (tv.CorruptCheckpointError, tv.UnsupportedFormatError) as exc:
            results.append({"step": step, "ok": False, "error": exc.message, "key": exc.key})
            if not args.json:
                print(f"FAILED {_failure(label, exc.message)}", file=sys.stderr)
            continue
        results.append({"step": step, **verify_json(report)})
        if not args.json:
            print(verify_text(report))
    bad = sum(1 for r in results if not r["ok"])
    if args.json:
        print_json({"path": path, "ok": not bad, "steps": results})
    elif not results:
        print(f"OK  {one_line(path)}: no checkpoints yet")
    elif ref is None:
        verdict = f"{bad} of {len(results)} damaged" if bad else f"all {len(results)} OK"
        print(f"{one_line(path)}: {len(results)} checkpoints verified, {verdict}")
    return ExitCode.INVALID if bad else ExitCode.OK


def _failure(path: str, message: str) -> str:
    # torchvault's messages usually begin with the path already: do not say it twice.
    text = message if message.startswith(path) else f"{path}: {message}"
    return message_line(text)
