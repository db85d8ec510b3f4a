"""A small training job that checkpoints with torchvault and resumes exactly after any kill.

    python examples/train.py RUN_DIR --steps 120 --every 10 [--out final.tv]

Everything a step depends on is restored: weights, AdamW state, the LR schedule, the data
order (a sampler with state_dict/load_state_dict) and every random generator (dropout).
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

import torchvault as tv


class ResumableSampler(Sampler[int]):
    """Shuffles each epoch from seed + epoch, and remembers how far into the epoch it is."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch, self.position = size, seed, 0, 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        order = torch.randperm(
            self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)
        )
        while self.position < self.size:
            self.position += 1
            yield int(order[self.position - 1])
        self.epoch, self.position = self.epoch + 1, 0

    def __len__(self) -> int:
        return self.size - self.position

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(256, 16), torch.randint(0, 4, (256,)))
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=40, gamma=0.5)
    sampler = ResumableSampler(len(data))
    items = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "sampler": sampler}

    with tv.CheckpointManager(args.run, keep_last=3, keep_best=1, monitor="loss") as mgr:
        report = mgr.restore(**items)
        step = report.step + 1 if report else 0
        print(f"resuming after step {report.step}" if report else "fresh run", flush=True)
        while step < args.steps:
            # The loader gets its own generator: each new iterator draws a seed from it, and a
            # draw from the global one would shift every dropout mask after a mid-epoch resume.
            loader = DataLoader(data, batch_size=16, sampler=sampler, generator=torch.Generator())
            for x, y in loader:
                loss = nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                if step % args.every == 0:
                    mgr.save(step, metrics={"loss": loss.detach()}, **items)
                    print(f"step {step} saved, loss {loss.item():.4f}", flush=True)
                step += 1
                if step >= args.steps:
                    break
    if args.out:
        tv.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, args.out)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--out")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
