"""``tv.convert`` and ``torchvault convert``: the format written follows the destination, ``to=``
overrides it, and an argument the chosen format would ignore is refused."""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import torchvault as tv
from torchvault.cli import main


def _state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "layer.weight": torch.randn(4, 3, generator=generator),
        "layer.bias": torch.randn(4, generator=generator),
        "steps": torch.arange(5),
    }


@pytest.fixture
def good_tv(tmp_path: Path) -> Path:
    path = tmp_path / "good.tv"
    tv.save(_state(), path)
    return path


def _assert_equal(got: object, want: dict[str, torch.Tensor]) -> None:
    assert isinstance(got, dict)
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key


def _is_torchvault(path: Path) -> bool:
    return tv.inspect(path).format == "torchvault"


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_torch_suffix_writes_a_file_torch_load_weights_only_reads(
    good_tv: Path, tmp_path: Path, suffix: str
) -> None:
    destination = tmp_path / f"out{suffix}"
    report = tv.convert(good_tv, destination)
    assert report.format == "torch"
    assert report.files == (str(destination),)
    assert report.tensors == 3
    _assert_equal(torch.load(destination, weights_only=True), _state())


def test_torch_target_keeps_nesting_and_shared_storage(tmp_path: Path) -> None:
    shared = torch.randn(3, 3)
    state = {
        "model": OrderedDict(embed=shared, head=shared),
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1}]},
        "epoch": 7,
        "shape": torch.Size([2, 3]),
    }
    source = tmp_path / "nested.tv"
    tv.save(state, source)
    report = tv.convert(source, tmp_path / "nested.pt")
    assert report.tensors == 2  # embed and head are one tensor
    loaded = torch.load(tmp_path / "nested.pt", weights_only=True)
    assert type(loaded["model"]) is OrderedDict
    assert loaded["model"]["embed"].data_ptr() == loaded["model"]["head"].data_ptr()
    assert torch.equal(loaded["model"]["head"], shared)
    assert loaded["optimizer"]["param_groups"] == [{"lr": 0.1}]
    assert (loaded["epoch"], loaded["shape"]) == (7, torch.Size([2, 3]))


def test_torch_target_refuses_what_weights_only_cannot_read(tmp_path: Path) -> None:
    source = tmp_path / "args.pth"  # a training script's checkpoint: load_legacy reads it
    torch.save({"args": argparse.Namespace(lr=0.1)}, source)
    with pytest.raises(tv.UnsupportedTypeError, match=r"args: .*Namespace.*\.tv") as info:
        tv.convert(source, tmp_path / "args.pt")
    assert info.value.key == "args"
    assert not (tmp_path / "args.pt").exists()


def test_safetensors_suffix_writes_plain_safetensors(good_tv: Path, tmp_path: Path) -> None:
    report = tv.convert(good_tv, tmp_path / "out.safetensors")
    assert report.format == "safetensors"
    _assert_equal(load_file(tmp_path / "out.safetensors"), _state())


def test_tv_suffix_writes_torchvault(tmp_path: Path) -> None:
    source = tmp_path / "in.pt"
    torch.save(_state(), source)
    report = tv.convert(source, tmp_path / "out.tv")
    assert report.format == "torchvault"
    assert _is_torchvault(tmp_path / "out.tv")
    _assert_equal(tv.load(tmp_path / "out.tv"), _state())


def test_no_suffix_with_max_shard_size_writes_a_sharded_hf_folder(
    good_tv: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "model-hf"
    report = tv.convert(good_tv, folder, max_shard_size=64)
    assert report.format == "hf"
    assert (folder / "model.safetensors.index.json").is_file()
    _assert_equal(tv.load(folder), _state())


def test_existing_folder_writes_a_hf_folder(good_tv: Path, tmp_path: Path) -> None:
    folder = tmp_path / "existing.v2"  # a dotted name: the folder decides, not the suffix
    folder.mkdir()
    assert tv.convert(good_tv, folder).format == "hf"
    _assert_equal(load_file(folder / "model.safetensors"), _state())


@pytest.mark.parametrize(
    ("to", "name", "check"),
    [
        ("tv", "out.pt", _is_torchvault),
        ("torchvault", "out.bin", _is_torchvault),
        ("safetensors", "out.weights", lambda p: set(load_file(p)) == set(_state())),
        ("torch", "out.tv", lambda p: set(torch.load(p, weights_only=True)) == set(_state())),
        ("hf", "out.tv", lambda p: (p / "model.safetensors").is_file()),
    ],
)
def test_to_overrides_the_suffix(
    good_tv: Path, tmp_path: Path, to: str, name: str, check: object
) -> None:
    destination = tmp_path / name
    report = tv.convert(good_tv, destination, to=to)  # type: ignore[arg-type]
    assert report.format == {"tv": "torchvault"}.get(to, to)
    assert check(destination)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("name", "to"),
    [("out.safetensors", None), ("out.pt", None), ("out.tv", None), ("out", "torch")],
)
def test_max_shard_size_for_a_single_file_is_refused(
    good_tv: Path, tmp_path: Path, name: str, to: str | None
) -> None:
    with pytest.raises(ValueError, match=r"max_shard_size='1MB' applies only to a Hugging Face"):
        tv.convert(good_tv, tmp_path / name, to=to, max_shard_size="1MB")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == [good_tv]


def test_unknown_suffix_without_to_lists_the_choices(good_tv: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"out\.onnx.*'tv', 'safetensors', 'hf', 'torch'"):
        tv.convert(good_tv, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_unknown_to_lists_the_choices(good_tv: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"to='onnx'.*'tv', 'safetensors', 'hf', 'torch'"):
        tv.convert(good_tv, tmp_path / "out.tv", to="onnx")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"to=\['tv'\]"):
        tv.convert(good_tv, tmp_path / "out.tv", to=["tv"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("arguments", "error", "named"),
    [
        ({"destination": 3}, TypeError, r"\bdestination\b"),
        ({"source": None}, TypeError, r"\bsource\b"),
        ({"max_shard_size": True}, TypeError, "max_shard_size"),
        ({"max_shard_size": "12 parsecs"}, ValueError, "max_shard_size"),
        ({"max_shard_size": 0}, ValueError, "max_shard_size"),
    ],
)
def test_bad_arguments_name_themselves(
    good_tv: Path, tmp_path: Path, arguments: dict[str, object], error: type, named: str
) -> None:
    call: dict[str, object] = {"source": good_tv, "destination": tmp_path / "hf", **arguments}
    with pytest.raises(error, match=named):
        tv.convert(**call)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- the command line


def test_cli_convert_to_pt_writes_a_torch_file(
    good_tv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    destination = tmp_path / "good.pt"
    assert main(["convert", str(good_tv), str(destination), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "torch"
    _assert_equal(torch.load(destination, weights_only=True), _state())


def test_cli_convert_to_flag_overrides(
    good_tv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    destination = tmp_path / "weights.bin"
    assert main(["convert", str(good_tv), str(destination), "--to", "safetensors"]) == 0
    assert "to safetensors at" in capsys.readouterr().out
    _assert_equal(load_file(destination), _state())


@pytest.mark.parametrize(
    "args",
    [
        ["out.onnx"],
        ["out.tv", "--max-shard-size", "1MB"],
        ["out", "--to", "torch", "--max-shard-size", "1MB"],
    ],
)
def test_cli_convert_target_mistakes_are_usage_errors(
    good_tv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    code = main(["convert", str(good_tv), str(tmp_path / args[0]), *args[1:]])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert "usage: torchvault convert" in err
    assert list(tmp_path.iterdir()) == [good_tv]
