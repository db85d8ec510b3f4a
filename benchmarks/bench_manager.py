"""Benchmark torchvault's CheckpointManager: dedup, async save, restore and save throughput.

The state is one module holding 64 fp32 tensors (``--size-mib`` in all) as buffers. Every
measurement is repeated ``--runs`` times, round-robin over the measurements (the order
rotates each round), and reported as the median with min and max. A ratio is given two ways:
the ratio of the two medians, and the median of the per-round ratios (both measured in the
same round, minutes apart at most: the verdict, since this VM's disk changes speed several
fold from one minute to the next). Saves write a fresh run folder (or file) each time under
``benchmarks/.work/manager/`` (the disk) and, for the throughput comparison, under
``/dev/shm`` (RAM: what the software costs when storage is not the limit); reads are warm
(the page cache is never dropped), as in ``bench_file.py``. Machine description, raw/torch
baselines and the memory sampler come from ``bench_file.py``.

    .venv/bin/python benchmarks/bench_manager.py --runs 5                 # full: 1 GiB
    .venv/bin/python benchmarks/bench_manager.py --size-mib 64 --runs 3   # quick check
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import gc
import hashlib
import os
import pstats
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

import torchvault as tv
from bench_file import (
    MIB,
    WORK,
    AnonSampler,
    Start,
    Workload,
    bench_parser,
    hash_only,
    log,
    machine,
    parse_bench_args,
    publish,
    raw_write,
    settle,
    torch_save,
)
from torchvault.run._store import RunStore

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BASE = WORK / "manager"  # everything this script writes on the disk; deleted at the end
RAM = Path("/dev/shm/torchvault-bench-manager")  # the same on tmpfs, when there is one
COUNT = 64  # tensors in the state
CHANGED_FRACTION = 0.10  # share of the tensors changed between step 0 and step 1
READ_REPEAT = 5  # back-to-back calls per round of the in-memory and read measurements

Figures = dict[str, float]
Samples = dict[str, list[float]]


# ----------------------------------------------------------------------------- the state


class State(torch.nn.Module):
    """The benchmark's model: the workload's tensors as buffers (``add_`` needs no no_grad)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        for key, tensor in tensors.items():
            self.register_buffer(key.replace(".", "_"), tensor)

    def named(self) -> dict[str, torch.Tensor]:
        return dict(self.named_buffers())


@dataclass
class Bench:
    """The saved model, its restore target, and which tensors step 1 changes."""

    workload: Workload
    model: State
    target: State  # restores are copied into these tensors (pre-faulted zeros at first)
    changed: list[str]
    originals: dict[str, torch.Tensor]  # copies of the changed tensors at step 0

    @property
    def changed_bytes(self) -> int:
        return sum(t.nbytes for t in self.originals.values())

    def mutate(self) -> None:
        """The step-0 -> step-1 update: ``add_(1)`` on the changed tensors."""
        buffers = self.model.named()
        for name in self.changed:
            buffers[name].add_(1)

    def reset(self) -> None:
        """Back to the step-0 values, bit for bit."""
        buffers = self.model.named()
        for name in self.changed:
            buffers[name].copy_(self.originals[name])

    def train_step(self) -> None:
        """An ordinary training step: every tensor changes (values drift; timings do not care)."""
        for tensor in self.model.named().values():
            tensor.add_(1)


def build(size_mib: int) -> Bench:
    workload = Workload("M", COUNT, (4 * size_mib, 1024))  # 64 x size/64 MiB
    model = State(workload.build())
    names = list(model.named())
    target = State({name: torch.zeros_like(t) for name, t in model.named().items()})
    picks = max(1, round(CHANGED_FRACTION * COUNT))
    changed = [names[i * COUNT // picks] for i in range(picks)]
    originals = {name: model.named()[name].clone() for name in changed}
    return Bench(workload, model, target, changed, originals)


# ----------------------------------------------------------------------------- helpers


def fresh(path: Path) -> Path:
    """Remove a run folder or file this script made before (untimed)."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    return path


def object_bytes(run: Path) -> int:
    """Bytes under ``run/objects`` (what a save wrote there)."""
    total = 0
    for folder, _, files in os.walk(run / "objects"):
        total += sum(os.stat(os.path.join(folder, name)).st_size for name in files)
    return total


def timed(fn: Callable[[], object], repeat: int = 1) -> float:
    """Seconds ``fn`` takes (its result is freed after the clock stops); with ``repeat``, the
    median of that many back-to-back calls (for the reads, which take tens of ms)."""
    times = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        del result
    return statistics.median(times)


def save_and_wait(mgr: tv.CheckpointManager, step: int, model: State) -> tuple[float, float]:
    """An async save: (seconds save() blocked, seconds until committed), one clock."""
    gc.collect()
    start = time.perf_counter()
    mgr.save(step, model=model)
    blocked = time.perf_counter() - start
    mgr.wait()
    return blocked, time.perf_counter() - start


# ----------------------------------------------------------------------------- measurements


def run_dir(name: str) -> Path:
    return BASE / name


def measure_dedup(bench: Bench) -> Figures:
    """Step 0 into a fresh run (full), then step 1 with ~10% of the bytes changed."""
    run = fresh(run_dir("dedup-run"))
    bench.reset()
    with tv.CheckpointManager(run) as mgr:
        full = timed(lambda: mgr.save(0, model=bench.model))
        full_bytes = object_bytes(run)
        bench.mutate()
        delta = timed(lambda: mgr.save(1, model=bench.model))
        delta_bytes = object_bytes(run) - full_bytes
    manifest = os.stat(RunStore(run).manifest_path(1)).st_size
    bench.reset()
    fresh(run)
    return {
        "mgr_full": full,
        "mgr_delta": delta,
        "full_bytes": full_bytes,
        "delta_bytes": delta_bytes,
        "manifest_bytes": manifest,
    }


def measure_async(bench: Bench) -> Figures:
    """A fresh async manager: step 0 (buffers allocated), then step 1 (buffers reused)."""
    run = fresh(run_dir("async-run"))
    bench.reset()
    mgr = tv.CheckpointManager(run, async_save=True)
    try:
        blocked_first, e2e_first = save_and_wait(mgr, 0, bench.model)
        bench.mutate()
        blocked, e2e = save_and_wait(mgr, 1, bench.model)
    finally:
        mgr.close()
    bench.reset()
    fresh(run)
    mgr = tv.CheckpointManager(run, async_save=True)
    try:
        mgr.restore(model=bench.model)  # the documented loop: restore() first, on a fresh run
        mgr.wait()  # stands for the first training steps, which overlap the buffer preparation
        after_restore, _ = save_and_wait(mgr, 0, bench.model)
        settle()  # the saves so far took --prefault's worth of fresh page cache
        for step in (1, 2):  # ordinary training: every tensor changes between saves
            bench.train_step()
            training, training_e2e = save_and_wait(mgr, step, bench.model)
    finally:
        mgr.close()
    bench.reset()
    fresh(run)
    return {
        "async_blocked_first": blocked_first,
        "async_e2e_first": e2e_first,
        "async_blocked": blocked,
        "async_e2e": e2e,
        "async_blocked_after_restore": after_restore,
        "async_blocked_training": training,
        "async_e2e_training": training_e2e,
    }


def measure_full_ram(bench: Bench) -> Figures:
    """The sync full save into a fresh run on tmpfs: the software's cost, no disk."""
    run = fresh(RAM / "run")
    with tv.CheckpointManager(run) as mgr:
        seconds = timed(lambda: mgr.save(0, model=bench.model))
    fresh(run)
    return {"mgr_full_ram": seconds}


def file_save(
    key: str, save: Callable[[dict[str, torch.Tensor], Path], object], base: Path = BASE
) -> Callable[[Bench], Figures]:
    """A one-file save of the model's state dict into a new file under ``base``."""

    def measure(bench: Bench) -> Figures:
        path = fresh(base / f"{key}.bin")
        sd = bench.model.state_dict()
        seconds = timed(lambda: save(sd, path))
        fresh(path)
        return {key: seconds}

    return measure


def measure_hash(bench: Bench) -> Figures:
    sd = bench.model.state_dict()
    return {"hash": timed(lambda: hash_only(sd, BASE), READ_REPEAT)}


def measure_copy(bench: Bench) -> Figures:
    """The floor of staging and of restoring: ``copy_`` of every tensor into another."""
    pairs = list(zip(bench.target.named().values(), bench.model.named().values(), strict=True))
    return {"copy": timed(lambda: [dst.copy_(src) for dst, src in pairs], READ_REPEAT)}


def measure_restore(bench: Bench) -> Figures:
    with tv.CheckpointManager(run_dir("restore-run")) as mgr:
        return {"restore": timed(lambda: mgr.restore(1, model=bench.target), READ_REPEAT)}


def measure_load(_: Bench) -> Figures:
    with tv.CheckpointManager(run_dir("restore-run")) as mgr:
        return {"mgr_load": timed(lambda: mgr.load(1), READ_REPEAT)}


def measure_tv_load(_: Bench) -> Figures:
    return {"tv_load": timed(lambda: tv.load(BASE / "restore.tv"), READ_REPEAT)}


def measure_tv_load_into(bench: Bench) -> Figures:
    return {
        "tv_load_into": timed(lambda: tv.load_into(bench.target, BASE / "restore.tv"), READ_REPEAT)
    }


MEASUREMENTS: list[Callable[[Bench], Figures]] = [  # pairs compared in a ratio sit together
    file_save("raw_write", raw_write),
    file_save("torch_save", torch_save),
    measure_dedup,
    file_save("tv_save", tv.save),
    measure_async,
    measure_hash,
    measure_copy,
    measure_tv_load,
    measure_load,
    measure_tv_load_into,
    measure_restore,
]
RAM_MEASUREMENTS: list[Callable[[Bench], Figures]] = [
    file_save("torch_save_ram", torch_save, RAM),
    measure_full_ram,
    file_save("raw_write_ram", raw_write, RAM),
    file_save("tv_save_ram", tv.save, RAM),
]

LABELS = {
    "raw_write": "raw os.write 64 MiB pieces + fsync (one file)",
    "torch_save": "torch.save + fsync (one file)",
    "tv_save": "tv.save (one file)",
    "mgr_full": "manager save, step 0, fresh run (sync, full)",
    "mgr_delta": "manager save, step 1, ~10% changed (sync, dedup)",
    "async_blocked_first": "async save() blocked, first save (buffers allocated)",
    "async_e2e_first": "async first save + wait (end to end)",
    "async_blocked": "async save() blocked, second save, ~10% changed (buffers reused)",
    "async_e2e": "async second save + wait (end to end, dedup step)",
    "async_blocked_after_restore": "async save() blocked, first save after restore() (buffers prepared in the background)",
    "async_blocked_training": "async save() blocked, every tensor changed since the last save (ordinary training, buffers reused)",
    "async_e2e_training": "async save + wait, every tensor changed (end to end)",
    "raw_write_ram": "RAM (tmpfs): raw os.write + fsync (one file)",
    "torch_save_ram": "RAM (tmpfs): torch.save + fsync (one file)",
    "tv_save_ram": "RAM (tmpfs): tv.save (one file)",
    "mgr_full_ram": "RAM (tmpfs): manager save, fresh run (sync, full)",
    "hash": "xxh3-128 of the in-memory tensors (no I/O)",
    "copy": "copy_ of every tensor into preallocated tensors (no I/O)",
    "tv_load": "tv.load(file), verified",
    "mgr_load": "manager load(1): the checkpoint's state, verified",
    "tv_load_into": "tv.load_into(model, file), verified",
    "restore": "manager restore(1, model=...), verified, copied into the model",
}
SIZES = ("full_bytes", "delta_bytes", "manifest_bytes")


def prepare(bench: Bench) -> None:
    """The run (steps 0 and 1) and the file that restores read; check both restore exactly."""
    run = fresh(run_dir("restore-run"))
    bench.reset()
    with tv.CheckpointManager(run) as mgr:
        mgr.save(0, model=bench.model)
        bench.mutate()
        mgr.save(1, model=bench.model)
    tv.save(bench.model.state_dict(), fresh(BASE / "restore.tv"))
    measure_restore(bench)
    _check_equal(bench.target.named(), bench.model.named(), "manager restore")
    loaded = tv.load(BASE / "restore.tv")
    assert isinstance(loaded, dict)
    _check_equal(loaded, bench.model.named(), "tv.load")
    bench.reset()


def _check_equal(
    got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor], what: str
) -> None:
    if list(got) != list(want) or not all(torch.equal(got[k], want[k]) for k in want):
        raise RuntimeError(f"{what} did not give back the saved state")


def measurements() -> list[Callable[[Bench], Figures]]:
    return MEASUREMENTS + (RAM_MEASUREMENTS if RAM.parent.is_dir() else [])


def time_all(bench: Bench, runs: int, warmup: int) -> Samples:
    """Every measurement once per round; ``samples[key][i]`` comes from round ``i``."""
    samples: Samples = {}
    todo = measurements()
    count = len(todo)
    for round_ in range(warmup + runs):
        order = todo[round_ % count :] + todo[: round_ % count]
        for measure in order:
            settle()
            figures = measure(bench)
            if round_ >= warmup:
                for key, value in figures.items():
                    samples.setdefault(key, []).append(value)
        log(f"round {round_ + 1}/{warmup + runs} done")
    return samples


# ----------------------------------------------------------------------------- memory


def peak_extra_mib(fn: Callable[[], object]) -> float:
    """Peak growth of RssAnon (MiB) while ``fn`` runs, sampled every 1 ms."""
    gc.collect()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)  # let the sampler in even while Python code runs
    try:
        with AnonSampler() as sampler:
            result = fn()
            sampler.sample()
    finally:
        sys.setswitchinterval(interval)
    del result
    return sampler.extra_mib


def measure_memory(bench: Bench) -> Figures:
    """One untimed pass per operation, after the timings (in this process)."""

    def sync_save() -> None:
        with tv.CheckpointManager(fresh(run_dir("mem-run"))) as mgr:
            mgr.save(0, model=bench.model)

    def async_save() -> None:
        with tv.CheckpointManager(fresh(run_dir("mem-run")), async_save=True) as mgr:
            mgr.save(0, model=bench.model)
            mgr.wait()

    out = {
        "mgr_full": peak_extra_mib(sync_save),
        "async_e2e_first": peak_extra_mib(async_save),
        "restore": peak_extra_mib(lambda: measure_restore(bench)),
        "mgr_load": peak_extra_mib(lambda: measure_load(bench)),
        "tv_load": peak_extra_mib(lambda: tv.load(BASE / "restore.tv")),
    }
    fresh(run_dir("mem-run"))
    return out


# ----------------------------------------------------------------------------- profiles


def profile(fn: Callable[[], object], top: int = 6) -> str:
    """Where ``fn``'s time goes (main thread only): the top functions by own time."""
    profiler = cProfile.Profile()
    gc.collect()
    profiler.enable()
    fn()
    profiler.disable()
    stats = pstats.Stats(profiler)
    own = Path(__file__).name  # leave out this script's lambdas
    items = [kv for kv in stats.stats.items() if Path(kv[0][0]).name != own]  # type: ignore[attr-defined]
    rows = sorted(items, key=lambda kv: kv[1][2], reverse=True)[:top]
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    parts = [f"{_where(func)} {tt:.3f} s/{nc} calls" for func, (_, nc, tt, _, _) in rows]
    return f"profiled {total:.3f} s: " + "; ".join(parts)


def _where(func: tuple[str, int, str]) -> str:
    filename, line, name = func
    if filename != "~":
        return f"{Path(filename).name}:{line}({name})"
    if "'" in name:  # <method 'copy_' of 'torch._C.TensorBase' objects>
        return name.split("'")[1]
    return name.strip("<>").replace("built-in method ", "").split(" at 0x")[0]


def profile_full_save(bench: Bench) -> str:
    with tv.CheckpointManager(fresh(run_dir("prof-run"))) as mgr:
        return profile(lambda: mgr.save(0, model=bench.model))


def profile_delta_save(bench: Bench) -> str:
    with tv.CheckpointManager(fresh(run_dir("prof-run"))) as mgr:
        mgr.save(0, model=bench.model)
        bench.mutate()
        try:
            return profile(lambda: mgr.save(1, model=bench.model))
        finally:
            bench.reset()


def profile_async_blocked(bench: Bench) -> str:
    """The third async save of an ordinary training run (every tensor changed each time)."""
    with tv.CheckpointManager(fresh(run_dir("prof-run")), async_save=True) as mgr:
        for step in (0, 1):
            mgr.save(step, model=bench.model)
            mgr.wait()
            bench.train_step()
        try:
            return profile(lambda: mgr.save(2, model=bench.model))
        finally:
            mgr.wait()


def profile_restore(bench: Bench) -> str:
    with tv.CheckpointManager(run_dir("restore-run")) as mgr:
        return profile(lambda: mgr.restore(1, model=bench.target))


# ----------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class Check:
    """A ratio of two measurements against its target (``limit`` None: reported only).

    ``value`` is the median of the per-round ratios (the verdict), ``of_medians`` the ratio
    of the two medians. For an "at least" target the ratio is ``denominator / numerator``
    (a throughput ratio: how many times faster ``numerator`` is).
    """

    label: str
    value: float
    of_medians: float
    limit: float | None
    at_least: bool = False  # True: value >= limit passes
    profiler: Callable[[Bench], str] | None = None  # run when the target is missed

    @property
    def passed(self) -> bool | None:
        if self.limit is None:
            return None
        return self.value >= self.limit if self.at_least else self.value <= self.limit

    @property
    def verdict(self) -> str:
        return {None: "info", True: "PASS", False: "**MISS**"}[self.passed]

    def target(self) -> str:
        if self.limit is None:
            return ""
        return f"{'>=' if self.at_least else '<='} {self.limit:.2f} x"

    def row(self) -> str:
        return (
            f"| {self.label} | {self.value:.3f} x | {self.of_medians:.3f} x | {self.target()} "
            f"| {self.verdict} |"
        )


def ratio(
    samples: Samples,
    label: str,
    top: str,
    bottom: str,
    limit: float | None = None,
    *,
    at_least: bool = False,
    profiler: Callable[[Bench], str] | None = None,
) -> Check:
    """``top / bottom`` measured in the same rounds (inverted for an "at least" target)."""
    if at_least:
        top, bottom = bottom, top
    paired = statistics.median(a / b for a, b in zip(samples[top], samples[bottom], strict=True))
    medians = statistics.median(samples[top]) / statistics.median(samples[bottom])
    return Check(label, paired, medians, limit, at_least, profiler)


def checks(samples: Samples) -> list[Check]:
    out = [
        ratio(
            samples,
            "1. dedup: step-1 bytes / full bytes (objects folder growth)",
            "delta_bytes",
            "full_bytes",
            0.10,
        ),
        ratio(
            samples,
            "1. dedup: step-1 save time / full save time",
            "mgr_delta",
            "mgr_full",
            0.20,
            profiler=profile_delta_save,
        ),
        ratio(
            samples,
            "2. async: save() blocked / sync full save; every tensor changed (ordinary training)",
            "async_blocked_training",
            "mgr_full",
            0.15,
            profiler=profile_async_blocked,
        ),
        ratio(
            samples,
            "2. async: save() blocked / sync full save; ~10% changed",
            "async_blocked",
            "mgr_full",
            0.15,
        ),
        ratio(
            samples,
            "2. async: save() blocked / sync full save; first save after restore()",
            "async_blocked_after_restore",
            "mgr_full",
            0.15,
        ),
        ratio(
            samples,
            "2. async: save() blocked / sync save of the same state; ~10% changed (dedup on both sides)",
            "async_blocked",
            "mgr_delta",
        ),
        ratio(
            samples,
            "2. async: save() blocked / sync full save; first save without restore()",
            "async_blocked_first",
            "mgr_full",
        ),
        ratio(
            samples,
            "3. restore: manager load(step) / tv.load (the state, mapped and verified)",
            "mgr_load",
            "tv_load",
            1.10,
        ),
        ratio(
            samples,
            "3. restore: manager restore(model=) / tv.load_into(model) (verified, copied into the model)",
            "restore",
            "tv_load_into",
            1.10,
            profiler=profile_restore,
        ),
        ratio(
            samples,
            "3. restore: manager restore(model=) / tv.load (copy into the model vs none)",
            "restore",
            "tv_load",
        ),
        ratio(
            samples,
            "4. throughput, disk: manager full save vs torch.save + fsync",
            "mgr_full",
            "torch_save",
            1.25,
            at_least=True,
            profiler=profile_full_save,
        ),
        ratio(
            samples,
            "4. throughput, disk: manager full save vs raw write + fsync",
            "mgr_full",
            "raw_write",
            at_least=True,
        ),
        ratio(
            samples,
            "4. throughput, disk: manager full save vs tv.save",
            "mgr_full",
            "tv_save",
            at_least=True,
        ),
    ]
    if "mgr_full_ram" in samples:
        out += [
            ratio(
                samples,
                "4. throughput, RAM: manager full save vs torch.save + fsync",
                "mgr_full_ram",
                "torch_save_ram",
                1.25,
                at_least=True,
            ),
            ratio(
                samples,
                "4. throughput, RAM: manager full save vs raw write + fsync",
                "mgr_full_ram",
                "raw_write_ram",
                at_least=True,
            ),
            ratio(
                samples,
                "4. throughput, RAM: manager full save vs tv.save",
                "mgr_full_ram",
                "tv_save_ram",
                at_least=True,
            ),
        ]
    return out


# ----------------------------------------------------------------------------- report


def seconds_table(samples: Samples, memory: Figures, nbytes: int) -> list[str]:
    lines = [
        "| Measurement | median s | min s | max s | GB/s (median) | peak extra RssAnon MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label in LABELS.items():
        values = samples[key]
        med = statistics.median(values)
        mem = f"{memory[key]:,.1f}" if key in memory else ""
        lines.append(
            f"| {label} | {med:.4f} | {min(values):.4f} | {max(values):.4f} | "
            f"{nbytes / med / 1e9:.2f} | {mem} |"
        )
    return lines


def source_diff() -> str:
    """A fingerprint of uncommitted changes under src/ (tracked and new files), or 'clean'."""

    def git(*argv: str) -> bytes:
        return subprocess.run(["git", *argv], capture_output=True, check=False, cwd=ROOT).stdout

    diff = git("diff", "HEAD", "--", "src") + git(
        "ls-files", "--others", "--exclude-standard", "src"
    )
    return hashlib.sha256(diff).hexdigest()[:12] if diff.strip() else "clean"


def command_line() -> str:
    exe = Path(sys.executable)
    shown = os.path.relpath(exe, ROOT) if exe.is_relative_to(ROOT) else str(exe)
    return shlex.join([shown, os.path.relpath(Path(__file__).resolve(), ROOT), *sys.argv[1:]])


def notes(
    bench: Bench, samples: Samples, med: Figures, found: list[Check], profiles: dict[str, str]
) -> list[str]:
    size = bench.workload.nbytes
    per = size / COUNT
    lines = [
        f"- Step 1 changes {len(bench.changed)} of {COUNT} tensors with `add_(1)` "
        f"({bench.changed_bytes / size:.1%} of the bytes); objects written: step 0 "
        f"{med['full_bytes'] / MIB:,.1f} MiB, step 1 {med['delta_bytes'] / MIB:,.1f} MiB; the "
        f"step-1 manifest is {med['manifest_bytes'] / 1024:,.1f} KiB (not counted).",
        "- The sync full save (row `manager save, step 0`) is the denominator of targets 1 and 2: "
        "the same operation, timed once per round; target 4 compares it with torch.save on the "
        "disk and, on tmpfs (RAM), where no disk limits either side.",
        f"- Full save: manager {med['mgr_full']:.3f} s vs tv.save {med['tv_save']:.3f} s, raw "
        f"write+fsync {med['raw_write']:.3f} s, torch.save+fsync {med['torch_save']:.3f} s, "
        f"hashing alone {med['hash']:.3f} s. The manager writes {COUNT} object files of "
        f"{per / MIB:,.0f} MiB in one batch (each written with the kernel's writeback started "
        "as it ends, then all fsynced, renamed, one folder fsync); torch.save writes everything "
        "to the page cache and the fsync then waits for all of it.",
        f"- Step-1 save {med['mgr_delta']:.3f} s: hashes all {size / MIB:,.0f} MiB (~"
        f"{med['hash']:.3f} s) to find the changed tensors, then writes "
        f"{len(bench.changed)} objects.",
        "- Async save() blocks while it snapshots: tensors unchanged at the previous save are "
        "hashed first and passed on by digest when still unchanged, the others are copied into "
        f"reused staging buffers without hashing (copy_ of all: {med['copy']:.3f} s). Blocked: "
        f"{med['async_blocked_training']:.3f} s when every tensor changed (ordinary training), "
        f"{med['async_blocked']:.3f} s with ~10% changed, "
        f"{med['async_blocked_after_restore']:.3f} s on a run's first save after restore() "
        "(which prepares the buffers in the background; the benchmark waits for that outside "
        "the timed region, standing for the first training steps), "
        f"{med['async_blocked_first']:.3f} s on a first save without restore() (fresh memory: "
        "allocation + page faults). End to end: first save "
        f"{med['async_e2e_first']:.3f} s, ~10% changed {med['async_e2e']:.3f} s, every tensor "
        f"changed {med['async_e2e_training']:.3f} s.",
        f"- Restore (warm cache): manager load(1) {med['mgr_load']:.3f} s maps and verifies "
        f"{COUNT} objects, tv.load {med['tv_load']:.3f} s maps and verifies one file; "
        f"restore(model=) {med['restore']:.3f} s and tv.load_into {med['tv_load_into']:.3f} s "
        "do that and copy every tensor into the model's own (which the zero-copy tv.load does "
        "not: restore / tv.load is reported, without a target). All verify every checksum "
        "(xxh3-128).",
        f"- torch copy_ runs on {torch.get_num_threads()} OpenMP threads; when the shared cores are "
        "busy a descheduled thread stalls the others, so copy-bound rows (async blocked, restore, "
        "load_into, copy_) swing most; their min is closer to the unloaded cost.",
        "- Before each measurement (untimed) the script touches and frees --prefault x the "
        "state's size of memory. This VM hands memory left free for a few seconds back to its "
        "host, and touching such pages again costs ~1.5 s/GiB instead of ~0.2 s/GiB (measured "
        "here: 8 GiB of fresh tensors, 1.0-1.6 s per GiB after the first); a save whose page "
        "cache lands on them runs at ~0.35-0.65 GB/s, as if the disk were that slow, whichever "
        "library writes. Touched just before, the measurement's writes get backed pages.",
        f"- Rows without I/O to the disk (hashing, copy_, loads and restores from the warm page "
        f"cache) take tens of ms: each round's figure is the median of {READ_REPEAT} "
        "back-to-back calls.",
        "- Peak memory: measured once per operation after the timings, in this process; the "
        "async figure includes the staging buffers, which the manager keeps between saves.",
    ]
    noisy = [k for k in LABELS if max(samples[k]) > 1.5 * min(samples[k])]
    if noisy:
        lines.append(
            "- Noisy (max > 1.5 x min; the machine is shared): "
            + ", ".join(f"{k} {min(samples[k]):.3g}-{max(samples[k]):.3g} s" for k in noisy)
            + "."
        )
    for check in found:
        if check.passed is False:
            where = profiles.get(check.label, "")
            lines.append(
                f"- MISS: {check.label} = {check.value:.3f} x (target {check.target()})"
                + (f"; cProfile of one run, {where}" if where else "")
                + "."
            )
    return lines


def report(
    bench: Bench,
    samples: Samples,
    memory: Figures,
    profiles: dict[str, str],
    args: argparse.Namespace,
    start: Start,
) -> str:
    med = {key: statistics.median(values) for key, values in samples.items()}
    found = checks(samples)
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    lines = [
        "# torchvault CheckpointManager benchmark results",
        "",
        f"- Date: {stamp}",
        *machine(start),
        f"- Uncommitted src/ changes at the end (sha256 of `git diff HEAD -- src` + untracked "
        f"names): {source_diff()}",
        f"- Command: `{command_line()}` (from the repository root)",
        f"- Each figure: median of {args.runs} runs (after {args.warmup} warm-up round), "
        "round-robin over the measurements, order rotated each round; warm page cache; no settling between measurements unless --settle is given; "
        f"{args.prefault:g} x the state's size of memory touched and freed before each measurement (--prefault, see the notes). "
        "Ratios: the median of the per-round ratios (the verdict: both sides measured in the same round, "
        "since this VM's disk changes speed several fold from minute to minute) and the ratio of the medians. "
        f"torch intra-op threads: {torch.get_num_threads()}.",
        "",
        f"## State: one module, {bench.workload.describe()} as buffers",
        "",
        *seconds_table(samples, memory, bench.workload.nbytes),
        "",
        "## Ratios and targets",
        "",
        "| Metric | median of per-round ratios | ratio of medians | target | |",
        "|---|---:|---:|---:|---|",
        *[c.row() for c in found],
        "",
        "## Notes",
        "",
        *notes(bench, samples, med, found, profiles),
        "",
    ]
    return "\n".join(lines)


def run_profiles(bench: Bench, samples: Samples) -> dict[str, str]:
    out = {}
    for check in checks(samples):
        if check.passed is False and check.profiler is not None:
            log(f"profiling: {check.label}")
            out[check.label] = check.profiler(bench)
    fresh(run_dir("prof-run"))
    return out


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__, HERE / "RESULTS-manager.md", prefault=4.0)
    parser.add_argument("--size-mib", type=int, default=1024, help="state size (64 tensors)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="torch intra-op threads (0: torch's default)"
    )
    parser.add_argument("--no-profile", action="store_true", help="skip cProfile of misses")
    return parse_bench_args(parser, argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = Start.now()
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    for folder in (BASE, RAM):
        fresh(folder)
    BASE.mkdir(parents=True)
    if RAM.parent.is_dir():
        RAM.mkdir()
    try:
        bench = build(args.size_mib)
        log(f"state: {bench.workload.describe()}")
        prepare(bench)
        samples = time_all(bench, args.runs, args.warmup)
        memory = {} if args.no_memory else measure_memory(bench)
        profiles = {} if args.no_profile else run_profiles(bench, samples)
        text = report(bench, samples, memory, profiles, args, start)
    finally:
        for folder in (BASE, RAM):
            fresh(folder)
    publish(text, args.results)


if __name__ == "__main__":
    main()
