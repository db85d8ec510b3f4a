"""Distributed checkpoints: ``dcp.save`` / ``dcp.load`` through torchvault's StorageWriter and
StorageReader against DCP's FileSystemWriter / FileSystemReader, on real gloo ranks.

The state is an FSDP2-sharded model (``--layers`` x ``Linear(--width, --width)``,
``fully_shard`` per layer and at the root on ``init_device_mesh("cpu", (world,))``) and its
AdamW state after one step: parameters a third of the bytes, ``exp_avg`` + ``exp_avg_sq`` the
rest (960 MiB by default). For 4 ranks, then 2, one spawn of ranks makes one untimed save and
load each way, then runs ``--runs`` rounds, each measuring, in an order that rotates from
round to round:

- xxh3-128 of every rank's bytes (the checksum alone);
- saves to the disk: DCP's FileSystemWriter and torchvault's StorageWriter (default fixed
  global blocks) into a fresh folder / run, the raw anchor (each rank writes its bytes to one
  file and fsyncs it), and torchvault's second save: each round starts with a step in which
  only the last tenth of the layers train (the other 90% of the bytes, parameters and
  optimizer state, stay unchanged), and that state goes as step 2 into the previous round's
  run; its time and the new bytes its manifest counts;
- the same on tmpfs (``/dev/shm``: what the software costs when no disk is in the way), plus
  torchvault with ``block_bytes=None`` (objects follow the sharding) and ``--alt-block-mib``;
- loads of the disk checkpoints into the zeroed state, DCP's reader against torchvault's
  (each checked bit-exact, untimed).

A time is barrier, call, maximum over ranks; each save also reports its phases (DCP's
planning, ``write_data``, the coordinator's ``finish``). After the 4-rank rounds the state
is saved (untimed) by DCP and in each torchvault layout; the 2-rank spawn loads it resharded
(4 -> 2, both libraries, checked bit-exact against the 4-rank full tensors) and saves the same
values again as step 2 of each run: what dedup survives a change of world size. Last, in
fresh processes, the 4-rank checkpoint is consolidated into one safetensors file: torchvault
streamed (``run/_sharded.deferred`` + the writer ``tv.convert`` uses) against
``dcp_to_torch_save`` + ``torch.load`` + safetensors ``save_file``; time and peak extra
RssAnon; ``tv.convert("RUN@1", ...)`` is tried as it is.

    .venv/bin/python benchmarks/bench_distributed.py            # full: 960 MiB, ~6 min
    .venv/bin/python benchmarks/bench_distributed.py --quick    # 240 MiB, ~1 min
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from bench_file import MIB, WORK, Start, log, machine, publish, raw_write
from torchvault.distributed import StorageReader, StorageWriter
from torchvault.distributed._layout import BLOCK_BYTES as BLOCK_DEFAULT

HERE = Path(__file__).resolve().parent
BASE = WORK / "distributed"  # everything this script writes; deleted at the end
SHM = Path("/dev/shm/torchvault-bench-distributed")  # deleted at the end too

Samples = dict[str, list[float]]
Ops = dict[str, Callable[[], float]]


@dataclass(frozen=True)
class Config:
    """What every rank needs (spawn pickles it)."""

    layers: int
    width: int
    trained: int  # layers that train between the first and the incremental save
    runs: int
    warmup: int
    alt_block: int
    prefault: float
    settle: float
    base: str  # on the disk: every timed save, and the results
    shm: str | None  # on tmpfs: the software's cost with no disk in the way
    keep: str  # the 4-rank checkpoints the 2-rank spawn and the consolidation read

    @property
    def state_bytes(self) -> int:
        params = self.layers * (self.width * self.width + self.width)
        return params * 4 * 3


# ----------------------------------------------------------------------------- on each rank


def rank_main(rank: int, world: int, cfg: Config, init: str) -> None:
    import torch.distributed as dist

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)  # the ranks share 2 cores; as tests/dist_harness.py does
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )  # fmt: skip
    try:
        results = Ranks(rank, world, cfg).run()
        if rank == 0:
            Path(cfg.base, f"world-{world}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def tensors(obj: object, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a nested state with its dotted name, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            yield from tensors(obj[key], f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from tensors(value, f"{prefix}.{i}" if prefix else str(i))


def local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class Ranks:
    """One rank's model, optimizer and measurements."""

    def __init__(self, rank: int, world: int, cfg: Config) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.rank, self.world, self.cfg = rank, world, cfg
        self.dir = Path(cfg.base, f"world-{world}")
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        layers = [torch.nn.Linear(cfg.width, cfg.width) for _ in range(cfg.layers)]
        self.model = torch.nn.Sequential(*layers)
        for layer in self.model:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.steps = 0
        self.phases: dict[str, float] = {}
        self.previous = self.dir  # the run the next second save goes into (set by warm)
        self.train(cfg.layers)  # every parameter gets its optimizer state

    # -- state

    def train(self, last: int) -> None:
        """One optimizer step in which only the ``last`` layers train (the others frozen)."""
        for i, layer in enumerate(self.model):
            layer.requires_grad_(i >= self.cfg.layers - last)
        self.steps += 1
        gen = torch.Generator().manual_seed(self.steps * 1000 + self.rank)
        self.model(torch.randn(8, self.cfg.width, generator=gen)).square().mean().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.model, self.opt)
        return {"model": model, "optim": optim}

    def digests(self, state: dict[str, Any]) -> list[str]:
        return [xxhash.xxh3_128_hexdigest(view(local(t))) for _, t in tensors(state)]

    def full_digests(self, state: dict[str, Any]) -> dict[str, str]:
        """Digests of the global tensors (a collective: every rank gathers each in turn)."""
        from torch.distributed.tensor import DTensor

        out = {}
        for name, t in tensors(state):
            full = t.full_tensor() if isinstance(t, DTensor) else t
            out[name] = xxhash.xxh3_128_hexdigest(view(full))
        return out

    # -- collectives

    def reduce(self, value: float, op: str = "max") -> float:
        import torch.distributed as dist

        ops = {"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "sum": dist.ReduceOp.SUM}
        box = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(box, op=ops[op])
        return float(box.item())

    def timed(self, fn: Callable[[], object], writer: Marks | None = None) -> float:
        """Seconds from a common start until the last rank is done. With a marked
        ``writer``, ``self.phases`` gets where the time went (each the max over ranks)."""
        import torch.distributed as dist

        if self.cfg.prefault > 0:  # backed pages for the page cache (see bench_file.settle)
            size = int(self.cfg.prefault * self.cfg.state_bytes / self.world)
            torch.empty(size, dtype=torch.uint8).fill_(1)
        dist.barrier()
        start = time.perf_counter()
        fn()
        end = time.perf_counter()
        if writer is None:
            return self.reduce(end - start)
        marks = writer.marks
        plan = marks["write"] - start  # DCP's planning: local and global plans, collectives
        write = marks["written"] - marks["write"]  # write_data: this rank's bytes, durable
        finish = marks.get("finished", 0.0) - marks.get("finish", 0.0)  # coordinator's commit
        other = end - start - plan - write - finish  # gathers and waits in between
        spans = torch.tensor([end - start, plan, write, finish, other], dtype=torch.float64)
        dist.all_reduce(spans, op=dist.ReduceOp.MAX)
        total, *parts = spans.tolist()
        self.phases = dict(zip(("plan", "write", "finish", "other"), parts, strict=True))
        return float(total)

    def check(self, ok: bool, what: str) -> None:
        if self.reduce(float(ok), "min") < 1:
            raise AssertionError(f"{what}: the loaded state differs from the saved one")

    def clear(self, *paths: Path) -> None:
        import torch.distributed as dist

        dist.barrier()
        if self.rank == 0:
            for path in paths:
                shutil.rmtree(path, ignore_errors=True)
        dist.barrier()

    # -- operations

    def dcp_save(self, state: dict[str, Any], folder: Path) -> float:
        import torch.distributed.checkpoint as dcp

        writer = MarkedFileSystemWriter(folder)
        return self.timed(lambda: dcp.save(state, storage_writer=writer), writer)

    def tv_save(self, state: dict[str, Any], run: Path, step: int, block: int | None) -> float:
        import torch.distributed.checkpoint as dcp

        writer = MarkedStorageWriter(run, step=step, block_bytes=block)
        return self.timed(lambda: dcp.save(state, storage_writer=writer), writer)

    def hash_only(self, state: dict[str, Any]) -> float:
        """The anchor for torchvault's checksums: xxh3-128 of every rank's bytes."""
        return self.timed(lambda: self.digests(state))

    def raw_save(self, state: dict[str, Any], folder: Path) -> float:
        if self.rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
        self.reduce(0)  # the folder exists before anyone writes
        shards = {name: local(t) for name, t in tensors(state)}
        return self.timed(lambda: raw_write(shards, folder / f"rank{self.rank}.raw"))

    def load(
        self, state: dict[str, Any], reader: Any, expected: list[str] | None, what: str
    ) -> float:
        """Zero the state (untimed), load into it, check it against ``expected`` (untimed)."""
        import torch.distributed.checkpoint as dcp

        with torch.no_grad():
            for _, t in tensors(state):
                local(t).zero_()
        seconds = self.timed(lambda: dcp.load(state, storage_reader=reader))
        if expected is not None:
            self.check(self.digests(state) == expected, what)
        return seconds

    def new_bytes(self, run: Path, step: int) -> dict[str, int]:
        from torchvault.run._store import RunStore

        manifest = RunStore(run).manifest(step)
        return {**manifest["bytes"], "objects": len(manifest["blobs"])}

    # -- the rounds

    def run(self) -> dict[str, Any]:
        samples: Samples = {}
        incremental: list[dict[str, int]] = []
        self.warm()
        for number in range(self.cfg.warmup + self.cfg.runs):
            figures, counted = self.round(number)
            if number >= self.cfg.warmup:
                for key, value in figures.items():
                    samples.setdefault(key, []).append(value)
                incremental.append(counted)
            if self.rank == 0:
                log(f"world {self.world} round {number}: " + ", ".join(
                    f"{k} {v:.2f}" for k, v in figures.items() if ":" not in k))  # fmt: skip
        self.clear(self.dir)
        local_bytes = sum(local(t).nbytes for _, t in tensors(self.state()))
        out: dict[str, Any] = {
            "samples": samples,
            "incremental": incremental,
            "state_bytes": int(self.reduce(local_bytes, "sum")),
        }
        if self.world == 4:
            self.keep()
        elif Path(self.cfg.keep, "full.json").exists():
            out["reshard"] = self.reshard()
        return out

    def round(self, number: int) -> tuple[dict[str, float], dict[str, int]]:
        # Only the last tenth of the layers train: since the previous round's saves, 90% of
        # the bytes are unchanged. The second save goes into the previous round's run, in
        # the same rotation as the first saves (a write's speed here depends on its place).
        self.train(self.cfg.trained)
        where = self.dir / f"round-{number}"
        dcp_dir, run = where / "dcp", where / "tv"
        state = self.state()
        expected = self.digests(state)
        figures = {"hash": self.hash_only(state)}
        disk: Ops = {
            "dcp_save": lambda: self.dcp_save(state, dcp_dir),
            "tv_save": lambda: self.tv_save(state, run, 1, BLOCK_DEFAULT),
            "raw_save": lambda: self.raw_save(state, where / "raw"),
            "tv_save2": lambda: self.tv_save(state, self.previous, 2, BLOCK_DEFAULT),
        }
        self.measure(figures, rotated(disk, number), settle=True)
        counted = self.new_bytes(self.previous, 2)
        if self.cfg.shm is not None:
            shm = Path(self.cfg.shm) / "round"
            memory: Ops = {
                "dcp_save_shm": lambda: self.dcp_save(state, shm / "dcp"),
                "tv_save_shm": lambda: self.tv_save(state, shm / "tv", 1, BLOCK_DEFAULT),
                "tv_save_none_shm": lambda: self.tv_save(state, shm / "tv", 1, None),
                "tv_save_alt_shm": lambda: self.tv_save(state, shm / "tv", 1, self.cfg.alt_block),
            }
            for op in rotated(memory, number):
                self.measure(figures, [op])
                self.clear(shm)  # at most one checkpoint in memory at a time
        loads: Ops = {
            "dcp_load": lambda: self.load(state, FileSystemReader(dcp_dir), expected, "dcp"),
            "tv_load": lambda: self.load(state, StorageReader(run, step=1), expected, "tv"),
        }
        figures.update({key: fn() for key, fn in rotated(loads, number)})
        self.clear(dcp_dir, where / "raw", self.previous)
        self.previous = run
        return figures, counted

    def measure(
        self,
        figures: dict[str, float],
        ops: list[tuple[str, Callable[[], float]]],
        settle: bool = False,
    ) -> None:
        """Run each timed op; a save's phases go in as ``key:phase``. With ``settle``, and
        ``--settle S``, the disk is flushed and left alone S seconds before each op."""
        import torch.distributed as dist

        for key, fn in ops:
            if settle and self.cfg.settle > 0:
                dist.barrier()
                os.sync()
                time.sleep(self.cfg.settle)
            self.phases = {}
            figures[key] = fn()
            figures.update({f"{key}:{phase}": v for phase, v in self.phases.items()})

    def warm(self) -> None:
        """One untimed save and load each way before the rounds (first calls pay imports)."""
        where = Path(self.cfg.shm or self.dir) / "warm"
        state = self.state()
        self.dcp_save(state, where / "dcp")
        self.tv_save(state, where / "tv", 1, BLOCK_DEFAULT)
        self.load(state, FileSystemReader(where / "dcp"), None, "warm")
        self.load(state, StorageReader(where / "tv", step=1), None, "warm")
        self.clear(where)
        self.previous = self.dir / "warm-run"  # what round 0's second save follows
        self.tv_save(state, self.previous, 1, BLOCK_DEFAULT)

    def keep(self) -> None:
        """Save the current state (untimed) in each layout, for the 2-rank spawn."""
        keep = Path(self.cfg.keep)
        state = self.state()
        self.dcp_save(state, keep / "dcp")
        for name, block in self.layouts().items():
            self.tv_save(state, keep / name, 1, block)
        digests = self.full_digests(state)
        if self.rank == 0:
            (keep / "full.json").write_text(json.dumps(digests))

    def layouts(self) -> dict[str, int | None]:
        return {"tv": BLOCK_DEFAULT, "tv-none": None, "tv-alt": self.cfg.alt_block}

    def reshard(self) -> dict[str, Any]:
        """Loads of the 4-rank checkpoints on this world; then the same values saved again."""
        keep = Path(self.cfg.keep)
        full = json.loads((keep / "full.json").read_text())
        state = self.state()
        samples: Samples = {}
        readers = {
            "dcp_load_4to2": lambda: FileSystemReader(keep / "dcp"),
            "tv_load_4to2": lambda: StorageReader(keep / "tv", step=1),
        }
        for number in range(self.cfg.warmup + self.cfg.runs):
            for key, reader in rotated(readers, number):
                seconds = self.load(state, reader(), None, key)
                if number >= self.cfg.warmup:
                    samples.setdefault(key, []).append(seconds)
                if number == 0:  # bit-exact after 4 -> 2 (a gather of the whole state)
                    self.check(self.full_digests(state) == full, key)
        changed: dict[str, Any] = {}
        for name, block in self.layouts().items():
            before = self.new_bytes(keep / name, 1)["objects"]
            seconds = self.tv_save(state, keep / name, 2, block)
            changed[name] = {
                "seconds": seconds,
                "objects_4": before,
                **self.new_bytes(keep / name, 2),
            }
        return {"samples": samples, "world_change": changed}


def view(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def rotated(
    items: dict[str, Callable[[], float]], by: int
) -> list[tuple[str, Callable[[], float]]]:
    """Round ``by``'s order: rounds 2k and 2k+1 use rotation k, the second reversed, so that
    each op runs in each place and before and after each other op (on this VM a write's
    speed depends on what was written just before it)."""
    pairs = list(items.items())
    cut = (by // 2) % len(pairs)
    order = pairs[cut:] + pairs[:cut]
    return order[::-1] if by % 2 else order


# ----------------------------------------------------------------------------- consolidation


def child_main(how: str, source: str, out: str) -> None:
    """Consolidate ``source`` into the safetensors file ``out`` in this fresh process; print
    the time and the peak extra RssAnon as JSON."""
    import safetensors.torch
    import torch.distributed.checkpoint.format_utils as fu

    import torchvault as tv
    from bench_file import AnonSampler
    from torchvault.legacy._convert import _write_tensors
    from torchvault.run._sharded import deferred
    from torchvault.run._store import RunStore

    warnings.simplefilter("ignore")
    start = time.perf_counter()
    with AnonSampler(interval=0.0005) as memory:
        if how == "tv":  # what tv.convert("RUN@STEP") is to do: stream, one tensor at a time
            run, step = source.rsplit("@", 1)
            store = RunStore(run)
            manifest = store.manifest(int(step))
            lazy = deferred(store, manifest, str(store.manifest_path(int(step))))
            _write_tensors(lazy, {}, source, Path(out), "safetensors", None)
        elif how == "tv_convert":
            tv.convert(source, out)
        else:
            fu.dcp_to_torch_save(source, out + ".pt")
            state = torch.load(out + ".pt", weights_only=True)
            safetensors.torch.save_file(dict(tensors(state)), out)
            fd = os.open(out, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "extra_mib": memory.extra_mib}))


def consolidate(how: str, source: Path | str, out: Path) -> dict[str, Any]:
    for path in (out, Path(f"{out}.pt")):
        path.unlink(missing_ok=True)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}  # as bench_dcp_convert
    done = subprocess.run(
        [sys.executable, __file__, "--child", how, str(source), str(out)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    figures: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return figures


def file_digests(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return {k: xxhash.xxh3_128_hexdigest(view(handle.get_tensor(k))) for k in handle.keys()}  # noqa: SIM118


def consolidations(keep: Path, runs: int) -> dict[str, Any]:
    """The 4-rank checkpoint into one safetensors file, each way ``runs`` times, alternating."""
    sources = {"tv": f"{keep / 'tv'}@1", "torch": keep / "dcp"}
    samples: dict[str, list[dict[str, Any]]] = {"tv": [], "torch": []}
    same = None
    for number in range(runs):
        for how in ("tv", "torch") if number % 2 == 0 else ("torch", "tv"):
            samples[how].append(consolidate(how, sources[how], BASE / f"{how}.safetensors"))
        if same is None and not any("error" in s[-1] for s in samples.values()):
            same = file_digests(BASE / "tv.safetensors") == file_digests(BASE / "torch.safetensors")
        for how in samples:
            (BASE / f"{how}.safetensors").unlink(missing_ok=True)
    attempt = consolidate("tv_convert", sources["tv"], BASE / "convert.safetensors")
    return {"samples": samples, "same_tensors": same, "tv_convert": attempt}


# ----------------------------------------------------------------------------- the report


def med(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def ratios(samples: Samples, top: str, bottom: str) -> tuple[float, float]:
    """(median of per-round ratios, ratio of medians)."""
    paired = [a / b for a, b in zip(samples[top], samples[bottom], strict=True)]
    return statistics.median(paired), statistics.median(samples[top]) / statistics.median(
        samples[bottom]
    )


def verdict(value: float, target: float) -> str:
    return "PASS" if value <= target else "MISS"


LABELS = {
    "hash": "xxh3-128 of every rank's bytes (torchvault's checksum, alone)",
    "dcp_save": "save, DCP FileSystemWriter",
    "tv_save": "save, torchvault StorageWriter (default blocks)",
    "dcp_save_shm": "save to tmpfs, DCP FileSystemWriter",
    "tv_save_shm": "save to tmpfs, torchvault (default blocks)",
    "tv_save_none_shm": "save to tmpfs, torchvault, block_bytes=None (objects follow the sharding)",
    "tv_save_alt_shm": "save to tmpfs, torchvault, block_bytes={alt}",
    "raw_save": "raw anchor: each rank writes its bytes to one file + fsync",
    "dcp_load": "load, DCP FileSystemReader",
    "tv_load": "load, torchvault StorageReader (every object verified)",
    "tv_save2": "second save, 90% of the bytes unchanged (torchvault, default blocks)",
    "dcp_load_4to2": "resharded load 4 -> 2, DCP FileSystemReader",
    "tv_load_4to2": "resharded load 4 -> 2, torchvault StorageReader",
}


def world_section(world: int, data: dict[str, Any], cfg: Config) -> tuple[list[str], list[str]]:
    samples: Samples = data["samples"]
    gb = data["state_bytes"] / 1e9
    alt = f"{cfg.alt_block / MIB:g} MiB"
    lines = [
        f"## {world} ranks",
        "",
        "| Measurement | median s (min-max) | GB/s (median) |",
        "|---|---:|---:|",
    ]
    for key, values in samples.items():
        if ":" not in key:
            label = LABELS[key].format(alt=alt)
            lines.append(f"| {label} | {med(values)} | {gb / statistics.median(values):.2f} |")
    lines += ["", *breakdown(samples, alt)]
    counted = data["incremental"]
    new = statistics.median(c["new"] / c["total"] for c in counted)
    checks = []
    for name, top, bottom, target in (
        ("save time, torchvault / DCP", "tv_save", "dcp_save", 1.0),
        ("load time, torchvault / DCP", "tv_load", "dcp_load", 1.0),
        ("second save time / first save (torchvault)", "tv_save2", "tv_save", 0.25),
        ("save time, DCP / raw anchor", "dcp_save", "raw_save", None),
        ("save time, torchvault / raw anchor", "tv_save", "raw_save", None),
        ("save time on tmpfs, torchvault / DCP", "tv_save_shm", "dcp_save_shm", None),
        ("save time on tmpfs, block_bytes=None / default", "tv_save_none_shm", "tv_save_shm", None),
        (
            f"save time on tmpfs, block_bytes={alt} / default",
            "tv_save_alt_shm",
            "tv_save_shm",
            None,
        ),
    ):
        if top not in samples or bottom not in samples:
            continue
        paired, of_medians = ratios(samples, top, bottom)
        mark = f"<= {target:g} | {verdict(paired, target)}" if target else "- | "
        checks.append(f"| {world} ranks: {name} | {paired:.3f} | {of_medians:.3f} | {mark} |")
    new_mib = statistics.median(c["new"] for c in counted) / MIB
    checks.append(
        f"| {world} ranks: second save, bytes written / checkpoint bytes | {new:.4f} "
        f"({new_mib:.1f} MiB) | | <= 0.10 | {verdict(new, 0.10 + MANIFEST_SLACK)} |"
    )
    return lines, checks


PHASES = ("plan", "write", "finish", "other")


def breakdown(samples: Samples, alt: str) -> list[str]:
    """Where each save's time went: medians over the rounds, each phase the max over ranks."""
    lines = [
        "Where the time of a save goes (median s; each phase the max over ranks): planning = "
        "DCP's local and global plans and their collectives, up to `write_data`; write_data = "
        "the rank's bytes written and durable; finish = the coordinator's commit (DCP: the "
        "pickled `.metadata` + fsync; torchvault: lock, object check, sealed manifest, "
        "`latest` pointer); other = gathers and waits between them. Each column is the max over "
        "ranks of that phase, so the columns need not add up to the total.",
        "",
        "| Save | total | planning | write_data | finish | other |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key in ("dcp_save", "tv_save", "tv_save2", *(k for k in samples if k.endswith("_shm"))):
        if f"{key}:write" not in samples:
            continue
        parts = [samples[key], *(samples[f"{key}:{p}"] for p in PHASES)]
        cells = " | ".join(f"{statistics.median(v):.3f}" for v in parts)
        lines.append(f"| {LABELS[key].format(alt=alt)} | {cells} |")
    return lines


MANIFEST_SLACK = 0.001  # the step counters of the trained tensors (G10 allows the manifest too)


def reshard_section(data: dict[str, Any], cfg: Config) -> tuple[list[str], list[str]]:
    samples: Samples = data["samples"]
    lines = [
        "## Saved on 4 ranks, used on 2",
        "",
        "| Measurement | median s (min-max) |",
        "|---|---:|",
    ]
    for key, values in samples.items():
        lines.append(f"| {LABELS[key]} | {med(values)} |")
    paired, of_medians = ratios(samples, "tv_load_4to2", "dcp_load_4to2")
    checks = [f"| resharded load 4 -> 2, torchvault / DCP | {paired:.3f} | {of_medians:.3f} | "
              "- | |"]  # fmt: skip
    lines += [
        "",
        "The same values saved again on 2 ranks as step 2 of each 4-rank run (what a resharded "
        "resume writes for state that did not change); one save each:",
        "",
        "| Layout | objects, 4 ranks / 2 ranks | new bytes written | of the checkpoint | save s |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {
        "tv": f"fixed global blocks of {BLOCK_DEFAULT / MIB:g} MiB (default)",
        "tv-none": "block_bytes=None (objects follow the sharding)",
        "tv-alt": f"fixed global blocks of {cfg.alt_block / MIB:g} MiB",
    }
    for name, figures in data["world_change"].items():
        share = figures["new"] / figures["total"]
        lines.append(
            f"| {names[name]} | {figures['objects_4']} / {figures['objects']} | "
            f"{figures['new'] / MIB:,.1f} MiB | {share:.1%} | "
            f"{figures['seconds']:.3f} |"
        )
    return lines, checks


def consolidation_section(data: dict[str, Any]) -> tuple[list[str], list[str]]:
    lines = [
        "## Consolidation of the 4-rank checkpoint into one safetensors file",
        "",
        "| Way | median s (min-max) | peak extra RssAnon MiB, median (max) |",
        "|---|---:|---:|",
    ]
    labels = {
        "tv": "torchvault, streamed (run/_sharded.deferred + legacy/_convert._write_tensors)",
        "torch": "dcp_to_torch_save + torch.load + safetensors save_file + fsync",
    }
    checks = []
    for how, runs in data["samples"].items():
        errors = [r["error"] for r in runs if "error" in r]
        if errors:
            lines.append(f"| {labels[how]} | failed: {errors[0]} | |")
            continue
        seconds = [r["seconds"] for r in runs]
        extra = [r["extra_mib"] for r in runs]
        lines.append(
            f"| {labels[how]} | {med(seconds)} | {statistics.median(extra):,.0f} "
            f"({max(extra):,.0f}) |"
        )
        if how == "tv":
            checks.append(
                f"| consolidation, torchvault peak extra RssAnon | {max(extra):,.0f} MiB | | "
                f"<= 256 MiB | {verdict(max(extra), 256)} |"
            )
    attempt = data["tv_convert"]
    outcome = (
        f"refused or failed: `{attempt['error'][:200]}`"
        if "error" in attempt
        else f"{attempt['seconds']:.3f} s, +{attempt['extra_mib']:,.0f} MiB RssAnon (one run)"
    )
    lines += [
        "",
        f"- Both files hold the same tensors (names and bytes): {data['same_tensors']}.",
        f"- `tv.convert('RUN@1', 'out.safetensors')` with this source: {outcome}.",
    ]
    return lines, checks


def notes(results: dict[int, dict[str, Any]], cfg: Config) -> list[str]:
    """What the tables mean for the layout choice, and which rows were noisy."""
    weight = cfg.width * cfg.width * 4
    shards = ", ".join(f"{weight / w / MIB:g} MiB on {w} ranks" for w in sorted(results))
    lines = [
        f"- Layout: each weight is {weight / MIB:g} MiB, a rank's shard of it {shards}. "
        "Objects are cut where a shard meets a block boundary, so a shard smaller than a "
        f"block is one object whatever the block: with {BLOCK_DEFAULT / MIB:g} MiB blocks, "
        "shards that span whole blocks give objects that do not depend on the world size "
        "(dedup survives a resharded resume); smaller shards give the same objects as "
        "block_bytes=None. Smaller blocks mean more objects, each one more file (measured "
        "separately with RunStore.put_all on this VM, 2026-12-04: ~0.15 ms a file on tmpfs, "
        "1-2 ms with its fsync on the disk).",
        "- Second save: the manifest's new bytes are the trained layers' parameters, exp_avg "
        "and exp_avg_sq (10.0% of the checkpoint) plus their step counters; nothing else is "
        "written again.",
        "- The disk: on this VM the speed of a write depends on what was written just before "
        "it (a GiB written after another is often several times slower), so round 2k uses "
        "rotation k of the order and round 2k+1 the same reversed; a per-round ratio pairs two "
        "saves written a minute apart at most. The tmpfs rows show the software alone; on the "
        "disk a torchvault save is one file and one fsync per object (per rank here: 120 "
        "objects, 60 of them 2-4 KiB bias pieces) where DCP writes one file per rank, and when "
        "the disk is busy each fsync waits (measured separately, 2026-12-04: 4 processes x 256 "
        "MiB right after 1 GiB written, one file + fsync each 0.61 s, 64 objects each with "
        "RunStore.put_all 0.75 s, the same with one syncfs instead of the per-file fsyncs "
        "0.64 s).",
    ]
    noisy = [
        f"{world} ranks: {LABELS[key].format(alt=f'{cfg.alt_block / MIB:g} MiB')}"
        for world, data in sorted(results.items(), reverse=True)
        for key, values in data["samples"].items()
        if ":" not in key and max(values) > 2 * min(values)
    ]
    if noisy:
        lines.append("- Rows whose max is over twice their min (noise): " + "; ".join(noisy) + ".")
    return lines


def report(results: dict[int, dict[str, Any]], merged: dict[str, Any], cfg: Config,
           args: argparse.Namespace, start: Start, seconds: float) -> str:  # fmt: skip
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    body: list[str] = []
    checks: list[str] = []
    for world in sorted(results, reverse=True):
        lines, more = world_section(world, results[world], cfg)
        body += [*lines, ""]
        checks += more
    if "reshard" in results.get(2, {}):
        lines, more = reshard_section(results[2]["reshard"], cfg)
        body += [*lines, ""]
        checks += more
    if merged:
        lines, more = consolidation_section(merged)
        body += [*lines, ""]
        checks += more
    state = results[max(results)]["state_bytes"]
    body += ["## Notes", "", *notes(results, cfg), ""]
    return "\n".join([
        "# Distributed checkpoints: torchvault's StorageWriter/Reader against DCP's file system",
        "",
        f"- Date: {stamp}; the whole run took {seconds:.0f} s",
        *machine(start),
        f"- Command: `{command_line()}` (from the repository root)",
        f"- State: FSDP2 `fully_shard` model of {cfg.layers} x Linear({cfg.width}, {cfg.width}) "
        f"+ AdamW state after one step: {state / MIB:,.0f} MiB (parameters 1/3, exp_avg + "
        f"exp_avg_sq 2/3); between the first and the second save only the last {cfg.trained} "
        "layers train one step (their parameters and optimizer state change; the rest stays).",
        f"- Each figure: median (min-max) of {cfg.runs} rounds after {cfg.warmup} warm-up "
        "round(s) and one untimed save and load each way, order rotated each round (see the "
        "notes); disk "
        f"saves under {BASE.relative_to(HERE.parent)}, tmpfs saves under {SHM} "
        f"({'on' if cfg.shm else 'off'}); loads warm (page cache never dropped); a time is "
        "barrier, call, max over ranks; gloo, "
        f"torch intra-op threads 1 per rank; {cfg.prefault:g} x each rank's share of the "
        "state touched and freed before each timed call (bench_file.settle's VM note). Ratios: "
        "the median of per-round ratios (the verdict) and the ratio of medians.",
        "",
        "## Targets",
        "",
        "| Metric | median of per-round ratios | ratio of medians | target | |",
        "|---|---:|---:|---:|---|",
        *checks,
        "",
        *body,
    ]) + "\n"  # fmt: skip


# ----------------------------------------------------------------------------- main


def command_line() -> str:
    exe = Path(sys.executable)
    root = HERE.parent
    shown = os.path.relpath(exe, root) if exe.is_relative_to(root) else str(exe)
    script = os.path.relpath(Path(__file__).resolve(), root)
    return shlex.join([shown, script, *sys.argv[1:]])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB, 2 rounds: ~1 min")
    parser.add_argument(
        "--runs",
        type=int,
        help="timed rounds (default 6: each disk save twice in each place; --quick 2)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        help="untimed rounds first (default 0: one untimed save and load each way instead)",
    )
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--width", type=int, help="Linear width (2048: 1 GiB; --quick 1024)")
    parser.add_argument("--alt-block-mib", type=float, help="third layout (16; --quick 1)")
    parser.add_argument("--consolidate-runs", type=int, help="(2; --quick 1)")
    parser.add_argument("--prefault", type=float, default=1.0,
                        help="x each rank's share of the state touched before each timing")  # fmt: skip
    parser.add_argument("--settle", type=float, default=0.0,
                        help="os.sync() and pause this long before each disk save")  # fmt: skip
    parser.add_argument("--worlds", default="4,2", help="rank counts (4 first: 2 reshards it)")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS-distributed.md",
                        help="markdown report to (over)write; '-' for none")  # fmt: skip
    parser.add_argument("--no-shm", action="store_true",
                        help="no tmpfs pass (/dev/shm; the 4-rank checkpoints go to the disk)")  # fmt: skip
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def config(args: argparse.Namespace) -> Config:
    quick = args.quick

    def pick(value: Any, full: Any, fast: Any) -> Any:
        return value if value is not None else (fast if quick else full)

    return Config(
        layers=args.layers,
        width=pick(args.width, 2048, 1024),
        trained=max(1, args.layers // 10),
        runs=pick(args.runs, 6, 2),
        warmup=args.warmup or 0,
        alt_block=int(pick(args.alt_block_mib, 16, 1) * MIB),
        prefault=args.prefault,
        settle=args.settle,
        base=str(BASE),
        shm=None if args.no_shm else str(SHM),
        keep=str((BASE if args.no_shm else SHM) / "keep"),
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(*args.child)
        return
    import torch.multiprocessing as mp

    cfg = config(args)
    worlds = [int(w) for w in args.worlds.split(",")]
    start, began = Start.now(), time.perf_counter()
    for folder in (BASE, SHM):
        shutil.rmtree(folder, ignore_errors=True)
    BASE.mkdir(parents=True)
    try:
        results = {}
        for world in worlds:
            log(f"{world} ranks, {cfg.state_bytes / MIB:,.0f} MiB of state")
            init = f"file://{BASE}/pg-{world}"
            mp.spawn(rank_main, args=(world, cfg, init), nprocs=world)
            results[world] = json.loads((BASE / f"world-{world}.json").read_text())
        merged = {}
        if Path(cfg.keep, "full.json").exists():
            log("consolidation")
            runs = args.consolidate_runs or (1 if args.quick else 2)
            merged = consolidations(Path(cfg.keep), runs)
        seconds = time.perf_counter() - began
        publish(report(results, merged, cfg, args, start, seconds), args.results)
    finally:
        for folder in (BASE, SHM):
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()


class Marks:
    """Records when ``write_data`` and ``finish`` run, for the breakdown of a save."""

    marks: dict[str, float]

    def write_data(self, plan: Any, planner: Any) -> Any:
        self.marks = {"write": time.perf_counter()}
        future = super().write_data(plan, planner)  # type: ignore[misc]
        future.wait()
        self.marks["written"] = time.perf_counter()
        return future

    def finish(self, metadata: Any, results: Any) -> None:
        self.marks["finish"] = time.perf_counter()
        super().finish(metadata, results)  # type: ignore[misc]
        self.marks["finished"] = time.perf_counter()


class MarkedFileSystemWriter(Marks, FileSystemWriter):
    pass


class MarkedStorageWriter(Marks, StorageWriter):
    pass
