"""Consolidate a sharded torch.distributed.checkpoint folder into one safetensors file:
``tv.convert`` (streamed, one tensor at a time) against torch's ``dcp_to_torch_save`` then
safetensors ``save_file``. Each measurement runs in a fresh process, which reports its time
and its peak extra anonymous memory (RssAnon sampled every 0.5 ms; glibc's mmap threshold is
fixed so that freed tensors leave RssAnon, as they would leave a busy process's heap to be
reused).

    .venv/bin/python benchmarks/bench_dcp_convert.py --mib 512 --tensors 16 --ranks 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

MIB = 1 << 20


def write(rank: int, world: int, root: str, mib: int, tensors: int) -> None:
    """One rank of an FSDP-like save: every tensor sharded along dim 0 across the ranks."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        rows = mib * MIB // tensors // 4096
        gen = torch.Generator().manual_seed(0)
        state = {
            f"layers.{i}.weight": distribute_tensor(
                torch.randn(rows, 1024, generator=gen), mesh, [Shard(0)]
            )
            for i in range(tensors)
        }
        dcp.save(state, checkpoint_id=f"{root}/dcp")
    finally:
        dist.destroy_process_group()


CHILD = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
import torch.distributed.checkpoint.format_utils as fu, safetensors.torch, torch
import torchvault as tv
sys.path.insert(0, sys.argv[4])
from bench_file import AnonSampler

how, folder, out = sys.argv[1:4]
start = time.perf_counter()
with AnonSampler(interval=0.0005) as memory:
    if how == "tv":
        tv.convert(folder, out)
    else:
        fu.dcp_to_torch_save(folder, out + ".pt")
        state = torch.load(out + ".pt", weights_only=True)
        safetensors.torch.save_file(state, out)
        with open(out, "rb") as f:
            import os; os.fsync(f.fileno())
    seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "extra_mib": memory.extra_mib}))
"""


def measure(how: str, folder: Path, out: Path) -> dict[str, float]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
    for path in (out, Path(f"{out}.pt")):
        path.unlink(missing_ok=True)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, how, str(folder), str(out), str(Path(__file__).parent)],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    figures: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="state size in MiB")
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    import torch.multiprocessing as mp

    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        mp.spawn(write, args=(args.ranks, tmp, args.mib, args.tensors), nprocs=args.ranks)
        largest = args.mib / args.tensors
        print(f"state {args.mib} MiB in {args.tensors} tensors ({largest:.0f} MiB each), "
              f"{args.ranks} ranks")  # fmt: skip
        for how, label in (("tv", "tv.convert"), ("torch", "dcp_to_torch_save + save_file")):
            runs = [measure(how, root / "dcp", root / "out.safetensors") for _ in range(args.runs)]
            seconds = statistics.median(r["seconds"] for r in runs)
            extra = statistics.median(r["extra_mib"] for r in runs)
            print(f"| {label} | {seconds:.2f} s | +{extra:.0f} MiB RssAnon |")


if __name__ == "__main__":
    main()
