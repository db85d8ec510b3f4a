"""CheckpointManager under torch.distributed, on real ranks (spawned processes, gloo on CPU).

A training run killed by SIGKILL at three points resumes to the bit-identical end state of an
uninterrupted run; checkpoints reshard 4 -> 2 -> 4, 2 -> 1 (one process, no
torch.distributed) and 1 -> 2 bit-exactly; DDP and FSDP2; async saves; a failing rank, a
dead rank and a hung rank give every rank the same typed error and lose nothing; the
mistakes users make on many ranks are caught on every rank.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import torchvault as tv
from dist_harness import run_ranks
from torchvault.distributed import StorageWriter
from torchvault.run._store import RunStore

STEPS = 5


def build(world: int, kind: str) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """A model whose first layer has 15 rows: uneven shards on 2 and 4 ranks."""
    torch.manual_seed(0)
    model: nn.Module = nn.Sequential(nn.Linear(8, 15), nn.ReLU(), nn.Linear(15, 5))
    if kind == "fsdp":
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    elif kind == "ddp":
        model = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5)
    return model, opt, sched


def train_step(model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> float:
    loss = model(torch.randn(4, 8)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    sched.step()
    return loss.item()


def full_state(model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> dict[str, Any]:
    """Model and optimizer state as full tensors (collective under torch.distributed)."""
    options = StateDictOptions(full_state_dict=True)
    model_sd, optim_sd = get_state_dict(model, opt, options=options)
    return {
        "model": {k: v.detach().clone() for k, v in model_sd.items()},
        "optim": {
            f"{name}.{k}": v.detach().clone()
            for name, state in optim_sd["state"].items()
            for k, v in state.items()
        },
        "sched": sched.last_epoch,
    }


def same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (
        a["sched"] == b["sched"]
        and a["model"].keys() == b["model"].keys()
        and a["optim"].keys() == b["optim"].keys()
        and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        and all(torch.equal(a["optim"][k], b["optim"][k]) for k in a["optim"])
    )


def values(outcomes: list[Any]) -> list[Any]:
    return [o.value for o in outcomes]


def dump(rank: int, state: dict[str, Any], path: str) -> None:
    if rank == 0:
        tv.save(state, path)


# -- kill a rank, resume, end bit-identical ------------------------------------------------


def train(rank: int, world: int, run: str, out: str, kill: str | None, at: int) -> None:
    """Train to STEPS saving every step; with ``kill``, SIGKILL a rank at step ``at``."""
    if kill == "in_write" and rank == 1:
        original = StorageWriter.write_data

        def write_then_die(self: StorageWriter, plan: Any, planner: Any) -> Any:
            result = original(self, plan, planner)  # this rank's objects are durable
            if self.step == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        StorageWriter.write_data = write_then_die  # type: ignore[method-assign]
    if kill in ("before_commit", "after_commit") and rank == 0:
        commit = RunStore.commit

        def commit_and_die(self: RunStore, step: int, manifest: dict[str, Any]) -> None:
            if step == at and kill == "before_commit":
                os.kill(os.getpid(), signal.SIGKILL)
            commit(self, step, manifest)
            if step == at:  # committed, but the pointers are not moved yet
                os.kill(os.getpid(), signal.SIGKILL)

        RunStore.commit = commit_and_die  # type: ignore[method-assign]
    model, opt, sched = build(world, "fsdp")
    with tv.CheckpointManager(run, keep_last=2, monitor="loss") as mgr:
        report = mgr.restore(model=model, optimizer=opt, scheduler=sched)
        if report is None:
            torch.manual_seed(100 + rank)  # each rank's data; restored with the RNG on resume
        start = report.step + 1 if report else 0
        for step in range(start, STEPS):
            loss = train_step(model, opt, sched)
            mgr.save(step, metrics={"loss": loss}, model=model, optimizer=opt, scheduler=sched)
    dump(rank, full_state(model, opt, sched), out)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("straight")
    run_ranks(train, 2, str(root / "run"), str(root / "end.tv"), None, 0)
    return tv.load(root / "end.tv")


@pytest.mark.parametrize(
    ("kill", "committed"),
    [("in_write", 1), ("before_commit", 1), ("after_commit", 2)],
)
def test_a_run_killed_on_one_rank_resumes_bit_identical(
    tmp_path: Path, uninterrupted: dict[str, Any], kill: str, committed: int
) -> None:
    run, out = str(tmp_path / "run"), str(tmp_path / "end.tv")
    outcomes = run_ranks(train, 2, run, out, kill, 2, check=False, pg_timeout=20)
    assert any(o.exitcode == -signal.SIGKILL for o in outcomes)
    survivor = next(o for o in outcomes if o.exitcode != -signal.SIGKILL)
    assert survivor.error is not None  # the other rank learned of it; it did not hang
    assert "CheckpointWriteError" in survivor.error or "CollectiveError" in survivor.error
    store = RunStore(run)
    assert max(store.steps()) == committed  # nothing partial; nothing earlier lost
    if kill != "after_commit":
        assert store.stored() - store.referenced()  # the killed save left objects behind
    run_ranks(train, 2, run, out, None, 0)
    assert same_state(tv.load(out), uninterrupted)
    # the killed save's objects were removed by the next writer
    assert store.stored() == store.referenced()


# -- resharding: 4 -> 2 -> 4, 2 -> 1 process, 1 -> 2 ----------------------------------------


def reshard(
    rank: int, world: int, run: str, expect: str | None, out: str | None
) -> tuple[Any, ...]:
    """Restore the latest checkpoint (check it against ``expect``), then with ``out`` train
    one step and save it (its full state to ``out``)."""
    model, opt, sched = build(world, "fsdp" if world > 1 else "plain")
    with tv.CheckpointManager(run, keep_last=3) as mgr:
        report = mgr.restore(model=model, optimizer=opt, scheduler=sched)
        restored = full_state(model, opt, sched)
        same = same_state(restored, tv.load(expect)) if expect else None
        if out is not None:
            step = report.step + 1 if report else 0
            if report is None:
                torch.manual_seed(rank)
            train_step(model, opt, sched)
            train_step(model, opt, sched)
            mgr.save(step, model=model, optimizer=opt, scheduler=sched, epoch=step)
            dump(rank, full_state(model, opt, sched), out)
    return same, report.resharded_from if report else None, report.values if report else None


def test_a_checkpoint_restores_bit_exact_on_any_number_of_ranks(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    ref = [str(tmp_path / f"state{i}.tv") for i in range(3)]
    run_ranks(reshard, 4, run, None, ref[0])  # saved on 4
    # 4 -> 2, then saved on 2
    assert values(run_ranks(reshard, 2, run, ref[0], ref[1])) == [(True, 4, {"epoch": 0})] * 2
    # 2 -> 4
    assert values(run_ranks(reshard, 4, run, ref[1], None)) == [(True, 2, {"epoch": 1})] * 4
    # 2 -> one process without torch.distributed
    assert not dist.is_initialized()
    with pytest.warns(UserWarning, match="resharded"):
        assert reshard(0, 1, run, ref[1], None) == (True, 2, {"epoch": 1})
    # 2 -> 1 rank of a process group, saved there; then 1 -> 2
    assert run_ranks(reshard, 1, run, ref[1], ref[2])[0].value == (True, 2, {"epoch": 1})
    assert values(run_ranks(reshard, 2, run, ref[2], None)) == [(True, 1, {"epoch": 2})] * 2
    # and the consolidated checkpoint is the saved state, in one process
    expected = tv.load(ref[2])
    for items in (tv.CheckpointManager(run).load(), tv.load(f"{run}@latest")):
        assert all(torch.equal(items["model"][k], v) for k, v in expected["model"].items())
        assert items["epoch"] == 2


def test_a_single_process_checkpoint_continues_on_sharded_ranks(tmp_path: Path) -> None:
    run, ref = str(tmp_path / "run"), str(tmp_path / "state.tv")
    model, opt, sched = build(1, "plain")
    train_step(model, opt, sched)
    with tv.CheckpointManager(run) as mgr:
        mgr.save(0, model=model, optimizer=opt, scheduler=sched, epoch=0)
    tv.save(full_state(model, opt, sched), ref)
    # the ranks warn that the one saved random state is not given to them all
    assert values(run_ranks(reshard, 2, run, ref, None)) == [(True, 1, {"epoch": 0})] * 2


# -- DDP: replicated tensors are written once ---------------------------------------------


def ddp_save(rank: int, world: int, run: str, out: str) -> dict[str, int]:
    model, opt, sched = build(world, "ddp")
    torch.manual_seed(7 + rank)  # DDP averages the gradients: the replicas stay equal
    with tv.CheckpointManager(run) as mgr:
        if mgr.restore(model=model, optimizer=opt, scheduler=sched) is None:
            train_step(model, opt, sched)
            mgr.save(0, model=model, optimizer=opt, scheduler=sched)
        dump(rank, full_state(model, opt, sched), out)
        return dict(RunStore(run).manifest(0)["bytes"])


def test_ddp_writes_replicated_state_once_and_restores_anywhere(tmp_path: Path) -> None:
    run, out, again = str(tmp_path / "run"), str(tmp_path / "a.tv"), str(tmp_path / "b.tv")
    sizes = values(run_ranks(ddp_save, 2, run, out))
    # each object written by one rank: a replica written twice would count twice as new
    assert sizes[0] == sizes[1]
    # only equal tiny scalars (Adam's per-parameter step) may be written by two ranks at once
    assert 0 <= sizes[0]["new"] - sizes[0]["total"] < 64
    model, opt, sched = build(1, "plain")
    tv.CheckpointManager(run).restore(model=model, optimizer=opt, scheduler=sched)
    assert same_state(full_state(model, opt, sched), tv.load(out))
    run_ranks(ddp_save, 2, run, again)
    assert same_state(tv.load(again), tv.load(out))


# -- async ----------------------------------------------------------------------------------


def async_saves(rank: int, world: int, run: str) -> tuple[bool, list[int]]:
    model, opt, sched = build(world, "fsdp")
    torch.manual_seed(rank)
    with tv.CheckpointManager(run, async_save=True, keep_last=2) as mgr:
        states = {}
        for step in range(3):
            train_step(model, opt, sched)
            states[step] = full_state(model, opt, sched)
            mgr.save(step, model=model, optimizer=opt, scheduler=sched)
            with torch.no_grad():  # training goes on while the save is in flight
                for p in model.parameters():
                    p.add_(1.0)
        mgr.wait()
        steps = mgr.steps
    fresh, fresh_opt, fresh_sched = build(world, "fsdp")
    with tv.CheckpointManager(run) as mgr:
        mgr.restore(model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)
    return same_state(full_state(fresh, fresh_opt, fresh_sched), states[2]), steps


def test_async_save_commits_what_the_ranks_had_when_save_returned(tmp_path: Path) -> None:
    outcomes = run_ranks(async_saves, 2, str(tmp_path / "run"))
    assert {(o.value[0], tuple(o.value[1])) for o in outcomes} == {(True, (1, 2))}


# -- failures: one outcome for every rank ---------------------------------------------------


def failing_saves(rank: int, world: int, run: str) -> list[str]:
    from torchvault.storage import LocalStorage

    model, opt, sched = build(world, "fsdp")
    seen = []
    with tv.CheckpointManager(run) as mgr:
        train_step(model, opt, sched)
        mgr.save(0, model=model, optimizer=opt)
        before = full_state(model, opt, sched)
        put_many, commit, set_ref = LocalStorage.put_many, RunStore.commit, RunStore.set_ref

        def full_disk(self: Any, items: Any) -> None:
            raise OSError(28, "No space left on device")

        def refused(self: Any, *args: Any) -> None:
            raise OSError(5, "Input/output error")

        for where, failing in (("put_many", 1), ("commit", 0), ("set_ref", 0)):
            if rank == failing and where == "put_many":
                LocalStorage.put_many = full_disk  # type: ignore[method-assign]
            if rank == failing and where == "commit":
                RunStore.commit = refused  # type: ignore[method-assign]
            if rank == failing and where == "set_ref":
                RunStore.set_ref = refused  # type: ignore[method-assign]
            step = max(mgr.steps) + 1
            try:
                train_step(model, opt, sched)
                mgr.save(step, model=model, optimizer=opt)
            except tv.CheckpointWriteError as exc:
                committed = "is committed" in exc.message
                seen.append(f"{where}:{exc.ranks}:{committed}:{step in mgr.steps}")
            finally:
                LocalStorage.put_many, RunStore.commit = put_many, commit  # type: ignore[method-assign]
                RunStore.set_ref = set_ref  # type: ignore[method-assign]
        mgr.save(max(mgr.steps) + 1, model=model, optimizer=opt)  # the next save works
        fresh, fresh_opt, fresh_sched = build(world, "fsdp")
        mgr.restore(0, model=fresh, optimizer=fresh_opt)
        fresh_sched.last_epoch = sched.last_epoch = before["sched"]
        seen.append(str(same_state(full_state(fresh, fresh_opt, fresh_sched), before)))
        seen.append(str(mgr.steps))
    return seen


def test_a_rank_that_fails_to_write_fails_every_rank_and_commits_nothing(tmp_path: Path) -> None:
    outcomes = run_ranks(failing_saves, 2, str(tmp_path / "run"))
    assert (
        outcomes[0].value
        == outcomes[1].value
        == [
            "put_many:(1,):False:False",  # ENOSPC on rank 1: named; nothing committed
            "commit:(0,):False:False",  # the coordinator's commit refused: nothing committed
            "set_ref:(0,):True:True",  # committed, its pointer failed: said so on every rank
            "True",
            "[0, 1, 2]",
        ]
    )


def hung_peer(rank: int, world: int, run: str) -> tuple[str, float]:
    model = build(world, "plain")[0]
    mgr = tv.CheckpointManager(run, collective_timeout=2)
    if rank == 1:
        time.sleep(8)  # never calls save: alive, but not answering
        return "slept", 0.0
    start = time.monotonic()
    try:
        mgr.save(0, model=model)
    except tv.CollectiveError as exc:
        return (
            f"{type(exc).__name__}: {'collective_timeout=2 s' in exc.message}",
            time.monotonic() - start,
        )
    return "saved", 0.0


def test_a_hung_peer_times_out_with_a_typed_error(tmp_path: Path) -> None:
    outcomes = run_ranks(hung_peer, 2, str(tmp_path / "run"), check=False)
    message, waited = outcomes[0].value
    assert message == "CollectiveError: True"
    assert waited < 7  # the timeout, not the peer's sleep, ended the wait
    assert RunStore(tmp_path / "run").steps() == []


# -- mistakes users make on many ranks ------------------------------------------------------


def _error(call: Any) -> str:
    try:
        call()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def mistakes(rank: int, world: int, run: str) -> list[str]:
    model, opt, _ = build(world, "fsdp")
    other = nn.Linear(2, 2)
    found = []
    with tv.CheckpointManager(run, monitor="loss") as mgr:
        found.append(_error(lambda: mgr.save(0, metrics={"loss": 1.0}, optimizer=opt)))
        found.append(_error(lambda: mgr.save(rank, metrics={"loss": 1.0}, model=model)))
        found.append(
            _error(lambda: mgr.save(0, metrics={"loss": 1.0} if rank == 0 else {}, model=model))
        )
        mgr.save(0, metrics={"loss": 1.0}, model=model, optimizer=opt)
        unstepped = not opt.state  # saving did not step a fresh optimizer (DCP shapes its state so)
        found.append(_error(lambda: mgr.save(0, metrics={"loss": 0.5}, model=model)))
        found.append(_error(lambda: mgr.restore(model=model)))  # the optimizer has no target
        found.append(_error(lambda: mgr.restore(model=other, optimizer=opt)))
        found.append(
            _error(lambda: mgr.export_program(0, other, (torch.randn(1, 2),))) if rank else ""
        )
    found.append(_error(lambda: mgr.save(1, model=model)))
    found.append(f"unstepped: {unstepped}")
    return found


def test_mistakes_on_many_ranks_raise_the_same_error_on_every_rank(tmp_path: Path) -> None:
    first, second = (o.value for o in run_ranks(mistakes, 2, str(tmp_path / "run")))
    for mine, theirs in zip(first[:6], second[:6], strict=True):
        assert mine.split(":")[0] == theirs.split(":")[0]  # the same kind of error everywhere
    expected = [
        (first[0], "ValueError", "optimizer item 'optimizer'"),
        (first[1], "ValueError", "rank 1"),  # different steps on the ranks
        (second[2], "ValueError", "'loss'"),  # rank 1 lacked the monitored metric...
        (first[2], "ValueError", "rank 1"),  # ...and rank 0 was told which rank
        (first[3], "ValueError", "already committed"),
        (first[4], "RestoreMismatchError", "optimizer"),
        (first[5], "ValueError", "no module item"),
        (second[6], "ValueError", "rank 0 only"),
        (first[7], "ManagerClosedError", "closed"),
        (second[7], "ManagerClosedError", "closed"),
        (first[8], "unstepped", "True"),
    ]
    for message, kind, words in expected:
        assert message.startswith(kind), message
        assert words in message, message


def locked(rank: int, world: int, run: str) -> str:
    return _error(lambda: tv.CheckpointManager(run))


def test_a_run_held_by_another_writer_is_refused_on_every_rank(tmp_path: Path) -> None:
    with tv.CheckpointManager(tmp_path / "run"):
        outcomes = run_ranks(locked, 2, str(tmp_path / "run"))
    assert all(o.value.startswith("RunLockedError") for o in outcomes)
