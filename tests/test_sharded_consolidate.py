"""One process reads a sharded run checkpoint whole: ``tv.load``/``inspect``/``verify``/
``diff``/``convert`` and the CLI on ``RUN@STEP``, checked against DCP's own consolidation;
damaged or crafted manifests refused with errors naming them, never wrong data; user
mistakes named. The sharded checkpoints come from ONE spawn of 2 gloo ranks (FSDP2)."""

from __future__ import annotations

import json
import shutil
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch import nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import torchvault as tv
from dist_harness import run_ranks
from torchvault.cli import main
from torchvault.run import _sharded
from torchvault.run._store import RunStore, seal
from torchvault.storage._lock import RunLock

MANAGED_ITEMS = {"model": "state", "optimizer": "state", "epoch": "value"}


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 15), nn.ReLU(), nn.Linear(15, 7))


def _save_sharded(rank: int, world: int, root: str) -> None:
    """On every rank: an FSDP2 model and AdamW state, saved through StorageWriter (as
    ``dcp.save`` directly, and as a manager lays it out) and through DCP's own writer."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from torchvault.distributed import StorageWriter

    model = make_model()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    torch.manual_seed(1)

    def train() -> dict[str, Any]:
        model(torch.randn(4, 16)).sum().backward()
        opt.step()
        opt.zero_grad()
        msd, osd = get_state_dict(model, opt)
        return {"model": msd, "optimizer": osd, "epoch": 3}

    state = train()
    state = train()
    dcp.save(state, storage_writer=StorageWriter(f"{root}/direct", step=1, block_bytes=64))
    dcp.save(state, storage_writer=FileSystemWriter(f"{root}/fs"))
    for step in (4, 6):
        writer = StorageWriter(f"{root}/managed", step=step, block_bytes=64)
        writer.extra = {"items": MANAGED_ITEMS}  # what the collective manager records
        dcp.save({"items": state}, storage_writer=writer)
        state = train()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``direct`` (dcp.save with StorageWriter, step 1), ``managed`` (steps 4 and 6, items
    model/optimizer/epoch) and ``fs`` (FileSystemWriter, same state as direct@1), and
    ``expected.pt``: ``fs`` consolidated by DCP's ``dcp_to_torch_save``."""
    root = tmp_path_factory.mktemp("sharded")
    run_ranks(_save_sharded, 2, str(root))
    dcp_to_torch_save(root / "fs", root / "expected.pt")
    return root


def expected(saved: Path) -> dict[str, Any]:
    return torch.load(saved / "expected.pt", weights_only=True)  # type: ignore[no-any-return]


def assert_same(a: object, b: object, where: str = "") -> None:
    """Equal structure, types, dtypes and bits."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), where  # type: ignore[call-overload]
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")  # type: ignore[index]
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where  # type: ignore[arg-type]
        for i, (x, y) in enumerate(zip(a, b, strict=True)):  # type: ignore[call-overload]
            assert_same(x, y, f"{where}.{i}")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert a.numpy().tobytes() == b.numpy().tobytes(), where
    else:
        assert a == b, where


def copy_run(saved: Path, name: str, tmp_path: Path) -> Path:
    shutil.copytree(saved / name, tmp_path / name)
    return tmp_path / name


def classic_run(path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A single-process manager run: steps 0, 1, 2, losses ranking step 1 best."""
    model = nn.Linear(3, 2)
    kept = {}
    with tv.CheckpointManager(path, monitor="loss") as manager:
        for step, loss in enumerate((0.5, 0.1, 0.3)):
            with torch.no_grad():
                model.weight.fill_(float(step))
            manager.save(step, metrics={"loss": loss}, model=model, epoch=step)
            kept[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return path, kept[1]


# -- tv.load ------------------------------------------------------------------------------


def test_load_of_a_sharded_run_equals_dcps_own_consolidation(saved: Path) -> None:
    assert_same(tv.load(f"{saved}/direct@latest"), expected(saved))
    assert_same(tv.load(f"{saved}/direct@1"), expected(saved))


def test_load_of_a_manager_checkpoint_gives_its_items(saved: Path) -> None:
    # step 4 holds the same state as direct@1, nested under the manager's items
    assert_same(tv.load(f"{saved}/managed@4"), expected(saved))
    assert set(tv.load(f"{saved}/managed@latest")) == set(MANAGED_ITEMS)


def test_a_bare_run_folder_loads_its_latest(saved: Path) -> None:
    assert_same(tv.load(saved / "managed"), tv.load(f"{saved}/managed@6"))


def test_load_honours_map_location(saved: Path) -> None:
    state = tv.load(f"{saved}/managed@4", map_location="meta")
    assert state["model"]["0.weight"].device.type == "meta"
    assert state["optimizer"]["state"]["0.weight"]["exp_avg"].shape == (15, 16)


def test_load_takes_no_lock_and_writes_nothing(saved: Path, tmp_path: Path) -> None:
    run = copy_run(saved, "managed", tmp_path)
    lock = RunLock(run / "lock")  # a trainer writing the run holds it
    before = sorted((p, p.stat().st_mtime_ns) for p in run.rglob("*"))
    try:
        tv.load(f"{run}@4")
        tv.inspect(f"{run}@4")
        tv.verify(f"{run}@4")
    finally:
        lock.release()
    assert sorted((p, p.stat().st_mtime_ns) for p in run.rglob("*")) == before


def test_load_of_a_classic_run_checkpoint(tmp_path: Path) -> None:
    run, best = classic_run(tmp_path / "run")
    state = tv.load(f"{run}@best")
    assert set(state) == {"model", "epoch"}
    assert state["epoch"] == 1
    assert_same(dict(state["model"]), best)
    assert tv.load(run)["epoch"] == 2
    info = tv.inspect(f"{run}@best")
    assert info.format == "torchvault-run"
    assert info.keys == ("model.weight", "model.bias")
    assert tv.verify(f"{run}@0").tensors == 2


def test_a_file_whose_name_holds_an_at_is_still_a_file(tmp_path: Path) -> None:
    tv.save({"w": torch.ones(2)}, tmp_path / "model@1.tv")
    assert torch.equal(tv.load(tmp_path / "model@1.tv")["w"], torch.ones(2))
    assert tv.inspect(str(tmp_path / "model@1.tv")).keys == ("w",)


def test_a_folder_whose_name_holds_an_at_is_still_that_folder(tmp_path: Path) -> None:
    # a Hugging Face folder "model@2" is the folder, not step 2 of a run named "model"
    tv.convert(_file(tmp_path), tmp_path / "model@2", to="hf")
    assert torch.equal(tv.load(tmp_path / "model@2")["w"], torch.ones(2))
    assert tv.inspect(f"{tmp_path}/model@2").keys == ("w",)
    assert main(["inspect", f"{tmp_path}/model@2"]) == 0


def _file(folder: Path) -> Path:
    tv.save({"w": torch.ones(2)}, folder / "w.tv")
    return folder / "w.tv"


# -- tv.inspect, tv.verify, tv.diff -------------------------------------------------------


def test_inspect_reads_global_shapes_from_the_manifest_alone(saved: Path, tmp_path: Path) -> None:
    run = copy_run(saved, "managed", tmp_path)
    shutil.rmtree(run / "objects")  # nothing but the manifest may be read
    info = tv.inspect(f"{run}@latest")
    assert info.format == "torchvault-run-sharded"
    assert info.path == f"{run}@6"
    shapes = {t.key: (t.dtype, t.shape) for t in info.tensors}
    assert shapes["model.0.weight"] == ("float32", (15, 16))
    assert shapes["optimizer.state.2.weight.exp_avg_sq"] == ("float32", (7, 15))
    assert shapes["optimizer.state.0.bias.step"] == ("float32", ())
    assert len(shapes) == 16


def test_verify_hashes_every_object(saved: Path) -> None:
    report = tv.verify(f"{saved}/managed@4")
    store = RunStore(saved / "managed")
    unique = {b[0]: b[3] for b in store.manifest(4)["blobs"]}
    assert (report.tensors, report.checked_bytes) == (16, sum(unique.values()))
    assert report.checksummed
    assert report.path == f"{saved}/managed@4"


def test_diff_of_sharded_checkpoints(saved: Path) -> None:
    same = tv.diff(f"{saved}/managed@4", f"{saved}/direct@1")
    assert same.identical
    report = tv.diff(f"{saved}/managed@4", f"{saved}/managed@6", item="model")
    assert {c.key for c in report.changed} == {"0.weight", "0.bias", "2.weight", "2.bias"}


# -- tv.convert ---------------------------------------------------------------------------


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118


@pytest.mark.parametrize("source", ["managed@4", "direct@1", "direct"])
def test_convert_to_safetensors_writes_the_model(saved: Path, tmp_path: Path, source: str) -> None:
    report = tv.convert(f"{saved}/{source}", tmp_path / "model.safetensors")
    assert report.tensors == 4
    assert_same(read_safetensors(tmp_path / "model.safetensors"), expected(saved)["model"])


def test_convert_to_a_hugging_face_folder(saved: Path, tmp_path: Path) -> None:
    report = tv.convert(f"{saved}/managed@4", tmp_path / "hf", to="hf", max_shard_size=1000)
    assert len(report.files) > 2  # sharded, with an index
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    got: dict[str, torch.Tensor] = {}
    for name in sorted(set(index["weight_map"].values())):
        got |= read_safetensors(tmp_path / "hf" / name)
    assert_same(got, expected(saved)["model"])


def test_convert_of_an_item_and_of_every_item(saved: Path, tmp_path: Path) -> None:
    tv.convert(f"{saved}/managed@4", tmp_path / "all.tv")
    assert_same(tv.load(tmp_path / "all.tv"), expected(saved))
    tv.convert(f"{saved}/managed@4", tmp_path / "opt.tv", item="optimizer")
    assert_same(tv.load(tmp_path / "opt.tv"), expected(saved)["optimizer"])
    tv.convert(f"{saved}/managed@4", tmp_path / "model.pt", item="model")
    assert_same(torch.load(tmp_path / "model.pt", weights_only=True), expected(saved)["model"])


def test_convert_of_a_classic_run_checkpoint(tmp_path: Path) -> None:
    run, best = classic_run(tmp_path / "run")
    tv.convert(f"{run}@best", tmp_path / "hf", to="hf")
    assert_same(read_safetensors(tmp_path / "hf" / "model.safetensors"), best)


def test_convert_streams_one_whole_tensor_at_a_time(
    saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assembled: list[weakref.ref[torch.Tensor]] = []
    real = _sharded.tensor

    def tracked(*args: Any) -> torch.Tensor:
        assert all(ref() is None for ref in assembled), "an earlier tensor is still held"
        out = real(*args)
        assembled.append(weakref.ref(out))
        return out

    monkeypatch.setattr(_sharded, "tensor", tracked)
    tv.convert(f"{saved}/managed@4", tmp_path / "model.safetensors")
    tv.convert(f"{saved}/direct@1", tmp_path / "hf", to="hf")
    assert len(assembled) == 8
    assert_same(read_safetensors(tmp_path / "model.safetensors"), expected(saved)["model"])
    tv.convert(f"{saved}/managed@4", tmp_path / "all.tv")  # nested, with values: streamed too
    assert len(assembled) == 8 + 16
    assert_same(tv.load(tmp_path / "all.tv"), expected(saved))


def test_convert_of_a_dcp_folder_to_torchvault_streams(
    saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvault.legacy import _dcp

    assembled: list[weakref.ref[torch.Tensor]] = []
    real = _dcp._Folder.tensor

    def tracked(self: Any, *args: Any) -> torch.Tensor:
        assert all(ref() is None for ref in assembled), "an earlier tensor is still held"
        out = real(self, *args)
        assembled.append(weakref.ref(out))
        return out

    monkeypatch.setattr(_dcp._Folder, "tensor", tracked)
    report = tv.convert(saved / "fs", tmp_path / "all.tv")
    assert (report.tensors, len(assembled)) == (16, 16)
    assert_same(tv.load(tmp_path / "all.tv"), expected(saved))


# -- the command line ---------------------------------------------------------------------


def test_cli_inspect_verify_diff_convert(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    managed = saved / "managed"
    assert main(["inspect", f"{managed}@4"]) == 0
    out = capsys.readouterr().out
    assert "model.0.weight" in out
    assert main(["inspect", "--json", f"{managed}@4"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {t["key"]: t["shape"] for t in info["tensors"]}["model.2.weight"] == [7, 15]
    assert main(["verify", f"{managed}@4"]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["verify", str(managed)]) == 0  # every committed checkpoint
    assert "all 2 OK" in capsys.readouterr().out
    assert main(["diff", f"{managed}@4", f"{saved}/direct@1"]) == 0
    assert main(["diff", "--exit-code", f"{managed}@4", f"{managed}@6"]) == 1
    assert "model.0.weight" in capsys.readouterr().out
    assert main(["convert", f"{managed}@4", str(tmp_path / "m.safetensors")]) == 0
    assert_same(read_safetensors(tmp_path / "m.safetensors"), expected(saved)["model"])
    assert main(["convert", f"{managed}@4", str(tmp_path / "o.tv"), "--item", "optimizer"]) == 0
    assert_same(tv.load(tmp_path / "o.tv"), expected(saved)["optimizer"])
    capsys.readouterr()


def test_cli_convert_mistakes_are_usage_errors(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["convert", f"{saved}/managed@soon", str(tmp_path / "m.tv")]) == 2
    assert "'soon' is not a step" in capsys.readouterr().err
    tv.save({"w": torch.ones(1)}, tmp_path / "w.tv")
    args = ["convert", str(tmp_path / "w.tv"), str(tmp_path / "x.tv"), "--item", "model"]
    assert main(args) == 2
    assert "--item 'model' applies only to a run's checkpoint" in capsys.readouterr().err
    assert main(["convert", f"{saved}/managed@4", str(tmp_path / "x.tv"), "--item", "nope"]) == 3
    assert "no item 'nope'" in capsys.readouterr().err


# -- tv.scan ------------------------------------------------------------------------------


def test_scan_of_a_sharded_run_is_safe_and_assembles_nothing(
    saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_: object) -> torch.Tensor:
        raise AssertionError("scan verifies objects; it needs no whole tensor")

    monkeypatch.setattr(_sharded, "tensor", refuse)
    report = tv.scan(saved / "managed")
    assert report.safe, report.anomalies
    assert report.format == "run"
    assert len(report.files) == 2


def test_scan_reports_a_damaged_object_of_a_sharded_run(saved: Path, tmp_path: Path) -> None:
    run = copy_run(saved, "managed", tmp_path)
    digest = RunStore(run).manifest(4)["blobs"][0][0]
    flip_byte(run / "objects" / digest)
    report = tv.scan(run)
    assert not report.safe
    assert any("step-000000000004.json" in a for a in report.anomalies)


# -- damaged or crafted manifests ---------------------------------------------------------


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))


W = "items.model.0.weight"  # 15 x 16 float32: one 64-byte object per row (block_bytes=64)


def _chunks(m: dict[str, Any]) -> list[Any]:
    return m["shards"]["tensors"][W][2]  # type: ignore[no-any-return]


def _other_blob(m: dict[str, Any], shape: list[int]) -> int:
    return next(i for i, b in enumerate(m["blobs"]) if b[2] == shape)


def _value_group(m: dict[str, Any]) -> dict[str, Any]:
    return m["shards"]["values"][0][0]["dict"]  # type: ignore[no-any-return]


EDITS: dict[str, tuple[Callable[[dict[str, Any]], object], str | None]] = {
    # name: (edit of the manifest, the key the error must name)
    "overlapping chunks": (lambda m: _chunks(m).append(list(_chunks(m)[0])), W),
    "a gap": (lambda m: _chunks(m).pop(3), W),
    "a chunk past the global shape": (lambda m: _chunks(m).append([[15, 0], 0]), W),
    "a negative offset": (lambda m: _chunks(m)[0].__setitem__(0, [-1, 0]), W),
    "an offset of the wrong rank": (lambda m: _chunks(m)[0].__setitem__(0, [0]), W),
    "an object of the wrong dtype": (
        lambda m: m["shards"]["tensors"][W].__setitem__(0, "F16"), W),
    "an object of the wrong shape": (
        lambda m: _chunks(m)[1].__setitem__(1, _other_blob(m, [1, 15])), W),
    "an object of the wrong rank": (
        lambda m: _chunks(m)[1].__setitem__(1, _other_blob(m, [8])), W),
    "a blob index out of range": (
        lambda m: _chunks(m)[1].__setitem__(1, len(m["blobs"]) + 5), W),
    "an unknown dtype": (lambda m: m["shards"]["tensors"][W].__setitem__(0, "X99"), W),
    "a malformed global shape": (
        lambda m: m["shards"]["tensors"][W].__setitem__(1, [15, -16]), W),
    "world_size not an int": (lambda m: m.__setitem__("world_size", "2"), None),
    "world_size 0": (lambda m: m.__setitem__("world_size", 0), None),
    "an empty path": (lambda m: m["shards"]["paths"].__setitem__(W, []), W),
    "a path of a dict": (lambda m: m["shards"]["paths"].__setitem__(W, [{"a": 1}]), W),
    "a tensor without a path": (lambda m: m["shards"]["paths"].pop(W), W),
    "a value key that is also a tensor key": (lambda m: _value_group(m).__setitem__(W, 1), W),
    "a value group out of range": (
        lambda m: m["shards"]["values"][0].__setitem__(2, [len(m["blobs"])]), None),
    "a shards section with an unknown field": (
        lambda m: m["shards"].__setitem__("extra", {}), None),
    "a malformed object entry": (lambda m: m["blobs"][0].__setitem__(3, -1), None),
}  # fmt: skip


def reseal(run: Path, step: int, edit: Callable[[dict[str, Any]], object]) -> Path:
    """Edit a committed manifest and seal it again, so that only the reader's own checks
    stand between the edit and the data."""
    path = RunStore(run).manifest_path(step)
    manifest = RunStore(run).manifest(step)
    edit(manifest)
    path.write_bytes(seal(manifest))
    return path


@pytest.mark.parametrize("case", sorted(EDITS))
def test_a_crafted_manifest_is_refused_naming_it_and_the_key(
    saved: Path, tmp_path: Path, case: str
) -> None:
    run = copy_run(saved, "managed", tmp_path)
    edit, key = EDITS[case]
    manifest = reseal(run, 4, edit)
    RunStore(run).manifest(4)  # the seal holds: the edit reaches the sharded reader
    for read in (tv.load, tv.verify, tv.inspect):
        with pytest.raises(tv.CorruptCheckpointError) as caught:
            read(f"{run}@4")
        assert str(manifest) in caught.value.message, (read, caught.value.message)
        if key is not None:
            assert repr(key) in caught.value.message or key in caught.value.message
    with pytest.raises(tv.CorruptCheckpointError):
        tv.convert(f"{run}@4", tmp_path / "model.safetensors")
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("damage", ["missing", "flipped"])
def test_a_damaged_object_is_refused_naming_the_manifest(
    saved: Path, tmp_path: Path, damage: str
) -> None:
    run = copy_run(saved, "managed", tmp_path)
    digest = RunStore(run).manifest(4)["blobs"][_chunks(RunStore(run).manifest(4))[5][1]][0]
    if damage == "missing":
        (run / "objects" / digest).unlink()
    else:
        flip_byte(run / "objects" / digest)
    manifest = str(RunStore(run).manifest_path(4))
    for read in (tv.load, tv.verify):
        with pytest.raises(tv.CorruptCheckpointError, match=digest) as caught:
            read(f"{run}@4")
        assert manifest in caught.value.message
    with pytest.raises(tv.CorruptCheckpointError, match=digest):
        tv.convert(f"{run}@4", tmp_path / "model.safetensors")
    assert not (tmp_path / "model.safetensors").exists()


# -- user mistakes ------------------------------------------------------------------------


def test_a_step_that_is_not_a_step_is_a_value_error_naming_it(saved: Path) -> None:
    for call in (tv.load, tv.inspect, tv.verify):
        with pytest.raises(ValueError, match=r"managed@nope.*'nope' is not a step"):
            call(f"{saved}/managed@nope")
    with pytest.raises(ValueError, match=r"source .*managed@nope"):
        tv.convert(f"{saved}/managed@nope", "x.tv")


def test_a_step_not_committed_is_not_found(saved: Path) -> None:
    with pytest.raises(tv.CheckpointNotFoundError, match="step 99 is not committed"):
        tv.load(f"{saved}/managed@99")
    with pytest.raises(tv.CheckpointNotFoundError, match="no best checkpoint"):
        tv.load(f"{saved}/managed@best")  # saved without a metric


def test_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    with pytest.raises(tv.UnsupportedFormatError, match="not a torchvault run folder"):
        tv.load(f"{tmp_path}/plain@1")
    with pytest.raises(tv.CheckpointNotFoundError, match="no run at"):
        tv.load(f"{tmp_path}/missing@latest")
    with pytest.raises(ValueError, match="the run folder before '@' is missing"):
        tv.load("@1")


def test_an_empty_run_has_no_checkpoint(tmp_path: Path) -> None:
    tv.CheckpointManager(tmp_path / "run").close()
    with pytest.raises(tv.CheckpointNotFoundError, match="no checkpoint yet"):
        tv.load(tmp_path / "run")


def test_convert_item_mistakes(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(tv.CheckpointNotFoundError, match=r"no item 'nope'.*'epoch'"):
        tv.convert(f"{saved}/managed@4", tmp_path / "x.safetensors", item="nope")
    with pytest.raises(TypeError, match="`item` must be an item name"):
        tv.convert(f"{saved}/managed@4", tmp_path / "x.tv", item=3)  # type: ignore[arg-type]
    with pytest.raises(tv.UnsupportedTypeError, match=r"item 'optimizer'.*to='tv'"):
        tv.convert(f"{saved}/managed@4", tmp_path / "x.safetensors", item="optimizer")
    tv.save({"w": torch.ones(1)}, tmp_path / "w.tv")
    with pytest.raises(ValueError, match="item='model' applies only to a run's checkpoint"):
        tv.convert(tmp_path / "w.tv", tmp_path / "x.tv", item="model")


def test_convert_asks_which_of_several_models(tmp_path: Path) -> None:
    with tv.CheckpointManager(tmp_path / "run") as manager:
        manager.save(0, model=nn.Linear(2, 2), ema=nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"several state dicts of tensors \(ema, model\)"):
        tv.convert(tmp_path / "run", tmp_path / "x.safetensors")
    tv.convert(tmp_path / "run", tmp_path / "x.safetensors", item="ema")
    assert set(read_safetensors(tmp_path / "x.safetensors")) == {"weight", "bias"}
