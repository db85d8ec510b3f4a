"""Exit codes, and the one-line messages that failures become."""

from __future__ import annotations

import enum
import os
import sys
import traceback

from ..errors import TorchVaultError


class ExitCode(enum.IntEnum):
    """What ``torchvault``'s exit status means; scripts may rely on these values."""

    OK = 0
    INVALID = 1
    USAGE = 2
    IO = 3
    INTERNAL = 4
    INTERRUPTED = 130


MEANINGS = {
    ExitCode.OK: "success",
    ExitCode.INVALID: "the checkpoint is invalid (corrupt, truncated, unsupported format)",
    ExitCode.USAGE: "usage error (bad command line)",
    ExitCode.IO: "file not found, or another I/O error",
    ExitCode.INTERNAL: "unexpected internal error (a bug: please report it)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C)",
}

EPILOG = "exit codes:\n" + "\n".join(f"  {int(code):>3}  {text}" for code, text in MEANINGS.items())

DEBUG_VARIABLE = "TORCHVAULT_DEBUG"


class UsageError(Exception):
    """A command line the parser accepted but the command refuses (exit 2): raised by a
    command, printed with the command's usage line."""


def code_for(exc: Exception) -> ExitCode:
    """The exit code for an exception raised by a command."""
    if isinstance(exc, UsageError):
        return ExitCode.USAGE
    # CheckpointNotFoundError and CheckpointWriteError are OSErrors: the disk, not the file.
    if isinstance(exc, OSError):
        return ExitCode.IO
    # CorruptCheckpointError, UnsupportedFormatError, and any other refusal by torchvault.
    if isinstance(exc, TorchVaultError):
        return ExitCode.INVALID
    return ExitCode.INTERNAL


def report(exc: Exception, prog: str) -> ExitCode:
    """Print ``exc`` to stderr as one line (plus a traceback for internal errors under
    ``TORCHVAULT_DEBUG=1``) and return its exit code."""
    code = code_for(exc)
    if code is ExitCode.INTERNAL:
        print(
            f"{prog}: internal error: {type(exc).__name__}: {one_line(str(exc))} -- please "
            f"report this (set {DEBUG_VARIABLE}=1 to see the traceback)",
            file=sys.stderr,
        )
        if os.environ.get(DEBUG_VARIABLE) == "1":
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    else:
        print(f"{prog}: error: {describe(exc)}", file=sys.stderr)
    return code


def describe(exc: Exception) -> str:
    """A one-line description of a torchvault or OS error, without Python's ``[Errno N]``."""
    if isinstance(exc, OSError) and not isinstance(exc, TorchVaultError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename is not None else ""
        return one_line(f"{where}{exc.strerror}")
    return message_line(str(exc) or type(exc).__name__)


def message_line(text: str) -> str:
    """A message written over several lines (a load report's list, say) as one line: its
    lines joined with ``; `` (or a space after a ``:`` or ``.``), indentation dropped; other
    control characters escaped as :func:`one_line` does."""
    parts = [line.strip() for line in text.splitlines() if line.strip()]
    joined = ""
    for part in parts:
        if joined:
            joined += " " if joined.endswith((":", ".")) else "; "
        joined += part
    return one_line(joined)


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped, so that a message
    (or a name read from an untrusted file) stays on one line and cannot drive the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
