"""CUDA paths: run wherever a GPU is present (CI machines have none, so these skip there)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import torchvault as tv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_tensors_are_written_from_the_cpu_and_load_on_the_cpu(tmp_path: Path) -> None:
    state = {"w": torch.randn(64, 64, device="cuda"), "t": torch.randn(8, 4, device="cuda").t()}
    tv.save(state, tmp_path / "c.tv")
    loaded = tv.load(tmp_path / "c.tv")
    assert loaded["w"].device.type == "cpu"
    assert torch.equal(loaded["w"], state["w"].cpu())
    assert torch.equal(loaded["t"], state["t"].cpu())


def test_map_location_none_restores_the_saved_cuda_device(tmp_path: Path) -> None:
    tv.save({"w": torch.arange(6.0, device="cuda:0")}, tmp_path / "c.tv")
    loaded = tv.load(tmp_path / "c.tv", map_location=None)
    assert loaded["w"].device == torch.device("cuda:0")


def test_shared_cuda_storage_stays_shared_on_the_gpu(tmp_path: Path) -> None:
    base = torch.arange(10.0, device="cuda")
    tv.save({"a": base[:5], "b": base[5:]}, tmp_path / "c.tv")
    loaded = tv.load(tmp_path / "c.tv", map_location="cuda")
    assert loaded["a"].untyped_storage().data_ptr() == loaded["b"].untyped_storage().data_ptr()
    assert torch.equal(torch.cat([loaded["a"], loaded["b"]]), base)


def test_large_cuda_tensor_is_written_in_pieces(tmp_path: Path) -> None:
    big = torch.randn(40 << 20 >> 2, device="cuda")  # 40 MiB: more than one 16 MiB piece
    tv.save({"big": big}, tmp_path / "big.tv")
    assert torch.equal(tv.load(tmp_path / "big.tv")["big"], big.cpu())


def test_load_into_a_cuda_module_copies_from_the_mapped_file(tmp_path: Path) -> None:
    source = torch.nn.Linear(16, 4)
    tv.save(source, tmp_path / "m.tv")
    target = torch.nn.Linear(16, 4).cuda()
    weight = target.weight
    report = tv.load_into(target, tmp_path / "m.tv")
    assert report.ok
    assert target.weight is weight
    assert torch.equal(target.weight.cpu(), source.weight)
