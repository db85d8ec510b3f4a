"""``tv.diff`` and ``torchvault diff``: both sides verified before anything is compared, and the
library and the command line report the same thing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import torchvault as tv
from torchvault.cli import main
from torchvault.cli._exit import ExitCode


def _flip_last_data_byte(path: Path) -> None:
    """A flipped bit inside the tensor data, where no parser but a checksum sees it."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a.tv", tmp_path / "b.tv"
    tv.save({"w": torch.zeros(4), "n": 1}, a)
    tv.save({"w": torch.tensor([0.0, 0.0, 0.5, 0.0]), "n": 1, "extra": torch.ones(2)}, b)
    return a, b


def test_diff_returns_a_frozen_report(pair: tuple[Path, Path]) -> None:
    a, b = pair
    report = tv.diff(a, b)
    assert isinstance(report, tv.DiffReport)
    assert dataclasses.is_dataclass(report)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.unchanged = 0  # type: ignore[misc]
    assert (report.a.path, report.b.path) == (str(a), str(b))
    assert not report.identical
    assert [(c.key, c.reason, c.max_abs_diff) for c in report.changed] == [("w", "values", 0.5)]
    assert [key for key, _ in report.added] == ["extra"]
    assert (report.removed, report.unchanged) == ((), 1)
    assert tv.diff(a, b, atol=1.0).changed == ()
    assert tv.diff(a, a).identical


def test_diff_of_a_damaged_file_raises_naming_it(pair: tuple[Path, Path]) -> None:
    a, b = pair
    damaged = b.with_name("damaged.tv")
    damaged.write_bytes(a.read_bytes())
    _flip_last_data_byte(damaged)
    with pytest.raises(tv.CorruptCheckpointError, match=r"damaged\.tv") as info:
        tv.diff(a, damaged)
    assert info.value.path == str(damaged)
    with pytest.raises(tv.CorruptCheckpointError, match=r"damaged\.tv"):
        tv.diff(damaged, a)


def test_diff_rejects_bad_arguments(pair: tuple[Path, Path]) -> None:
    a, b = pair
    with pytest.raises(ValueError, match="atol"):
        tv.diff(a, b, atol=-1.0)
    with pytest.raises(TypeError, match="atol"):
        tv.diff(a, b, atol="0.1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"\ba\b"):
        tv.diff(3, b)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`item`"):
        tv.diff(a, b, item=["model"])  # type: ignore[arg-type]


def test_cli_diff_of_a_damaged_file_exits_1_naming_it(
    pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    a, _ = pair
    damaged = a.with_name("damaged.tv")
    damaged.write_bytes(a.read_bytes())
    _flip_last_data_byte(damaged)
    code = main(["diff", str(a), str(damaged)])
    out, err = capsys.readouterr()
    assert (code, out) == (ExitCode.INVALID, "")
    assert str(damaged) in err
    assert len(err.splitlines()) == 1


def test_cli_diff_of_a_damaged_run_object_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    with tv.CheckpointManager(run) as manager:
        manager.save(1, model={"w": torch.zeros(8)})
        manager.save(2, model={"w": torch.ones(8)})
    for obj in (run / "objects").rglob("*"):
        if obj.is_file() and obj.stat().st_size == 32:
            _flip_last_data_byte(obj)
    code = main(["diff", f"{run}@1", f"{run}@2"])
    out, err = capsys.readouterr()
    assert (code, out) == (ExitCode.INVALID, "")
    assert str(run) in err


def test_cli_diff_json_is_the_library_report(
    pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = pair
    assert main(["diff", "--json", str(a), str(b)]) == 0
    shown = json.loads(capsys.readouterr().out)
    report = tv.diff(a, b)
    assert shown["identical"] == report.identical
    assert [c["key"] for c in shown["changed"]] == [c.key for c in report.changed]
    assert [c["max_abs_diff"] for c in shown["changed"]] == [c.max_abs_diff for c in report.changed]
    assert [c["key"] for c in shown["added"]] == [key for key, _ in report.added]
    assert shown["unchanged"] == report.unchanged
