"""Run a function on N real ranks (spawned processes, gloo on CPU by default) for the
distributed tests.

``fn(rank, world, *args)`` must be a module-level function (pickled by name); it
runs after ``init_process_group("gloo")`` and its return value comes back per rank. A rank
may die on purpose (``os.kill(os.getpid(), signal.SIGKILL)``): its outcome then has the
exit code and no value, and the surviving ranks' errors are reported as they happened.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import queue
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_PRELOAD = [
    "torch",
    "torch.distributed.checkpoint",
    "torch.distributed.fsdp",
    "torch.distributed.tensor",
    "torchvault",
    "torchvault.distributed",
    "dist_harness",
]


@dataclass(frozen=True)
class Outcome:
    rank: int
    exitcode: int | None
    value: Any = None
    error: str | None = None  # the traceback of an exception the rank raised

    @property
    def ok(self) -> bool:
        return self.exitcode == 0 and self.error is None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_ranks(
    fn: Callable[..., Any],
    world: int,
    *args: Any,
    timeout: float = 180.0,
    check: bool = True,
    pg_timeout: float = 60.0,
    backend: str = "gloo",
) -> list[Outcome]:
    """Run ``fn`` on ``world`` ranks; with ``check``, fail unless every rank returned."""
    ctx = mp.get_context("forkserver")
    # ranks fork from a server that imported torch once: each starts in milliseconds, not
    # the seconds a fresh interpreter takes (the bulk of a distributed test's time)
    ctx.set_forkserver_preload([*_PRELOAD, fn.__module__])
    results: Any = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, rank, world, port, pg_timeout, backend, results, args))
        for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    got: dict[int, tuple[Any, str | None]] = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    misses = 0  # polls with every rank gone: a few more drain what they put last
    while len(got) < world and datetime.datetime.now() < deadline and misses < 3:
        message = _poll(results)
        if message is not None:
            got[message[0]] = message[1:]
        elif all(not p.is_alive() for p in procs):
            misses += 1
    for proc in procs:
        proc.join(timeout=max(1.0, (deadline - datetime.datetime.now()).total_seconds()))
        if proc.is_alive():
            proc.kill()
            proc.join()
    outcomes = [
        Outcome(rank, proc.exitcode, *got.get(rank, (None, None)))
        for rank, proc in enumerate(procs)
    ]
    if check and not all(o.ok for o in outcomes):
        raise AssertionError(
            "ranks failed:\n"
            + "\n".join(
                f"rank {o.rank} exit {o.exitcode}:\n{o.error}" for o in outcomes if not o.ok
            )
        )
    return outcomes


def _poll(results: Any) -> tuple[int, Any, str | None] | None:
    try:
        return results.get(timeout=0.2)  # type: ignore[no-any-return]
    except queue.Empty:
        return None


def _entry(
    fn: Callable[..., Any],
    rank: int,
    world: int,
    port: int,
    pg_timeout: float,
    backend: str,
    results: Any,
    args: tuple[Any, ...],
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if torch.cuda.is_available() and "nccl" in backend:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=pg_timeout)
    )
    try:
        value = fn(rank, world, *args)
    except BaseException:
        results.put((rank, None, traceback.format_exc()))
    else:
        results.put((rank, value, None))
    finally:
        with contextlib.suppress(Exception):  # a peer that died leaves the group unusable
            dist.destroy_process_group()
