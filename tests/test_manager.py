"""CheckpointManager behaviours: saving, retention, deduplication, pointers, locking, async."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch

import torchvault as tv
from torchvault import _commit, _format
from torchvault.run._store import RunStore


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def objects(run: Path) -> set[str]:
    return {p.name for p in (run / "objects").iterdir()}


def test_save_then_restore_loads_every_item_in_place(tmp_path: Path) -> None:
    source, target = model(0), model(1)
    opt = torch.optim.AdamW(source.parameters(), lr=0.1)
    source(torch.randn(2, 8)).sum().backward()
    opt.step()
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(3, model=source, optimizer=opt, epoch=1)
        target_opt = torch.optim.AdamW(target.parameters(), lr=0.1)
        report = mgr.restore(model=target, optimizer=target_opt)
    assert report is not None
    assert report.step == 3
    assert report.restored == ("model", "optimizer")
    assert report.values == {"epoch": 1}
    for a, b in zip(source.parameters(), target.parameters(), strict=True):
        assert torch.equal(a, b)
    saved = opt.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(target_opt.state_dict()["state"][0]["exp_avg"], saved)


def test_restore_of_an_empty_run_returns_none(tmp_path: Path) -> None:
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        assert mgr.restore(model=model()) is None


def test_a_step_is_saved_once(tmp_path: Path) -> None:
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, model=model())
        with pytest.raises(ValueError, match="already committed"):
            mgr.save(1, model=model())


def test_unchanged_tensors_are_stored_once_across_checkpoints(tmp_path: Path) -> None:
    net = model()
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, model=net)
        first = objects(tmp_path / "run")
        with torch.no_grad():
            net[2].bias.add_(1.0)
        mgr.save(2, model=net)
        second = objects(tmp_path / "run")
        summaries = {s.step: s for s in mgr.list()}
    assert len(second - first) == 1  # only the changed bias (RNG states did not change either)
    assert summaries[2].new_bytes == net[2].bias.numel() * 4
    assert summaries[2].total_bytes == summaries[1].total_bytes


def test_tied_weights_are_stored_once_within_a_checkpoint(tmp_path: Path) -> None:
    shared = torch.nn.Parameter(torch.randn(32, 32))
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, weights={"a": shared})
        mgr.save(2, weights={"a": shared, "b": shared})
        once, twice = mgr.list()
    assert twice.total_bytes == once.total_bytes


def test_retention_deletes_old_checkpoints_and_their_unshared_objects(tmp_path: Path) -> None:
    net = model()
    with tv.CheckpointManager(tmp_path / "run", keep_last=2) as mgr:
        for step in range(5):
            with torch.no_grad():
                net[0].weight.add_(1.0)
            mgr.save(step, model=net)
        assert mgr.steps == [3, 4]
        referenced = RunStore(tmp_path / "run").referenced()
    assert objects(tmp_path / "run") == referenced


def test_retention_never_deletes_the_best_checkpoint(tmp_path: Path) -> None:
    with tv.CheckpointManager(tmp_path / "run", keep_last=1, monitor="loss") as mgr:
        for step, loss in enumerate([0.5, 0.1, 0.9, 0.8]):
            mgr.save(step, metrics={"loss": loss}, model=model(step))
        assert mgr.best_step == 1
        assert mgr.steps == [1, 3]


def test_keep_best_keeps_the_best_k_by_mode_max(tmp_path: Path) -> None:
    with tv.CheckpointManager(
        tmp_path / "run", keep_last=1, keep_best=2, monitor="acc", mode="max"
    ) as mgr:
        for step, acc in enumerate([0.5, 0.9, 0.7, 0.1, 0.2]):
            mgr.save(step, metrics={"acc": acc}, model=model(step))
        assert mgr.steps == [1, 2, 4]
        assert mgr.best_step == 1


def test_prune_dry_run_deletes_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with tv.CheckpointManager(run) as mgr:
        for step in range(4):
            mgr.save(step, model=model(step))
    with tv.CheckpointManager(run, keep_last=1) as mgr:
        assert mgr.prune(dry_run=True) == [0, 1, 2]
        assert mgr.steps == [0, 1, 2, 3]
        assert mgr.prune() == [0, 1, 2]
        assert mgr.steps == [3]


def test_pointer_files_name_the_latest_and_the_best(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with tv.CheckpointManager(run, monitor="loss") as mgr:
        for step, loss in enumerate([0.3, 0.1, 0.2]):
            mgr.save(step, metrics={"loss": loss}, model=model(step))
    store = RunStore(run)
    assert store.ref("latest") == 2
    assert store.ref("best") == 1


def test_restore_best_and_by_number(tmp_path: Path) -> None:
    nets = [model(seed) for seed in range(3)]
    with tv.CheckpointManager(tmp_path / "run", monitor="loss") as mgr:
        for step, (net, loss) in enumerate(zip(nets, [0.3, 0.1, 0.2], strict=True)):
            mgr.save(step, metrics={"loss": loss}, model=net)
        best, numbered = model(9), model(9)
        assert mgr.restore("best", model=best).step == 1  # type: ignore[union-attr]
        assert mgr.restore(2, model=numbered).step == 2  # type: ignore[union-attr]
    assert torch.equal(best[0].weight, nets[1][0].weight)
    assert torch.equal(numbered[0].weight, nets[2][0].weight)


def test_metrics_round_trip_including_nan(tmp_path: Path) -> None:
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, metrics={"loss": torch.tensor(0.25), "gnorm": float("nan")}, model=model())
        metrics = mgr.metrics(1)
    assert metrics["loss"] == 0.25
    assert metrics["gnorm"] != metrics["gnorm"]


def test_a_second_writer_is_refused_at_once(tmp_path: Path) -> None:
    with (
        tv.CheckpointManager(tmp_path / "run"),
        pytest.raises(tv.RunLockedError, match="only one CheckpointManager"),
    ):
        tv.CheckpointManager(tmp_path / "run")
    tv.CheckpointManager(tmp_path / "run").close()  # released on close


def test_temp_files_of_an_interrupted_save_are_removed_by_the_next_writer(tmp_path: Path) -> None:
    run = tmp_path / "run"
    tv.CheckpointManager(run).close()
    leftover = run / "objects" / f".x{_commit.TEMP_MARK}host-1-abc"
    leftover.parent.mkdir(exist_ok=True)
    leftover.write_bytes(b"partial")
    tv.CheckpointManager(run).close()
    assert not leftover.exists()


def test_uncommitted_manifest_temp_is_not_a_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with tv.CheckpointManager(run) as mgr:
        mgr.save(1, model=model())
    (run / "checkpoints" / f".step-000000000002.json{_commit.TEMP_MARK}x").write_text("{}")
    assert RunStore(run).steps() == [1]


def test_async_save_snapshots_before_returning(tmp_path: Path) -> None:
    net = model()
    expected = net[0].weight.detach().clone()
    with tv.CheckpointManager(tmp_path / "run", async_save=True) as mgr:
        mgr.save(1, model=net)
        with torch.no_grad():
            net[0].weight.add_(100.0)  # after save() returned: must not reach the checkpoint
        mgr.wait()
        restored = model(5)
        mgr.restore(model=restored)
    assert torch.equal(restored[0].weight, expected)


def test_async_save_hashes_first_only_what_stayed_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = model()
    run = tmp_path / "run"
    caller = threading.current_thread()
    hashed: list[int] = []  # blobs save() hashed on the caller's thread, per save
    real = _format.hash_bytes

    def counting(data: object) -> str:
        if hashed and threading.current_thread() is caller:
            hashed[-1] += 1
        return real(data)

    monkeypatch.setattr(_format, "hash_bytes", counting)

    def save(mgr: tv.CheckpointManager, step: int) -> None:
        hashed.append(0)
        mgr.save(step, model=net)
        mgr.wait()

    with tv.CheckpointManager(run, async_save=True) as mgr:
        save(mgr, 1)  # nothing stored yet: everything copied, nothing hashed
        with torch.no_grad():
            net[0].weight.add_(1)
        save(mgr, 2)  # everything hashed: all but the one weight passed by digest
        after_two = objects(run)
        save(mgr, 3)  # the weight changed last time: copied unhashed, found unchanged
        assert objects(run) == after_two
        hashed.append(0)  # restore's verification is not counted
        restored = model(6)
        mgr.restore(3, model=restored)
    blobs = hashed[1]
    assert blobs >= 4
    assert hashed[:3] == [0, blobs, blobs - 1]
    assert torch.equal(restored[0].weight, net[0].weight)


def test_async_failure_is_raised_by_the_next_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mgr = tv.CheckpointManager(tmp_path / "run", async_save=True)

    def broken(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mgr._store, "commit", broken)
    mgr.save(1, model=model())
    with pytest.raises(OSError, match="No space"):
        mgr.wait()
    monkeypatch.undo()
    mgr.save(2, model=model())
    mgr.close()
    assert RunStore(tmp_path / "run").steps() == [2]


def test_export_writes_a_standalone_file_of_one_item(tmp_path: Path) -> None:
    net = model()
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, model=net, epoch=4)
        mgr.export("latest", tmp_path / "model.tv", item="model")
        mgr.export(1, tmp_path / "all.tv")
    fresh = model(7)
    assert tv.load_into(fresh, tmp_path / "model.tv").ok
    assert torch.equal(fresh[0].weight, net[0].weight)
    everything = tv.load(tmp_path / "all.tv")
    assert isinstance(everything, dict)
    assert everything["epoch"] == 4


def test_load_returns_a_checkpoints_state_without_targets(tmp_path: Path) -> None:
    net = model()
    with tv.CheckpointManager(tmp_path / "run", monitor="loss") as mgr:
        with pytest.raises(tv.CheckpointNotFoundError, match="no checkpoint yet"):
            mgr.load()
        mgr.save(1, metrics={"loss": 0.5}, model=net, epoch=4)
        first = net[0].weight.detach().clone()
        with torch.no_grad():
            net[0].weight.add_(1)
        mgr.save(2, metrics={"loss": 0.9}, model=net, epoch=5)
        everything = mgr.load()
        best = mgr.load("best", item="model")
        with pytest.raises(tv.CheckpointNotFoundError, match="no item 'optimizer'"):
            mgr.load(item="optimizer")
        with pytest.raises(tv.CheckpointNotFoundError, match="step 7 is not committed"):
            mgr.load(7)
    assert everything["epoch"] == 5
    assert torch.equal(everything["model"]["0.weight"], net[0].weight)
    assert torch.equal(best["0.weight"], first)
    assert "rng" not in everything


def test_equal_tensors_come_back_in_separate_memory(tmp_path: Path) -> None:
    """One object holds both (deduplicated), but the loaded tensors must not alias: an
    optimizer's per-parameter ``step`` counters are equal and updated in place."""
    net = model()
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(2, 8)).sum().backward()
    opt.step()
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, model=net, optimizer=opt, pair=[torch.zeros(64), torch.zeros(64)])
        state = mgr.load()
        restored = torch.optim.AdamW(net.parameters())
        mgr.restore(model=net, optimizer=restored, strict=False)
    first, second = state["pair"]
    first.add_(1)
    assert torch.equal(second, torch.zeros(64))
    steps = [s["step"] for s in restored.state_dict()["state"].values()]
    steps[0].add_(1)
    assert [float(s) for s in steps] == [2.0] + [1.0] * (len(steps) - 1)


def test_threaded_hashing_matches_and_still_catches_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large states hash on worker threads (saves pipeline it with writes, loads verify in
    parallel); force that path on a small state."""
    tensors = [torch.randn(1000) for _ in range(9)]
    views = [_format.byte_view(t) for t in tensors]
    inline = [_format.hash_bytes(v) for v in views]
    monkeypatch.setattr(_format, "_PIPELINE_BYTES", 0)
    assert _format.hash_all(views) == inline
    assert [digest for _, digest in _format.hashed_views(tensors)] == inline
    net = model()
    run = tmp_path / "run"
    with tv.CheckpointManager(run) as mgr:
        mgr.save(1, model=net)
        restored = model(3)
        mgr.restore(model=restored)
    assert all(
        torch.equal(a, b) for a, b in zip(net.parameters(), restored.parameters(), strict=True)
    )
    tv.save(net, tmp_path / "net.tv")
    assert tv.load_into(model(4), tmp_path / "net.tv").ok
    victim = max((run / "objects").iterdir(), key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[3] ^= 1
    victim.write_bytes(bytes(raw))
    with (
        tv.CheckpointManager(run) as mgr,
        pytest.raises(tv.CorruptCheckpointError, match="checksum"),
    ):
        mgr.restore(model=model())


def test_a_damaged_object_is_detected_on_restore(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with tv.CheckpointManager(run) as mgr:
        mgr.save(1, model=model())
    victim = max((run / "objects").iterdir(), key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 1
    victim.write_bytes(bytes(raw))
    with (
        tv.CheckpointManager(run) as mgr,
        pytest.raises(tv.CorruptCheckpointError, match="checksum"),
    ):
        mgr.restore(model=model())


def test_a_tampered_manifest_is_detected(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with tv.CheckpointManager(run) as mgr:
        mgr.save(1, model=model(), epoch=1)
    manifest = run / "checkpoints" / "step-000000000001.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"epoch"', b'"epocj"'))
    with pytest.raises(tv.CorruptCheckpointError, match="checksum"):
        tv.CheckpointManager(run)


def test_a_damaged_latest_pointer_falls_back_to_the_newest_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with tv.CheckpointManager(run) as mgr:
        for step in range(3):
            mgr.save(step, model=model(step))
    (run / "refs" / "latest.json").write_text(json.dumps({"step": 0}))  # not sealed
    with tv.CheckpointManager(run) as mgr:
        assert mgr.restore(model=model()).step == 2  # type: ignore[union-attr]


def test_run_folder_of_a_newer_format_is_refused(tmp_path: Path) -> None:
    from torchvault.run._store import seal

    run = tmp_path / "run"
    run.mkdir()
    (run / "torchvault-run.json").write_bytes(seal({"torchvault": "run", "format": 99}))
    with pytest.raises(tv.UnsupportedFormatError, match="newer"):
        tv.CheckpointManager(run)


def test_files_it_did_not_write_are_never_deleted(tmp_path: Path) -> None:
    run = tmp_path / "run"
    tv.CheckpointManager(run).close()
    mine = [run / "notes.txt", run / "objects" / "README", run / "checkpoints" / "keep.json"]
    for path in mine:
        path.parent.mkdir(exist_ok=True)
        path.write_text("user file")
    with tv.CheckpointManager(run, keep_last=1) as mgr:
        for step in range(3):
            mgr.save(step, model=model(step))
    assert all(path.read_text() == "user file" for path in mine)


def test_new_files_get_the_usual_mode(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        with tv.CheckpointManager(tmp_path / "run") as mgr:
            mgr.save(1, model=model())
    finally:
        os.umask(umask)
    manifest = tmp_path / "run" / "checkpoints" / "step-000000000001.json"
    assert manifest.stat().st_mode & 0o777 == 0o644


def test_a_run_can_live_in_memory_storage() -> None:
    from torchvault.storage import MemoryStorage

    storage, net = MemoryStorage(), model()
    with tv.CheckpointManager(storage, keep_last=1) as mgr:
        for step in range(3):
            with torch.no_grad():
                net[0].bias.add_(1.0)
            mgr.save(step, model=net)
        restored = model(3)
        assert mgr.restore(model=restored).step == 2  # type: ignore[union-attr]
        assert mgr.steps == [2]
    assert torch.equal(restored[0].bias, net[0].bias)
    with tv.CheckpointManager(storage), pytest.raises(tv.RunLockedError):
        tv.CheckpointManager(storage)


def test_async_restore_prepares_the_staging_buffers_of_the_first_save(tmp_path: Path) -> None:
    net = model()
    with tv.CheckpointManager(tmp_path / "run", async_save=True) as mgr:
        assert mgr.restore(model=net) is None  # a fresh run
        mgr.wait()
        prepared = [buffer.data_ptr() for buffer in mgr._buffers]
        assert len(prepared) >= len(net.state_dict())
        mgr.save(1, model=net)
        mgr.wait()
        staged = [buffer.data_ptr() for buffer in mgr._buffers]
        restored = model(4)
        mgr.restore(model=restored)
    assert staged == prepared  # the save copied into the prepared buffers, allocating none
    assert torch.equal(restored[0].weight, net[0].weight)


def test_grad_scaler_and_scheduler_state_round_trip(tmp_path: Path) -> None:
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    for _ in range(5):
        opt.zero_grad()
        scaler.scale(net(torch.randn(4, 8)).sum()).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(5, model=net, optimizer=opt, scheduler=sched, scaler=scaler)
        opt2 = torch.optim.SGD(model(1).parameters(), lr=0.1)
        sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
        scaler2 = torch.amp.GradScaler("cpu")
        mgr.restore(model=model(1), optimizer=opt2, scheduler=sched2, scaler=scaler2)
    assert scaler2.state_dict() == scaler.state_dict()
    assert sched2.state_dict() == sched.state_dict()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
