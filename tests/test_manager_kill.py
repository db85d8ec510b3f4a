"""CheckpointManager under real SIGKILLs, racing writers and a reader racing retention.

Child processes come from a ``forkserver`` that has torch, torchvault and this module
preloaded, so each starts in milliseconds and a kill lands while it saves, not while it imports.
Everything a child saves at a step is a deterministic function of the step, so the test
recomputes it and checks every committed checkpoint bit for bit.
"""

from __future__ import annotations

import multiprocessing
import random
import signal
import time
from multiprocessing.context import ForkServerContext
from pathlib import Path
from typing import Any

import pytest
import torch

import torchvault as tv
from torchvault._commit import TEMP_MARK
from torchvault.run._readers import load_tree, resolve, restore
from torchvault.run._store import RunStore

TIMEOUT = 60.0
KEEP = {"keep_last": 3, "keep_best": 1, "monitor": "loss"}


@pytest.fixture(scope="module")
def ctx() -> ForkServerContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torchvault", __name__])
    return context


# ---------------------------------------------------------------------- what a step saves


def data_at(step: int) -> dict[str, Any]:
    """The plain values saved at ``step``: several dtypes, one object shared by every step."""
    generator = torch.Generator().manual_seed(step)
    return {
        "weights": torch.randn(32, 32, generator=generator),
        "ids": torch.arange(step, step + 100, dtype=torch.int64),
        "flags": torch.rand(50, generator=generator) > 0.5,
        "half": torch.randn(64, generator=generator).to(torch.bfloat16),
        "shared": torch.ones(256),
        "name": f"step-{step}",
        "shape": [step, step + 1],
    }


def loss_at(step: int) -> float:
    return ((step * 7919) % 101) / 101.0  # jumps around, so the best is some older step


class Holder:
    """A stateful item (saved through state_dict) whose state is a function of the step."""

    def __init__(self, step: int) -> None:
        self.state: dict[str, Any] = {"position": step, "buffer": torch.full((16,), float(step))}

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


def save_step(mgr: tv.CheckpointManager, step: int) -> None:
    torch.manual_seed(step)  # the saved torch generator state is a function of the step too
    mgr.save(step, metrics={"loss": loss_at(step)}, holder=Holder(step), data=data_at(step))


def assert_identical(a: object, b: object, path: str) -> None:
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"{path} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict)
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{path}.{key}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def verify_checkpoint(store: RunStore, step: int) -> None:
    """Load ``step`` (every object checksummed) and compare it with what was saved."""
    manifest, state = load_tree(store, step)
    assert manifest["step"] == step
    assert_identical(state["items"]["data"], data_at(step), f"step {step} data")
    assert_identical(state["items"]["holder"], Holder(step).state, f"step {step} holder")
    expected_rng = torch.Generator().manual_seed(step).get_state()
    assert torch.equal(state["rng"]["torch"], expected_rng), f"step {step} torch rng"


def temp_files(run_dir: Path) -> list[Path]:
    return list(run_dir.rglob(f"*{TEMP_MARK}*"))


def join(process: multiprocessing.process.BaseProcess) -> None:
    process.join(TIMEOUT)
    if process.exitcode is None:
        process.kill()
        process.join(TIMEOUT)
        pytest.fail(f"{process.name} did not finish within {TIMEOUT} s")


# ---------------------------------------------------------------------- children


def save_forever(run_dir: str, saving: Any) -> None:
    """Resume after the newest checkpoint and save step after step until killed."""
    mgr = tv.CheckpointManager(run_dir, **KEEP)
    step = 0 if mgr.latest_step is None else mgr.latest_step + 1
    saving.set()
    while True:
        save_step(mgr, step)
        step += 1


def hold_lock(run_dir: str, ready: Any) -> None:
    """Open a manager on ``run_dir``, say so, and keep it open until killed."""
    _mgr = tv.CheckpointManager(run_dir)
    ready.set()
    signal.pause()


def race_to_write(index: int, dirs: list[str], barrier: Any, results: Any) -> None:
    """In each round, open a manager on the round's folder at the same moment as the others.

    The winner holds its lock until every writer has reported, so a loser cannot have
    succeeded by waiting for the winner to let go: it must have been refused at once.
    """
    for round_dir in dirs:
        barrier.wait(TIMEOUT)
        mgr = None
        try:
            mgr = tv.CheckpointManager(round_dir)
            outcome = "won"
        except tv.RunLockedError:
            outcome = "locked"
        except Exception as exc:  # reported to the test, which fails on it
            outcome = f"{type(exc).__name__}: {exc}"
        results.put((round_dir, index, outcome))
        barrier.wait(TIMEOUT)  # every writer has tried while the winner still holds the lock
        if mgr is not None:
            mgr.save(0, writer=index)
            mgr.close()
        barrier.wait(TIMEOUT)


def write_checkpoints(run_dir: str, count: int) -> None:
    with tv.CheckpointManager(run_dir, keep_last=2) as mgr:
        for step in range(count):
            save_step(mgr, step)


# ---------------------------------------------------------------------- SIGKILL while saving


def kill_saver_repeatedly(ctx: ForkServerContext, run_dir: Path, kills: int, seed: int) -> None:
    """Kill a saving child ``kills`` times, checking the run folder after each kill."""
    delays = random.Random(seed)
    saving = ctx.Event()
    rounds_with_temp_files = 0
    rounds_child_committed = 0
    parent_step = -1
    for _ in range(kills):
        saving.clear()
        child = ctx.Process(target=save_forever, args=(str(run_dir), saving))
        child.start()
        # 0-300 ms into the save loop (a loaded disk can make a save itself take 300 ms, so
        # counting from the process start would often kill it before its first write)
        assert saving.wait(TIMEOUT), "the child did not start saving"
        time.sleep(delays.uniform(0.0, 0.3))  # when the kill lands, not an assertion
        child.kill()
        join(child)
        assert child.exitcode == -signal.SIGKILL

        store = RunStore(run_dir)
        steps = store.steps()
        for step in steps:
            verify_checkpoint(store, step)
        for ref in ("latest", "best"):
            named = store.ref(ref)
            assert named is None or named in steps, f"refs/{ref}.json names uncommitted {named}"
        if steps:
            assert store.ref("latest") in (steps[-1], steps[-2] if len(steps) > 1 else None)
        rounds_with_temp_files += bool(temp_files(run_dir))
        rounds_child_committed += bool(steps) and steps[-1] > parent_step

        with tv.CheckpointManager(run_dir, **KEEP) as mgr:
            assert temp_files(run_dir) == []
            assert mgr.steps == steps
            parent_step = 0 if mgr.latest_step is None else mgr.latest_step + 1
            save_step(mgr, parent_step)
            assert mgr.latest_step == parent_step
        verify_checkpoint(RunStore(run_dir), parent_step)
        assert RunStore(run_dir).ref("latest") == parent_step

    # some kills landed mid-write, or after commits (else this test would prove nothing)
    assert rounds_with_temp_files + rounds_child_committed > 0


def test_sigkill_while_saving_leaves_only_verified_checkpoints(
    tmp_path: Path, ctx: ForkServerContext
) -> None:
    kill_saver_repeatedly(ctx, tmp_path / "run", kills=50, seed=6)


@pytest.mark.soak
def test_sigkill_while_saving_leaves_only_verified_checkpoints_soak(
    tmp_path: Path, ctx: ForkServerContext
) -> None:
    kill_saver_repeatedly(ctx, tmp_path / "run", kills=300, seed=11)


# ---------------------------------------------------------------------- the writer lock


def test_second_manager_on_a_run_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    first = tv.CheckpointManager(tmp_path / "run")
    with pytest.raises(tv.RunLockedError, match="only one CheckpointManager"):
        tv.CheckpointManager(tmp_path / "run")
    first.close()
    with tv.CheckpointManager(tmp_path / "run") as second:
        second.save(1, x=1)


def test_lock_of_a_killed_writer_is_released(tmp_path: Path, ctx: ForkServerContext) -> None:
    ready = ctx.Event()
    holder = ctx.Process(target=hold_lock, args=(str(tmp_path / "run"), ready))
    holder.start()
    try:
        assert ready.wait(TIMEOUT)
        with pytest.raises(tv.RunLockedError, match=f"pid {holder.pid}"):
            tv.CheckpointManager(tmp_path / "run")
    finally:
        holder.kill()
        join(holder)
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, x=1)
        assert mgr.steps == [1]


def test_of_four_racing_writers_one_writes_and_three_are_refused_at_once(
    tmp_path: Path, ctx: ForkServerContext
) -> None:
    writers, rounds = 4, 10
    dirs = [str(tmp_path / f"run-{r}") for r in range(rounds)]
    barrier, results = ctx.Barrier(writers), ctx.Queue()
    processes = [
        ctx.Process(target=race_to_write, args=(i, dirs, barrier, results)) for i in range(writers)
    ]
    for process in processes:
        process.start()
    try:
        outcomes: dict[str, dict[int, str]] = {d: {} for d in dirs}
        for _ in range(writers * rounds):
            round_dir, index, outcome = results.get(timeout=TIMEOUT)
            outcomes[round_dir][index] = outcome
    finally:
        for process in processes:
            join(process)
    assert all(process.exitcode == 0 for process in processes)

    for round_dir, by_writer in outcomes.items():
        assert sorted(by_writer.values()) == ["locked"] * 3 + ["won"], by_writer
        (winner,) = (i for i, outcome in by_writer.items() if outcome == "won")
        store = RunStore(round_dir)
        assert store.steps() == [0]
        report = restore(store, "latest", strict=True, map_location=None, items={})
        assert report is not None
        assert report.values == {"writer": winner}


# ---------------------------------------------------------------------- a reader racing retention


def read_latest(store: RunStore) -> tv.ResumeReport | None:
    """Restore the latest checkpoint without a lock, retrying when retention deleted the step
    between choosing it and reading it (a CorruptCheckpointError is never retried)."""
    while True:
        step = resolve(store, "latest")
        if step is None:
            return None
        holder = Holder(-1)
        try:
            report = restore(store, step, strict=True, map_location=None, items={"holder": holder})
        except FileNotFoundError:  # CheckpointNotFoundError included
            assert step not in store.steps(), f"step {step} is committed but was not found"
            continue
        assert_identical(holder.state, Holder(step).state, f"step {step} holder")
        return report


def test_reader_of_latest_always_sees_a_complete_checkpoint_while_retention_prunes(
    tmp_path: Path, ctx: ForkServerContext
) -> None:
    run_dir, count = tmp_path / "run", 30
    writer = ctx.Process(target=write_checkpoints, args=(str(run_dir), count))
    writer.start()
    store = RunStore(run_dir)
    seen: list[int] = []
    deadline = time.monotonic() + TIMEOUT
    try:
        while True:
            finished = writer.exitcode is not None  # then this read is the last
            report = read_latest(store)
            if report is not None:
                assert_identical(report.values["data"], data_at(report.step), "data")
                assert not seen or report.step >= seen[-1], "latest went backwards"
                seen.append(report.step)
            if finished:
                break
            assert time.monotonic() < deadline, "the writer did not finish in time"
    finally:
        if writer.exitcode is None:
            writer.kill()
        join(writer)
    assert writer.exitcode == 0
    assert RunStore(run_dir).steps() == [count - 2, count - 1]
    assert seen[-1] == count - 1
    assert len(set(seen)) > 1


class PausingStore(RunStore):
    """A reader's view of the run that lets the writer go on between reading a checkpoint's
    manifest and reading its objects (as when a big checkpoint takes a while to read)."""

    def __init__(self, root: Path, between: Any) -> None:
        super().__init__(root)
        self.between = between

    def manifest(self, step: int) -> dict[str, Any]:
        document = super().manifest(step)
        between, self.between = self.between, None
        if between is not None:
            between()
        return document


def test_reader_of_a_step_pruned_mid_read_gets_not_found_not_corrupt(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with tv.CheckpointManager(run_dir, keep_last=2) as mgr:
        save_step(mgr, 0)
        save_step(mgr, 1)

        def writer_goes_on() -> None:  # two more saves: step 1 is pruned, its objects freed
            save_step(mgr, 2)
            save_step(mgr, 3)
            assert mgr.steps == [2, 3]

        with pytest.raises(tv.CheckpointNotFoundError):
            load_tree(PausingStore(run_dir, writer_goes_on), 1)
