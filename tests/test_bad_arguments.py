"""Every mistake gets a typed error that blames the right thing (issue 10, section 2).

A wrong argument raises TypeError/ValueError naming the argument and what it accepts, never
an error about a valid file; a file read by the wrong function names the right one;
``map_location`` takes what ``torch.load`` takes; ``load_into`` takes what users pass it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from torch import nn

import torchvault as tv
from torchvault.errors import TorchVaultError

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"weight": torch.randn(1, 2), "bias": torch.randn(1)}


@pytest.fixture(params=["tv", "pt"])
def ckpt(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A torchvault file and a torch.save file of the same state dict."""
    path = tmp_path / f"model.{request.param}"
    if request.param == "tv":
        tv.save(state(), path)
    else:
        torch.save(state(), path)
    return path


@pytest.fixture
def cuda_pt(tmp_path: Path) -> Path:
    """A torch.save file whose storages say they were saved on cuda:0 (written on the CPU:
    torch records what ``location_tag`` says)."""
    path = tmp_path / "gpu_ckpt.pt"
    with mock.patch("torch.serialization.location_tag", return_value="cuda:0"):
        torch.save(state(), path)
    return path


def raised(call: Callable[[], object]) -> BaseException:
    """The exception ``call`` raises, whatever its type: the tests judge the type."""
    try:
        call()
    except BaseException as exc:
        return exc
    pytest.fail("no exception was raised")


def assert_blames_argument(exc: BaseException, name: str, *words: str) -> None:
    """A plain TypeError/ValueError (not an error about the file) naming ``name``."""
    assert isinstance(exc, TypeError | ValueError), repr(exc)
    assert not isinstance(exc, TorchVaultError), f"blames the file: {exc!r}"
    for word in (name, *words):
        assert word in str(exc), f"{word!r} not in {str(exc)!r}"


# ----------------------------------------------------------------------------- map_location


@pytest.mark.parametrize("where", ["gpu", "cuda:x", "", torch.float32, 3, ["cpu"]])
def test_map_location_that_is_no_device_names_map_location_not_the_file(
    ckpt: Path, where: Any
) -> None:
    exc = raised(lambda: tv.load(ckpt, map_location=where))
    assert_blames_argument(exc, "map_location", "accepts")


@NO_CUDA
@pytest.mark.parametrize("where", ["cuda:0", "cuda", torch.device("cuda", 1), {"cpu": "cuda:0"}])
def test_map_location_cuda_without_cuda_says_so_and_how_to_fix_it(ckpt: Path, where: Any) -> None:
    exc = raised(lambda: tv.load(ckpt, map_location=where))
    assert_blames_argument(exc, "map_location", "CUDA", "map_location='cpu'")


@NO_CUDA
@pytest.mark.parametrize("reader", ["load", "load_legacy"])
def test_cuda_saved_file_without_cuda_names_map_location_and_the_fix(
    cuda_pt: Path, reader: str
) -> None:
    exc = raised(lambda: getattr(tv, reader)(cuda_pt, map_location=None))
    assert_blames_argument(exc, "map_location", "cuda:0", "map_location='cpu'")


@pytest.mark.parametrize("reader", ["load", "load_legacy"])
def test_dict_map_location_moves_cuda_tensors_to_the_cpu(cuda_pt: Path, reader: str) -> None:
    loaded = getattr(tv, reader)(cuda_pt, map_location={"cuda:0": "cpu"})
    assert loaded["weight"].device.type == "cpu"
    assert torch.equal(loaded["weight"], state()["weight"])


def test_map_location_dict_with_a_non_string_key_names_its_keys(ckpt: Path) -> None:
    exc = raised(lambda: tv.load(ckpt, map_location={0: "cpu"}))
    assert_blames_argument(exc, "map_location's keys")


def test_tutorial_callable_map_location_keeps_tensors_on_the_cpu(ckpt: Path) -> None:
    loaded = tv.load(ckpt, map_location=lambda storage, loc: storage)
    assert loaded["weight"].device.type == "cpu"
    assert torch.equal(loaded["weight"], state()["weight"])


def test_callable_map_location_is_called_with_a_cpu_storage_and_the_saved_location(
    ckpt: Path,
) -> None:
    calls: list[tuple[type, str, str]] = []

    def where(storage: torch.UntypedStorage, location: str) -> None:
        calls.append((type(storage), storage.device.type, location))

    loaded = tv.load(ckpt, map_location=where)
    assert calls
    assert all(c == (torch.UntypedStorage, "cpu", "cpu") for c in calls)
    assert torch.equal(loaded["bias"], state()["bias"])  # None: where it was saved


def test_callable_map_location_returning_a_new_storage_uses_it(ckpt: Path) -> None:
    copies: list[torch.UntypedStorage] = []

    def where(storage: torch.UntypedStorage, location: str) -> torch.UntypedStorage:
        copies.append(storage.clone())
        return copies[-1]

    loaded = tv.load(ckpt, map_location=where)
    pointers = {c.data_ptr() for c in copies}
    assert loaded["weight"].untyped_storage().data_ptr() in pointers
    assert torch.equal(loaded["weight"], state()["weight"])


def test_callable_map_location_returning_something_else_names_map_location(ckpt: Path) -> None:
    exc = raised(lambda: tv.load(ckpt, map_location=lambda storage, loc: "cpu"))
    assert_blames_argument(exc, "map_location", "storage")


@NO_CUDA
def test_cuda_saved_file_with_the_tutorial_callable_loads_on_the_cpu(cuda_pt: Path) -> None:
    loaded = tv.load_legacy(cuda_pt, map_location=lambda storage, loc: storage)
    assert loaded["weight"].device.type == "cpu"


def test_load_into_and_load_legacy_take_a_callable_map_location(tmp_path: Path) -> None:
    torch.save(state(), tmp_path / "m.pt")
    model = nn.Linear(2, 1)
    report = tv.load_into(model, tmp_path / "m.pt", map_location=lambda s, loc: s)
    assert report.ok
    assert torch.equal(model.weight.detach(), state()["weight"])
    assert tv.load_legacy(tmp_path / "m.pt", map_location=lambda s, loc: s)["bias"].shape == (1,)


def test_manager_restore_and_load_take_a_callable_map_location(tmp_path: Path) -> None:
    torch.manual_seed(6)
    saved, fresh = nn.Linear(2, 1), nn.Linear(2, 1)
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, model=saved)
        loaded = mgr.load(item="model", map_location=lambda s, loc: s)
        assert torch.equal(loaded["weight"], saved.weight.detach())
        assert mgr.restore(map_location=lambda s, loc: s, model=fresh) is not None
        assert torch.equal(fresh.weight, saved.weight)


def test_manager_refuses_a_bad_map_location_even_before_the_first_checkpoint(
    tmp_path: Path,
) -> None:
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        assert_blames_argument(raised(lambda: mgr.restore(map_location="gpu")), "map_location")
        assert_blames_argument(raised(lambda: mgr.load(map_location=7)), "map_location")


# ----------------------------------------------------------------------------- load_into


def test_load_into_a_state_dict_with_a_non_tensor_value_names_the_key() -> None:
    exc = raised(lambda: tv.load_into(nn.Linear(2, 1), {"weight": [[1, 2]], "bias": torch.ones(1)}))
    assert_blames_argument(exc, "source['weight']", "torch.Tensor")


def test_load_into_from_another_module_copies_its_weights() -> None:
    torch.manual_seed(3)
    source, target = nn.Linear(2, 1), nn.Linear(2, 1)
    report = tv.load_into(target, source)
    assert report.ok
    assert set(report.loaded) == {"weight", "bias"}
    assert torch.equal(target.weight, source.weight)
    assert target.weight is not source.weight


@pytest.mark.parametrize("target", [{}, None, "model.tv", torch.zeros(2)])
def test_load_into_a_target_that_is_not_a_module_names_module(tmp_path: Path, target: Any) -> None:
    tv.save(state(), tmp_path / "model.tv")
    exc = raised(lambda: tv.load_into(target, tmp_path / "model.tv"))
    assert_blames_argument(exc, "module", "torch.nn.Module")


@pytest.mark.parametrize("source", [3, 2.5, None, ["model.tv"]])
def test_load_into_a_source_of_another_kind_names_source(source: Any) -> None:
    exc = raised(lambda: tv.load_into(nn.Linear(2, 1), source))
    assert_blames_argument(exc, "source")


def test_load_into_a_file_saved_on_cuda_loads_onto_the_modules_device(cuda_pt: Path) -> None:
    model = nn.Linear(2, 1)
    device = model.weight.device
    report = tv.load_into(model, cuda_pt)
    assert report.ok
    assert model.weight.device == device
    assert torch.equal(model.weight.detach(), state()["weight"])


# ----------------------------------------------------------------------------- rename


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))


class Features(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))


class Wrapped(nn.Module):
    """Stands in for DataParallel: the model lives at ``.module``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner


@pytest.fixture
def dp_file(tmp_path: Path) -> Path:
    torch.manual_seed(4)
    path = tmp_path / "dp.tv"
    tv.save(Wrapped(Features()), path)  # keys "module.features.0.weight", ...
    return path


@pytest.mark.parametrize(
    "rename",
    [
        {"features.": "backbone."},
        [("features.", "backbone.")],
        {"module.features.": "backbone."},
        lambda key: key.replace("features.", "backbone."),
    ],
    ids=["model-names", "pairs", "wrapper-names", "callable"],
)
def test_rename_applies_after_the_dataparallel_prefix_is_reconciled(
    dp_file: Path, rename: Any
) -> None:
    model = Backbone()
    report = tv.load_into(model, dp_file, rename=rename)
    assert report.ok, report
    saved = tv.load(dp_file)
    assert torch.equal(model.backbone[0].weight, saved["module.features.0.weight"])
    assert {r.source for r in report.renamed} == set(saved)


def test_callable_rename_on_a_plain_state_dict() -> None:
    torch.manual_seed(5)
    source = Features().state_dict()
    model = Backbone()
    report = tv.load_into(model, source, rename=lambda k: "backbone." + k.split(".", 1)[1])
    assert report.ok
    assert len(report.renamed) == 4


@pytest.mark.parametrize("rename", [3, "features.", {"features.": 3}, [("a",)], [(1, "b")]])
def test_malformed_rename_names_rename(rename: Any) -> None:
    exc = raised(lambda: tv.load_into(Backbone(), Backbone().state_dict(), rename=rename))
    assert_blames_argument(exc, "rename")


def test_callable_rename_returning_a_non_string_names_rename() -> None:
    exc = raised(lambda: tv.load_into(Backbone(), Backbone().state_dict(), rename=lambda k: 1))
    assert_blames_argument(exc, "rename", "str")


# ----------------------------------------------------------------------------- wrong function


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """One file of each kind torchvault meets, and an ONNX model's first bytes."""
    out = {
        "tv": tmp_path / "model.tv",
        "safetensors": tmp_path / "model.safetensors",
        "pt2": tmp_path / "model.pt2",
        "onnx": tmp_path / "model.onnx",
    }
    tv.save(state(), out["tv"])
    from safetensors.torch import save_file

    save_file(state(), out["safetensors"])
    program = torch.export.export(nn.Linear(2, 1), (torch.randn(3, 2),))
    torch.export.save(program, out["pt2"])
    # an ONNX ModelProto: ir_version (field 1), producer_name "pytorch" (field 2), ...
    out["onnx"].write_bytes(b"\x08\x08\x12\x07pytorch\x1a\x052.5.0" + b"\x00" * 64)
    return out


@pytest.mark.parametrize("kind", ["tv", "safetensors"])
def test_load_legacy_of_a_torchvault_file_says_so_and_names_tv_load(
    files: dict[str, Path], kind: str
) -> None:
    with pytest.raises(tv.UnsupportedFormatError, match=r"torchvault.*tv\.load\(") as info:
        tv.load_legacy(files[kind])
    assert info.value.path == str(files[kind])


@pytest.mark.parametrize("kind", ["tv", "safetensors"])
def test_load_program_of_a_checkpoint_names_tv_load_and_export_program(
    files: dict[str, Path], kind: str
) -> None:
    with pytest.raises(tv.UnsupportedFormatError, match="checkpoint, not a program") as info:
        tv.load_program(files[kind])
    assert "tv.load(" in str(info.value)
    assert "tv.export_program(" in str(info.value)


@pytest.mark.parametrize("reader", ["load", "load_legacy", "inspect", "verify"])
def test_checkpoint_readers_on_a_program_name_load_program(
    files: dict[str, Path], reader: str
) -> None:
    with pytest.raises(tv.UnsupportedFormatError, match=r"torch\.export program.*load_program"):
        getattr(tv, reader)(files["pt2"])


def test_load_into_of_a_program_names_load_program(files: dict[str, Path]) -> None:
    with pytest.raises(tv.UnsupportedFormatError, match="load_program"):
        tv.load_into(nn.Linear(2, 1), files["pt2"])


@pytest.mark.parametrize("reader", ["load", "load_legacy", "inspect", "verify", "load_program"])
def test_readers_on_an_onnx_model_say_it_is_onnx(files: dict[str, Path], reader: str) -> None:
    with pytest.raises(tv.UnsupportedFormatError, match=r"ONNX model.*onnxruntime"):
        getattr(tv, reader)(files["onnx"])


# ----------------------------------------------------------------------------- metadata, URLs


def test_metadata_with_a_non_string_key_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"metadata keys must be str; key 1 is int"):
        tv.save(state(), tmp_path / "m.tv", metadata={1: "a"})  # type: ignore[dict-item]
    assert not (tmp_path / "m.tv").exists()


def test_metadata_with_a_non_string_value_names_the_value(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"metadata\['epoch'\] is int"):
        tv.save(state(), tmp_path / "m.tv", metadata={"epoch": 3})  # type: ignore[dict-item]


def test_metadata_that_is_not_a_mapping_names_metadata(tmp_path: Path) -> None:
    exc = raised(lambda: tv.save(state(), tmp_path / "m.tv", metadata=["a"]))  # type: ignore[arg-type]
    assert_blames_argument(exc, "metadata", "dict")


URL = "s3://bucket/m.tv"


def _url_calls(tmp_path: Path) -> Iterator[tuple[str, str, Callable[[], object]]]:
    local = tmp_path / "model.tv"
    tv.save(state(), local)
    model = nn.Linear(2, 1)
    x = torch.randn(3, 2)
    yield "save", "path", lambda: tv.save(state(), URL)
    yield "load", "path", lambda: tv.load(URL)
    yield "inspect", "path", lambda: tv.inspect(URL)
    yield "verify", "path", lambda: tv.verify(URL)
    yield "load_into", "source", lambda: tv.load_into(model, URL)
    yield "load_legacy", "path", lambda: tv.load_legacy("gs://bucket/m.pt")
    yield "scan", "path", lambda: tv.scan("https://example.com/m.pt")
    yield "convert-source", "source", lambda: tv.convert(URL, tmp_path / "out.tv")
    yield "convert-destination", "destination", lambda: tv.convert(local, URL)
    yield "load_program", "path", lambda: tv.load_program("s3://bucket/m.pt2")
    yield "export_program", "path", lambda: tv.export_program(model, x, "s3://b/m.pt2")
    yield "export_onnx", "path", lambda: tv.export_onnx(model, x, "s3://b/m.onnx")
    yield "save_quantized", "path", lambda: tv.save_quantized(model, URL)
    yield "load_quantized", "path", lambda: tv.load_quantized(model, URL)
    yield "CheckpointManager", "directory", lambda: tv.CheckpointManager("s3://bucket/run")


URL_CALLS = [
    "save", "load", "inspect", "verify", "load_into", "load_legacy", "scan", "convert-source",
    "convert-destination", "load_program", "export_program", "export_onnx", "save_quantized",
    "load_quantized", "CheckpointManager",
]  # fmt: skip


@pytest.mark.parametrize("which", URL_CALLS)
def test_url_paths_are_refused_naming_the_argument(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    calls = {name: (arg, call) for name, arg, call in _url_calls(tmp_path)}
    arg, call = calls[which]
    before = set(os.listdir(tmp_path))
    exc = raised(call)
    assert_blames_argument(exc, arg, "URL", "not supported yet")
    assert set(os.listdir(tmp_path)) == before  # no folder named "s3:" or "gs:"


def test_manager_export_refuses_a_url(tmp_path: Path) -> None:
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, extra={"t": torch.zeros(1)})
        assert_blames_argument(raised(lambda: mgr.export(1, URL)), "path", "URL")


@pytest.mark.parametrize("path", [3, None, "m.tv\0", ""])
def test_a_path_of_the_wrong_type_or_value_names_path(path: Any) -> None:
    assert_blames_argument(raised(lambda: tv.load(path)), "path")
    assert_blames_argument(raised(lambda: tv.inspect(path)), "path")


def test_windows_drive_letters_are_paths_not_urls(tmp_path: Path) -> None:
    with pytest.raises(tv.CheckpointNotFoundError):
        tv.load(tmp_path / "C:" / "m.tv")


def test_a_url_folded_by_pathlib_is_still_refused(tmp_path: Path) -> None:
    """``Path("s3://bucket/m.tv")`` is ``s3:/bucket/m.tv``: still a URL, not a folder "s3:"."""
    exc = raised(lambda: tv.save(state(), Path("s3://bucket/m.tv")))
    assert_blames_argument(exc, "path", "URL")
