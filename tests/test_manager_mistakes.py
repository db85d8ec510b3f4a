"""CheckpointManager mistakes that used to lose checkpoints or mislabel them (issue 10, section 1):
a closed manager, "best" without a metric, a misspelt monitor, a step at or below the latest,
a DataLoader generator as an item, and a manager re-created in the same process."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import torchvault as tv
from torchvault.cli import main
from torchvault.export import program_path
from torchvault.retention import AnyOf, KeepBest, KeepEvery, KeepLast
from torchvault.run import _readers
from torchvault.run._store import RunStore
from torchvault.storage import MemoryStorage

LOSSES = {10: 0.9, 20: 0.2, 30: 0.5, 40: 0.7}  # the best (lowest) is step 20, the latest 40


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (but the lock, which records its holder) with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "lock"
    }


def save_losses(mgr: tv.CheckpointManager, net: torch.nn.Module) -> None:
    for step, loss in LOSSES.items():
        with torch.no_grad():
            net[0].weight.fill_(float(step))
        mgr.save(step, metrics={"val_loss": loss, "acc": 1 - loss}, model=net, epoch=step)


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------- a closed manager

CLOSED_CALLS: dict[str, Any] = {
    "save": lambda m, net, tmp: m.save(100, model=net),
    "wait": lambda m, net, tmp: m.wait(),
    "prune": lambda m, net, tmp: m.prune(),
    "restore": lambda m, net, tmp: m.restore(model=net),
    "load": lambda m, net, tmp: m.load(),
    "export": lambda m, net, tmp: m.export("latest", tmp / "out.tv"),
    "export_program": lambda m, net, tmp: m.export_program(1, net, (torch.randn(2, 4),)),
    "metrics": lambda m, net, tmp: m.metrics(1),
    "list": lambda m, net, tmp: m.list(),
    "steps": lambda m, net, tmp: m.steps,
    "latest_step": lambda m, net, tmp: m.latest_step,
    "best_step": lambda m, net, tmp: m.best_step,
    "__enter__": lambda m, net, tmp: m.__enter__(),
}


def test_closed_calls_cover_every_public_name_of_the_manager() -> None:
    public = {name for name in dir(tv.CheckpointManager) if not name.startswith("_")}
    assert public | {"__enter__"} == set(CLOSED_CALLS) | {"close"}


@pytest.mark.parametrize("name", sorted(CLOSED_CALLS))
def test_a_closed_manager_raises_and_writes_nothing(tmp_path: Path, name: str) -> None:
    run, net = tmp_path / "run", model()
    first = tv.CheckpointManager(run)
    first.save(1, model=net)
    first.close()
    with tv.CheckpointManager(run) as second:  # the case: another writer holds it now
        before = snapshot(run)
        with pytest.raises(tv.ManagerClosedError, match="closed"):
            CLOSED_CALLS[name](first, net, tmp_path)
        assert snapshot(run) == before
        assert second.steps == [1]
    assert not (tmp_path / "out.tv").exists()


def test_close_is_idempotent_and_exit_after_close_is_too(tmp_path: Path) -> None:
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        mgr.close()
        mgr.close()
    tv.CheckpointManager(tmp_path / "run").close()  # the lock was released once, and is free


def test_a_standalone_program_export_into_a_run_takes_the_runs_lock(tmp_path: Path) -> None:
    run, net = tmp_path / "run", model()
    with tv.CheckpointManager(run) as mgr:
        mgr.save(1, model=net)
        program_path(run, 1).parent.mkdir()
        with pytest.raises(tv.RunLockedError):
            tv.export_program(net, torch.randn(2, 4), program_path(run, 1), validate=False)
        assert list(program_path(run, 1).parent.iterdir()) == []
    tv.export_program(net, torch.randn(2, 4), program_path(run, 1), validate=False)
    assert program_path(run, 1).is_file()  # with no writer left, the export takes the lock


# ---------------------------------------------------------------------- what "best" means


def test_best_is_undefined_without_a_metric_and_asking_for_it_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, net = tmp_path / "run", model()
    with tv.CheckpointManager(run, keep_last=3) as mgr:
        save_losses(mgr, net)
        assert mgr.best_step is None
        with pytest.raises(tv.CheckpointNotFoundError, match="no metric"):
            mgr.load("best")
        with pytest.raises(tv.CheckpointNotFoundError, match="no metric"):
            mgr.restore("best", model=net)
    with pytest.raises(tv.CheckpointNotFoundError, match="no metric"):
        _readers.resolve(RunStore(run), "best")
    code, _, err = cli(["export", str(run), "--step", "best", str(tmp_path / "b.tv")], capsys)
    assert (code, "no metric" in err) == (3, True)
    assert not (tmp_path / "b.tv").exists()
    with pytest.raises(tv.CheckpointNotFoundError, match="no metric"):
        tv.load_program(run, step="best")


def test_ls_never_marks_the_latest_as_best_without_a_metric(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        save_losses(mgr, model())
    listing = json.loads(cli(["ls", "--json", str(tmp_path / "run")], capsys)[1])
    assert (listing["latest"], listing["best"]) == (40, None)
    assert not any(c["best"] for c in listing["checkpoints"])
    rows = cli(["ls", str(tmp_path / "run")], capsys)[1].splitlines()
    assert not any(row.endswith("best") for row in rows)


@pytest.mark.parametrize(
    "policy",
    [
        KeepLast(2) | KeepBest(1, "val_loss"),
        AnyOf((KeepLast(1), AnyOf((KeepEvery(1000), KeepBest(1, "val_loss"))))),
    ],
    ids=["union", "nested"],
)
def test_best_is_defined_by_a_keep_best_policy_for_every_reader(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], policy: Any
) -> None:
    run, net = tmp_path / "run", model()
    with tv.CheckpointManager(run, policy=policy) as mgr:
        save_losses(mgr, net)
        assert mgr.best_step == 20
        assert mgr.load("best")["epoch"] == 20
        report = mgr.restore("best", model=model(1))
        assert report is not None
        assert report.step == 20
    assert _readers.resolve(RunStore(run), "best") == 20
    listing = json.loads(cli(["ls", "--json", str(run)], capsys)[1])
    assert (listing["latest"], listing["best"]) == (40, 20)
    assert cli(["export", str(run), "--step", "best", str(tmp_path / "b.tv")], capsys)[0] == 0
    assert tv.load(tmp_path / "b.tv")["epoch"] == 20


def test_load_program_best_is_the_best_by_the_runs_metric(tmp_path: Path) -> None:
    run, net, x = tmp_path / "run", model(), torch.randn(2, 4)
    with tv.CheckpointManager(run, policy=KeepLast(2) | KeepBest(1, "val_loss")) as mgr:
        save_losses(mgr, net)
        assert mgr.best_step == 20
        mgr.export_program(40, net, (x,), validate=False)  # the latest has a program too
        with torch.no_grad():
            net[0].weight.fill_(20.0)
        mgr.export_program(20, net, (x,), validate=False)
    with torch.no_grad():
        torch.testing.assert_close(tv.load_program(run, step="best")(x), net(x))


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["prune", "dry-run"])
def test_cli_prune_keeps_the_runs_best_when_its_pointer_is_stale(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dry_run: list[str]
) -> None:
    run = tmp_path / "run"
    with tv.CheckpointManager(run, monitor="val_loss") as mgr:
        save_losses(mgr, model())
    RunStore(run).set_ref("best", 40)  # killed between a commit and its best pointer
    code, out, _ = cli(["prune", "--keep-last", "1", "--json", *dry_run, str(run)], capsys)
    assert code == 0
    assert json.loads(out)["deleted"] == [10, 30]


def test_cli_model_export_from_a_run_without_a_metric_says_it_takes_the_latest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "nets_for_mgr_test.py").write_text(
        "import torch\n\ndef mlp():\n    return torch.nn.Sequential(torch.nn.Linear(4, 3), "
        "torch.nn.ReLU(), torch.nn.Linear(3, 2))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        save_losses(mgr, model())
    model_args = ["--model", "nets_for_mgr_test:mlp", "--input-shape", "2,4", "--checkpoint"]
    out = tmp_path / "m.pt2"
    code, _, err = cli(["export-program", *model_args, "run", str(out)], capsys)
    assert code == 0
    assert "no metric that defines a best checkpoint: loading the latest, step 40" in err
    code, _, err = cli(["export-program", *model_args, "run", "--step", "best", str(out)], capsys)
    assert (code, "no metric" in err) == (3, True)


@pytest.mark.parametrize(
    ("arguments", "names"),
    [
        ({"monitor": "val_loss", "policy": KeepBest(1, "acc", "max")}, ("val_loss", "acc")),
        ({"monitor": "val_loss", "policy": KeepBest(1, "val_loss", "max")}, ("min", "max")),
        ({"policy": KeepBest(1, "val_loss") | KeepBest(2, "acc", "max")}, ("val_loss", "acc")),
    ],
    ids=["monitor-and-policy", "two-modes", "two-policies"],
)
def test_two_metrics_for_best_are_refused_at_construction(
    tmp_path: Path, arguments: dict[str, Any], names: tuple[str, str]
) -> None:
    with pytest.raises(ValueError, match=f"{names[0]}.*{names[1]}"):
        tv.CheckpointManager(tmp_path / "run", **arguments)
    assert not (tmp_path / "run").exists()


def test_the_same_metric_in_monitor_and_policy_is_one_metric(tmp_path: Path) -> None:
    policy = KeepLast(1) | KeepBest(1, "val_loss")
    with tv.CheckpointManager(tmp_path / "run", monitor="val_loss", policy=policy) as mgr:
        save_losses(mgr, model())
        assert (mgr.best_step, mgr.steps) == (20, [20, 40])


def test_readers_recompute_the_best_when_its_pointer_is_missing_or_stale(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with tv.CheckpointManager(run, monitor="val_loss") as mgr:
        save_losses(mgr, model())
    store = RunStore(run)
    store.set_ref("best", 40)  # a pointer a crash left behind
    assert _readers.resolve(store, "best") == 20
    (run / "refs" / "best.json").unlink()
    assert _readers.resolve(store, "best") == 20
    with tv.CheckpointManager(run) as mgr:  # a manager without a metric reads it the same way
        assert mgr.best_step == 20


def test_a_new_writer_repairs_a_best_pointer_a_crash_left_stale(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with tv.CheckpointManager(run, monitor="val_loss") as mgr:
        save_losses(mgr, model())
    RunStore(run).set_ref("best", 40)
    tv.CheckpointManager(run).close()
    assert RunStore(run).ref("best") == 20


def test_the_managers_list_marks_the_best_it_reports(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with tv.CheckpointManager(run, monitor="val_loss") as mgr:
        save_losses(mgr, model())
    with tv.CheckpointManager(run, monitor="acc") as mgr:  # a new metric, lowest acc: step 10
        assert mgr.best_step == 10
        assert [c.step for c in mgr.list() if c.best] == [10]


def test_an_old_run_whose_manifests_name_no_metric_keeps_its_best_pointer(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with tv.CheckpointManager(run, monitor="val_loss") as mgr:
        save_losses(mgr, model())
    store = RunStore(run)
    for step in store.steps():  # as written before manifests recorded their metric
        manifest = store.manifest(step)
        manifest.pop("monitor", None)
        store.commit(step, manifest)
    assert _readers.resolve(store, "best") == 20
    with tv.CheckpointManager(run) as mgr:
        assert mgr.best_step == 20
        assert mgr.load("best")["epoch"] == 20


def test_a_misspelt_step_name_is_refused(tmp_path: Path) -> None:
    with tv.CheckpointManager(tmp_path / "run", monitor="val_loss") as mgr:
        save_losses(mgr, model())
        with pytest.raises(ValueError, match=r"step.*'bset'.*'latest' or 'best'"):
            mgr.load("bset")
        with pytest.raises(TypeError, match="step"):
            mgr.restore(2.0, model=model())  # type: ignore[arg-type]


# ---------------------------------------------------------------------- a misspelt monitor


@pytest.mark.parametrize(
    "arguments",
    [
        {"keep_last": 1, "keep_best": 1, "monitor": "val_los"},
        {"policy": KeepLast(1) | KeepBest(1, "val_los")},
    ],
    ids=["monitor", "policy"],
)
def test_a_save_without_the_monitored_metric_raises_before_writing(
    tmp_path: Path, arguments: dict[str, Any]
) -> None:
    run, net = tmp_path / "run", model()
    with tv.CheckpointManager(run, **arguments) as mgr:
        mgr.save(1, metrics={"val_los": 0.1}, model=net)
        before = snapshot(run)
        with pytest.raises(ValueError, match=r"'val_los'.*\['acc', 'val_loss'\]"):
            mgr.save(2, metrics={"val_loss": 0.5, "acc": 0.5}, model=net)
        with pytest.raises(ValueError, match=r"'val_los'.*\[\]"):
            mgr.save(2, model=net)
        assert snapshot(run) == before
        assert mgr.steps == [1]


@pytest.mark.parametrize(
    ("metrics", "error"),
    [({"loss": "low"}, TypeError), ({"loss": torch.ones(2)}, ValueError), ({3: 0.5}, TypeError)],
)
def test_a_metric_that_is_not_a_named_number_is_refused_naming_it(
    tmp_path: Path, metrics: dict[Any, Any], error: type[Exception]
) -> None:
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        with pytest.raises(error, match="metrics"):
            mgr.save(1, metrics=metrics, x=torch.ones(1))
        assert mgr.steps == []


# ---------------------------------------------------------------------- step order


def test_a_step_below_the_latest_is_refused_and_says_the_two_ways_out(tmp_path: Path) -> None:
    run, net = tmp_path / "run", model()
    with tv.CheckpointManager(run, keep_last=2) as mgr:
        mgr.save(10, model=net)
        mgr.save(11, model=net)
        before = snapshot(run)
        with pytest.raises(
            ValueError, match=r"(?s)latest step 11.*restore\(\).*12.*new run folder"
        ):
            mgr.save(5, model=net)
        assert snapshot(run) == before
        assert mgr.steps == [10, 11]


def test_the_latest_step_again_is_refused_with_the_same_ways_out(tmp_path: Path) -> None:
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(3, x=torch.ones(1))
        with pytest.raises(ValueError, match=r"(?s)already committed.*restore\(\).*new run folder"):
            mgr.save(3, x=torch.ones(1))


@pytest.mark.parametrize(
    ("step", "error"), [(-1, ValueError), (10**12, ValueError), (True, TypeError), (1.0, TypeError)]
)
def test_a_step_no_reader_could_list_is_refused(
    tmp_path: Path, step: Any, error: type[Exception]
) -> None:
    with tv.CheckpointManager(tmp_path / "run") as mgr, pytest.raises(error, match="step"):
        mgr.save(step, x=torch.ones(1))
    assert not list((tmp_path / "run" / "checkpoints").glob("*"))


# ---------------------------------------------------------------------- torch.Generator items


def epoch_orders(loader: torch.utils.data.DataLoader[Any], epochs: int) -> list[list[int]]:
    return [[int(i) for batch in loader for i in batch] for _ in range(epochs)]


def test_a_dataloader_generator_resumes_the_same_order(tmp_path: Path) -> None:
    data = torch.arange(20)
    straight = torch.Generator().manual_seed(7)
    expected = epoch_orders(
        torch.utils.data.DataLoader(data, 4, shuffle=True, generator=straight), 3
    )

    first = torch.Generator().manual_seed(7)
    loader = torch.utils.data.DataLoader(data, 4, shuffle=True, generator=first)
    assert epoch_orders(loader, 1) == expected[:1]
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(0, model=model(), loader_gen=first)

    resumed = torch.Generator().manual_seed(123)  # a fresh process: any seed
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        report = mgr.restore(model=model(), loader_gen=resumed)
    assert report is not None
    assert "loader_gen" in report.restored
    loader = torch.utils.data.DataLoader(data, 4, shuffle=True, generator=resumed)
    assert epoch_orders(loader, 2) == expected[1:]


def test_a_generator_item_is_loaded_as_its_state_and_device(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(0, loader_gen=gen)
        saved = mgr.load(item="loader_gen")
    assert saved["device"] == "cpu"
    assert torch.equal(saved["state"], gen.get_state())


def test_a_generator_item_needs_a_generator_target(tmp_path: Path) -> None:
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(0, loader_gen=torch.Generator())
        with pytest.raises(TypeError, match=r"loader_gen.*torch\.Generator"):
            mgr.restore(loader_gen=model())
        with pytest.raises(tv.RestoreMismatchError, match="loader_gen"):
            mgr.restore()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_generator_is_saved_with_its_device_and_restored_in_place(tmp_path: Path) -> None:
    gen = torch.Generator(device="cuda").manual_seed(5)
    expected = torch.rand(4, device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(0, cuda_gen=gen)
        assert mgr.load(item="cuda_gen")["device"] == str(gen.device)  # "cuda": as created
        target = torch.Generator(device="cuda").manual_seed(99)
        mgr.restore(cuda_gen=target)
        torch.testing.assert_close(torch.rand(4, device="cuda", generator=target), expected)
        with pytest.raises(ValueError, match=r"cuda_gen.*cpu.*cuda"):
            mgr.restore(cuda_gen=torch.Generator())


# ---------------------------------------------------------------------- the same process twice


def test_a_second_manager_in_the_same_process_says_how_to_release_the_first(
    tmp_path: Path,
) -> None:
    first = tv.CheckpointManager(tmp_path / "run")
    with pytest.raises(tv.RunLockedError) as caught:
        tv.CheckpointManager(tmp_path / "run")
    message = str(caught.value)
    assert f"this process (pid {os.getpid()})" in message
    assert "close()" in message
    assert "with tv.CheckpointManager" in message
    assert "Stop the other job" not in message
    first.close()
    tv.CheckpointManager(tmp_path / "run").close()


def test_a_second_manager_on_one_memory_storage_says_how_to_release_the_first() -> None:
    storage = MemoryStorage()
    with (
        tv.CheckpointManager(storage),
        pytest.raises(tv.RunLockedError, match=r"this process.*close\(\).*with"),
    ):
        tv.CheckpointManager(storage)
