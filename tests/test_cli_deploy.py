"""``torchvault export onnx|program`` and ``torchvault quantize``: a model built from the
user's factory, weights from a file or a run, the artifact written and its report printed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import torchvault as tv
from torchvault.cli import main

FACTORY = """
import torch

def mlp():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))

def not_a_model():
    return 3
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder holding the user's model code and a trained checkpoint, as the cwd."""
    (tmp_path / "nets_for_cli_test.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(7)
    trained = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    tv.save(trained, tmp_path / "trained.tv")
    with tv.CheckpointManager(tmp_path / "run") as manager:
        manager.save(1, model=trained)
    return tmp_path


MODEL = ["--model", "nets_for_cli_test:mlp", "--input-shape", "2,16"]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    state = tv.load(path)
    assert isinstance(state, dict)
    return state


@pytest.mark.parametrize("kind", ["onnx", "program"])
def test_export_writes_a_checked_artifact_from_a_checkpoint(
    project: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = project / f"model.{kind}"
    code = main(["export", kind, *MODEL, "--checkpoint", "trained.tv", "--json", str(out)])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == kind
    assert report["max_abs_diff"] < 1e-4
    assert out.exists()


def test_export_takes_the_best_checkpoint_of_a_run(project: Path) -> None:
    out = project / "model.pt2"
    assert main(["export", "program", *MODEL, "--checkpoint", "run", str(out)]) == 0
    program = tv.load_program(out)
    trained = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    tv.load_into(trained, project / "trained.tv")
    x = torch.randn(2, 16)
    assert torch.allclose(program(x), trained(x), atol=1e-6)


def test_quantize_writes_a_model_that_loads_back(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = project / "mlp-int8.tv"
    code = main(["quantize", *MODEL, "--checkpoint", "trained.tv", str(out)])
    assert code == 0
    assert "int8-dynamic" in capsys.readouterr().out
    skeleton = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    quantized = tv.load_quantized(skeleton, out)
    assert quantized(torch.randn(2, 16)).shape == (2, 4)


def test_export_of_a_run_checkpoint_still_works(project: Path) -> None:
    out = project / "out.tv"
    assert main(["export", "run", "--step", "latest", "--item", "model", str(out)]) == 0
    assert set(_weights(out)) == {"0.weight", "0.bias", "2.weight", "2.bias"}


@pytest.mark.parametrize(
    ("arguments", "code"),
    [
        (["--model", "nets_for_cli_test", "--input-shape", "2,16"], 2),
        (["--model", "nets_for_cli_test:not_a_model", "--input-shape", "2,16"], 2),
        (["--model", "nets_for_cli_test:mlp", "--input-shape", "2,x"], 2),
        (
            [
                "--model",
                "nets_for_cli_test:mlp",
                "--input-shape",
                "2,16",
                "--checkpoint",
                "nope.tv",
            ],
            3,
        ),
    ],
)
def test_bad_arguments_are_usage_or_not_found_errors(
    project: Path, arguments: list[str], code: int
) -> None:
    assert main(["export", "onnx", *arguments, str(project / "m.onnx")]) == code
    assert not (project / "m.onnx").exists()
