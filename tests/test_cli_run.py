"""The checkpoint-manager commands of the ``torchvault`` command line: ls, diff, prune, export."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import torchvault as tv
import torchvault.cli
from torchvault import _diff
from torchvault.cli import _progress, main
from torchvault.cli._render import human_bytes
from torchvault.cli._runs import parse_source

LOSSES = (0.9, 0.2, 0.5, 0.7)  # the best (lowest) is step 10, the latest step 30
STEPS = (0, 10, 20, 30)


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def make_run(path: Path, steps: tuple[int, ...] = STEPS) -> Path:
    """A run whose model weight is filled with i at the i-th save; the bias never changes."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    with tv.CheckpointManager(path, monitor="loss") as manager:
        for i, step in enumerate(steps):
            with torch.no_grad():
                model.weight.fill_(float(i))
            manager.save(step, metrics={"loss": LOSSES[i], "acc": 0.5}, model=model, epoch=i)
    return path


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return make_run(tmp_path / "run")


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def committed(run: Path) -> list[int]:
    return sorted(int(p.stem.removeprefix("step-")) for p in (run / "checkpoints").glob("step-*"))


# ---------------------------------------------------------------------- ls


def test_ls_prints_one_row_per_checkpoint_with_refs_and_footer(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(["ls", str(run)], capsys)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["step", "created", "(UTC)", "metrics", "size", "new", "refs"]
    rows = {int(line.split()[0]): line for line in lines[2:6]}
    assert sorted(rows) == list(STEPS)
    assert "loss=0.2 acc=0.5" in rows[10]
    assert rows[10].endswith("best")
    assert rows[30].endswith("latest")
    assert not rows[0].endswith(("best", "latest"))
    object_bytes = sum(p.stat().st_size for p in (run / "objects").rglob("*") if p.is_file())
    assert lines[-1] == (
        f"4 checkpoints; {human_bytes(object_bytes)} ({object_bytes:,} bytes) of objects on "
        f"disk in {run}"
    )


def test_ls_json_reports_every_checkpoint(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["ls", "--json", str(run)], capsys)
    listing = json.loads(out)
    assert code == 0
    assert (listing["run"], listing["latest"], listing["best"]) == (str(run), 30, 10)
    assert listing["object_bytes"] == sum(
        p.stat().st_size for p in (run / "objects").rglob("*") if p.is_file()
    )
    first, second = listing["checkpoints"][:2]
    assert set(first) == {
        "step", "created", "metrics", "total_bytes", "new_bytes", "latest", "best"
    }  # fmt: skip
    assert [c["step"] for c in listing["checkpoints"]] == list(STEPS)
    assert first["metrics"] == {"loss": 0.9, "acc": 0.5}
    assert (second["latest"], second["best"]) == (False, True)
    assert first["new_bytes"] == first["total_bytes"] > 0  # everything is new in the first
    assert 0 < second["new_bytes"] < second["total_bytes"]  # only the new weight


def test_ls_of_an_empty_run_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tv.CheckpointManager(tmp_path / "empty").close()
    code, out, err = run_main(["ls", str(tmp_path / "empty")], capsys)
    assert (code, out, err) == (0, f"{tmp_path / 'empty'}: no checkpoints yet\n", "")
    code, out, _ = run_main(["ls", "--json", str(tmp_path / "empty")], capsys)
    assert code == 0
    assert json.loads(out)["checkpoints"] == []


def test_ls_json_is_strict_json_with_non_finite_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with tv.CheckpointManager(tmp_path / "run") as manager:
        manager.save(1, metrics={"loss": float("nan"), "gap": float("-inf")}, x=torch.ones(1))
    _, out, _ = run_main(["ls", "--json", str(tmp_path / "run")], capsys)

    def refuse(name: str) -> object:
        raise ValueError(f"{name} is not JSON")

    listing = json.loads(out, parse_constant=refuse)
    assert listing["checkpoints"][0]["metrics"] == {"loss": "nan", "gap": "-inf"}
    _, out, _ = run_main(["ls", str(tmp_path / "run")], capsys)
    assert "loss=nan gap=-inf" in out


@pytest.mark.parametrize(("what", "expected"), [("missing", 3), ("folder", 1), ("file", 1)])
def test_ls_of_something_that_is_not_a_run_fails_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str, expected: int
) -> None:
    target = tmp_path / "target"
    if what == "folder":
        target.mkdir()
        (target / "notes.txt").write_text("hello")
    elif what == "file":
        tv.save({"a": torch.ones(1)}, target)
    code, out, err = run_main(["ls", str(target)], capsys)
    assert (code, out) == (expected, "")
    assert err.startswith("torchvault: error: ")
    assert str(target) in err
    assert len(err.splitlines()) == 1
    if what == "folder":
        assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]  # nothing created


# ---------------------------------------------------------------------- verify and inspect


def damage_weight_of(run: Path, fill: float) -> Path:
    """Flip a bit of the object holding the model weight filled with ``fill``."""
    wanted = torch.full((2, 3), fill).numpy().tobytes()
    obj = next(p for p in (run / "objects").rglob("*") if p.is_file() and p.read_bytes() == wanted)
    data = bytearray(wanted)
    data[0] ^= 0x01
    obj.write_bytes(bytes(data))
    return obj


def test_verify_run_checks_every_step(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["verify", str(run)], capsys)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines[:4]] == [f"OK  {run}@{s}" for s in STEPS]
    assert all("checksums match" in line for line in lines[:4])
    assert lines[4] == f"{run}: 4 checkpoints verified, all 4 OK"


def test_verify_run_with_a_damaged_object_fails_that_step(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damage_weight_of(run, 2.0)  # the weight of the third save, step 20
    code, out, err = run_main(["verify", str(run)], capsys)
    assert code == 1
    assert [line.split(":")[0] for line in out.splitlines()[:3]] == [
        f"OK  {run}@{s}" for s in (0, 10, 30)
    ]
    assert out.splitlines()[-1] == f"{run}: 4 checkpoints verified, 1 of 4 damaged"
    assert err.startswith(f"FAILED {run}@20: ")
    assert "checksum" in err
    assert len(err.splitlines()) == 1
    code, out, _ = run_main(["verify", "--json", str(run)], capsys)
    result = json.loads(out)
    assert (code, result["ok"]) == (1, False)
    assert [(r["step"], r["ok"]) for r in result["steps"]] == [
        (0, True), (10, True), (20, False), (30, True)
    ]  # fmt: skip


def test_verify_run_at_step_checks_that_step_only(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damage_weight_of(run, 2.0)
    code, out, err = run_main(["verify", f"{run}@10"], capsys)
    assert (code, err) == (0, "")
    assert out.startswith(f"OK  {run}@10: 2 tensors")
    assert len(out.splitlines()) == 1
    code, out, err = run_main(["verify", f"{run}@20"], capsys)
    assert (code, out) == (1, "")
    assert err.startswith(f"FAILED {run}@20: ")
    code, _, err = run_main(["verify", f"{run}@99"], capsys)
    assert code == 3
    assert "step 99 is not committed" in err


def test_inspect_run_at_step_lists_the_items_tensors(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(["inspect", "--json", f"{run}@best"], capsys)
    assert (code, err) == (0, "")
    shown = json.loads(out)
    assert shown["path"] == f"{run}@10"
    exported = tmp_path / "step10.tv"
    assert run_main(["export", str(run), "--step", "10", str(exported)], capsys)[0] == 0
    capsys.readouterr()
    as_file = json.loads(run_main(["inspect", "--json", str(exported)], capsys)[1])
    assert shown["tensors"] == as_file["tensors"]  # the same keys, dtypes and shapes
    assert [t["key"] for t in shown["tensors"]] == ["model.weight", "model.bias"]
    code, out, _ = run_main(["inspect", str(run)], capsys)  # a bare run: its latest step
    assert code == 0
    assert "model.weight  float32  [2, 3]" in out


# ---------------------------------------------------------------------- diff


def test_diff_between_two_steps_lists_changed_tensors_with_max_abs_diff(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(["diff", f"{run}@0", f"{run}@20"], capsys)
    assert (code, err) == (0, "")
    assert f"--- a: {run}@0 (step 0)" in out
    assert f"+++ b: {run}@20 (step 20)" in out
    weight = next(line for line in out.splitlines() if "model.weight" in line)
    assert weight.split() == ["model.weight", "float32", "[2,", "3]", "float32", "[2,", "3]", "2"]
    epoch = next(line for line in out.splitlines() if line.strip().startswith("epoch"))
    assert epoch.split()[:3] == ["epoch", "0", "2"]
    assert "model.bias" not in out
    assert out.rstrip().endswith("different: 2 changed, 0 added, 0 removed, 1 unchanged")


def test_diff_json_and_step_names(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["diff", "--json", f"{run}@best", f"{run}@latest"], capsys)
    result = json.loads(out)
    assert code == 0
    assert result["a"] == {"source": f"{run}@best", "kind": "run", "path": str(run), "step": 10}
    assert result["b"]["step"] == 30
    assert (result["identical"], result["unchanged"], result["atol"]) == (False, 1, 0.0)
    assert (result["added"], result["removed"]) == ([], [])
    weight, epoch = result["changed"]
    assert weight == {
        "key": "model.weight",
        "reason": "values",
        "a": {"kind": "tensor", "dtype": "float32", "shape": [2, 3]},
        "b": {"kind": "tensor", "dtype": "float32", "shape": [2, 3]},
        "max_abs_diff": 2.0,
    }
    assert (epoch["key"], epoch["reason"], epoch["a"], epoch["b"]) == (
        "epoch", "value", {"kind": "value", "repr": "1"}, {"kind": "value", "repr": "3"}
    )  # fmt: skip


def test_diff_a_file_against_a_run_checkpoint(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exported = tmp_path / "step10.tv"
    assert run_main(["export", str(run), "--step", "10", str(exported)], capsys)[0] == 0
    code, out, _ = run_main(["diff", str(exported), f"{run}@10"], capsys)
    assert code == 0
    assert f"--- a: {exported}\n" in out
    assert out.rstrip().endswith("identical: 0 changed, 0 added, 0 removed, 3 unchanged")

    model = {"weight": torch.full((2, 3), 1.25), "extra": torch.zeros(4, dtype=torch.int64)}
    tv.save(model, tmp_path / "model.tv")
    code, out, _ = run_main(
        ["diff", "--json", "--item", "model", str(tmp_path / "model.tv"), f"{run}@10"], capsys
    )
    result = json.loads(out)
    assert code == 0
    assert [c["key"] for c in result["changed"]] == ["weight"]
    assert result["changed"][0]["max_abs_diff"] == 0.25
    assert result["removed"] == [
        {"key": "extra", "kind": "tensor", "dtype": "int64", "shape": [4]}
    ]  # fmt: skip
    assert result["added"] == [{"key": "bias", "kind": "tensor", "dtype": "float32", "shape": [2]}]


def test_diff_exit_code_is_1_only_when_asked_and_different(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_main(["diff", f"{run}@10", f"{run}@20"], capsys)[0] == 0
    assert run_main(["diff", "--exit-code", f"{run}@10", f"{run}@20"], capsys)[0] == 1
    assert run_main(["diff", "--exit-code", f"{run}@10", f"{run}@best"], capsys)[0] == 0
    assert run_main(["diff", "--exit-code", str(run), f"{run}@30"], capsys)[0] == 0  # bare RUN


def test_diff_reports_dtype_and_shape_changes_and_honours_atol(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a.tv", tmp_path / "b.tv"
    tv.save({"x": torch.zeros(3), "y": torch.zeros(3), "z": torch.zeros(2), "n": 1.0}, a)
    tv.save({"x": torch.full((3,), 1e-3), "y": torch.zeros(3).half(), "z": torch.zeros(3), "n": 1}, b)  # fmt: skip
    code, out, _ = run_main(["diff", "--json", str(a), str(b)], capsys)
    changed = {c["key"]: c for c in json.loads(out)["changed"]}
    assert code == 0
    assert sorted(changed) == ["x", "y", "z"]  # 1.0 == 1: values are compared with ==
    assert changed["x"]["max_abs_diff"] == pytest.approx(1e-3)
    assert (changed["y"]["reason"], changed["y"]["max_abs_diff"]) == ("dtype", None)
    assert changed["z"]["reason"] == "shape"
    _, out, _ = run_main(["diff", "--json", "--atol", "0.01", str(a), str(b)], capsys)
    assert sorted(c["key"] for c in json.loads(out)["changed"]) == ["y", "z"]


def test_diff_bad_operands(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["diff", f"{run}@99", f"{run}@10"], capsys)
    assert code == 3
    assert "step 99 is not committed" in err
    code, _, err = run_main(["diff", f"{run}@first", f"{run}@10"], capsys)
    assert code == 2
    assert "usage: torchvault diff" in err
    code, _, err = run_main(["diff", str(tmp_path / "nope@v2.tv"), f"{run}@10"], capsys)
    assert code == 3
    assert len(err.splitlines()) == 1
    code, _, err = run_main(["diff", "--item", "nope", f"{run}@10", f"{run}@20"], capsys)
    assert code == 3
    assert "has no item 'nope'" in err


def test_parse_source(run: Path, tmp_path: Path) -> None:
    odd = tmp_path / "odd@3.tv"
    odd.write_bytes(b"")
    assert parse_source(f"{run}@12") == (str(run), 12)
    assert parse_source(f"{run}@best") == (str(run), "best")
    assert parse_source(str(run)) == (str(run), "latest")
    assert parse_source(str(odd)) == (str(odd), None)  # an existing file wins
    assert parse_source("model.tv") == ("model.tv", None)


def test_compare_is_chunked_and_stride_independent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_diff, "CHUNK_ELEMENTS", 7)
    x = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    y = x.clone().transpose(0, 2).contiguous().transpose(0, 2)  # same values, other strides
    y[2, 3, 4] += 0.5
    y[0, 0, 1] -= 2.0
    assert not y.is_contiguous()
    assert _diff.compare(x, y) == (True, 2.0)
    assert _diff.compare(x, x.clone()) == (False, 0.0)
    seen = list(_diff.blocks((3, 4, 5), 7))
    assert len(seen) == 12  # one row of 5 at a time: every block holds at most 7 elements
    nan = torch.tensor([1.0, float("nan")])
    assert _diff.compare(nan, nan.clone()) == (False, 0.0)  # NaN in the same place: equal
    differs, biggest = _diff.compare(nan, torch.tensor([1.0, 2.0]))
    assert differs
    assert biggest != biggest  # NaN against a number: the difference is NaN
    big = torch.tensor([2**60, 0], dtype=torch.int64)
    assert _diff.compare(big, big + torch.tensor([1, 0]))[0]  # exact, not float64-rounded


def test_compare_bit_packed_dtypes_bit_for_bit() -> None:
    x = torch.tensor([1, 2, 3], dtype=torch.uint8).view(torch.float8_e4m3fn)
    assert _diff.compare(x, x.clone()) == (False, 0.0)
    y = torch.tensor([1, 2, 4], dtype=torch.uint8).view(torch.float8_e4m3fn)
    assert _diff.compare(x, y)[0]
    bits = torch.tensor([1, 2], dtype=torch.uint8).view(torch.bits8)
    other = torch.tensor([1, 3], dtype=torch.uint8).view(torch.bits8)
    assert _diff.compare(bits, bits.clone()) == (False, 0.0)
    assert _diff.compare(bits, other)[0]


# ---------------------------------------------------------------------- prune


def test_prune_dry_run_lists_and_touches_nothing(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(run)
    code, out, err = run_main(["prune", "--dry-run", "--keep-last", "1", str(run)], capsys)
    assert (code, err) == (0, "")
    assert out.startswith(f"{run}: would delete 2 of 4 checkpoints: steps 0, 20; would free ")
    assert out.splitlines()[1] == "kept: 10 (best), 30 (latest)"
    assert snapshot(run) == before
    code, out, _ = run_main(["prune", "--dry-run", "--json", "--keep-every", "20", str(run)], capsys)  # fmt: skip
    plan = json.loads(out)
    assert (plan["dry_run"], plan["deleted"], plan["kept"]) == (True, [], [0, 10, 20, 30])
    assert snapshot(run) == before


def test_prune_deletes_but_keeps_latest_and_best(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = run_main(["prune", "--dry-run", "--json", "--keep-last", "1", str(run)], capsys)
    plan = json.loads(out)
    objects_before = sum(p.stat().st_size for p in (run / "objects").rglob("*") if p.is_file())
    code, out, err = run_main(["prune", "--json", "--keep-last", "1", str(run)], capsys)
    done = json.loads(out)
    assert (code, err) == (0, "")
    assert (done["dry_run"], done["deleted"], done["kept"]) == (False, [0, 20], [10, 30])
    assert done["freed_bytes"] == plan["freed_bytes"] > 0
    assert committed(run) == [10, 30]  # 10 is the best by the run's own loss
    objects_after = sum(p.stat().st_size for p in (run / "objects").rglob("*") if p.is_file())
    assert objects_before - objects_after == done["freed_bytes"]
    _, out, _ = run_main(["ls", "--json", str(run)], capsys)
    listing = json.loads(out)
    assert (listing["latest"], listing["best"]) == (30, 10)
    assert run_main(["diff", "--exit-code", f"{run}@10", f"{run}@10"], capsys)[0] == 0

    code, out, _ = run_main(["prune", "--keep-best", "1", "--monitor", "acc", "--mode", "max", str(run)], capsys)  # fmt: skip
    assert code == 0
    assert out == f"{run}: nothing to delete; the policy keeps all 2 checkpoints\n"


def test_prune_by_monitor_keeps_the_runs_recorded_best_too(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--keep-best", "1", "--monitor", "loss", "--mode", "max"]  # the worst loss: step 0
    code, out, _ = run_main(["prune", *args, str(run)], capsys)
    assert code == 0
    assert out.startswith(f"{run}: deleted 1 of 4 checkpoints: steps 20; freed ")
    assert out.splitlines()[1] == "kept: 0, 10 (best), 30 (latest)"
    assert committed(run) == [0, 10, 30]  # 10: the run's best pointer is never deleted
    code, out, _ = run_main(["prune", "--keep-every", "10", str(run)], capsys)
    assert (code, committed(run)) == (0, [0, 10, 30])


def test_prune_while_a_trainer_holds_the_lock_exits_1(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(run)
    trainer = tv.CheckpointManager(run)
    try:
        code, out, err = run_main(["prune", "--keep-last", "1", str(run)], capsys)
        assert (code, out) == (1, "")
        # The trainer is this very process here, and the message says so.
        assert err.startswith(
            f"torchvault: error: {run} is already held by this process (pid {os.getpid()})"
        )
        assert len(err.splitlines()) == 1
        assert committed(run) == list(STEPS)
        # Reading commands take no lock.
        assert run_main(["ls", str(run)], capsys)[0] == 0
        assert run_main(["diff", f"{run}@0", f"{run}@latest"], capsys)[0] == 0
        assert run_main(["prune", "--dry-run", "--keep-last", "1", str(run)], capsys)[0] == 0
        assert run_main(["export", str(run), str(run.parent / "x.tv")], capsys)[0] == 0
    finally:
        trainer.close()
    assert {k: v for k, v in snapshot(run).items() if k != "lock"} == {
        k: v for k, v in before.items() if k != "lock"
    }


@pytest.mark.parametrize(
    "args",
    [[], ["--monitor", "loss"], ["--keep-best", "1"], ["--keep-last", "0"], ["--mode", "up"]],
    ids=str,
)
def test_prune_refuses_without_a_valid_policy(
    run: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    before = snapshot(run)
    code, out, err = run_main(["prune", *args, str(run)], capsys)
    assert (code, out) == (2, "")
    assert "usage: torchvault prune" in err
    assert snapshot(run) == before


def test_prune_of_a_folder_that_is_not_a_run_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, _ = run_main(["prune", "--keep-last", "1", str(tmp_path / "typo")], capsys)
    assert code == 3
    assert not (tmp_path / "typo").exists()


# ---------------------------------------------------------------------- export


def test_export_writes_a_file_tv_load_reads(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_path = tmp_path / "best.tv"
    code, out, err = run_main(["export", str(run), "--step", "best", str(out_path)], capsys)
    assert (code, err) == (0, "")
    assert out.startswith(f"exported step 10 of {run} to {out_path}: 2 tensors, ")
    state = tv.load(out_path)
    assert isinstance(state, dict)
    assert state["epoch"] == 1
    assert torch.equal(state["model"]["weight"], torch.full((2, 3), 1.0))
    assert tv.inspect(out_path).metadata == {"run": str(run), "step": "10"}
    assert tv.verify(out_path).tensors == 2


def test_export_item_loads_into_a_fresh_module(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_path = tmp_path / "model.tv"
    code, out, _ = run_main(["export", str(run), str(out_path), "--item", "model"], capsys)
    assert code == 0
    assert out.startswith(f"exported item 'model' of step 30 of {run} to {out_path}")
    fresh = nn.Linear(3, 2)
    report = tv.load_into(fresh, out_path)
    assert report.ok
    assert torch.equal(fresh.weight, torch.full((2, 3), 3.0))
    torch.manual_seed(0)
    assert torch.equal(fresh.bias, nn.Linear(3, 2).bias)


def test_export_errors(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_path = tmp_path / "x.tv"
    code, _, err = run_main(["export", str(run), str(out_path), "--item", "optimizer"], capsys)
    assert code == 3
    assert err == (
        f"torchvault: error: step 30 of {run} has no item 'optimizer'; its items: epoch, model.\n"
    )
    assert run_main(["export", str(run), "--step", "5", str(out_path)], capsys)[0] == 3
    assert run_main(["export", str(run), "--step", "soon", str(out_path)], capsys)[0] == 2
    tv.CheckpointManager(tmp_path / "empty").close()
    assert run_main(["export", str(tmp_path / "empty"), str(out_path)], capsys)[0] == 3
    assert not out_path.exists()


# ---------------------------------------------------------------------- progress


def test_no_progress_output_when_stderr_is_not_a_terminal(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_progress, "DELAY", 0.0)
    monkeypatch.setattr(_progress, "INTERVAL", 0.0)
    assert not sys.stderr.isatty()
    for args in (
        ["diff", f"{run}@0", f"{run}@30"],
        ["export", str(run), str(tmp_path / "x.tv")],
    ):
        code, _, err = run_main(args, capsys)
        assert (code, err) == (0, "")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_on_a_terminal_rate_limited_then_erases(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [0.0]
    stream = FakeTerminal()
    with _progress.Progress("diff", total=4096, stream=stream, clock=lambda: now[0]) as bar:
        bar.advance(1024)
        assert stream.getvalue() == ""  # nothing within the first DELAY seconds
        now[0] = _progress.DELAY
        bar.advance(1024)
        first = stream.getvalue()
        assert first.startswith("\rdiff [")
        assert first.endswith(" 50% 2.0 KiB/4.0 KiB")
        bar.advance(1024)
        assert stream.getvalue() == first  # rate-limited: no frame before INTERVAL
        now[0] += _progress.INTERVAL
        bar.advance(1024)
        assert stream.getvalue().endswith("100% 4.0 KiB/4.0 KiB")
    assert stream.getvalue().endswith("\r" + " " * len(first.lstrip("\r")) + "\r")

    quiet = io.StringIO()  # not a terminal
    with _progress.Progress("diff", total=10, stream=quiet, clock=lambda: 99.0) as bar:
        bar.advance(10)
        bar.refresh(force=True)
    assert quiet.getvalue() == ""


def test_progress_spinner_ticks_while_one_long_call_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_progress, "DELAY", 0.0)
    monkeypatch.setattr(_progress, "INTERVAL", 0.01)
    stream = FakeTerminal()
    with _progress.Progress("exporting step 3", stream=stream) as bar, bar.ticking():
        deadline = time.monotonic() + 5
        while stream.getvalue().count("\r") < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    frames = [f for f in stream.getvalue().split("\r") if f.strip()]
    assert len(frames) >= 3
    assert all(f.startswith("exporting step 3 ") and f.rstrip().endswith("0s") for f in frames)
    assert stream.getvalue().endswith("\r")


def test_diff_shows_progress_on_a_terminal(
    run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_progress, "DELAY", 0.0)
    monkeypatch.setattr(_progress, "INTERVAL", 0.0)
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    code = main(["diff", f"{run}@0", f"{run}@30"])
    out, _ = capsys.readouterr()
    assert code == 0
    assert "comparing [" in terminal.getvalue()
    assert terminal.getvalue().endswith("\r")  # the line is erased at the end
    assert "\r" not in out


# ---------------------------------------------------------------------- help and processes


def test_help_documents_the_new_commands_and_the_prune_lock(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, out, _ = run_main(["--help"], capsys)
    for name in ("ls", "diff", "prune", "export"):
        assert f"    {name} " in out
    code, out, _ = run_main(["prune", "--help"], capsys)
    assert code == 0
    assert "writer lock" in out
    assert "exits 1" in out
    assert "--dry-run" in out
    assert "torchvault prune RUN" in (torchvault.cli.__doc__ or "")


def test_process_ls_and_prune_exit_codes(run: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TORCHVAULT_DEBUG"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "torchvault.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )

    listed = cli("ls", str(run))
    refused = cli("prune", str(run))
    assert (listed.returncode, listed.stderr) == (0, "")
    assert "4 checkpoints" in listed.stdout
    assert refused.returncode == 2
    assert "Traceback" not in refused.stderr
