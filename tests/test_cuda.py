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


def _cuda_rank(rank: int, world: int, run: str) -> tuple[bool, bool, str]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 15), torch.nn.Linear(15, 3)).cuda()
        fully_shard(model, mesh=init_device_mesh("cuda", (world,)))
        return model, torch.optim.AdamW(model.parameters(), lr=0.1)

    model, opt = build()
    model(torch.randn(4, 8, device="cuda")).sum().backward()
    opt.step()
    with tv.CheckpointManager(run) as mgr:
        mgr.save(0, model=model, optimizer=opt)
        saved = {k: v.full_tensor().cpu() for k, v in model.state_dict().items()}
        fresh, fresh_opt = build()
        report = mgr.restore(model=fresh, optimizer=fresh_opt)
    restored = {k: v.full_tensor().cpu() for k, v in fresh.state_dict().items()}
    device = fresh_opt.state_dict()["state"][0]["exp_avg"].to_local().device.type
    same = all(torch.equal(saved[k], restored[k]) for k in saved)
    return report is not None, same, device


def test_fsdp2_on_cuda_saves_sharded_and_restores_onto_the_gpu(tmp_path: Path) -> None:
    from dist_harness import run_ranks

    run = str(tmp_path / "run")
    outcome = run_ranks(_cuda_rank, 1, run, backend="cpu:gloo,cuda:nccl")[0]
    assert outcome.value == (True, True, "cuda")
    consolidated = tv.load(f"{run}@0")  # one process, on the CPU
    assert consolidated["model"]["0.weight"].device.type == "cpu"
