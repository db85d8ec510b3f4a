"""The ``torchvault`` command line.

Usage::

    torchvault inspect PATH [--json]       # tensors, sizes, versions, metadata
    torchvault verify PATH [--json]        # structure and every checksum
                                           # PATH: a file, RUN@STEP, or RUN (verify: every
                                           # committed step; inspect: the latest)
    torchvault ls RUN [--json]             # a run's checkpoints, sizes, latest and best
    torchvault diff A B [--json] [--atol X] [--item NAME] [--exit-code]
                                           # A, B: files or RUN@STEP (N, latest, best)
    torchvault prune RUN [--keep-last N] [--keep-best K --monitor M [--mode min|max]]
                         [--keep-every N] [--dry-run] [--json]
    torchvault export RUN [--step latest|best|N] OUT [--item NAME]
    torchvault scan PATH... [--json]       # every global a torch.save file names; runs nothing
    torchvault convert SRC DST [--to tv|safetensors|hf|torch] [--max-shard-size SIZE]
                       [--item NAME] [--json]
                                           # DST's suffix chooses: .tv .safetensors .pt, a folder
                                           # SRC: a file, a folder, or RUN@STEP (streamed)
    torchvault export onnx|program --model MODULE:FACTORY [--checkpoint PATH_OR_RUN]
                      --input-shape 1,3,32,32 [--dynamic-batch] OUT   # exported and checked
    torchvault quantize --model MODULE:FACTORY [--checkpoint PATH_OR_RUN]
                        --input-shape 8,64 [--method int8-dynamic|int8-weight-only]
                        [--backend torchao|torch] OUT   # latencies: median (IQR)
    torchvault --version

``RUN`` is a run folder, the directory given to ``tv.CheckpointManager``. ``inspect``,
``verify``, ``ls``, ``diff``, ``export`` and ``prune --dry-run`` only read: they take no
lock and work while a trainer writes the run. ``prune`` takes the run's writer lock; while a
trainer holds it, prune deletes nothing and exits 1. ``prune`` with no policy flag is a
usage error (exit 2). ``diff`` verifies both sides first (a damaged one exits 1, naming it)
and exits 0 whether or not the checkpoints differ, unless ``--exit-code`` is given: then 1
means they differ. ``scan`` and ``convert`` read torch.save files (.pt, .pth, .bin, .ckpt)
and Hugging Face folders without importing or running anything they name: ``scan`` exits 1
when any PATH names a global outside the allowlist (a model class, ``os.system``) or is
malformed; ``convert`` refuses such a file (exit 1) and writes nothing. Long operations draw
a progress bar on stderr when it is a terminal.

Exit codes::

      0  success
      1  the checkpoint is invalid (corrupt, truncated, unsupported format)
      2  usage error (bad command line)
      3  file not found, or another I/O error
      4  unexpected internal error (a bug: please report it)
    130  interrupted (Ctrl-C)

Every failure prints one line to stderr, never a traceback (a usage error also prints the
command's usage first); a ``--model`` factory that cannot be imported or raises, and an
``--input-shape`` the model cannot run on, are usage errors; set ``TORCHVAULT_DEBUG=1`` to
see the traceback of an internal error.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import Any

import torch

from .._version import __version__
from . import _deploy_commands, _legacy_commands, _run_commands  # noqa: F401  (registers)
from ._commands import COMMANDS, Command
from ._exit import EPILOG, ExitCode, UsageError, message_line, report

__all__ = ["main"]

PROG = "torchvault"


def main(argv: list[str] | None = None) -> int:
    """Run the ``torchvault`` command line and return its exit code.

    Args:
        argv: the arguments after the program name; ``None`` for ``sys.argv[1:]``.

    Returns:
        The exit code (see the module docstring); ``main`` never raises ``SystemExit``.

    Example:
        >>> main(["verify", "model.tv"])
        0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(_deploy_commands.route(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse exits for --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE
    try:
        code = int(args.command.run(args))
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at exit
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except UsageError as exc:
        args.parser.print_usage(sys.stderr)
        print(f"{args.parser.prog}: error: {message_line(str(exc))}", file=sys.stderr)
        return ExitCode.USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except Exception as exc:
        return report(exc, PROG)
    return code


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with one subparser per registered command."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect, verify and compare torchvault and safetensors checkpoints; "
        "list, prune and export the checkpoints of a training run; scan and convert "
        "torch.save files and Hugging Face folders without running their code.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"{PROG} {__version__} (torch {torch.__version__}, "
        f"Python {platform.python_version()})",
    )
    commands = parser.add_subparsers(metavar="COMMAND", required=True)
    for command in COMMANDS.values():
        _add_command(commands, command)
    return parser


def _add_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], command: Command
) -> None:
    # `export onnx` and `export program` are routed to their own commands: listed and named
    # as users type them (the hyphenated names still work, unlisted)
    spoken = _deploy_commands.SPOKEN.get(command.name)
    options: dict[str, Any] = {"prog": f"{PROG} {spoken}"} if spoken else {"help": command.summary}
    sub = commands.add_parser(
        command.name,
        description=command.description,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **options,
    )
    if spoken:  # listed under the spoken name (a parser added without help is not listed)
        listing = commands._ChoicesPseudoAction(spoken, (), command.summary)
        commands._choices_actions.append(listing)
    for argument in command.arguments:
        argument.add_to(sub)
    # Under names no argument uses (a RUN positional is `args.run`).
    sub.set_defaults(command=command, parser=sub)


def _quiet_broken_pipe() -> int:
    # The reader (`| head`) stopped early: not an error. Point stdout at /dev/null so that
    # Python's final flush does not complain either.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout replaced by an object with no fd
        pass
    return ExitCode.OK
