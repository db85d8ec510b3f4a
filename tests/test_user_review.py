"""Mistakes a new user made after issue 10, each a test: a wrong argument is a TypeError or
ValueError naming it, a wrong file a torchvault error naming the file, and nothing is silently
wrong (an argument read for its truthiness, a step reference misread)."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import pytest
import torch

import torchvault as tv
from torchvault.cli import main
from torchvault.errors import TorchVaultError


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


# ----------------------------------------------------------------------------- manager


def test_a_manager_on_a_file_is_a_torchvault_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "model.tv").write_bytes(b"x")
    with pytest.raises(TorchVaultError, match=r"model\.tv is a file, not a run folder") as info:
        tv.CheckpointManager(tmp_path / "model.tv")
    assert info.value.path == str(tmp_path / "model.tv")
    assert (tmp_path / "model.tv").read_bytes() == b"x"


def test_a_manager_under_a_file_is_a_torchvault_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "model.tv").write_bytes(b"x")
    with pytest.raises(TorchVaultError, match=r"model\.tv") as info:
        tv.CheckpointManager(tmp_path / "model.tv" / "run")
    assert info.value.path is not None


@pytest.mark.parametrize("ref", ["best", "latest"])
def test_manager_export_program_takes_best_and_latest_as_load_does(
    tmp_path: Path, ref: str
) -> None:
    model = net()
    with tv.CheckpointManager(tmp_path / "run", monitor="loss") as mgr:
        mgr.save(1, model=model, metrics={"loss": 0.1})
        mgr.save(2, model=model, metrics={"loss": 0.5})
        mgr.export_program(ref, model, (torch.zeros(1, 4),), validate=False)
    want = 1 if ref == "best" else 2
    assert tv.load_program(tmp_path / "run", step=want) is not None


@pytest.mark.parametrize("step", ["bestt", 1.0, None])
def test_manager_export_program_names_a_wrong_step(tmp_path: Path, step: object) -> None:
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, model=net())
        with pytest.raises((TypeError, ValueError), match=r"\bstep\b"):
            mgr.export_program(step, net(), (torch.zeros(1, 4),), validate=False)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["no", 1, None])
def test_async_save_must_be_a_bool(tmp_path: Path, value: object) -> None:
    # "no" is truthy: read for its truthiness it would switch async saving on
    with pytest.raises(TypeError, match=r"async_save must be True or False"):
        tv.CheckpointManager(tmp_path / "run", async_save=value)  # type: ignore[arg-type]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["no", 0, None])
def test_prune_dry_run_must_be_a_bool(tmp_path: Path, value: object) -> None:
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, model=net())
        with pytest.raises(TypeError, match=r"dry_run must be True or False"):
            mgr.prune(dry_run=value)  # type: ignore[arg-type]


def test_restore_checks_strict_before_reading_the_checkpoint(tmp_path: Path) -> None:
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, other=net())
        # the targets differ from the saved items: a mismatch, but strict itself is wrong
        with pytest.raises(TypeError, match=r"strict must be True or False"):
            mgr.restore(model=net(), strict="no")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- files


def test_convert_salvage_must_be_a_bool(tmp_path: Path) -> None:
    tv.save(net(), tmp_path / "m.tv")
    with pytest.raises(TypeError, match=r"salvage must be True or False"):
        tv.convert(tmp_path / "m.tv", tmp_path / "o.tv", salvage="no")  # type: ignore[arg-type]


@pytest.mark.parametrize("metadata", [{1: "a"}, {"epoch": 3}])
def test_bad_metadata_is_a_plain_argument_error_not_a_file_error(
    tmp_path: Path, metadata: dict[object, object]
) -> None:
    # a torchvault error means the file; metadata is the caller's argument
    with pytest.raises(TypeError, match=r"\bmetadata\b") as info:
        tv.save(net(), tmp_path / "m.tv", metadata=metadata)  # type: ignore[arg-type]
    assert not isinstance(info.value, TorchVaultError)


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    ("flag", "value"), [("--rtol", "-1"), ("--atol", "nan"), ("--rtol", "inf")]
)
@pytest.mark.parametrize("kind", ["onnx", "program"])
def test_cli_export_refuses_a_bad_tolerance_as_a_usage_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kind: str,
    flag: str,
    value: str,
) -> None:
    (tmp_path / "nets_for_review_test.py").write_text(
        "import torch\n\ndef make():\n    return torch.nn.Linear(4, 2)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["export", kind, "--model", "nets_for_review_test:make", "--input-shape", "1,4"]
    code = main([*argv, flag, value, str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert flag in err
    assert "internal error" not in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- load_into


class Old(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Linear(3, 3)
        self.head = torch.nn.Linear(3, 1)


class New(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.Linear(3, 3)
        self.head = torch.nn.Linear(3, 1)


def _wrapped(kind: str) -> torch.nn.Module:
    new = New()
    if kind == "plain":
        return new
    if kind == "dataparallel":
        return torch.nn.DataParallel(new)
    return torch.compile(new)  # type: ignore[return-value]


@pytest.mark.parametrize("target", ["plain", "dataparallel", "compiled"])
@pytest.mark.parametrize("rename", [{"features.": "backbone."}, {"module.features.": "backbone."}])
def test_rename_on_a_dataparallel_file_works_for_every_wrapper_of_the_model(
    tmp_path: Path, target: str, rename: dict[str, str]
) -> None:
    torch.manual_seed(0)
    old = Old()
    tv.save(torch.nn.DataParallel(old).state_dict(), tmp_path / "dp.tv")
    model = _wrapped(target)
    report = tv.load_into(model, tmp_path / "dp.tv", rename=rename)
    assert report.ok
    # DataParallel moves a module to cuda:0 when a GPU is there: compare on the CPU
    assert torch.equal(model.state_dict()[report.loaded[0]].cpu(), old.features.weight.cpu())
    moved = {r.source: r.target for r in report.renamed}
    assert moved["module.features.weight"] == report.loaded[0]
    assert report.loaded[0].endswith("backbone.weight")


def test_load_into_with_map_location_meta_names_map_location(tmp_path: Path) -> None:
    tv.save(net(), tmp_path / "m.tv")
    with pytest.raises(ValueError, match=r"\bmap_location\b"):
        tv.load_into(net(), tmp_path / "m.tv", map_location="meta")


@pytest.mark.parametrize("kind", ["module", "state dict"])
def test_load_into_from_meta_tensors_names_source(kind: str) -> None:
    source: object = net().to("meta")
    if kind == "state dict":
        source = source.state_dict()  # type: ignore[union-attr]
    with pytest.raises(ValueError, match=r"\bsource\b.*meta"):
        tv.load_into(net(), source)  # type: ignore[arg-type]


def test_load_into_a_meta_module_is_refused_not_reported_loaded(tmp_path: Path) -> None:
    # copying into a meta tensor is a no-op: a report saying "loaded" would be a lie
    tv.save(net(), tmp_path / "m.tv")
    with pytest.raises(ValueError, match=r"\bmodule\b.*meta.*to_empty"):
        tv.load_into(net().to("meta"), tmp_path / "m.tv")


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_cli_run_at_step_without_a_run_is_a_usage_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    code = main([command, "@1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "'@1'" in err
    assert "RUN@STEP" in err


@pytest.mark.parametrize("spec", ["@1", "RUN@x"])
@pytest.mark.parametrize("side", ["a", "b"])
def test_diff_names_the_side_whose_run_at_step_is_malformed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str, side: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with tv.CheckpointManager(tmp_path / "RUN") as mgr:
        mgr.save(1, model=net())
    tv.save(net(), tmp_path / "m.tv")
    sides = {"a": "m.tv", "b": "m.tv", side: spec}
    with pytest.raises(ValueError, match=rf"^{side} "):
        tv.diff(**sides)


# ----------------------------------------------------------------------------- programs


def test_load_program_step_0_is_step_0_never_the_latest(tmp_path: Path) -> None:
    model = net()
    with tv.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(0, model=model)
        mgr.save(1, model=model)
        mgr.export_program(1, model, (torch.zeros(1, 4),), validate=False)
    # step 0 has no program: asking for it must say so, not hand over step 1's
    with pytest.raises(tv.CheckpointNotFoundError, match=r"step 0 of .* has no program"):
        tv.load_program(tmp_path / "run", step=0)


@pytest.mark.parametrize("step", [3, "best", 1.5])
def test_load_program_of_a_file_with_a_step_names_step(tmp_path: Path, step: object) -> None:
    tv.export_program(net(), (torch.zeros(1, 4),), tmp_path / "p.pt2", validate=False)
    with pytest.raises((TypeError, ValueError), match=r"\bstep\b"):
        tv.load_program(tmp_path / "p.pt2", step=step)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
def test_a_nested_tensor_is_unsupported_naming_its_place(tmp_path: Path, layout: object) -> None:
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=layout)
    with pytest.raises(tv.UnsupportedTypeError, match=r"`batch\.x` is a .*[nN]ested.*unbind"):
        tv.save({"batch": {"x": nested}}, tmp_path / "n.tv")
    assert not (tmp_path / "n.tv").exists()


# ----------------------------------------------------------------------------- file objects


@pytest.mark.parametrize("kind", ["bytesio", "file"])
def test_saving_over_longer_content_of_a_file_object_leaves_a_loadable_checkpoint(
    tmp_path: Path, kind: str
) -> None:
    # save(state, f) after f.seek(0) overwrites, as open(..., "wb") would: stale bytes left
    # after the checkpoint would make every later load refuse it
    model = net()
    handle = io.BytesIO() if kind == "bytesio" else open(tmp_path / "f.bin", "w+b")  # noqa: SIM115
    with handle:
        handle.write(b"x" * 100_000)
        handle.seek(0)
        report = tv.save(model, handle)
        assert handle.tell() == report.file_bytes
        handle.seek(0)
        state = tv.load(handle)
    assert torch.equal(state["0.weight"], model[0].weight)


def test_a_stream_that_cannot_seek_back_is_a_value_error_naming_path(tmp_path: Path) -> None:
    handle = gzip.open(tmp_path / "m.tv.gz", "wb")  # noqa: SIM115
    with handle, pytest.raises(ValueError, match=r"`path` .*seek back.*BytesIO"):
        tv.save(net(), handle)
