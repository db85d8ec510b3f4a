"""A multi-rank training job (FSDP2 on CPU, gloo) that checkpoints with torchvault.

    torchrun --standalone --nproc_per_node 2 examples/train_distributed.py RUN_DIR \
        [--steps 30] [--every 5] [--out final.tv] [--kill-rank 1 --kill-at 17] [--check-only]

Every rank creates the same CheckpointManager; ``restore`` reshards the latest checkpoint
onto however many ranks run now, and ``save`` is collective: each rank writes its shards,
rank 0 commits. ``--kill-at`` makes one rank SIGKILL itself at that step (torchrun then stops
the others), ``--check-only`` restores, compares the restored state with the checkpoint read
back in one process, and exits.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import torchvault as tv


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 4)
    )
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    items = {"model": model, "optimizer": optimizer, "scheduler": scheduler}

    with tv.CheckpointManager(args.run, keep_last=2, keep_best=1, monitor="loss") as mgr:
        report = mgr.restore(**items)
        if report is None:
            torch.manual_seed(1000 + rank)  # each rank's data stream; restored on resume
        elif rank == 0:
            saved = f"saved on {report.resharded_from} rank(s), resharded onto {world}"
            how = saved if report.resharded_from else f"on the same {world} rank(s)"
            print(f"restored step {report.step} {how}", flush=True)
        if args.check_only:
            restored = full_state(model, optimizer)
            on_disk = tv.load(f"{args.run}@{report.step}") if report else None
            if rank == 0 and on_disk is not None:
                same = all(
                    torch.equal(value, on_disk["model"][key])
                    for key, value in restored["model"].items()
                ) and all(
                    torch.equal(value, on_disk["optimizer"]["state"][fqn][name])
                    for fqn, state in restored["optimizer"]["state"].items()
                    for name, value in state.items()
                )
                print(f"restored state bit-identical to the checkpoint on disk: {same}", flush=True)
            return
        step = report.step + 1 if report else 0
        while step < args.steps:
            loss = nn.functional.mse_loss(model(torch.randn(16, 32)), torch.randn(16, 4))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            if step == args.kill_at and rank == args.kill_rank:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: a hard crash
            if step % args.every == 0:
                mgr.save(step, metrics={"loss": loss.item()}, **items)
                if rank == 0:
                    print(f"step {step} saved on {world} ranks, loss {loss.item():.4f}", flush=True)
            step += 1
    final = full_state(model, optimizer)
    if args.out and rank == 0:
        tv.save(final, args.out)
    dist.destroy_process_group()


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, object]:
    """Model and optimizer state as whole tensors (a collective: every rank calls it)."""
    model_sd, optim_sd = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True)
    )
    return {"model": model_sd, "optimizer": optim_sd}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--out")
    parser.add_argument("--kill-rank", type=int, default=1)
    parser.add_argument("--kill-at", type=int, default=-1)
    parser.add_argument("--check-only", action="store_true")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
