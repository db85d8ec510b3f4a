"""A tiny progress bar for long commands, drawn on stderr only when stderr is a terminal.

No dependency, no output at all in a pipe or a log file, and rate-limited: the first frame
waits :data:`DELAY` seconds (a fast command draws nothing) and later frames come at most every
:data:`INTERVAL` seconds. The line is erased when the work ends, so stdout stays clean.

    with Progress("diff", total=nbytes) as bar:
        for chunk in chunks:
            ...
            bar.advance(chunk_bytes)

Work whose size is unknown (``total=None``) shows a spinner and the elapsed time; call
:meth:`Progress.ticking` to keep it moving while a single long call runs.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TextIO

from ._exit import one_line
from ._render import human_bytes

DELAY = 0.5
"""Seconds before the first frame: work that ends sooner draws nothing."""

INTERVAL = 0.1
"""Least seconds between two frames."""

_SPINNER = "|/-\\"


class Progress:
    """A one-line progress display; every method is a no-op when it is disabled.

    Args:
        label: what is being done, shown first.
        total: the amount of work in bytes, or ``None`` when unknown (a spinner).
        stream: where to draw; ``sys.stderr`` (as it is now) by default.
        enabled: draw at all; by default only when ``stream.isatty()``.
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = one_line(label)
        self.total = total
        self.done = 0
        self._stream = sys.stderr if stream is None else stream
        self.enabled = _is_terminal(self._stream) if enabled is None else enabled
        self._clock = clock
        self._start = clock()
        self._next = self._start + DELAY
        self._width = 0  # characters of the frame on screen, to erase
        self._frames = 0
        self._lock = threading.Lock()

    def advance(self, amount: int) -> None:
        """Record ``amount`` more bytes done; redraw if the last frame is old enough."""
        self.done += amount
        self.refresh()

    def refresh(self, *, force: bool = False) -> None:
        """Redraw now if due (or ``force``); cheap when not due."""
        if not self.enabled:
            return
        now = self._clock()
        if not force and now < self._next:
            return
        with self._lock:
            self._next = now + INTERVAL
            self._draw(self.frame(now - self._start))

    def frame(self, elapsed: float) -> str:
        """The text of one frame (without the carriage return), fitted to the terminal."""
        columns = _columns(self._stream)
        if self.total is None:
            spin = _SPINNER[self._frames % len(_SPINNER)]
            self._frames += 1
            return _fit(f"{self.label} {spin} {elapsed:.0f}s", columns)
        total = max(self.total, 1)
        fraction = min(self.done / total, 1.0)
        tail = f" {fraction:4.0%} {human_bytes(self.done)}/{human_bytes(self.total)}"
        room = columns - 1 - len(self.label) - len(tail) - 3
        if room < 10:
            return _fit(f"{self.label}{tail}", columns)
        bar_width = min(room, 40)
        filled = int(bar_width * fraction)
        bar = "#" * filled + "." * (bar_width - filled)
        return f"{self.label} [{bar}]{tail}"

    def close(self) -> None:
        """Erase the line if anything was drawn."""
        with self._lock:
            if self._width:
                self._write("\r" + " " * self._width + "\r")
                self._width = 0

    @contextmanager
    def ticking(self) -> Iterator[None]:
        """Redraw from a background thread while the body runs (for one long call that
        reports no progress of its own)."""
        if not self.enabled:
            yield
            return
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(INTERVAL):
                self.refresh()

        thread = threading.Thread(target=tick, name="torchvault-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _draw(self, text: str) -> None:
        pad = max(self._width - len(text), 0)
        self._write("\r" + text + " " * pad)
        self._width = len(text)

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):  # the terminal went away: progress is not worth a crash
            self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def _columns(stream: TextIO) -> int:
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        columns = 0
    if columns <= 0:  # not a terminal, or one that does not know its size: $COLUMNS or 80
        columns = shutil.get_terminal_size().columns
    return max(columns, 20)


def _fit(text: str, columns: int) -> str:
    return text if len(text) < columns else text[: columns - 2] + "~"
