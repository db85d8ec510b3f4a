"""The ``torchvault`` command line.

Usage::

    torchvault inspect model.tv [--json]   # tensors, sizes, versions, metadata
    torchvault verify model.tv [--json]    # structure and every checksum
    torchvault --version

Exit codes::

      0  success
      1  the checkpoint is invalid (corrupt, truncated, unsupported format)
      2  usage error (bad command line)
      3  file not found, or another I/O error
      4  unexpected internal error (a bug: please report it)
    130  interrupted (Ctrl-C)

Every failure prints one line to stderr, never a traceback; set ``TORCHVAULT_DEBUG=1`` to
see the traceback of an internal error.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

from .._version import __version__
from ._commands import COMMANDS, Command
from ._exit import EPILOG, ExitCode, report

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
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits for --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE
    try:
        code = int(args.run(args))
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at exit
    except BrokenPipeError:
        return _quiet_broken_pipe()
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
        description="Inspect and verify torchvault and safetensors checkpoints.",
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
    sub = commands.add_parser(
        command.name,
        help=command.summary,
        description=command.summary,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for argument in command.arguments:
        argument.add_to(sub)
    sub.set_defaults(run=command.run)


def _quiet_broken_pipe() -> int:
    # The reader (`| head`) stopped early: not an error. Point stdout at /dev/null so that
    # Python's final flush does not complain either.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout replaced by an object with no fd
        pass
    return ExitCode.OK
