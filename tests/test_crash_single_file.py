"""Crash simulation of the single-file save (anchors-security.md section 4, F1).

A save of a new state over an old one is crashed before each of its file-system operations
(and just after it returns), and each crash is followed by a simulated power loss in every
mode of ``crashfs`` (keep all, drop un-synced, keep a random un-synced prefix, garble the
un-synced bytes, keep names but drop data). The destination must then hold the old file or
the new one, complete and verified; never a partial, damaged or missing one (missing only
before the first-ever save). The first tests check the harness itself.
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch

import attack_files as af
import crashfs
import torchvault as tv
from crashfs import CrashFS, SimulatedCrash
from torchvault import _commit, _freeing

BIG = (1 << 20) + 3  # spans several numbered writes of crashfs.WRITE_SIZE
DEAD_PID = 2**31 - 1  # above any pid_max: never a live process


def make_state(seed: int, step: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randint(0, 256, (BIG,), dtype=torch.uint8, generator=gen),
        "w": torch.randn(8, 8, generator=gen),
        "ids": torch.arange(10) + step,
        "step": step,
        "lr": 0.1 * step,
        "name": f"state-{step}",
    }


OLD = make_state(1, 1)
NEW = make_state(2, 2)


def outcome(path: Path) -> str:
    """``missing``, ``old`` or ``new`` (verified and equal), else what is wrong with it."""
    if not path.exists():
        return "missing"
    try:
        tv.verify(path)
        got = tv.load(path)
    except tv.TorchVaultError as exc:
        return f"damaged ({type(exc).__name__}: {exc})"
    for name, want in (("old", OLD), ("new", NEW)):
        with contextlib.suppress(AssertionError):
            af.assert_same(got, want)
            return name
    return "another state"


def temps(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _commit.TEMP_MARK in p.name)


def save_new(path: Path) -> Any:
    return lambda: tv.save(NEW, path)


@pytest.fixture
def old_file(tmp_path: Path) -> Path:
    """A folder holding the old state at ``model.tv``; returns the path."""
    root = tmp_path / "run"
    root.mkdir()
    tv.save(OLD, root / "model.tv")
    return root / "model.tv"


def crash(monkeypatch: pytest.MonkeyPatch, path: Path, kind: str, nth: int = 0) -> CrashFS:
    """Save NEW over ``path`` crashing before the ``nth`` operation of ``kind``."""
    ops = crashfs.dry_run(monkeypatch, path.parent, save_new(path))
    k = [op.index for op in ops if op.kind == kind][nth]
    with CrashFS(monkeypatch, path.parent, crash_at=k) as fs:
        tv.save(NEW, path)
    assert fs.crash_op is not None
    assert fs.crash_op.kind == kind
    return fs


# ----------------------------------------------------------------------------- the harness


def test_dry_run_lists_operations_in_protocol_order(
    monkeypatch: pytest.MonkeyPatch, old_file: Path
) -> None:
    ops = crashfs.dry_run(monkeypatch, old_file.parent, save_new(old_file))
    assert crashfs.kinds(ops) == [
        "create", "write", "fsync", "close", "replace", "open-dir", "fsync-dir", "close-dir"
    ]  # fmt: skip
    assert sum(op.kind == "write" for op in ops) >= BIG // crashfs.WRITE_SIZE + 1
    assert [op.index for op in ops] == list(range(len(ops)))


def test_dry_run_writes_cover_the_new_file_exactly_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "model.tv"
    with CrashFS(monkeypatch, tmp_path) as fs:
        tv.save(NEW, path)
    covered = bytearray(path.stat().st_size)
    for op in fs.ops:
        if op.kind == "write":
            assert covered[op.offset : op.offset + op.nbytes] == bytes(op.nbytes), op
            covered[op.offset : op.offset + op.nbytes] = b"\1" * op.nbytes
    assert covered == b"\1" * len(covered)


def test_dry_run_restores_the_tree_it_found(
    monkeypatch: pytest.MonkeyPatch, old_file: Path
) -> None:
    before = crashfs.read_tree(old_file.parent)
    ops = crashfs.dry_run(monkeypatch, old_file.parent, save_new(old_file))
    assert ops
    assert crashfs.read_tree(old_file.parent) == before


def test_uncrashed_run_completes_the_save(monkeypatch: pytest.MonkeyPatch, old_file: Path) -> None:
    with CrashFS(monkeypatch, old_file.parent) as fs:
        tv.save(NEW, old_file)
    assert not fs.crashed
    assert fs.crash_op is None
    assert outcome(old_file) == "new"


def test_simulated_crash_is_not_caught_by_except_exception() -> None:
    assert issubclass(SimulatedCrash, BaseException)
    assert not issubclass(SimulatedCrash, Exception)


def test_crash_at_k_stops_just_before_operation_k(
    monkeypatch: pytest.MonkeyPatch, old_file: Path
) -> None:
    root = old_file.parent
    start = crashfs.read_tree(root)
    ops = crashfs.dry_run(monkeypatch, root, save_new(old_file))
    for k in range(len(ops)):
        crashfs.write_tree(root, start)
        with CrashFS(monkeypatch, root, crash_at=k) as fs:
            tv.save(NEW, old_file)
            pytest.fail("the save went on after the crash")
        assert fs.crashed, k
        assert [op.kind for op in fs.ops] == [op.kind for op in ops[:k]], k
        assert fs.crash_op is not None
        assert (fs.crash_op.index, fs.crash_op.kind) == (k, ops[k].kind)


def test_crash_skips_the_librarys_cleanup_so_a_complete_temp_file_remains(
    monkeypatch: pytest.MonkeyPatch, old_file: Path
) -> None:
    crash(monkeypatch, old_file, "replace").materialize("keep_all")
    (temp,) = temps(old_file.parent)
    af.assert_same(tv.load(temp), NEW)
    assert outcome(old_file) == "old"


def test_drop_unsynced_reverts_the_rename_when_the_crash_precedes_the_folder_fsync(
    monkeypatch: pytest.MonkeyPatch, old_file: Path
) -> None:
    fs = crash(monkeypatch, old_file, "fsync-dir")
    assert outcome(old_file) == "new"  # the rename ran
    fs.materialize("drop_unsynced")
    assert outcome(old_file) == "old"
    assert os.listdir(old_file.parent) == [old_file.name]  # the temp's name was never synced


def test_keep_all_keeps_the_rename_when_the_crash_precedes_the_folder_fsync(
    monkeypatch: pytest.MonkeyPatch, old_file: Path
) -> None:
    crash(monkeypatch, old_file, "fsync-dir").materialize("keep_all")
    assert outcome(old_file) == "new"
    assert temps(old_file.parent) == []


def test_materialize_can_replay_the_same_crash_in_several_modes(
    monkeypatch: pytest.MonkeyPatch, old_file: Path
) -> None:
    fs = crash(monkeypatch, old_file, "fsync-dir")
    seen = []
    for mode in ("drop_unsynced", "keep_all", "keep_names", "garble_tail", "keep_all"):
        fs.materialize(mode)
        seen.append(outcome(old_file))
    assert seen == ["old", "new", "new", "old", "new"]


def test_keep_names_keeps_the_temp_name_but_drops_its_unsynced_data(
    monkeypatch: pytest.MonkeyPatch, old_file: Path
) -> None:
    crash(monkeypatch, old_file, "fsync").materialize("keep_names")
    (temp,) = temps(old_file.parent)
    assert temp.read_bytes() == b""
    assert outcome(old_file) == "old"


def _write_with_synced_name(path: Path, payload: bytes) -> None:
    """Write ``payload`` through atomic_file, syncing the folder while the temp is unsynced."""
    with _commit.atomic_file(path) as handle:
        handle.write(payload)
        handle.flush()
        _commit.fsync_dir(path.parent)  # the temp's name is durable, its data is not


def _crash_before_data_sync(
    monkeypatch: pytest.MonkeyPatch, root: Path, payload: bytes
) -> tuple[CrashFS, Path]:
    path = root / "blob.bin"
    ops = crashfs.dry_run(monkeypatch, root, lambda: _write_with_synced_name(path, payload))
    k = next(op.index for op in ops if op.kind == "fsync")
    with CrashFS(monkeypatch, root, crash_at=k) as fs:
        _write_with_synced_name(path, payload)
    (temp,) = temps(root)
    return fs, temp


def test_drop_unsynced_leaves_a_synced_name_with_its_synced_data_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fs, temp = _crash_before_data_sync(monkeypatch, tmp_path, random.Random(0).randbytes(600_000))
    fs.materialize("drop_unsynced")
    assert os.listdir(tmp_path) == [temp.name]
    assert temp.read_bytes() == b""


def test_keep_prefix_keeps_a_random_prefix_of_the_unsynced_writes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    payload = random.Random(0).randbytes(600_000)
    fs, temp = _crash_before_data_sync(monkeypatch, tmp_path, payload)
    lengths = set()
    for seed in range(20):
        fs.materialize("keep_prefix", seed)
        data = temp.read_bytes()
        assert data == payload[: len(data)], seed
        lengths.add(len(data))
    assert any(0 < n < len(payload) for n in lengths), lengths
    assert len(lengths) > 10, lengths


def test_garble_tail_fills_the_unsynced_bytes_with_garbage_of_the_same_length(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    payload = random.Random(0).randbytes(600_000)
    fs, temp = _crash_before_data_sync(monkeypatch, tmp_path, payload)
    fs.materialize("garble_tail", 1)
    data = temp.read_bytes()
    assert len(data) == len(payload)
    assert sum(a == b for a, b in zip(data[:4096], payload[:4096], strict=True)) < 64


def test_durable_tree_is_deterministic_for_a_seed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fs, _ = _crash_before_data_sync(monkeypatch, tmp_path, random.Random(0).randbytes(70_000))
    for mode in ("keep_prefix", "garble_tail"):
        assert fs.durable_tree(mode, 7) == fs.durable_tree(mode, 7)
        assert fs.durable_tree(mode, 7) != fs.durable_tree(mode, 8)


def test_unsynced_unlink_comes_back_after_power_loss(
    monkeypatch: pytest.MonkeyPatch, old_file: Path
) -> None:
    root = old_file.parent
    ops = crashfs.dry_run(monkeypatch, root, lambda: _commit.remove(old_file))
    assert crashfs.kinds(ops) == ["unlink", "open-dir", "fsync-dir", "close-dir"]
    with CrashFS(monkeypatch, root, crash_at=2) as fs:
        _commit.remove(old_file)
    fs.materialize("keep_all")
    assert not old_file.exists()
    fs.materialize("drop_unsynced")
    assert outcome(old_file) == "old"


def test_new_folder_is_durable_only_once_its_parent_is_synced(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    leaf = tmp_path / "a" / "b"
    _commit._durable_dirs.clear()  # every run below then does the same operations
    ops = crashfs.dry_run(monkeypatch, tmp_path, lambda: _commit.make_dirs(leaf))
    # make_dirs also syncs the entry of the existing ancestor (tmp_path, in a folder outside
    # root); only the syncs inside root decide what survives here.
    fsyncs = [op.index for op in ops if op.kind == "fsync-dir" and not Path(op.path).is_absolute()]
    assert [op.path for op in ops if op.kind == "mkdir"] == ["a", "a/b"]
    found = []
    for k in (*fsyncs, len(ops)):
        crashfs.write_tree(tmp_path, {})
        _commit._durable_dirs.clear()
        with CrashFS(monkeypatch, tmp_path, crash_at=k) as fs:
            _commit.make_dirs(leaf)
        fs.materialize("drop_unsynced")
        found.append(sorted(crashfs.read_tree(tmp_path)))
    assert found == [[], ["a"], ["a", "a/b"]]


def test_materialize_touches_nothing_outside_root(
    monkeypatch: pytest.MonkeyPatch, old_file: Path
) -> None:
    outside = old_file.parent.parent / "outside.bin"
    outside.write_bytes(b"keep me")
    crash(monkeypatch, old_file, "fsync").materialize("garble_tail", 3)
    assert outside.read_bytes() == b"keep me"
    assert sorted(p.name for p in old_file.parent.parent.iterdir()) == ["outside.bin", "run"]


def test_removal_made_outside_the_shim_is_undone_unless_the_folder_was_synced(
    monkeypatch: pytest.MonkeyPatch, old_file: Path
) -> None:
    # remove_orphans deletes with Path.unlink, which the shim does not see: the model learns
    # of it only when the folder is synced.
    orphan = old_file.with_name(f".{old_file.name}{_commit.TEMP_MARK}{_commit._HOST}-{DEAD_PID}-ab")
    orphan.write_bytes(b"orphan")
    root = old_file.parent
    start = crashfs.read_tree(root)
    states = []
    for k in (0, None):
        crashfs.write_tree(root, start)
        with CrashFS(monkeypatch, root, crash_at=k) as fs:
            tv.save(NEW, old_file)
        fs.materialize("keep_all")
        states.append(orphan.exists())
        fs.materialize("drop_unsynced")
        states.append(orphan.exists())
    assert states == [False, True, False, False]


def test_restart_carries_unsynced_state_into_the_next_process(
    monkeypatch: pytest.MonkeyPatch, old_file: Path
) -> None:
    ops = crashfs.dry_run(monkeypatch, old_file.parent, save_new(old_file))
    k = next(op.index for op in ops if op.kind == "fsync-dir")
    with CrashFS(monkeypatch, old_file.parent, crash_at=k) as fs:
        with pytest.raises(SimulatedCrash):
            tv.save(NEW, old_file)  # killed after the rename, before the folder sync
        fs.restart()
        _commit.fsync_dir(old_file.parent)  # the next process syncs the folder
    assert [op.kind for op in fs.ops[k:]] == ["open-dir", "fsync-dir", "close-dir"]
    fs.materialize("drop_unsynced")
    assert outcome(old_file) == "new"


# ----------------------------------------------------------------------------- the protocol


def test_crash_at_every_operation_leaves_the_old_or_the_new_file_in_every_mode(
    monkeypatch: pytest.MonkeyPatch, old_file: Path
) -> None:
    old_bytes = old_file.read_bytes()
    seen: dict[str, set[str]] = {}
    bad = []
    for case in crashfs.sweep(monkeypatch, old_file.parent, save_new(old_file)):
        got = outcome(old_file)
        seen.setdefault(case.mode, set()).add(got)
        if got not in ("old", "new"):
            bad.append(f"{case}: {got}")
        elif got == "old" and old_file.read_bytes() != old_bytes:
            bad.append(f"{case}: the old file changed")
    assert not bad, "\n".join(bad)
    assert seen == {mode: {"old", "new"} for mode in crashfs.MODES}


def test_crash_during_the_first_save_leaves_no_file_or_the_new_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "model.tv"
    seen = set()
    bad = []
    for case in crashfs.sweep(monkeypatch, tmp_path, save_new(path)):
        got = outcome(path)
        seen.add(got)
        if got not in ("missing", "new"):
            bad.append(f"{case}: {got}")
    assert not bad, "\n".join(bad)
    assert seen == {"missing", "new"}


def test_new_file_becomes_durable_exactly_at_the_folder_fsync(
    monkeypatch: pytest.MonkeyPatch, old_file: Path
) -> None:
    ops = crashfs.dry_run(monkeypatch, old_file.parent, save_new(old_file))
    synced = next(op.index for op in ops if op.kind == "fsync-dir")
    renamed = next(op.index for op in ops if op.kind == "replace")
    bad = []
    for case in crashfs.sweep(monkeypatch, old_file.parent, save_new(old_file)):
        commit = renamed if case.mode in ("keep_all", "keep_names") else synced
        want = "new" if case.k > commit else "old"
        if outcome(old_file) != want:
            bad.append(f"{case}: {outcome(old_file)}, expected {want}")
    assert not bad, "\n".join(bad)


def test_power_loss_after_the_save_returned_keeps_the_new_file(
    monkeypatch: pytest.MonkeyPatch, old_file: Path
) -> None:
    with CrashFS(monkeypatch, old_file.parent) as fs:
        tv.save(NEW, old_file)
    for mode in crashfs.MODES:
        fs.materialize(mode, seed=5)
        assert outcome(old_file) == "new", mode
        assert os.listdir(old_file.parent) == [old_file.name], mode


def test_only_temp_files_are_left_beside_the_destination_after_a_crash(
    monkeypatch: pytest.MonkeyPatch, old_file: Path
) -> None:
    bad = []
    for case in crashfs.sweep(monkeypatch, old_file.parent, save_new(old_file)):
        extra = [p for p in os.listdir(old_file.parent) if p != old_file.name]
        if len(extra) > 1 or any(_commit.TEMP_MARK not in p for p in extra):
            bad.append(f"{case}: {extra}")
    assert not bad, "\n".join(bad)


def test_load_never_returns_a_leftover_temp_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "model.tv"
    crash(monkeypatch, path, "replace").materialize("keep_all")
    (temp,) = temps(tmp_path)
    af.assert_same(tv.load(temp), NEW)  # complete, yet not the destination
    with pytest.raises(tv.CheckpointNotFoundError):
        tv.load(path)


def test_next_save_removes_the_temp_file_of_a_dead_process(
    monkeypatch: pytest.MonkeyPatch, old_file: Path
) -> None:
    crash(monkeypatch, old_file, "fsync").materialize("keep_names")
    (temp,) = temps(old_file.parent)
    head, _, token = temp.name.rsplit("-", 2)
    temp.rename(temp.with_name(f"{head}-{DEAD_PID}-{token}"))  # as if left by a dead process
    tv.save(NEW, old_file)
    assert os.listdir(old_file.parent) == [old_file.name]
    assert outcome(old_file) == "new"


def test_next_save_keeps_the_temp_file_of_a_live_process(
    monkeypatch: pytest.MonkeyPatch, old_file: Path
) -> None:
    crash(monkeypatch, old_file, "fsync").materialize("keep_all")
    (temp,) = temps(old_file.parent)  # named with this (live) process's pid
    tv.save(NEW, old_file)
    assert temps(old_file.parent) == [temp]
    assert outcome(old_file) == "new"


def test_folder_left_unsynced_by_a_killed_writer_is_synced_before_a_save_into_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    _commit._durable_dirs.clear()
    ops = crashfs.dry_run(monkeypatch, tmp_path, lambda: _commit.make_dirs(run))
    mkdir = next(op.index for op in ops if op.kind == "mkdir")
    _commit._durable_dirs.clear()
    with CrashFS(monkeypatch, tmp_path, crash_at=mkdir + 1) as fs:
        with pytest.raises(SimulatedCrash):
            _commit.make_dirs(run)  # killed after the mkdir, before the sync of its parent
        fs.restart()
        _commit._durable_dirs.clear()  # the restarted writer is a new process
        _commit.make_dirs(run)
        tv.save({"w": torch.arange(4.0)}, run / "model.tv")
    fs.materialize("drop_unsynced")
    assert torch.equal(tv.load(run / "model.tv")["w"], torch.arange(4.0))  # type: ignore[index]


# ----------------------------------------------------------------------------- the replaced file


def test_the_sweeps_replace_a_file_large_enough_to_be_freed_in_the_background(
    old_file: Path,
) -> None:
    # Replacing a file of at least _HOLD_BYTES keeps it open until a background thread
    # frees it; the sweeps above must cover that path, not only the plain rename.
    assert old_file.stat().st_size >= _freeing.HOLD_BYTES


def test_a_crash_at_any_operation_leaks_no_descriptor_of_the_replaced_file(
    monkeypatch: pytest.MonkeyPatch, old_file: Path
) -> None:
    assert _freeing.wait_for_frees(timeout=30)
    before = sorted(os.listdir("/proc/self/fd"))
    leaks = []
    for case in crashfs.sweep(
        monkeypatch, old_file.parent, save_new(old_file), modes=("keep_all",)
    ):
        assert _freeing.wait_for_frees(timeout=30)
        now = sorted(os.listdir("/proc/self/fd"))
        if now != before:
            leaks.append(f"{case}: {sorted(set(now) - set(before))}")
    assert not leaks, "\n".join(leaks)
