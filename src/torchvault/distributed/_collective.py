"""The collectives of a multi-rank CheckpointManager: its own gloo group with a timeout, JSON
(never pickle) between ranks, and one outcome for every rank.

Peers are untrusted like files: what a rank sends is bounded, strict JSON. Every collective
runs on a group created for the manager (``gloo``, ``collective_timeout``), so a peer that
died or hangs becomes an error within the timeout instead of a hang, and an asynchronous
save's collectives never share the training group (where they could deadlock).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .. import _format
from ..errors import (
    CheckpointNotFoundError,
    CheckpointWriteError,
    CollectiveError,
    CorruptCheckpointError,
    ManagerClosedError,
    RestoreMismatchError,
    RunLockedError,
    TorchVaultError,
    UnsupportedFormatError,
    UnsupportedTypeError,
)

T = TypeVar("T")
MAX_MESSAGE = 16 << 20
DEFAULT_TIMEOUT = 1800.0  # torch.distributed's own default for gloo and NCCL groups

# errors a rank may report to its peers: they are rebuilt by name, nothing else is
_KINDS: dict[str, type[BaseException]] = {
    kind.__name__: kind
    for kind in (
        TypeError, ValueError, CheckpointNotFoundError, CorruptCheckpointError,
        UnsupportedFormatError, UnsupportedTypeError, RunLockedError, RestoreMismatchError,
        ManagerClosedError,
    )
}  # fmt: skip


def active() -> bool:
    """Whether torch.distributed is initialized in this process."""
    return dist.is_available() and dist.is_initialized()


class Group:
    """The manager's process group. Creating one is collective (every rank, same order)."""

    def __init__(self, timeout: float) -> None:
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.timeout = timeout
        self.pg = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))

    @property
    def coordinator(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        # the default group may be gone already (destroyed, or a peer died)
        with contextlib.suppress(RuntimeError, ValueError, AssertionError):
            dist.destroy_process_group(self.pg)

    # ------------------------------------------------------------------ exchanging JSON

    def gather(self, value: Any, what: str) -> list[Any]:
        """Every rank's ``value`` (JSON-able), in rank order, on every rank."""
        data = json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
        if len(data) > MAX_MESSAGE:
            raise ValueError(f"{what}: {len(data)} bytes to send (cap {MAX_MESSAGE})")
        with self._failing(what):
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
            dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64), group=self.pg)
            lengths = [int(s.item()) for s in sizes]
            bad = [r for r, n in enumerate(lengths) if not 0 < n <= MAX_MESSAGE]
            if bad:
                raise CollectiveError(
                    f"{what}: rank {bad[0]} announced {lengths[bad[0]]} bytes (cap "
                    f"{MAX_MESSAGE}); the ranks run different code?",
                    ranks=tuple(bad),
                )
            size = max(lengths)
            mine = torch.zeros(size, dtype=torch.uint8)
            mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            parts = [torch.zeros(size, dtype=torch.uint8) for _ in range(self.world)]
            dist.all_gather(parts, mine, group=self.pg)
        out = []
        for rank, (part, length) in enumerate(zip(parts, lengths, strict=True)):
            raw = part[:length].numpy().tobytes()
            try:
                out.append(_format.strict_json(raw, f"rank {rank}", what))
            except CorruptCheckpointError as exc:
                raise CollectiveError(
                    f"{what}: rank {rank} sent malformed JSON ({exc})", ranks=(rank,)
                ) from exc
        return out

    def agree(
        self,
        compute: Callable[[], T],
        what: str,
        *,
        everywhere: bool = False,
        same: Callable[[Any], Any] = lambda result: result,
    ) -> T:
        """The result of ``compute`` on rank 0, the same on every rank; with ``everywhere``
        every rank computes it and ``same`` of every result must be equal (ValueError
        otherwise). If it
        raised on any rank, every rank raises that error (the lowest failing rank's; other
        kinds than ``_KINDS`` as :class:`CollectiveError`), so no rank goes on alone."""
        outcome: dict[str, Any]
        error: Exception | None = None
        if everywhere or self.coordinator:
            try:
                outcome = {"ok": compute()}
            except Exception as exc:
                error = exc
                outcome = {"error": type(exc).__name__, "message": str(exc)}
        else:
            outcome = {"ok": None}
        results = self.gather(outcome, what)
        for rank, result in enumerate(results):
            if isinstance(result, dict) and "error" in result:
                if rank == self.rank and error is not None:
                    raise error  # the failing rank raises its own error, traceback and all
                raise rebuild(result, rank, self.world)
        first = results[0]
        if not isinstance(first, dict) or "ok" not in first:
            raise CollectiveError(f"{what}: rank 0 sent no result", ranks=(0,))
        odd = [r for r, res in enumerate(results) if same(res.get("ok")) != same(first["ok"])]
        if everywhere and odd:
            raise ValueError(
                f"{what}: rank {odd[0]} was called with other arguments than rank 0 "
                f"({str(same(results[odd[0]].get('ok')))[:200]} vs {str(same(first['ok']))[:200]}"
                "); every rank must pass the same step and items"
            )
        return first["ok"]  # type: ignore[no-any-return]

    @contextlib.contextmanager
    def _failing(self, what: str) -> Iterator[None]:
        """A failed collective (a peer died: connection reset; a peer hangs: timeout) as a
        :class:`CollectiveError` that says which and what to do."""
        try:
            yield
        except RuntimeError as exc:
            if isinstance(exc, TorchVaultError):
                raise
            raise CollectiveError(
                f"{what}: a collective with the other {self.world - 1} rank(s) failed on rank "
                f"{self.rank} ({_first_line(exc)}). A peer rank died or did not answer within "
                f"collective_timeout={self.timeout:g} s; restart every rank (committed "
                "checkpoints are intact)."
            ) from exc


def rebuild(result: dict[str, Any], rank: int, world: int) -> BaseException:
    """The error a peer reported, rebuilt by kind (only the kinds in ``_KINDS``)."""
    kind = _KINDS.get(str(result.get("error")), CollectiveError)
    message = str(result.get("message", ""))[:4000]
    if world > 1:
        message = f"rank {rank}: {message}"
    if kind is RestoreMismatchError:
        return RestoreMismatchError(message, missing=(), unexpected=(), path="")
    if kind is CollectiveError:
        return CollectiveError(message, ranks=(rank,))
    return kind(message)


def write_failure(
    exc: BaseException, run: str | os.PathLike[str], step: int
) -> CheckpointWriteError:
    """A failed distributed save (DCP's ``CheckpointException`` carrying each failing rank's
    error, or a broken collective) as one :class:`CheckpointWriteError` naming the ranks."""
    failures: dict[int, Any] = getattr(exc, "failures", {}) or {}
    parts = []
    for rank in sorted(failures):
        error = failures[rank][0] if isinstance(failures[rank], tuple) else failures[rank]
        parts.append(f"rank {rank}: {type(error).__name__}: {_first_line(error)}")
    ranks = tuple(sorted(failures))
    errno = None
    for rank in ranks:
        error = failures[rank][0] if isinstance(failures[rank], tuple) else failures[rank]
        errno = errno or getattr(error, "errno", None)
    detail = "; ".join(parts) if parts else _first_line(exc)
    who = f"on rank {', '.join(map(str, ranks))}" if ranks else "in a collective"
    return CheckpointWriteError(
        f"saving step {step} of {run} failed {who}: {detail}. Nothing was committed; the "
        "earlier checkpoints are intact and the next save can proceed.",
        path=run,
        errno=errno,
        ranks=ranks,
    )


def peer_error(exc: BaseException) -> BaseException | None:
    """The first failing rank's own error inside DCP's ``CheckpointException``, when it is
    one a caller acts on (an argument error, a damaged file), else None."""
    failures: dict[int, Any] = getattr(exc, "failures", {}) or {}
    for rank in sorted(failures):
        error = failures[rank][0] if isinstance(failures[rank], tuple) else failures[rank]
        if isinstance(error, BaseException) and isinstance(error, tuple(_KINDS.values())):
            return error
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:500] if text else type(exc).__name__
