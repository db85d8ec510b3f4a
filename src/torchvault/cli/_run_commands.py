"""The checkpoint-manager commands: ``ls``, ``diff``, ``prune`` and ``export``.

Reading commands (``ls``, ``diff``, ``export``, ``prune --dry-run``) take no lock: they work
while a trainer writes the run. ``prune`` takes the run's writer lock through
:class:`torchvault.CheckpointManager`, so it refuses (exit 1) while a trainer holds it.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

import torchvault as tv

from .._diff import diff_trees, open_side
from .._report import CheckpointSummary, DiffSide
from ..errors import CheckpointNotFoundError, RunLockedError
from ..run import _readers, retention
from ..run._store import RunStore, blobs_of
from ._commands import JSON, Argument, command, print_json
from ._exit import ExitCode, UsageError, describe, one_line
from ._progress import Progress
from ._render import diff_json, diff_text, human_bytes, ls_json, ls_text
from ._runs import (
    open_run,
    parse_source,
    positive_int,
    recorded_bests,
    resolve,
    step_argument,
    summaries,
    tolerance,
)


def _arg(*names: str, help: str, **options: Any) -> Argument:
    return Argument(names, {"help": help, **options})


RUN = _arg("run", metavar="RUN", help="a run folder (the directory of a tv.CheckpointManager)")
ITEM_HELP = "compare only item NAME of RUN@STEP operands (to match a file exported with --item)"
DIFF_ARGUMENTS = (
    _arg("a", metavar="A", help="a checkpoint file, or RUN@STEP (STEP: a number, latest, best)"),
    _arg("b", metavar="B", help="the same, compared against A"),
    JSON,
    _arg(
        "--atol",
        type=tolerance,
        default=0.0,
        metavar="X",
        help="tensor values differ only if their max abs difference is above X (default 0)",
    ),
    _arg("--item", metavar="NAME", help=ITEM_HELP),
    _arg(
        "--exit-code",
        action="store_true",
        help="exit 1 if the checkpoints differ, 0 if identical (like git diff)",
    ),
)
PRUNE_ARGUMENTS = (
    RUN,
    _arg("--keep-last", type=positive_int, metavar="N", help="keep the N most recent checkpoints"),
    _arg("--keep-best", type=positive_int, metavar="K", help="keep the K best by --monitor"),
    _arg("--monitor", metavar="METRIC", help="the metric --keep-best ranks by, e.g. val_loss"),
    _arg(
        "--mode",
        choices=("min", "max"),
        default="min",
        help="lower (min, the default) or higher (max) --monitor is better",
    ),
    _arg(
        "--keep-every",
        type=positive_int,
        metavar="N",
        help="keep every step that is a multiple of N",
    ),
    _arg(
        "--dry-run",
        action="store_true",
        help="list what would be deleted and change nothing (takes no lock)",
    ),
    JSON,
)
EXPORT_ARGUMENTS = (
    RUN,
    _arg("out", metavar="OUT", help="the torchvault file to write (replaced atomically)"),
    _arg(
        "--step",
        type=step_argument,
        default="latest",
        metavar="latest|best|N",
        help="the checkpoint to export (default: latest)",
    ),
    _arg(
        "--item",
        metavar="NAME",
        help="export only this item (e.g. model: a state dict for tv.load_into)",
    ),
)


# ---------------------------------------------------------------------- ls


@command("ls", arguments=(RUN, JSON))
def ls(args: argparse.Namespace) -> int:
    """List a run's checkpoints: step, time, metrics, size, new bytes, latest and best."""
    store = open_run(args.run)
    checkpoints = summaries(store)
    object_bytes = store.object_bytes()
    if args.json:
        print_json(ls_json(str(args.run), checkpoints, object_bytes))
    else:
        print(ls_text(str(args.run), checkpoints, object_bytes))
    return ExitCode.OK


# ---------------------------------------------------------------------- diff


@command("diff", arguments=DIFF_ARGUMENTS)
def diff(args: argparse.Namespace) -> int:
    """Compare two checkpoints (files or RUN@STEP): tensors added, removed and changed.

    Both sides are verified first (every checksum of a file, every object of a run's
    checkpoint): a damaged side exits 1 with a message naming it, and nothing is compared.
    """
    side_a, tree_a = _open_side(args.a, args.item)
    side_b, tree_b = _open_side(args.b, args.item)
    with Progress("comparing") as progress:
        result = diff_trees(side_a, tree_a, side_b, tree_b, atol=args.atol, progress=progress)
    if args.json:
        print_json(diff_json(result))
    else:
        print(diff_text(result))
    if args.exit_code and not result.identical:
        return ExitCode.INVALID
    return ExitCode.OK


def _open_side(spec: str, item: str | None) -> tuple[DiffSide, object]:
    parse_source(spec)  # a malformed RUN@STEP is a usage error (exit 2)
    with Progress(f"reading {spec}") as progress, progress.ticking():
        return open_side(spec, item)


def _no_item(store: RunStore, step: int, item: str, items: Any) -> str:
    names = ", ".join(sorted(str(name) for name in items)) or "none"
    return f"step {step} of {store.root} has no item {item!r}; its items: {names}."


# ---------------------------------------------------------------------- prune


@command("prune", arguments=PRUNE_ARGUMENTS)
def prune(args: argparse.Namespace) -> int:
    """Delete the checkpoints a retention policy does not keep (never the latest or best).

    The policies given are united: a checkpoint any of them keeps stays. The latest
    checkpoint and the run's best (by the metric its newest checkpoint records, the step its
    best pointer names, and the best by --monitor) are always kept. Without a policy flag prune refuses (exit 2).

    Without --dry-run, prune takes the run's writer lock (it opens a CheckpointManager):
    while a trainer holds the lock, prune deletes nothing and exits 1. --dry-run takes no
    lock and changes nothing.
    """
    if args.keep_last is None and args.keep_best is None and args.keep_every is None:
        raise UsageError(
            "no retention policy given: pass --keep-last N, --keep-best K --monitor METRIC "
            "and/or --keep-every N (prune never deletes by default)"
        )
    if args.keep_best is not None and args.monitor is None:
        raise UsageError("--keep-best needs --monitor METRIC (the metric to rank by)")
    store = open_run(args.run)
    pins = recorded_bests(store)
    if args.dry_run:
        deleted, freed = _plan(store, args, pins)
    else:
        before = store.object_bytes()
        try:
            manager = tv.CheckpointManager(
                args.run,
                keep_last=args.keep_last,
                keep_best=args.keep_best,
                keep_every=args.keep_every,
                monitor=args.monitor,
                mode=args.mode,
                policy=retention.Pinned(pins) if pins else None,
            )
        except RunLockedError as exc:
            print(f"torchvault: error: {describe(exc)}", file=sys.stderr)
            return ExitCode.INVALID
        try:
            deleted = manager.prune()
        finally:
            manager.close()
        freed = max(before - store.object_bytes(), 0)
    kept = [c for c in summaries(store) if c.step not in deleted]
    if args.json:
        print_json(
            {
                "run": str(args.run),
                "dry_run": args.dry_run,
                "deleted": deleted,
                "kept": [c.step for c in kept],
                "freed_bytes": freed,
            }
        )
    else:
        print(_prune_text(str(args.run), args.dry_run, deleted, kept, freed))
    return ExitCode.OK


def _plan(store: RunStore, args: argparse.Namespace, pins: set[int]) -> tuple[list[int], int]:
    """What ``CheckpointManager.prune`` would delete under the same policy, and the bytes
    it would free; read without the lock."""
    checkpoints = summaries(store)
    if not checkpoints:
        return [], 0
    records = [retention.CheckpointRecord(c.step, c.metrics) for c in checkpoints]
    policy = retention.from_arguments(
        keep_last=args.keep_last,
        keep_best=args.keep_best,
        monitor=args.monitor,
        mode=args.mode,
        keep_every=args.keep_every,
        pinned=pins,
    )
    latest = max(c.step for c in checkpoints)
    best = retention.best_step(records, args.monitor, args.mode) if args.monitor else None
    protect = {step for step in (latest, best) if step is not None}  # the run's best: pins
    doomed = retention.plan_deletions(records, policy, protect=protect)
    if not doomed:
        return [], 0
    kept_objects: dict[str, int] = {}
    for c in checkpoints:
        if c.step in doomed:
            continue
        with contextlib.suppress(CheckpointNotFoundError):  # deleted meanwhile
            manifest = store.manifest(c.step)
            for blob in blobs_of(manifest, str(store.manifest_path(c.step))):
                kept_objects[blob.digest] = blob.nbytes
    return doomed, max(store.object_bytes() - sum(kept_objects.values()), 0)


def _prune_text(
    run: str, dry_run: bool, deleted: list[int], kept: list[CheckpointSummary], freed: int
) -> str:
    total = len(deleted) + len(kept)
    if not deleted:
        return f"{one_line(run)}: nothing to delete; the policy keeps all {total} checkpoints"
    verb, frees = ("would delete", "would free") if dry_run else ("deleted", "freed")
    steps = ", ".join(str(step) for step in deleted)
    marks = [
        f"{c.step} ({', '.join(n for n, on in (('latest', c.latest), ('best', c.best)) if on)})"
        if c.latest or c.best
        else str(c.step)
        for c in kept
    ]
    return (
        f"{one_line(run)}: {verb} {len(deleted)} of {total} checkpoints: steps {steps}; "
        f"{frees} {human_bytes(freed)}\nkept: {', '.join(marks) or '-'}"
    )


# ---------------------------------------------------------------------- export


@command("export", arguments=EXPORT_ARGUMENTS)
def export(args: argparse.Namespace) -> int:
    """Write one checkpoint of a run (or one item of it) as a standalone torchvault file."""
    store = open_run(args.run)
    step = resolve(store, args.step)
    manifest = store.manifest(step)
    items = manifest.get("items")
    if args.item is not None and (not isinstance(items, dict) or args.item not in items):
        raise CheckpointNotFoundError(
            _no_item(store, step, args.item, items if isinstance(items, dict) else {}),
            path=store.root,
        )
    size = human_bytes(int(manifest.get("bytes", {}).get("total", 0)))
    with Progress(f"exporting step {step} ({size})") as progress, progress.ticking():
        try:
            _readers.export(store, step, args.out, item=args.item)
        except KeyError as exc:  # the item check above raced a rewrite; say it the same way
            raise CheckpointNotFoundError(str(exc.args[0]), path=store.root) from exc
    info = tv.inspect(args.out)
    what = f"item {args.item!r} of step {step}" if args.item is not None else f"step {step}"
    count = len(info.tensors)
    print(
        f"exported {what} of {one_line(str(args.run))} to {one_line(str(args.out))}: "
        f"{count} tensor{'' if count == 1 else 's'}, {human_bytes(info.tensor_bytes)}"
    )
    return ExitCode.OK
