"""A small, deterministic training program that resumes through a CheckpointManager.

Used as a subprocess by test_resume.py: it is killed with SIGKILL at some step, rerun, and its
final state must be bit-identical to an uninterrupted run's.

    python train_job.py RUN_DIR TOTAL_STEPS EVERY OUT [--async] [--pause-at STEP]

Steps are numbered 0 .. TOTAL_STEPS - 1; after step s, when (s + 1) % EVERY == 0, the state is
saved as checkpoint s. On start the job restores the latest checkpoint and goes on from its
step + 1. Every step draws from Python's ``random``, NumPy's global generator and torch's CPU
generator (dropout, noise), so a resume is exact only if the manager restores all three.
The sampler's shuffle order is a function of (seed, epoch) and it records its position within
the epoch, so a mid-epoch resume skips exactly the batches consumed.

Progress goes to stdout, one flushed line per event: ``step S``, ``saved S``, and with
``--pause-at S``: ``paused S`` after step S (and its save, if any), then the job blocks until
killed. At the end the model, optimizer, scheduler and sampler states and the torch generator
are written to OUT with ``tv.save``, then ``done`` is printed.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

import torchvault as tv

SAMPLES = 96
BATCH = 8
STEPS_PER_EPOCH = SAMPLES // BATCH
FEATURES = 16
CLASSES = 4
SAMPLER_SEED = 1234


class ResumableSampler(Sampler[int]):
    """A shuffling sampler that can be checkpointed mid-epoch.

    The order of epoch ``e`` is ``torch.randperm`` from a generator seeded with ``seed + e``;
    ``position`` counts the indices of that order already handed out.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        if self.position >= self.size:  # the previous epoch was consumed to its end
            self.epoch += 1
            self.position = 0
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        while self.position < self.size:
            index = order[self.position]
            self.position += 1
            yield index

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.seed = int(state["seed"])


def dataset() -> TensorDataset:
    generator = torch.Generator()
    generator.manual_seed(7)
    x = torch.randn(SAMPLES, FEATURES, generator=generator)
    y = torch.randint(0, CLASSES, (SAMPLES,), generator=generator)
    return TensorDataset(x, y)


def say(line: str) -> None:
    print(line, flush=True)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("total_steps", type=int)
    parser.add_argument("every", type=int)
    parser.add_argument("out")
    parser.add_argument("--async", dest="async_save", action="store_true")
    parser.add_argument("--pause-at", type=int, default=None)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)

    model = nn.Sequential(
        nn.Linear(FEATURES, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, CLASSES)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.7)
    sampler = ResumableSampler(SAMPLES, SAMPLER_SEED)
    # The loader draws its base seed from its own generator, never from the global one, so
    # creating an iterator (at each epoch, and once more on resume) consumes no global state.
    loader = DataLoader(
        dataset(), batch_size=BATCH, sampler=sampler, generator=torch.Generator().manual_seed(0)
    )

    manager = tv.CheckpointManager(args.run_dir, async_save=args.async_save)
    report = manager.restore(model=model, optimizer=optimizer, scheduler=scheduler, sampler=sampler)
    step = 0 if report is None else report.step + 1
    if report is not None and report.values.get("epoch") != sampler.epoch:
        raise SystemExit(f"epoch value {report.values.get('epoch')} != sampler {sampler.epoch}")

    model.train()
    while step < args.total_steps:
        for x, y in loader:
            noise = np.random.standard_normal(x.shape).astype(np.float32)
            x = x + random.uniform(0.0, 0.05) * torch.from_numpy(noise)
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            say(f"step {step}")
            if (step + 1) % args.every == 0:
                manager.save(
                    step,
                    metrics={"loss": float(loss.detach())},
                    model=model,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    sampler=sampler,
                    epoch=sampler.epoch,
                )
                say(f"saved {step}")
            if step == args.pause_at:
                say(f"paused {step}")
                signal.pause()  # until the test kills us
            step += 1
            if step >= args.total_steps:
                break
    manager.close()

    final = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "sampler": sampler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_draw": random.random(),
        "numpy_draw": float(np.random.random()),
    }
    tv.save(final, args.out)
    say("done")


if __name__ == "__main__":
    main(sys.argv[1:])
