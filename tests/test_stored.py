"""Checkpoints stored smaller than they are: half precision (``save(dtype=...)``) and
per-channel int8 storage quantization (``save(quantize="int8")``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import torchvault as tv
from attack_files import reseal


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 6 * 6, 256),
        torch.nn.LayerNorm(256),
        torch.nn.Linear(256, 10),
    )


def _tensor_bytes(path: Path) -> int:
    return sum(t.nbytes for t in tv.inspect(path).tensors)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_halves_the_bytes_and_restores_the_dtype_on_request(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    model = _model()
    full, half = tmp_path / "full.tv", tmp_path / "half.tv"
    tv.save(model, full)
    report = tv.save(model, half, dtype=dtype)
    assert _tensor_bytes(half) * 2 == _tensor_bytes(full)
    assert {s.key for s in report.stored} == set(model.state_dict())
    assert all(s.stored_as == str(dtype).removeprefix("torch.") for s in report.stored)
    loaded = tv.load(half)
    restored = tv.load(half, restore_dtype=True)
    assert isinstance(loaded, dict)
    assert isinstance(restored, dict)
    for key, value in model.state_dict().items():
        assert loaded[key].dtype == dtype
        assert restored[key].dtype == torch.float32
        assert torch.equal(restored[key], value.to(dtype).to(torch.float32))
    assert [t.stored_as for t in tv.inspect(half).tensors] == [report.stored[0].stored_as] * 8


def test_half_precision_keeps_parameters_and_leaves_other_dtypes_alone(tmp_path: Path) -> None:
    state = {
        "p": torch.nn.Parameter(torch.randn(4, dtype=torch.float64)),
        "steps": torch.arange(3),
        "mask": torch.ones(2, dtype=torch.bool),
        "already": torch.ones(2, dtype=torch.bfloat16),
    }
    tv.save(state, tmp_path / "h.tv", dtype=torch.float16)
    loaded = tv.load(tmp_path / "h.tv")
    back = tv.load(tmp_path / "h.tv", restore_dtype=True)
    assert isinstance(loaded, dict)
    assert isinstance(back, dict)
    assert isinstance(loaded["p"], torch.nn.Parameter)
    assert loaded["p"].dtype == torch.float16
    assert isinstance(back["p"], torch.nn.Parameter)
    assert back["p"].dtype == torch.float64
    assert back["p"].requires_grad
    for key in ("steps", "mask", "already"):
        assert torch.equal(loaded[key], state[key])
        assert loaded[key].dtype == state[key].dtype


def test_int8_storage_is_about_four_times_smaller_and_dequantizes_on_load(tmp_path: Path) -> None:
    model = _model()
    full, small = tmp_path / "full.tv", tmp_path / "int8.tv"
    tv.save(model, full)
    report = tv.save(model, small, quantize="int8")
    quantized = {s.key for s in report.stored}
    assert quantized == {"0.weight", "2.weight", "4.weight"}
    matrix_bytes = sum(model.state_dict()[k].nbytes for k in quantized)
    assert _tensor_bytes(small) <= _tensor_bytes(full) - matrix_bytes * 3 / 4 + 1
    assert full.stat().st_size / small.stat().st_size > 3.0
    loaded = tv.load(small)
    assert isinstance(loaded, dict)
    for key, value in model.state_dict().items():
        assert loaded[key].dtype == value.dtype
        assert loaded[key].shape == value.shape
        if key in quantized:
            error = float((loaded[key] - value).abs().max())
            stored = next(s for s in report.stored if s.key == key)
            assert error <= stored.max_abs_error + 1e-7
            rows = value.reshape(value.shape[0], -1).abs().amax(dim=1)
            assert error <= float(rows.max()) / 127 / 2 + 1e-6
        else:
            assert torch.equal(loaded[key], value)


def test_int8_storage_handles_zero_rows_and_shared_tensors(tmp_path: Path) -> None:
    weight = torch.randn(32, 16)
    weight[3] = 0.0
    tv.save({"a": weight, "b": weight}, tmp_path / "q.tv", quantize="int8")
    loaded = tv.load(tmp_path / "q.tv")
    assert isinstance(loaded, dict)
    assert loaded["a"] is loaded["b"]
    assert torch.equal(loaded["a"][3], torch.zeros(16))


def test_int8_files_load_into_a_model_and_inspect_shows_them(tmp_path: Path) -> None:
    model = _model()
    tv.save(model, tmp_path / "q.tv", quantize="int8", dtype=torch.bfloat16)
    report = tv.load_into(_model(), tmp_path / "q.tv")
    assert report.ok
    kinds = {t.key: t.stored_as for t in tv.inspect(tmp_path / "q.tv").tensors}
    assert kinds["2.weight"] == "int8"
    assert kinds["2.bias"] == "bfloat16"
    assert tv.verify(tmp_path / "q.tv").checksummed


def test_a_quantized_file_is_still_a_safetensors_file(tmp_path: Path) -> None:
    tv.save({"w": torch.randn(64, 64)}, tmp_path / "q.tv", quantize="int8")
    plain = load_file(str(tmp_path / "q.tv"))
    assert plain["w"].dtype == torch.int8
    assert plain["w.scale"].shape == (64,)


def test_a_forged_stored_record_is_refused(tmp_path: Path) -> None:
    tv.save({"w": torch.randn(64, 64)}, tmp_path / "q.tv", quantize="int8")
    forged = {"0": {"as": "int8", "dtype": "float32", "param": False, "grad": False,
                    "error": 0.0, "scale": 0}}  # fmt: skip
    reseal(
        tmp_path / "q.tv", tmp_path / "bad.tv", members={"torchvault.stored": json.dumps(forged)}
    )
    with pytest.raises(tv.CorruptCheckpointError, match="scales"):
        tv.load(tmp_path / "bad.tv")
    reseal(tmp_path / "q.tv", tmp_path / "bad2.tv", members={"torchvault.stored": "[1]"})
    with pytest.raises(tv.CorruptCheckpointError, match=r"torchvault\.stored"):
        tv.load(tmp_path / "bad2.tv")


def test_unknown_storage_forms_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bfloat16"):
        tv.save({"w": torch.ones(2)}, tmp_path / "x.tv", dtype=torch.int8)
    with pytest.raises(ValueError, match="int8"):
        tv.save({"w": torch.ones(2)}, tmp_path / "x.tv", quantize="int4")
    assert not (tmp_path / "x.tv").exists()


def test_save_reports_the_file_it_wrote(tmp_path: Path) -> None:
    report = tv.save({"w": torch.ones(3), "n": 1}, tmp_path / "x.tv")
    assert report.path == str(tmp_path / "x.tv")
    assert report.file_bytes == (tmp_path / "x.tv").stat().st_size
    assert (report.tensors, report.stored) == (1, ())
