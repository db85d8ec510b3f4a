"""Which torch versions the package claims, and that the tests run on one of them."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from torchvault import _dtypes

ROOT = Path(__file__).resolve().parents[1]


def _torch_range() -> tuple[tuple[int, int], tuple[int, int]]:
    spec = re.search(r'"torch(>=[^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert spec is not None
    low = re.search(r">=(\d+)\.(\d+)", spec[1])
    high = re.search(r"<(\d+)\.(\d+)", spec[1])
    assert low is not None
    assert high is not None
    return (int(low[1]), int(low[2])), (int(high[1]), int(high[2]))


def test_package_accepts_torch_2_4_through_2_13() -> None:
    low, high = _torch_range()
    assert low <= (2, 4)
    assert high > (2, 13)


def test_suite_runs_on_a_torch_inside_the_declared_range() -> None:
    low, high = _torch_range()
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    assert low <= (major, minor) < high


def test_development_environment_pins_torch_2_13_0() -> None:
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text().splitlines()


def test_dtype_tables_skip_names_an_older_torch_lacks() -> None:
    assert _dtypes._present(("float32", "float9_made_up")) == {"float32": torch.float32}
