"""The run folder's writer lock: one CheckpointManager writes a run at a time.

An advisory ``flock`` on ``RUN/lock``, held for the manager's lifetime: the kernel drops it
when the process dies, so a killed trainer never leaves a stale lock behind. Readers take no
lock. The file records who holds it, for the error message of the writer that is refused.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from ..errors import RunLockedError


class RunLock:
    """Acquire the lock of a run folder at once, or raise :class:`RunLockedError`."""

    def __init__(self, path: Path) -> None:
        import fcntl  # POSIX only; imported here so that reading runs works everywhere

        self._path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(
            path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666
        )
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holder = (
                os.pread(self._fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            )
            os.close(self._fd)
            self._fd = None
            if holder == _holder():
                raise RunLockedError(held_here(str(path.parent)), path=path.parent) from exc
            raise RunLockedError(
                f"{path.parent} is being written by {holder}: only one CheckpointManager may "
                "write a run at a time. Stop the other job, or use another folder.",
                path=path.parent,
            ) from exc
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{_holder()}\n".encode(), 0)

    def release(self) -> None:
        """Release the lock (closing the descriptor drops the flock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def held_here(run: str) -> str:
    """The message for a writer refused because this very process holds the run (a notebook
    cell that creates a manager, run twice): "stop the other job" would send the user looking
    for a job that does not exist."""
    return (
        f"{run} is already held by this process (pid {os.getpid()}): a CheckpointManager of "
        "it is still open, and only one CheckpointManager may write a run at a time. Call "
        "close() on the old manager first, or create it as `with tv.CheckpointManager(...) as "
        "mgr:` so that it closes itself at the end of the block."
    )


def _holder() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"
