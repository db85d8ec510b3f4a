"""Resuming a training run: a SIGKILLed job resumes bit-exactly, and restore's semantics.

The subprocess tests run ``train_job.py`` (model with dropout, AdamW, StepLR, a resumable
shuffling sampler, noise from Python's, NumPy's and torch's generators), kill it, rerun it to
the end and compare its final state with an uninterrupted run's, tensor by tensor, bit for bit.
"""

from __future__ import annotations

import fcntl
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import torchvault as tv
from torchvault.run._store import RunStore

JOB = Path(__file__).with_name("train_job.py")
TOTAL = 60  # 5 epochs of 12 batches
EVERY = 4  # checkpoints after steps 3, 7, 11, 15, ...; steps 11, 23, ... end an epoch
TIMEOUT = 120.0


# ---------------------------------------------------------------------- the training job


class Job:
    """One run of train_job.py, its stdout in a file the test polls."""

    def __init__(self, run_dir: Path, out: Path, log: Path, *flags: str) -> None:
        self.log = log
        self._stdout = log.open("w")
        self._stderr = log.with_suffix(".err").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, str(JOB), str(run_dir), str(TOTAL), str(EVERY), str(out), *flags],
            stdout=self._stdout,
            stderr=self._stderr,
        )

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def wait_for(self, line: str) -> None:
        """Poll stdout until ``line`` appears; fail if the job ends or time runs out first."""
        deadline = time.monotonic() + TIMEOUT
        while line not in self.lines():
            if self.proc.poll() is not None:
                pytest.fail(f"job exited ({self.proc.returncode}) before {line!r}: {self.errors()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"job did not print {line!r} within {TIMEOUT} s")
            time.sleep(0.01)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(TIMEOUT)
        self._close()

    def finish(self) -> None:
        try:
            code = self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"job did not finish within {TIMEOUT} s")
        self._close()
        assert code == 0, self.errors()
        assert self.lines()[-1] == "done"

    def first_step(self) -> int:
        return int(self.lines()[0].removeprefix("step "))

    def errors(self) -> str:
        return self.log.with_suffix(".err").read_text()[-3000:]

    def _close(self) -> None:
        self._stdout.close()
        self._stderr.close()


def run_to_end(run_dir: Path, out: Path, log: Path, *flags: str) -> Job:
    job = Job(run_dir, out, log, *flags)
    job.finish()
    return job


def next_step(run_dir: Path) -> int:
    """The step a resumed job must start at: after the newest committed checkpoint."""
    steps = RunStore(run_dir).steps()
    return steps[-1] + 1 if steps else 0


def assert_identical(a: object, b: object, path: str = "final") -> None:
    """Same structure, types and values; tensors equal bit for bit (dtype, shape, bytes)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        assert torch.equal(_bytes(a), _bytes(b)), f"{path} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict)
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple)
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{path}.{i}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The final state of an uninterrupted, synchronous run, computed once per session (the
    pytest-xdist workers share it through a locked folder beside their own)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder = root / "train-job-reference"
    folder.mkdir(exist_ok=True)
    with (root / "train-job-reference.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "final.tv").exists():
            run_to_end(folder / "run", folder / "final.tv", folder / "log.txt")
    final = tv.load(folder / "final.tv")
    assert isinstance(final, dict)
    assert final["sampler"] == {"epoch": 4, "position": 96, "seed": 1234}
    return final


# (pause after step, async_save, the step the rerun starts at when the save was committed)
KILLS = {
    "after-epoch-boundary-checkpoint": (11, False, 12),
    "after-mid-epoch-checkpoint": (15, False, 16),
    "mid-epoch-between-checkpoints": (13, False, 12),
    "async-after-mid-epoch-checkpoint": (15, True, 16),
}


@pytest.mark.parametrize(("pause_at", "async_save", "resume_at"), KILLS.values(), ids=KILLS)
def test_run_killed_at_a_step_resumes_bit_exactly(
    tmp_path: Path, reference: dict[str, Any], pause_at: int, async_save: bool, resume_at: int
) -> None:
    flags = ("--async",) if async_save else ()
    run_dir, out = tmp_path / "run", tmp_path / "final.tv"
    job = Job(run_dir, out, tmp_path / "log1.txt", "--pause-at", str(pause_at), *flags)
    job.wait_for(f"paused {pause_at}")
    job.kill()
    committed = next_step(run_dir)
    if async_save:  # the kill may have landed before the background commit
        assert committed in (resume_at, resume_at - EVERY)
    else:
        assert committed == resume_at

    rerun = run_to_end(run_dir, out, tmp_path / "log2.txt", *flags)

    assert rerun.first_step() == committed
    assert_identical(reference, tv.load(out))


def test_run_killed_at_a_random_step_resumes_bit_exactly(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    kill_after = random.Random(20240611).randrange(1, TOTAL - 1)
    run_dir, out = tmp_path / "run", tmp_path / "final.tv"
    job = Job(run_dir, out, tmp_path / "log1.txt")
    job.wait_for(f"step {kill_after}")  # the kill lands wherever the job is by then
    job.kill()
    committed = next_step(run_dir)

    rerun = run_to_end(run_dir, out, tmp_path / "log2.txt")

    assert rerun.first_step() == committed
    assert_identical(reference, tv.load(out))


# ---------------------------------------------------------------------- restore semantics


class Counter:
    """A stateful item that is not a module (like a sampler)."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self) -> dict[str, int]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.value = state["value"]


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_params(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    assert_identical(expected, params(model), "model")


def test_restore_of_an_empty_run_returns_none_and_touches_nothing(tmp_path: Path) -> None:
    model = make_model(0)
    before, rng = params(model), torch.get_rng_state()
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        assert mgr.restore(model=model) is None
    assert_params(model, before)
    assert torch.equal(torch.get_rng_state(), rng)


def test_strict_restore_names_saved_items_given_no_target(tmp_path: Path) -> None:
    model = make_model(0)
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, model=model, counter=Counter(5))
        with pytest.raises(tv.RestoreMismatchError, match="counter") as caught:
            mgr.restore(model=model)
    assert caught.value.missing == ("counter",)
    assert caught.value.unexpected == ()


def test_strict_restore_names_targets_with_no_saved_item(tmp_path: Path) -> None:
    model = make_model(0)
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, model=model)
        with pytest.raises(tv.RestoreMismatchError, match="extra") as caught:
            mgr.restore(model=model, extra=Counter())
    assert caught.value.missing == ()
    assert caught.value.unexpected == ("extra",)


def test_strict_restore_mismatch_changes_no_target_and_no_generator(tmp_path: Path) -> None:
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, model=make_model(0), counter=Counter(5))
        model, counter = make_model(1), Counter(0)
        before, rng = params(model), torch.get_rng_state()
        with pytest.raises(tv.RestoreMismatchError):
            mgr.restore(model=model, other=counter)
    assert_params(model, before)
    assert counter.value == 0
    assert torch.equal(torch.get_rng_state(), rng)


def test_non_strict_restore_lists_mismatches_and_restores_the_rest(tmp_path: Path) -> None:
    saved = make_model(0)
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, model=saved, counter=Counter(5))
        model, extra = make_model(1), Counter(9)
        report = mgr.restore(strict=False, model=model, extra=extra)
    assert report is not None
    assert report.missing == ("counter",)
    assert report.unexpected == ("extra",)
    assert report.restored == ("model",)
    assert_params(model, params(saved))
    assert extra.value == 9


def test_plain_values_come_back_in_report_values(tmp_path: Path) -> None:
    values: dict[str, Any] = {
        "epoch": 3,
        "name": "run-a",
        "lr": 0.125,
        "done": False,
        "history": [1.5, 2.5],
        "table": {"a": 1, "b": None},
        "mask": torch.tensor([True, False, True]),
        "ids": np.arange(4, dtype=np.int32),
    }
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, counter=Counter(5), **values)
        report = mgr.restore(counter=Counter())
    assert report is not None
    assert report.restored == ("counter",)
    mask, ids = report.values.pop("mask"), report.values.pop("ids")
    assert torch.equal(mask, values.pop("mask"))
    assert isinstance(ids, np.ndarray)
    assert ids.dtype == np.int32
    assert np.array_equal(ids, values.pop("ids"))
    assert report.values == values


def test_restore_returns_the_metrics_saved_with_the_step(tmp_path: Path) -> None:
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(4, metrics={"loss": 0.25, "acc": np.float32(0.5)}, counter=Counter(1))
        report = mgr.restore(counter=Counter())
    assert report is not None
    assert report.metrics == {"loss": 0.25, "acc": 0.5}


@pytest.mark.parametrize(("mode", "best"), [("min", 20), ("max", 30)])
def test_restore_best_picks_the_best_step_by_monitor_and_mode(
    tmp_path: Path, mode: str, best: int
) -> None:
    losses = {10: 0.5, 20: 0.2, 30: 0.9, 40: 0.4}
    with tv.CheckpointManager(tmp_path / "run", monitor="loss", mode=mode) as mgr:
        for step, loss in losses.items():
            mgr.save(step, metrics={"loss": loss}, counter=Counter(step))
        counter = Counter()
        report = mgr.restore("best", counter=counter)
        assert mgr.best_step == best
    assert report is not None
    assert report.step == best
    assert counter.value == best
    assert report.metrics == {"loss": losses[best]}
    assert RunStore(tmp_path / "run").ref("best") == best


def test_restore_of_a_pruned_step_raises_checkpoint_not_found(tmp_path: Path) -> None:
    with tv.CheckpointManager(tmp_path / "run", keep_last=2) as mgr:
        for step in range(1, 5):
            mgr.save(step, counter=Counter(step))
        assert mgr.steps == [3, 4]
        with pytest.raises(tv.CheckpointNotFoundError, match="step 1 is not committed"):
            mgr.restore(1, counter=Counter())


def test_restore_of_an_older_kept_step_restores_that_step(tmp_path: Path) -> None:
    with tv.CheckpointManager(tmp_path / "run", keep_last=2) as mgr:
        for step in range(1, 5):
            mgr.save(step, counter=Counter(step * 10), epoch=step)
        counter = Counter()
        report = mgr.restore(3, counter=counter)
    assert report is not None
    assert (report.step, counter.value, report.values) == (3, 30, {"epoch": 3})


def test_restore_latest_without_a_latest_pointer_takes_the_newest_checkpoint(
    tmp_path: Path,
) -> None:
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        for step in (1, 2, 3):
            mgr.save(step, counter=Counter(step))
    RunStore(tmp_path / "run").ref_path("latest").unlink()
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        counter = Counter()
        report = mgr.restore(counter=counter)
    assert report is not None
    assert (report.step, counter.value) == (3, 3)


def test_restore_latest_ignores_a_pointer_to_an_uncommitted_step(tmp_path: Path) -> None:
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        for step in (1, 2):
            mgr.save(step, counter=Counter(step))
    RunStore(tmp_path / "run").set_ref("latest", 7)
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        counter = Counter()
        report = mgr.restore(counter=counter)
    assert report is not None
    assert (report.step, counter.value) == (2, 2)


DRAWS: dict[str, Callable[[], object]] = {
    "python": lambda: [random.random() for _ in range(4)],
    "numpy": lambda: np.random.random(4).tolist(),
    "torch": lambda: torch.rand(4).tolist(),
}


@pytest.mark.parametrize("generator", DRAWS)
def test_restore_puts_the_generator_back_to_its_state_at_the_saved_step(
    tmp_path: Path, generator: str
) -> None:
    draw = DRAWS[generator]
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    draw()
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, counter=Counter())
        expected = draw()  # what step 2 would have drawn
        draw()
        report = mgr.restore(counter=Counter())
    assert report is not None
    assert generator in report.rng
    assert draw() == expected


def test_async_save_keeps_the_state_as_it_was_when_save_returned(tmp_path: Path) -> None:
    model = make_model(0)
    before = params(model)
    with tv.CheckpointManager(tmp_path / "run", async_save=True) as mgr:
        mgr.save(1, model=model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # training goes on while the save is in flight
        target = make_model(1)
        report = mgr.restore(model=target)
    assert report is not None
    assert report.step == 1
    assert_params(target, before)
