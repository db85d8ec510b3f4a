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


# ---------------------------------------------------------------------- mistakes and names


@pytest.mark.parametrize("kind", ["onnx", "program"])
def test_a_factory_that_does_not_exist_is_a_usage_error(
    project: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["export", kind, "--model", "nope:make_model", "--input-shape", "2,16", "m.out"])
    _, err = capsys.readouterr()
    assert code == 2
    assert f"usage: torchvault export {kind}" in err
    assert "--model 'nope:make_model': cannot import nope" in err
    assert "internal error" not in err


def test_a_factory_that_raises_is_a_usage_error_naming_it(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / "broken_nets.py").write_text("def make():\n    raise RuntimeError('no GPU')\n")
    code = main(["quantize", "--model", "broken_nets:make", "--input-shape", "2,16", "q.tv"])
    _, err = capsys.readouterr()
    assert code == 2
    assert "--model 'broken_nets:make' raised RuntimeError: no GPU" in err


@pytest.mark.parametrize("command", [["export", "onnx"], ["export", "program"], ["quantize"]])
def test_a_wrong_input_shape_is_one_line_and_a_usage_error(
    project: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = project / "m.out"
    code = main([*command, "--model", "nets_for_cli_test:mlp", "--input-shape", "2,15", str(out)])
    stdout, err = capsys.readouterr()
    assert (code, stdout) == (2, "")
    message = err.splitlines()[-1]
    assert message.startswith(f"torchvault {' '.join(command)}: error: --input-shape 2,15: ")
    assert "Traceback" not in err
    assert err.count("error:") == 1  # the usage lines, then the one message
    assert not out.exists()


def test_a_multi_line_error_message_prints_as_one_line_without_literal_escapes(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.save({"0.weight": torch.zeros(3, 3)}, project / "other.pt")
    code = main(["export", "onnx", *MODEL, "--checkpoint", "other.pt", str(project / "m.onnx")])
    _, err = capsys.readouterr()
    assert code == 1
    assert len(err.splitlines()) == 1
    assert "\\n" not in err
    assert "missing" in err


def test_help_names_the_export_commands_as_the_readme_does(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert "export onnx" in listing
    assert "export program" in listing
    assert "export-onnx" not in listing
    assert "export-program" not in listing
    assert main(["export", "onnx", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: torchvault export onnx ")
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "torchvault export onnx|program --model" in readme
    assert "torchvault export onnx|program --model" in (tv.cli.__doc__ or "")


def test_the_hyphenated_names_stay_as_aliases(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = project / "m.pt2"
    assert main(["export-program", *MODEL, "--checkpoint", "trained.tv", str(out)]) == 0
    assert out.exists()


def test_quantize_backend_flag_and_latency_spread(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = project / "q.tv"
    code = main(["quantize", *MODEL, "--backend", "torch", "--json", str(out)])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backend"] == "torch.ao"
    assert report["quantized_latency_iqr_ms"] >= 0
    code = main(["quantize", *MODEL, "--backend", "torch", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    line = next(row for row in text.splitlines() if row.startswith("quantized_latency_ms"))
    assert "ms (IQR " in line
    assert "quantized_latency_iqr_ms" not in text
    code = main(
        ["quantize", *MODEL, "--backend", "torch", "--method", "int8-weight-only", str(out)]
    )
    assert code == 2
    assert "backend" in capsys.readouterr().err
