"""Int8 quantization: the report, the pickle-free file, and exact reloading."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchvault as tv
from torchvault.export import _quantize_backends, load_quantized, quantize, save_quantized

METHODS = ["int8-dynamic", "int8-weight-only"]
INSTALL = 'pip install "torchvault[quantize]"'


class MLP(nn.Module):
    """Linear-dominated: three 512 x 512 layers hold almost all of its bytes."""

    def __init__(self, width: int = 512) -> None:
        super().__init__()
        self.fc1 = nn.Linear(128, width)
        self.fc2 = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.fc3 = nn.Linear(width, width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = self.norm(torch.relu(self.fc2(x)))
        logits: torch.Tensor = self.head(torch.relu(self.fc3(x)))
        return logits


class Block(nn.Module):
    """A pre-norm transformer block whose projections are plain Linear layers."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, dim))
        out: torch.Tensor = x + self.down(nn.functional.gelu(self.up(self.norm2(x))))
        return out


class TinyTransformer(nn.Module):
    """Token ids in, logits out: an embedding, two blocks and a Linear head."""

    def __init__(self, vocab: int = 64, dim: int = 128, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([Block(dim, heads), Block(dim, heads)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        logits: torch.Tensor = self.head(self.norm(x))
        return logits


MLP_LINEARS = ("fc1", "fc2", "fc3", "head")
TRANSFORMER_LINEARS = (
    *(f"blocks.{i}.{name}" for i in range(2) for name in ("qkv", "proj", "up", "down")),
    "head",
)


def mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


def transformer(seed: int = 0) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer().eval()


def mlp_input() -> torch.Tensor:
    return torch.randn(4, 128, generator=torch.Generator().manual_seed(1))


def token_ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))


Make = Callable[..., nn.Module]
Example = Callable[[], torch.Tensor]
MODELS = [
    pytest.param(mlp, mlp_input, MLP_LINEARS, id="mlp"),
    pytest.param(transformer, token_ids, TRANSFORMER_LINEARS, id="transformer"),
]


def without_torchao(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(purpose: str) -> None:
        raise ImportError(f"{purpose} needs torchao, which is not installed: {INSTALL}")

    monkeypatch.setattr(_quantize_backends, "_torchao", missing)


def outputs(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        result: torch.Tensor = model(inputs)
    return result


# ----------------------------------------------------------------------------- quantize


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("make", "example", "linears"), MODELS)
def test_quantize_reports_every_linear_layer_and_a_small_output_difference(
    make: Make, example: Example, linears: tuple[str, ...], method: str
) -> None:
    model, inputs = make(), example()
    quantized, report = quantize(model, method, example_inputs=inputs, samples=4)
    scale = float(outputs(model, inputs).abs().max())
    assert (report.method, report.backend) == (method, "torchao")
    assert report.modules == linears
    assert 0 < report.max_abs_diff <= 0.05 * scale
    assert report.float_latency_ms > 0
    assert report.quantized_latency_ms > 0
    assert report.samples == 5  # the example inputs and 4 random sets
    assert report.quantized_bytes < report.float_bytes
    assert not quantized.training


@pytest.mark.parametrize("method", METHODS)
def test_a_linear_dominated_model_shrinks_to_under_0_3_of_its_float_file(method: str) -> None:
    _, report = quantize(mlp(), method)
    assert report.quantized_bytes <= 0.3 * report.float_bytes


def test_the_float_model_is_left_untouched_and_in_its_mode() -> None:
    model = mlp().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized, _ = quantize(model, example_inputs=mlp_input(), samples=1)
    assert quantized is not model
    assert model.training
    assert model.norm.training
    assert all(type(p) is nn.Parameter for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_inplace_quantizes_the_model_itself_in_eval_mode() -> None:
    model = mlp().train()
    expected = outputs(quantize(mlp(), example_inputs=mlp_input())[0], mlp_input())
    quantized, report = quantize(model, example_inputs=mlp_input(), inplace=True)
    assert quantized is model
    assert not model.training
    assert report.max_abs_diff > 0  # measured against the float outputs, taken first
    assert torch.equal(outputs(model, mlp_input()), expected)


def test_without_example_inputs_the_comparison_figures_are_nan() -> None:
    _, report = quantize(mlp())
    assert math.isnan(report.max_abs_diff)
    assert math.isnan(report.max_rel_diff)
    assert math.isnan(report.float_latency_ms)
    assert math.isnan(report.quantized_latency_ms)
    assert report.samples == 0
    assert report.modules == MLP_LINEARS


def test_an_unknown_method_is_a_value_error_listing_the_methods() -> None:
    with pytest.raises(ValueError, match=r"int8-dynamic.*int8-weight-only"):
        quantize(mlp(), "int4")


def test_a_model_without_linear_layers_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        quantize(nn.Sequential(nn.Conv1d(2, 2, 1)))


def test_an_already_quantized_model_is_a_value_error() -> None:
    quantized, _ = quantize(mlp())
    with pytest.raises(ValueError, match="already quantized"):
        quantize(quantized)


# ----------------------------------------------------------------------------- the file


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("make", "example", "linears"), MODELS)
def test_a_saved_model_reloads_into_a_fresh_skeleton_bit_identically(
    tmp_path: Path, make: Make, example: Example, linears: tuple[str, ...], method: str
) -> None:
    quantized, _ = quantize(make(), method)
    save_quantized(quantized, tmp_path / "q.tv")
    loaded = load_quantized(make(seed=7), tmp_path / "q.tv")
    inputs = example()
    assert torch.equal(outputs(loaded, inputs), outputs(quantized, inputs))
    assert _quantize_backends._quantized_modules(loaded, "torchao") == linears
    assert not loaded.training


def test_the_file_is_a_torchvault_file_recording_method_and_backend(tmp_path: Path) -> None:
    quantized, _ = quantize(mlp(), "int8-weight-only")
    save_quantized(quantized, tmp_path / "q.tv", metadata={"run": "exp1"})
    info = tv.inspect(tmp_path / "q.tv")
    assert info.format == "torchvault"
    assert info.metadata["quantization"] == "int8-weight-only"
    assert info.metadata["quantization.backend"] == "torchao"
    assert info.metadata["run"] == "exp1"
    dtypes = {t.key: t.dtype for t in info.tensors}
    assert dtypes["state.fc2.weight.qdata"] == "int8"
    assert dtypes["state.norm.weight"] == "float32"
    assert tv.verify(tmp_path / "q.tv").checksummed


def test_metadata_keys_of_the_quantization_are_reserved(tmp_path: Path) -> None:
    quantized, _ = quantize(mlp())
    with pytest.raises(ValueError, match="quantization"):
        save_quantized(quantized, tmp_path / "q.tv", metadata={"quantization": "mine"})


def test_saving_a_float_model_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"tv\.quantize"):
        save_quantized(mlp(), tmp_path / "q.tv")


def test_a_mismatching_skeleton_is_a_typed_error_and_left_float(tmp_path: Path) -> None:
    quantized, _ = quantize(mlp())
    save_quantized(quantized, tmp_path / "q.tv")
    skeleton = MLP(width=256)
    with pytest.raises(tv.StateDictMismatchError, match=r"fc2\.weight") as caught:
        load_quantized(skeleton, tmp_path / "q.tv")
    report = caught.value.report
    assert isinstance(report, tv.LoadReport)
    assert ("fc2.weight", (512, 512), (256, 256)) in {
        (m.key, m.file_shape, m.model_shape) for m in report.mismatched
    }
    assert all(type(p) is nn.Parameter for p in skeleton.parameters())


def test_another_architecture_reports_missing_and_unexpected_keys(tmp_path: Path) -> None:
    quantized, _ = quantize(mlp())
    save_quantized(quantized, tmp_path / "q.tv")
    with pytest.raises(tv.StateDictMismatchError) as caught:
        load_quantized(transformer(), tmp_path / "q.tv")
    report = caught.value.report
    assert isinstance(report, tv.LoadReport)
    assert "fc1.weight" in report.unexpected
    assert "embed.weight" in report.missing


def test_a_skeleton_of_another_dtype_is_a_typed_error(tmp_path: Path) -> None:
    quantized, _ = quantize(mlp())
    save_quantized(quantized, tmp_path / "q.tv")
    with pytest.raises(tv.StateDictMismatchError, match="dtype float32 in the file"):
        load_quantized(mlp().double(), tmp_path / "q.tv")


def tampered(tmp_path: Path, change: Callable[[Any], object]) -> Path:
    """A quantized file rewritten with ``change`` applied to its tree."""
    quantized, _ = quantize(mlp())
    save_quantized(quantized, tmp_path / "q.tv")
    tree = tv.load(tmp_path / "q.tv")
    change(tree)
    tv.save(tree, tmp_path / "tampered.tv")
    return tmp_path / "tampered.tv"


def test_a_malformed_layout_is_a_corrupt_checkpoint(tmp_path: Path) -> None:
    path = tampered(tmp_path, lambda tree: tree["layout"]["fc2.weight"].update(shape=["x"]))
    with pytest.raises(tv.CorruptCheckpointError, match=r"fc2\.weight"):
        load_quantized(mlp(), path)


def test_a_quantized_weight_without_layout_is_a_corrupt_checkpoint(tmp_path: Path) -> None:
    path = tampered(tmp_path, lambda tree: tree["layout"].pop("fc1.weight"))
    with pytest.raises(tv.CorruptCheckpointError, match=r"fc1\.weight"):
        load_quantized(mlp(), path)


def test_an_unknown_method_in_the_file_is_unsupported(tmp_path: Path) -> None:
    path = tampered(tmp_path, lambda tree: tree.update(method="int2-magic"))
    with pytest.raises(tv.UnsupportedFormatError, match="int2-magic"):
        load_quantized(mlp(), path)


def test_another_quantization_configuration_is_a_typed_error(tmp_path: Path) -> None:
    def other_config(tree: dict[str, dict[str, dict[str, str]]]) -> None:
        tree["layout"]["fc2.weight"]["attributes"] += " (another torchao)"

    with pytest.raises(tv.StateDictMismatchError, match=r"fc2\.weight: attributes"):
        load_quantized(mlp(), tampered(tmp_path, other_config))


def test_a_float_checkpoint_is_not_a_quantized_model(tmp_path: Path) -> None:
    tv.save(mlp(), tmp_path / "float.tv")
    with pytest.raises(tv.UnsupportedFormatError, match="no quantized model"):
        load_quantized(mlp(), tmp_path / "float.tv")


# ----------------------------------------------------------------------------- without torchao


def test_without_torchao_int8_dynamic_falls_back_to_torch_ao(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    without_torchao(monkeypatch)
    model, inputs = transformer(), token_ids()
    quantized, report = quantize(model, example_inputs=inputs, samples=2)
    assert report.backend == "torch.ao"
    assert report.modules == TRANSFORMER_LINEARS
    assert report.max_abs_diff <= 0.05 * float(outputs(model, inputs).abs().max())
    save_quantized(quantized, tmp_path / "q.tv")
    assert tv.inspect(tmp_path / "q.tv").metadata["quantization.backend"] == "torch.ao"
    loaded = load_quantized(transformer(seed=7), tmp_path / "q.tv")
    assert torch.equal(outputs(loaded, inputs), outputs(quantized, inputs))


def test_without_torchao_weight_only_asks_for_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    without_torchao(monkeypatch)
    with pytest.raises(ImportError, match=r"torchvault\[quantize\]"):
        quantize(mlp(), "int8-weight-only")


def test_a_torchao_file_without_torchao_asks_for_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    quantized, _ = quantize(mlp())
    save_quantized(quantized, tmp_path / "q.tv")
    without_torchao(monkeypatch)
    with pytest.raises(ImportError, match=r"torchvault\[quantize\]"):
        load_quantized(mlp(), tmp_path / "q.tv")


# ----------------------------------------------------------------------------- tv.save / tv.load_into

BACKENDS = [
    pytest.param("torchao", "int8-dynamic", id="torchao-dynamic"),
    pytest.param("torchao", "int8-weight-only", id="torchao-weight-only"),
    pytest.param("torch.ao", "int8-dynamic", id="torch.ao-dynamic"),
]


def quantized_mlp(
    backend: str, method: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[nn.Module, Any]:
    if backend == "torch.ao":
        without_torchao(monkeypatch)
    quantized, report = quantize(mlp(), method)
    assert report.backend == backend
    return quantized, report


@pytest.mark.parametrize(("backend", "method"), BACKENDS)
def test_tv_save_of_a_quantized_model_stores_it_as_save_quantized(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, method: str
) -> None:
    quantized, _ = quantized_mlp(backend, method, monkeypatch)
    report = tv.save(quantized, tmp_path / "q.tv", metadata={"run": "exp1"})
    assert isinstance(report, tv.SaveReport)
    assert report.file_bytes == (tmp_path / "q.tv").stat().st_size
    info = tv.inspect(tmp_path / "q.tv")
    assert info.metadata["quantization"] == method
    assert info.metadata["quantization.backend"] == backend
    assert info.metadata["run"] == "exp1"
    loaded = load_quantized(mlp(seed=7), tmp_path / "q.tv")
    assert torch.equal(outputs(loaded, mlp_input()), outputs(quantized, mlp_input()))


@pytest.mark.parametrize(("backend", "method"), BACKENDS)
def test_load_into_a_float_skeleton_reads_a_quantized_file_bit_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, method: str
) -> None:
    quantized, _ = quantized_mlp(backend, method, monkeypatch)
    tv.save(quantized, tmp_path / "q.tv")
    skeleton = mlp(seed=7)
    report = tv.load_into(skeleton, tmp_path / "q.tv")
    assert report.ok
    assert set(report.loaded) == set(quantized.state_dict())
    assert _quantize_backends._quantized_modules(skeleton, backend) == MLP_LINEARS
    assert torch.equal(outputs(skeleton, mlp_input()), outputs(quantized, mlp_input()))


@pytest.mark.parametrize(("backend", "method"), BACKENDS)
def test_load_into_an_already_quantized_model_copies_the_saved_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, method: str
) -> None:
    quantized, _ = quantized_mlp(backend, method, monkeypatch)
    save_quantized(quantized, tmp_path / "q.tv")
    other, _ = quantize(mlp(seed=7), method)
    assert not torch.equal(outputs(other, mlp_input()), outputs(quantized, mlp_input()))
    assert tv.load_into(other, tmp_path / "q.tv").ok
    assert torch.equal(outputs(other, mlp_input()), outputs(quantized, mlp_input()))


def test_save_quantized_returns_a_save_report(tmp_path: Path) -> None:
    quantized, _ = quantize(mlp())
    report = save_quantized(quantized, tmp_path / "q.tv")
    assert isinstance(report, tv.SaveReport)
    assert report.path == str(tmp_path / "q.tv")
    assert report.file_bytes == (tmp_path / "q.tv").stat().st_size


def test_a_quantized_model_round_trips_through_memory() -> None:
    quantized, _ = quantize(mlp(), "int8-weight-only")
    buffer = io.BytesIO()
    tv.save(quantized, buffer)
    skeleton = mlp(seed=3)
    tv.load_into(skeleton, buffer.getvalue())
    assert torch.equal(outputs(skeleton, mlp_input()), outputs(quantized, mlp_input()))


def test_storing_a_quantized_model_in_another_dtype_is_a_value_error(tmp_path: Path) -> None:
    quantized, _ = quantize(mlp())
    with pytest.raises(ValueError, match="`dtype`"):
        tv.save(quantized, tmp_path / "q.tv", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="`quantize`"):
        tv.save(quantized, tmp_path / "q.tv", quantize="int8")
    assert not (tmp_path / "q.tv").exists()


def test_load_into_a_quantized_file_refuses_partial_matching(tmp_path: Path) -> None:
    quantized, _ = quantize(mlp())
    tv.save(quantized, tmp_path / "q.tv")
    with pytest.raises(ValueError, match="`strict=False`"):
        tv.load_into(mlp(), tmp_path / "q.tv", strict=False)
    with pytest.raises(ValueError, match="`rename`"):
        tv.load_into(mlp(), tmp_path / "q.tv", rename={"fc1.": "fc0."})


def test_load_into_a_quantized_file_of_another_architecture_is_a_mismatch(tmp_path: Path) -> None:
    quantized, _ = quantize(mlp())
    tv.save(quantized, tmp_path / "q.tv")
    skeleton = transformer()
    with pytest.raises(tv.StateDictMismatchError, match="missing in the file"):
        tv.load_into(skeleton, tmp_path / "q.tv")
    assert not _quantize_backends._torchao_weights(skeleton)  # left float


def test_load_into_a_model_quantized_another_way_is_a_mismatch(tmp_path: Path) -> None:
    quantized, _ = quantize(mlp(), "int8-weight-only")
    tv.save(quantized, tmp_path / "q.tv")
    other, _ = quantize(mlp(), "int8-dynamic")
    with pytest.raises(tv.StateDictMismatchError, match="int8-weight-only"):
        tv.load_into(other, tmp_path / "q.tv")


# ----------------------------------------------------------------------------- backend choice


@pytest.mark.parametrize(("backend", "recorded"), [("torchao", "torchao"), ("torch", "torch.ao")])
def test_backend_chooses_the_library(backend: str, recorded: str, tmp_path: Path) -> None:
    model, inputs = mlp(), mlp_input()
    quantized, report = quantize(model, example_inputs=inputs, samples=1, backend=backend)
    assert report.backend == recorded
    assert report.modules == MLP_LINEARS
    save_quantized(quantized, tmp_path / "q.tv")
    assert tv.inspect(tmp_path / "q.tv").metadata["quantization.backend"] == recorded


def test_torch_backend_is_chosen_even_where_torchao_is_installed() -> None:
    quantized, _ = quantize(mlp(), backend="torch")
    assert _quantize_backends._quantized_modules(quantized, "torch.ao") == MLP_LINEARS
    assert not _quantize_backends._torchao_weights(quantized)


@pytest.mark.parametrize(
    ("method", "backend", "message"),
    [
        ("int8-weight-only", "torch", r"backend='torch'.*int8-weight-only.*'torchao'"),
        ("int8-dynamic", "onnxruntime", r"backend='onnxruntime'.*'torchao', 'torch'"),
    ],
)
def test_an_unsupported_backend_is_a_value_error_naming_the_choices(
    method: str, backend: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        quantize(mlp(), method, backend=backend)


def test_an_unavailable_backend_is_a_value_error_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    without_torchao(monkeypatch)
    with pytest.raises(ValueError, match=r"backend='torchao'.*torchvault\[quantize\]"):
        quantize(mlp(), backend="torchao")


def test_latencies_carry_their_interquartile_range() -> None:
    _, report = quantize(mlp(), example_inputs=mlp_input(), samples=1)
    assert report.float_latency_iqr_ms >= 0
    assert report.quantized_latency_iqr_ms >= 0
    _, report = quantize(mlp())
    assert math.isnan(report.float_latency_iqr_ms)
    assert math.isnan(report.quantized_latency_iqr_ms)
