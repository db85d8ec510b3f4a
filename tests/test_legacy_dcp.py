"""Existing torch.distributed.checkpoint (DCP) folders, written by torch's own writers, read
in one process without unpickling anything: load, inspect, verify, load_into, convert, the
CLI and scan; and the chunk layout checked so that a bad folder gives an error, never wrong
data. The malicious ``.metadata`` corpus is in test_legacy_dcp_attacks.py."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter, HuggingFaceStorageWriter
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import torchvault as tv
from torchvault.cli import main

# dcp.save in one process says it assumes a single process: that is the setup here
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def nested_state() -> dict[str, Any]:
    torch.manual_seed(1)
    return {
        "model": model().state_dict(),
        "optim": {"step": 7, "lr": 0.5, "betas": [0.9, 0.99]},
        "ema": [
            torch.arange(6, dtype=torch.int32).reshape(2, 3),
            torch.ones(2, dtype=torch.bfloat16),
        ],
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "name": "run-1",
    }


def assert_same(a: object, b: object) -> None:
    """Equal structure, and tensors equal bit for bit with the same dtype and shape."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert (a.dtype, a.shape) == (b.dtype, b.shape)
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    elif isinstance(a, dict):
        assert isinstance(b, dict)
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple))
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


@pytest.fixture(scope="module")
def fs_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder written by dcp.save with FileSystemWriter, in one process (no process group)."""
    folder = tmp_path_factory.mktemp("dcp") / "ckpt"
    dcp.save(nested_state(), storage_writer=FileSystemWriter(folder))
    assert (folder / ".metadata").is_file()
    assert list(folder.glob("*.distcp"))
    return folder


def test_load_restores_the_nesting_dcp_recorded_with_every_value(fs_folder: Path) -> None:
    assert_same(tv.load(fs_folder), nested_state())


def test_loading_matches_dcp_to_torch_save_consolidation(fs_folder: Path, tmp_path: Path) -> None:
    dcp_to_torch_save(fs_folder, tmp_path / "full.pt")
    expected = torch.load(tmp_path / "full.pt", weights_only=False)  # torch's own consolidation
    assert_same(tv.load(fs_folder), expected)


def test_the_metadata_file_path_loads_its_folder(fs_folder: Path) -> None:
    assert_same(tv.load(fs_folder / ".metadata"), nested_state())
    with pytest.raises(tv.UnsupportedFormatError, match=r"tv\.load\(folder\)"):
        tv.load_legacy(fs_folder / ".metadata")  # a torch.save reader: the message says where


def test_inspect_lists_tensors_from_the_metadata_alone(fs_folder: Path, tmp_path: Path) -> None:
    copy = tmp_path / "ckpt"
    shutil.copytree(fs_folder, copy)
    for data in copy.glob("*.distcp"):
        data.write_bytes(b"")  # inspect must not read tensor data
    info = tv.inspect(copy)
    assert info.format == "dcp"
    shapes = {t.key: (t.dtype, t.shape) for t in info.tensors}
    assert shapes["model.0.weight"] == ("float32", (3, 4))
    assert shapes["ema.0"] == ("int32", (2, 3))
    assert shapes["ema.1"] == ("bfloat16", (2,))
    assert shapes["scalar"] == ("float32", ())
    assert shapes["empty"] == ("float32", (0, 3))
    assert "name" not in shapes


def test_verify_reads_every_item_and_checks_zip_crcs(fs_folder: Path, tmp_path: Path) -> None:
    report = tv.verify(fs_folder)
    assert report.tensors == 8
    assert report.checksummed
    copy = tmp_path / "ckpt"
    shutil.copytree(fs_folder, copy)
    data = next(copy.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    # flip a byte of tensor data inside the first archive: the zip CRC catches it
    at = raw.index(b"data/0") + 200
    raw[at] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(tv.CorruptCheckpointError, match=r"\.distcp"):
        tv.verify(copy)


def test_load_into_a_model(fs_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "weights"
    dcp.save(model().state_dict(), checkpoint_id=folder)
    target = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    tv.load_into(target, folder)
    assert_same(target.state_dict(), model().state_dict())


@pytest.mark.parametrize("name", ["model.tv", "model.safetensors", "model-hf"])
def test_convert_to_each_target(tmp_path: Path, name: str) -> None:
    folder = tmp_path / "weights"
    dcp.save(model().state_dict(), checkpoint_id=folder)
    out = tmp_path / name
    tv.convert(folder, out)
    if name.endswith(".safetensors"):
        assert_same(
            dict(sorted(load_file(out).items())), dict(sorted(model().state_dict().items()))
        )
    else:
        assert_same(dict(tv.load(out)), dict(model().state_dict()))


def test_convert_keeps_nested_state_in_a_torchvault_file(fs_folder: Path, tmp_path: Path) -> None:
    tv.convert(fs_folder, tmp_path / "all.tv")
    assert_same(tv.load(tmp_path / "all.tv"), nested_state())


def test_cli_inspect_verify_convert(
    fs_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(fs_folder)]) == 0
    assert "model.0.weight" in capsys.readouterr().out
    assert main(["verify", str(fs_folder)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["convert", str(fs_folder), str(tmp_path / "out.tv")]) == 0
    assert_same(tv.load(tmp_path / "out.tv"), nested_state())


def test_scan_reads_the_metadata_with_dcps_allowlist(fs_folder: Path) -> None:
    report = tv.scan(fs_folder)
    assert report.safe, report.anomalies
    assert report.format == "dcp"
    assert str(fs_folder / ".metadata") in report.files
    assert any(g.name.endswith("TensorStorageMetadata") and g.allowed for g in report.globals)


def test_scan_of_a_folder_whose_metadata_runs_code_is_unsafe(
    fs_folder: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "ckpt"
    shutil.copytree(fs_folder, copy)
    marker = tmp_path / "marker"
    (copy / ".metadata").write_bytes(pickle.dumps(_System(f"touch {marker}"), protocol=4))
    report = tv.scan(copy)
    assert not report.safe
    assert "posix.system" in report.unsafe_globals
    with pytest.raises(tv.UnsafeCheckpointError, match=r"posix\.system"):
        tv.load(copy)
    assert not marker.exists()


class _System:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (self.command,)


# -- HuggingFaceStorageWriter --------------------------------------------------------------


def test_hugging_face_writer_output_reads_and_converts(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    state = dict(model().state_dict())
    dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(folder)))
    assert_same(dict(sorted(tv.load(folder).items())), dict(sorted(state.items())))
    tv.convert(folder, tmp_path / "out.safetensors")
    assert_same(
        dict(sorted(load_file(tmp_path / "out.safetensors").items())), dict(sorted(state.items()))
    )


def test_hugging_face_writer_distributed_shards_read(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    state = dict(model().state_dict())
    dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True))
    assert not (folder / "model.safetensors.index.json").exists()
    assert_same(dict(sorted(tv.load(folder).items())), dict(sorted(state.items())))
    assert tv.inspect(folder).format == "dcp-hf"
    assert tv.verify(folder).tensors == len(state)


# -- several ranks: tensors in chunks ------------------------------------------------------


def _write_sharded(rank: int, world: int, root: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        full = sharded_full()
        state = {
            "model": {
                "w": distribute_tensor(full["w"], mesh, [Shard(0)]),  # 5 rows: 3 + 2
                "v": distribute_tensor(full["v"], mesh, [Shard(1)]),
                "b": full["b"],  # replicated: written once
            },
            "step": 3,
        }
        dcp.save(state, checkpoint_id=f"{root}/fs")
        hf = {"w": state["model"]["w"], "v": state["model"]["v"]}
        dcp.save(hf, storage_writer=HuggingFaceStorageWriter(f"{root}/hf", save_distributed=True))
    finally:
        dist.destroy_process_group()


def sharded_full() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {
        "w": torch.randn(5, 4, generator=gen),
        "v": torch.randn(3, 6, generator=gen).to(torch.float64),
        "b": torch.arange(4.0),
    }


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DCP folders written by 2 gloo processes: every sharded tensor is in 2 chunks."""
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("sharded")
    mp.spawn(_write_sharded, args=(2, str(root)), nprocs=2, join=True)
    return root


def test_chunks_from_two_ranks_assemble_into_whole_tensors(sharded: Path, tmp_path: Path) -> None:
    assert len(list((sharded / "fs").glob("*.distcp"))) == 2
    full = sharded_full()
    loaded = tv.load(sharded / "fs")
    assert_same(loaded, {"model": {"w": full["w"], "v": full["v"], "b": full["b"]}, "step": 3})
    dcp_to_torch_save(sharded / "fs", tmp_path / "full.pt")
    assert_same(loaded, torch.load(tmp_path / "full.pt", weights_only=False))
    tv.convert(sharded / "fs", tmp_path / "model.tv")
    assert_same(tv.load(tmp_path / "model.tv"), loaded)


def test_hugging_face_shards_from_two_ranks_assemble(sharded: Path, tmp_path: Path) -> None:
    assert len(list((sharded / "hf").glob("shard-*.safetensors"))) == 2
    full = sharded_full()
    assert_same(dict(sorted(tv.load(sharded / "hf").items())), {"v": full["v"], "w": full["w"]})
    tv.convert(sharded / "hf", tmp_path / "out.safetensors")
    assert torch.equal(load_file(tmp_path / "out.safetensors")["w"], full["w"])


@pytest.mark.parametrize("layout", ["fs", "hf"])
def test_map_location_places_assembled_tensors(sharded: Path, layout: str) -> None:
    state = tv.load(sharded / layout, map_location="meta")
    tensors = state["model"] if layout == "fs" else state
    assert {t.device.type for t in tensors.values() if isinstance(t, torch.Tensor)} == {"meta"}
    assert tensors["w"].shape == (5, 4)
