"""torchvault in two minutes: save, inspect, load exactly, load into a changed model, catch rot,
then a training run killed with SIGKILL mid-run that resumes bit-exactly.

Run with `make demo`; everything is written under ./demo-out.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

import torchvault as tv
from torchvault._tree import flatten
from torchvault.cli import main as cli

OUT = Path("demo-out")


def make_model(classes: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, classes))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> float:
    loss = torch.tensor(0.0)
    for _ in range(steps):
        x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def bit_identical(a: object, b: object) -> bool:
    """Every leaf equal: tensors bit for bit, everything else with ==."""
    leaves_a, leaves_b = list(flatten(a)), list(flatten(b))
    return [k for k, _ in leaves_a] == [k for k, _ in leaves_b] and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        for (_, x), (_, y) in zip(leaves_a, leaves_b, strict=True)
    )


def section(title: str) -> None:
    print(f"\n=== {title}")


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    torch.manual_seed(0)
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = train(model, optimizer, steps=50)

    section("1. save a whole training state in one pickle-free, atomic, checksummed file")
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": 50,
        "loss": loss,
        "rng": {"python": random.getstate(), "torch": torch.get_rng_state()},
    }
    path = OUT / "checkpoint.tv"
    tv.save(state, path, metadata={"experiment": "demo"})
    print(f"saved {path} ({path.stat().st_size} bytes)")

    section("2. inspect it without building anything (`torchvault inspect`)")
    cli(["inspect", str(path)])

    section("3. load it back: same structure, types and bits")
    loaded = tv.load(path)
    assert isinstance(loaded, dict)
    exact = all(
        torch.equal(loaded["model"][k], v) for k, v in model.state_dict().items()
    ) and loaded["optimizer"]["state"][0]["exp_avg"].equal(
        optimizer.state_dict()["state"][0]["exp_avg"]
    )
    print(
        f"model and optimizer bit-identical: {exact}; step={loaded['step']}, loss={loaded['loss']:.4f}"
    )
    print(f"python RNG state restored exactly: {loaded['rng']['python'] == random.getstate()}")

    section("4. any safetensors reader opens it")
    weights = OUT / "weights.tv"
    tv.save(model, weights)
    with safe_open(str(weights), "pt") as f:
        print(f"safetensors sees {list(f.keys())}")

    section("5. load into a changed model: new head, DDP-style prefix, full report")
    ddp_style = OUT / "ddp.tv"
    tv.save({f"module.{k}": v for k, v in model.state_dict().items()}, ddp_style)
    new_model = make_model(classes=10)
    report = tv.load_into(new_model, ddp_style, strict=False)
    print(report)
    try:
        tv.load_into(make_model(classes=10), ddp_style)
    except tv.StateDictMismatchError as exc:
        print(f"\nwith strict=True (the default) it refuses instead:\n{exc}")

    section("6. a flipped bit is caught and named")
    damaged = OUT / "damaged.tv"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0x10
    damaged.write_bytes(bytes(raw))
    code = cli(["verify", str(damaged)])
    print(f"`torchvault verify` exit code: {code}")

    section("7. existing torch.save files, opened without running their code")
    legacy_demo(model)

    section("8. a training run killed with SIGKILL resumes exactly where it was")
    resume_demo()

    section("9. two ranks (FSDP2): one is SIGKILLed; resume on 1 rank and on 2; convert to HF")
    distributed_demo()


def legacy_demo(model: nn.Module) -> None:
    torch.save(model.state_dict(), OUT / "model.pth")
    report = tv.load_into(make_model(), OUT / "model.pth")
    print(f"tv.load_into(model, 'model.pth'): {report}")
    torch.save(model, OUT / "whole-model.pt")  # pickles the classes: torch.load would import them
    cli(["scan", str(OUT / "whole-model.pt")])
    salvaged = tv.load_legacy(OUT / "whole-model.pt", salvage=True)
    print(f"salvaged {len(salvaged.state_dict)} tensors by name; classes never imported: "
          f"{', '.join(salvaged.classes)}")  # fmt: skip
    converted = tv.convert(OUT / "model.pth", OUT / "model-hf", to="hf")
    print(f"converted to a Hugging Face folder: {[Path(f).name for f in converted.files]}")


def resume_demo() -> None:
    train = [sys.executable, str(Path(__file__).with_name("train.py")), "--steps", "120"]
    subprocess.run([*train, str(OUT / "run-reference"), "--out", str(OUT / "reference.tv")],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    run = OUT / "run"
    job = subprocess.Popen([*train, str(run)], stdout=subprocess.PIPE, text=True)
    assert job.stdout is not None
    for line in job.stdout:
        print(f"  [job] {line.rstrip()}")
        if line.startswith("step 60 saved"):
            job.send_signal(signal.SIGKILL)
            break
    job.wait()
    print(f"  killed with SIGKILL (exit code {job.returncode}); starting it again")
    resumed = subprocess.run([*train, str(run), "--out", str(OUT / "resumed.tv")],
                             check=True, capture_output=True, text=True)  # fmt: skip
    print("  [job] " + resumed.stdout.splitlines()[0])
    same = bit_identical(tv.load(OUT / "reference.tv"), tv.load(OUT / "resumed.tv"))
    print(f"  final weights and optimizer state bit-identical to an uninterrupted run: {same}\n")
    cli(["ls", str(run)])


def distributed_demo() -> None:
    script = str(Path(__file__).with_name("train_distributed.py"))

    def torchrun(ranks: int, *args: str, check: bool = True) -> int:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={ranks}", script, *args]  # fmt: skip
        job = subprocess.run(command, capture_output=True, text=True, check=False)
        for line in job.stdout.splitlines():
            print(f"  [{ranks} rank{'s' * (ranks > 1)}] {line}")
        if check and job.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{job.stderr[-3000:]}")
        return job.returncode

    run = str(OUT / "run-fsdp")
    print("  an uninterrupted run, for reference:")
    torchrun(2, str(OUT / "run-fsdp-reference"), "--out", str(OUT / "fsdp-reference.tv"))
    print("  the same run, one rank killed:")
    code = torchrun(2, run, "--kill-rank", "1", "--kill-at", "17", check=False)
    print(f"  rank 1 killed with SIGKILL at step 17; torchrun stopped the job (exit code {code})")
    torchrun(1, run, "--check-only")
    torchrun(2, run, "--out", str(OUT / "fsdp-resumed.tv"))
    same = bit_identical(tv.load(OUT / "fsdp-reference.tv"), tv.load(OUT / "fsdp-resumed.tv"))
    print(f"  final weights and optimizer state bit-identical to an uninterrupted run: {same}")
    converted = tv.convert(f"{run}@latest", OUT / "fsdp-hf", to="hf")
    print(
        f"  the sharded checkpoint as a Hugging Face folder: {[Path(f).name for f in converted.files]}"
    )
    cli(["ls", run])


if __name__ == "__main__":
    main()
