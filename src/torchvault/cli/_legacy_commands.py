"""The commands for the world's existing checkpoints: ``scan`` and ``convert``.

Both read pickled files (torch.save's zip and stacked-pickle formats) with torchvault's own
restricted reader: nothing a file names is imported or run. ``scan`` reports every global a
file names and exits 1 when any is refused or anything is malformed, so that it can guard a
download in a script::

    torchvault scan downloads/model.bin && python train.py --init downloads/model.bin
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from typing import Any

import torchvault as tv

from .._report import ConvertReport, GlobalRef, ScanReport
from ..errors import CheckpointNotFoundError
from ..legacy._convert import parse_size, resolve_target
from ._commands import JSON, Argument, command, print_json
from ._exit import ExitCode, UsageError, one_line
from ._progress import Progress
from ._render import human_bytes, table

SCAN_ARGUMENTS = (
    Argument(
        ("paths",),
        {
            "nargs": "+",
            "metavar": "PATH",
            "help": "a checkpoint file (.pt .pth .bin .ckpt .safetensors .tv) or a folder of them",
        },
    ),
    JSON,
)
FOLDER_FORMATS = ("folder", "hf-folder")


def shard_size(text: str) -> int:
    """argparse type: a size in bytes, or like ``500MB`` or ``2GiB``; at least one byte."""
    try:
        value = parse_size(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 500MB, 2GiB or 1048576")
    return value


CONVERT_ARGUMENTS = (
    Argument(
        ("source",),
        {
            "metavar": "SRC",
            "help": "a torch.save, safetensors or torchvault file, a HF or DCP folder, or a "
            "run's checkpoint as RUN@STEP (a run folder: its latest)",
        },
    ),
    Argument(
        ("destination",),
        {
            "metavar": "DST",
            "help": "the file or folder to write; its name chooses the format: .tv torchvault, "
            ".safetensors safetensors, .pt/.pth/.bin torch.save (weights_only), a folder or a "
            "name without suffix a Hugging Face folder",
        },
    ),
    Argument(
        ("--to",),
        {
            "choices": ("tv", "torchvault", "safetensors", "hf", "torch"),
            "default": None,
            "help": "the format to write, whatever DST's name says",
        },
    ),
    Argument(
        ("--max-shard-size",),
        {
            "type": shard_size,
            "metavar": "SIZE",
            "help": "for a Hugging Face folder: the largest shard, e.g. 500MB or 2GiB "
            "(default: 5GB)",
        },
    ),
    Argument(
        ("--salvage",),
        {
            "action": "store_true",
            "help": "SRC is a whole model saved with torch.save(model): convert the weights "
            "recovered by name, without importing its classes",
        },
    ),
    Argument(
        ("--item",),
        {
            "metavar": "NAME",
            "default": None,
            "help": "for a RUN@STEP source: convert only this item (e.g. model); default: "
            "every item, or for safetensors/hf the one state dict of tensors among them",
        },
    ),
    JSON,
)


# ---------------------------------------------------------------------- scan


@command("scan", arguments=SCAN_ARGUMENTS)
def scan(args: argparse.Namespace) -> int:
    """Report every global a checkpoint's pickles name, and anything malformed; run nothing.

    Each PATH is a file or a folder (every file under it that holds a checkpoint, whatever
    its name, or is named like one). A global is
    allowed when it is on torchvault's allowlist of data types; any other (a model class,
    os.system) is REFUSED: torch.load(weights_only=False) would import and possibly run it.
    scan only reads: nothing from the files is imported or run.

    Exits 0 when every path is safe, 1 when any names a refused global or is malformed, and
    3 when a path does not exist (before anything is scanned).
    """
    paths: list[str] = args.paths
    for path in paths:
        if not os.path.lexists(path):
            raise CheckpointNotFoundError(f"{path}: no such file or folder", path=path)
    reports = []
    for path in paths:
        with Progress(f"scanning {path}") as progress, progress.ticking():
            reports.append(tv.scan(path))
    if args.json:
        print_json(scan_json(reports))
    else:
        print(scan_text(reports))
    return ExitCode.OK if all(r.safe for r in reports) else ExitCode.INVALID


def scan_text(reports: list[ScanReport]) -> str:
    """The ``torchvault scan`` report: a block per path, then the verdict."""
    lines: list[str] = []
    for report in reports:
        lines += [*_scan_block(report), ""]
    unsafe = [r for r in reports if not r.safe]
    if not unsafe:
        count = len(reports)
        lines.append(
            f"safe: {count} path{'' if count == 1 else 's'}, every global allowed, nothing "
            "malformed; nothing was run"
        )
        return "\n".join(lines)
    reasons = "; ".join(f"{one_line(r.path)} ({_problems(r)})" for r in unsafe)
    lines.append(
        f"UNSAFE: {len(unsafe)} of {len(reports)} paths: {reasons}. Nothing was run; do not "
        "torch.load these with weights_only=False"
    )
    return "\n".join(lines)


def _scan_block(report: ScanReport) -> list[str]:
    refused = len(report.unsafe_globals)
    status = f"UNSAFE, {refused} refused" if refused else ("UNSAFE" if not report.safe else "safe")
    lines = [f"{one_line(report.path)}: {report.format}; {status}"]
    if report.format in FOLDER_FORMATS:
        # Say which files were read: a folder vouches only for the checkpoints found in it.
        names = ", ".join(one_line(os.path.relpath(f, report.path)) for f in report.files)
        lines.append(f"  files ({len(report.files)}): {names or 'no checkpoint files'}")
    if report.globals:
        rows = [_global_row(ref) for ref in sorted(report.globals, key=_refused_first)]
        lines += _indent(table(["status", "global", "count"], rows, right={2}))
    else:
        lines.append("  no pickled globals")
    lines += [f"  anomaly: {one_line(text)}" for text in report.anomalies]
    return lines


def _refused_first(ref: GlobalRef) -> tuple[bool, str]:
    return (ref.allowed, ref.name)


def _global_row(ref: GlobalRef) -> list[str]:
    return ["allowed" if ref.allowed else "REFUSED", one_line(ref.name), str(ref.count)]


def _problems(report: ScanReport) -> str:
    parts = []
    if report.unsafe_globals:
        parts.append("refused " + ", ".join(one_line(n) for n in report.unsafe_globals))
    if report.anomalies:
        count = len(report.anomalies)
        parts.append(f"{count} anomal{'y' if count == 1 else 'ies'}")
    return "; ".join(parts)


def _indent(lines: list[str]) -> list[str]:
    return [f"  {line}" for line in lines]


def scan_json(reports: list[ScanReport]) -> dict[str, Any]:
    """The ``torchvault scan --json`` object: the overall verdict and one entry per path."""
    return {
        "safe": all(r.safe for r in reports),
        "reports": [
            {**dataclasses.asdict(r), "safe": r.safe, "unsafe_globals": list(r.unsafe_globals)}
            for r in reports
        ],
    }


# ---------------------------------------------------------------------- convert


@command("convert", arguments=CONVERT_ARGUMENTS)
def convert(args: argparse.Namespace) -> int:
    """Rewrite a checkpoint as torchvault, safetensors, torch.save or a HF folder; run nothing.

    DST's name chooses the format (--to overrides it): .tv a torchvault file, .safetensors a
    plain safetensors file, .pt/.pth/.bin a torch.save file that
    torch.load(weights_only=True) reads, a folder or a name without suffix a Hugging Face
    folder. Another suffix without --to, or --max-shard-size for a single file, is a usage
    error (exit 2). SRC is read with torchvault's restricted reader: a file that names a
    refused global (a whole model saved with torch.save(model), or worse) is refused with
    exit 1 and nothing is written. --to safetensors and --to hf need a flat state dict
    (names to tensors); a Lightning checkpoint's state_dict is taken from it. With
    --salvage, SRC is a whole model saved with torch.save(model): its weights are recovered
    by name and converted, its classes listed; a file that calls a refused global
    (os.system) is converted without it and a warning naming it is printed. Tied weights are
    stored once and the other names recorded as aliases. Files are replaced atomically.
    SRC may be one checkpoint of a run, RUN@STEP (STEP: a number, latest or best; a bare run
    folder means RUN@latest): every item goes to a .tv or torch.save file, and the one state
    dict of tensors among them (the model's) to safetensors or a HF folder, or --item NAME;
    a sharded checkpoint is streamed, one whole tensor in memory at a time.
    """
    options: dict[str, Any] = {"to": args.to, "max_shard_size": args.max_shard_size}
    try:
        resolve_target(args.destination, **options)
    except ValueError as exc:
        flags = str(exc).replace("max_shard_size=", "--max-shard-size ").replace("to=", "--to ")
        raise UsageError(flags) from None
    with (
        Progress(f"converting {args.source}") as progress,
        progress.ticking(),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", UserWarning)  # the report's unsafe field says it once
        try:
            report = tv.convert(
                args.source, args.destination, salvage=args.salvage, item=args.item, **options
            )
        except ValueError as exc:  # RUN@STEP's step, or --item: the command line's to fix
            if isinstance(exc, tv.TorchVaultError):  # some are ValueErrors: about the file
                raise
            raise UsageError(str(exc).replace("item=", "--item ")) from None
    if report.unsafe:
        print(f"torchvault: warning: {salvage_warning(report)}", file=sys.stderr)
    if args.json:
        print_json(convert_json(report))
    else:
        print(convert_text(report))
    return ExitCode.OK


def salvage_warning(report: ConvertReport) -> str:
    """The line that says a salvaged file calls refused globals."""
    names = ", ".join(one_line(name) for name in report.unsafe)
    return (
        f"UNSAFE: {one_line(report.source)} calls {names}, which torch.load(weights_only=False) "
        "would run; nothing was run and only the weights were converted. Do not torch.load "
        "this file"
    )


def convert_text(report: ConvertReport) -> str:
    """The ``torchvault convert`` report: what was written, file by file, and the aliases."""
    count = report.tensors
    lines = [
        f"converted {one_line(report.source)} to {report.format} at "
        f"{one_line(report.destination)}: {count} tensor{'' if count == 1 else 's'}, "
        f"{human_bytes(report.bytes)} in {len(report.files)} file"
        f"{'' if len(report.files) == 1 else 's'}",
        *(f"  {one_line(path)}" for path in report.files),
    ]
    if report.classes:
        lines.append("salvaged from: " + ", ".join(one_line(name) for name in report.classes))
    if report.aliases:
        lines.append(f"aliases ({len(report.aliases)}, stored once under another name):")
        lines += [f"  {one_line(name)} -> {one_line(kept)}" for name, kept in report.aliases]
    return "\n".join(lines)


def convert_json(report: ConvertReport) -> dict[str, Any]:
    """The ``torchvault convert --json`` object."""
    return {**dataclasses.asdict(report), "aliases": dict(report.aliases)}
