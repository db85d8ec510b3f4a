"""export_onnx: the file is published only when onnxruntime computes what the model computes."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from torchvault import _commit
from torchvault._report import ExportReport
from torchvault.errors import CheckpointWriteError, ExportError, ExportMismatchError
from torchvault.export import _compare, _onnx
from torchvault.export._onnx import export_onnx

onnx = pytest.importorskip("onnx")  # the export extra
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SAMPLES = 3


# ----------------------------------------------------------------------------- models


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))


def cnn() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    norm = model[1]
    assert isinstance(norm, nn.BatchNorm2d)
    norm.running_mean.uniform_(-0.5, 0.5)  # not the identity it is when fresh
    norm.running_var.uniform_(0.5, 2.0)
    return model.eval()


def encoder() -> nn.Module:
    return nn.TransformerEncoderLayer(d_model=32, nhead=4, batch_first=True).eval()


class TwoInTwoOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(5, 6)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.a(x) * torch.sigmoid(self.b(y))
        return hidden.relu(), hidden.sum(dim=-1)


class Drifting(nn.Module):
    """Adds how often it was called: a Python counter the export freezes into a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x + self.calls


class BranchOnValue(nn.Module):
    """A Python branch on a tensor's value: torch.export cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x


@torch.library.custom_op("torchvault_test::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@twice.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class CustomOp(nn.Module):
    """Calls an operator torch.export traces but torch.onnx has no translation for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return twice(x)


class Scale(nn.Module):
    def forward(self, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * scale


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    inputs: tuple[torch.Tensor, ...]
    dynamic_shapes: object
    outputs: int


BATCH = torch.export.Dim("batch")
CASES = {
    "mlp": Case(mlp, (torch.randn(4, 8),), "batch", 1),
    "cnn": Case(cnn, (torch.randn(2, 3, 12, 12),), "batch", 1),
    "transformer": Case(encoder, (torch.randn(2, 7, 32),), "batch", 1),
    # the caller's own torch.export shapes, keyed by argument name
    "two_in_two_out": Case(
        TwoInTwoOut, (torch.randn(3, 4), torch.randn(3, 5)), {"x": {0: BATCH}, "y": {0: BATCH}}, 2
    ),
}


@dataclass(frozen=True)
class Exported:
    case: Case
    model: nn.Module
    path: Path
    report: ExportReport


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """Each model exported once with a dynamic batch axis, shared by the tests below."""
    case = CASES[request.param]
    torch.manual_seed(0)
    model = case.build()
    path = tmp_path_factory.mktemp(request.param) / "model.onnx"
    report = export_onnx(
        model, case.inputs, path, dynamic_shapes=case.dynamic_shapes, samples=SAMPLES
    )
    return Exported(case, model, path, report)


@pytest.fixture(scope="module")
def static(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """The MLP with static shapes, named inputs and outputs and opset 18."""
    torch.manual_seed(0)
    model = mlp()
    path = tmp_path_factory.mktemp("static") / "mlp.onnx"
    report = export_onnx(
        model,
        torch.randn(4, 8),
        path,
        opset=18,
        input_names=["features"],
        output_names=["logits"],
        samples=SAMPLES,
    )
    return Exported(CASES["mlp"], model, path, report)


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_both(
    exported: Exported, inputs: tuple[torch.Tensor, ...]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    runtime = session(exported.path)
    feed = {i.name: t.numpy() for i, t in zip(runtime.get_inputs(), inputs, strict=True)}
    got = [torch.from_numpy(array) for array in runtime.run(None, feed)]
    with torch.no_grad():
        want = exported.model(*inputs)
    return list(want) if isinstance(want, tuple) else [want], got


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# ----------------------------------------------------------------------------- exported models


def test_the_published_file_runs_in_onnxruntime_and_matches_the_model(
    exported: Exported,
) -> None:
    inputs = tuple(torch.randn_like(t) for t in exported.case.inputs)
    want, got = run_both(exported, inputs)
    assert len(got) == exported.case.outputs
    for expected, actual in zip(want, got, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_the_report_measures_every_output_within_the_tolerance(exported: Exported) -> None:
    report = exported.report
    with torch.no_grad():
        outputs = _compare.outputs_of(exported.model(*exported.case.inputs))
    largest = max(float(output.abs().max()) for output in outputs)
    assert report.format == "onnx"
    assert (report.rtol, report.atol) == (1e-4, 1e-5)
    assert 0.0 <= report.max_abs_diff <= report.atol + report.rtol * largest
    assert report.max_rel_diff >= 0.0


def test_the_report_describes_the_file(exported: Exported) -> None:
    report = exported.report
    assert report.path == str(exported.path)
    assert report.file_bytes == exported.path.stat().st_size
    graph = onnx.load(str(exported.path)).graph
    assert report.input_names == tuple(i.name for i in graph.input)
    assert report.output_names == tuple(o.name for o in graph.output)
    assert len(report.input_names) == len(exported.case.inputs)
    assert len(report.output_names) == exported.case.outputs
    assert report.opset is not None
    assert report.opset >= 18
    assert report.torch_latency_ms > 0
    assert report.runtime_latency_ms > 0


def test_a_dynamic_batch_is_compared_at_other_batch_sizes(exported: Exported) -> None:
    batch = exported.case.inputs[0].shape[0]
    assert exported.report.batch_sizes == (1, batch, 2 * batch + 1)
    assert exported.report.checked == 1 + SAMPLES + 2


def test_a_dynamic_batch_file_runs_at_a_batch_size_it_was_not_exported_with(
    exported: Exported,
) -> None:
    inputs = tuple(torch.randn(5, *t.shape[1:]) for t in exported.case.inputs)
    want, got = run_both(exported, inputs)
    assert got[0].shape[0] == 5
    for expected, actual in zip(want, got, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_only_the_file_is_left_in_the_folder(exported: Exported) -> None:
    assert listing(exported.path.parent) == ["model.onnx"]


def test_static_shapes_compare_the_example_batch_only(static: Exported) -> None:
    assert static.report.batch_sizes == (4,)
    assert static.report.checked == 1 + SAMPLES
    dims = onnx.load(str(static.path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [4, 8]


def test_names_and_opset_are_the_callers(static: Exported) -> None:
    assert static.report.input_names == ("features",)
    assert static.report.output_names == ("logits",)
    assert static.report.opset == 18
    assert [i.name for i in session(static.path).get_inputs()] == ["features"]


def test_a_scalar_first_input_has_no_batch_sizes(tmp_path: Path) -> None:
    report = export_onnx(Scale(), (torch.tensor(2.0), torch.randn(3)), tmp_path / "s.onnx")
    assert report.batch_sizes == ()
    assert report.checked == 9


def test_the_models_training_flags_are_restored(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    model.train()
    model[1].eval()  # a submodule deliberately frozen stays frozen
    norm = model[1]
    assert isinstance(norm, nn.BatchNorm1d)
    before = norm.running_mean.clone()
    export_onnx(model, torch.randn(3, 4), tmp_path / "m.onnx", samples=1)
    assert [m.training for m in model.modules()] == [True, True, False, True, True]
    torch.testing.assert_close(norm.running_mean, before)  # run in eval: no statistics update


# ----------------------------------------------------------------------------- failures


def test_a_mismatch_raises_with_the_figures_and_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "drift.onnx"
    with pytest.raises(ExportMismatchError) as caught:
        export_onnx(Drifting(), torch.randn(2, 3), path, samples=2)
    report = caught.value.report
    assert isinstance(report, ExportReport)
    assert report.max_abs_diff >= 1.0
    assert report.checked == 3
    assert caught.value.path == str(path)
    message = str(caught.value)
    assert "Drifting" in message
    assert f"{report.max_abs_diff:.3g}" in message
    assert "atol=1e-05" in message
    assert "rtol=0.0001" in message
    assert listing(tmp_path) == []


def test_a_failed_export_leaves_an_existing_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"the previous export")
    with pytest.raises(ExportMismatchError):
        export_onnx(Drifting(), torch.randn(2, 3), path, samples=2)
    assert path.read_bytes() == b"the previous export"
    assert listing(tmp_path) == ["model.onnx"]


def test_a_model_torch_export_cannot_trace_raises_a_typed_error(tmp_path: Path) -> None:
    path = tmp_path / "branch.onnx"
    with pytest.raises(ExportError, match=r"BranchOnValue.*export step") as caught:
        export_onnx(BranchOnValue(), torch.randn(2, 3), path)
    assert caught.value.__cause__ is not None
    assert caught.value.path == str(path)
    assert listing(tmp_path) == []


def test_an_operator_without_an_onnx_translation_raises_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"CustomOp.*translate.*twice") as caught:
        export_onnx(CustomOp(), torch.randn(2, 3), tmp_path / "custom.onnx")
    assert "custom_translation_table" in str(caught.value)
    assert listing(tmp_path) == []


def test_a_file_onnxruntime_cannot_load_raises_a_typed_error_and_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(path: str, *args: object, **kwargs: object) -> None:
        raise RuntimeError(
            "[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation"
        )

    monkeypatch.setattr(ort, "InferenceSession", refuse)
    with pytest.raises(ExportError, match=r"Sequential.*run step.*NOT_IMPLEMENTED"):
        export_onnx(mlp(), torch.randn(2, 8), tmp_path / "m.onnx")
    assert listing(tmp_path) == []


def test_a_file_failing_the_onnx_checker_raises_a_typed_error_and_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(model: object, *args: object, **kwargs: object) -> None:
        raise onnx.checker.ValidationError("Nodes in a graph must be topologically sorted")

    monkeypatch.setattr(onnx.checker, "check_model", refuse)
    with pytest.raises(ExportError, match=r"Sequential.*check step.*topologically"):
        export_onnx(mlp(), torch.randn(2, 8), tmp_path / "m.onnx")
    assert listing(tmp_path) == []


def test_a_destination_that_is_a_folder_or_in_a_missing_folder_fails_before_exporting(
    tmp_path: Path,
) -> None:
    with pytest.raises(CheckpointWriteError, match="is a folder"):
        export_onnx(BranchOnValue(), torch.randn(2, 3), tmp_path)
    with pytest.raises(CheckpointWriteError, match="does not exist"):
        export_onnx(BranchOnValue(), torch.randn(2, 3), tmp_path / "missing" / "m.onnx")


def test_dynamic_shapes_accepts_only_batch_as_a_string(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match='"batch"'):
        export_onnx(mlp(), torch.randn(2, 8), tmp_path / "m.onnx", dynamic_shapes="seq")
    with pytest.raises(ValueError, match="scalar"):
        export_onnx(
            mlp(),
            [torch.randn(2, 8), torch.tensor(1.0)],
            tmp_path / "m.onnx",
            dynamic_shapes="batch",
        )


def test_missing_onnx_names_the_extra_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r'pip install "torchvault\[export\]"'):
        export_onnx(mlp(), torch.randn(2, 8), tmp_path / "m.onnx")


# ----------------------------------------------------------------------------- options


def test_validate_false_writes_a_checked_file_without_onnxruntime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match="onnxruntime"):
        export_onnx(mlp(), torch.randn(2, 8), tmp_path / "validated.onnx")
    path = tmp_path / "m.onnx"
    report = export_onnx(Drifting(), torch.randn(2, 8), path, validate=False)
    onnx.checker.check_model(str(path))
    assert (report.checked, report.batch_sizes) == (0, ())
    assert math.isnan(report.max_abs_diff)
    assert math.isnan(report.max_rel_diff)
    assert math.isnan(report.torch_latency_ms)
    assert math.isnan(report.runtime_latency_ms)
    assert report.file_bytes == path.stat().st_size
    assert listing(tmp_path) == ["m.onnx"]


def test_large_weights_are_published_beside_the_file_as_external_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_onnx, "_SINGLE_FILE_LIMIT", 0)
    torch.manual_seed(0)
    model = mlp()
    path = tmp_path / "big.onnx"
    report = export_onnx(model, torch.randn(2, 8), path, samples=1)
    data = tmp_path / "big.onnx.data"
    assert listing(tmp_path) == ["big.onnx", "big.onnx.data"]
    assert report.file_bytes == path.stat().st_size + data.stat().st_size
    inputs = (torch.randn(2, 8),)
    want, got = run_both(Exported(CASES["mlp"], model, path, report), inputs)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)


def test_a_killed_exports_temp_files_are_removed_by_the_next_export(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    prefix, _, token = _commit.temp_name(path).name.rsplit("-", 2)
    orphan = path.with_name(f"{prefix}-{2**22 + 1}-{token}")  # beyond pid_max: a dead process
    orphan.write_bytes(b"half an export")
    orphan.with_name(f"{orphan.name}.data").write_bytes(b"its weights")
    export_onnx(mlp(), torch.randn(2, 8), path, validate=False)
    assert listing(tmp_path) == ["m.onnx"]
