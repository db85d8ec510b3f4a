"""Benchmark torchvault's one-file save/load against raw I/O, torch.save/load and safetensors.

Every measurement runs on the same in-memory state dict and the same files (under
``benchmarks/.work/``), ``--runs`` times in round-robin order, and is reported as the
median (with min and max). The page cache is never dropped: reads are warm, as in the
reference baselines. Peak extra anonymous memory (``RssAnon``) is measured once per
measurement in a fresh subprocess (this script with ``--child``), sampled every 1 ms.

    .venv/bin/python benchmarks/bench_file.py --runs 5            # full: 1 GiB, 20k x 1 KiB
    .venv/bin/python benchmarks/bench_file.py --size-mib 64 --runs 3 --small-count 2000
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import safetensors
import safetensors.torch
import torch
import xxhash

import torchvault as tv

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / ".work"
MIB = 1 << 20
PIECE = 64 * MIB  # raw write/read piece size
SEED = 20240611

StateDict = dict[str, torch.Tensor]
Kind = Literal["save", "load", "cpu"]
Fn = Callable[[StateDict, Path], object]


# ----------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """``count`` fp32 tensors of ``shape``, filled from a fixed seed (same data every time)."""

    name: str
    count: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n

    @property
    def nbytes(self) -> int:
        return self.count * self.numel * 4

    def build(self) -> StateDict:
        gen = torch.Generator().manual_seed(SEED)
        return {
            f"layers.{i:05d}.weight": torch.randn(self.shape, generator=gen)
            for i in range(self.count)
        }

    def describe(self) -> str:
        size = self.numel * 4
        each = f"{size // MIB} MiB" if size >= MIB else f"{size} B"
        return f"{self.count:,} fp32 tensors of {each} ({self.nbytes / MIB:,.0f} MiB in all)"


def big_workload(size_mib: int, tensor_mib: int) -> Workload:
    tensor_mib = max(1, min(tensor_mib, size_mib))
    rows = tensor_mib * MIB // 4 // 1024
    return Workload("A", max(1, size_mib // tensor_mib), (rows, 1024))


def small_workload(count: int) -> Workload:
    return Workload("B", count, (256,))


# ----------------------------------------------------------------------------- operations


def tensor_views(obj: object) -> Iterator[memoryview]:
    """A flat byte view of every tensor in ``obj`` (dicts, lists, tuples of tensors)."""
    if isinstance(obj, torch.Tensor):
        flat = obj.detach().reshape(-1).view(torch.uint8)
        yield memoryview(flat.numpy())
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from tensor_views(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from tensor_views(value)


def touch(obj: object) -> int:
    """Read every tensor byte (xxh3-64: ~20 GB/s, so this mostly measures page access)."""
    acc = 0
    for view in tensor_views(obj):
        acc ^= xxhash.xxh3_64_intdigest(view)
    return acc


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_write(sd: StateDict, path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for view in tensor_views(sd):
            for start in range(0, len(view), PIECE):
                piece = view[start : start + PIECE]
                while piece:
                    piece = piece[os.write(fd, piece) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_reader(nbytes: int) -> Fn:
    """Read a file into one preallocated (and pre-faulted) buffer with ``os.preadv``."""
    buffer = bytearray(nbytes)

    def read(_: StateDict, path: Path) -> None:
        view = memoryview(buffer)
        fd = os.open(path, os.O_RDONLY)
        try:
            offset = 0
            while offset < nbytes:
                got = os.preadv(fd, [view[offset : offset + PIECE]], offset)
                if got == 0:
                    raise OSError(f"{path} is shorter than {nbytes} bytes")
                offset += got
        finally:
            os.close(fd)

    return read


def torch_save(sd: StateDict, path: Path) -> None:
    torch.save(sd, path)
    fsync_path(path)


def st_save(sd: StateDict, path: Path) -> None:
    safetensors.torch.save_file(sd, str(path))
    fsync_path(path)


def hash_only(sd: StateDict, _: Path) -> list[str]:
    return [xxhash.xxh3_128_hexdigest(view) for view in tensor_views(sd)]


def touched(load: Callable[[Path], object]) -> Fn:
    def run(_: StateDict, path: Path) -> object:
        obj = load(path)
        touch(obj)
        return obj

    return run


def loader(load: Callable[[Path], object]) -> Fn:
    return lambda _, path: load(path)


def torch_load(path: Path) -> object:
    return torch.load(path, weights_only=True)


def torch_mmap(path: Path) -> object:
    return torch.load(path, mmap=True, weights_only=True)


def st_load(path: Path) -> object:
    return safetensors.torch.load_file(path)


def tv_lazy(path: Path) -> object:
    return tv.load(path, lazy=True)


def tv_full(path: Path) -> object:
    return tv.load(path)


def tv_save(sd: StateDict, path: Path) -> None:
    tv.save(sd, path)


def without_gc(fn: Fn) -> Fn:
    """Diagnostic: ``fn`` with Python's cyclic garbage collector switched off."""

    def run(sd: StateDict, path: Path) -> object:
        gc.disable()
        try:
            return fn(sd, path)
        finally:
            gc.enable()

    return run


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One measurement: ``fn(state_dict, path)``; saves write ``path`` anew every run."""

    key: str
    label: str
    kind: Kind
    suffix: str  # the file it writes or reads: .raw .pt .safetensors .tv ('' = none)
    fn: Fn
    memory: bool = True  # measured for peak memory (big workload only)

    def path(self, workload: Workload, prefix: str = "") -> Path:
        return WORK / f"{prefix}{workload.name}{self.suffix}"


def big_cases(workload: Workload, with_raw_read: bool = True) -> list[Case]:
    read = raw_reader(workload.nbytes) if with_raw_read else loader(lambda _: None)
    return [
        Case("raw_write", "raw os.write 64 MiB pieces + fsync", "save", ".raw", raw_write),
        Case("torch_save", "torch.save + fsync", "save", ".pt", torch_save),
        Case("st_save", "safetensors save_file + fsync", "save", ".safetensors", st_save),
        Case("tv_save", "tv.save (fsync + rename + dir fsync)", "save", ".tv", tv_save),
        Case("raw_read", "raw os.preadv into preallocated buffer", "load", ".raw", read, False),
        Case("torch_load", "torch.load(weights_only)", "load", ".pt", loader(torch_load)),
        Case(
            "torch_mmap", "torch.load(mmap, weights_only) open", "load", ".pt", loader(torch_mmap)
        ),
        Case("torch_mmap_touch", "torch.load(mmap) + touch", "load", ".pt", touched(torch_mmap)),
        Case("st_load", "safetensors load_file open", "load", ".safetensors", loader(st_load)),
        Case(
            "st_load_touch",
            "safetensors load_file + touch",
            "load",
            ".safetensors",
            touched(st_load),
        ),
        Case("tv_lazy", "tv.load(lazy=True) open", "load", ".tv", loader(tv_lazy)),
        Case(
            "tv_lazy_touch",
            "tv.load(lazy=True) + touch (no verify)",
            "load",
            ".tv",
            touched(tv_lazy),
        ),
        Case("tv_full", "tv.load() full, verified", "load", ".tv", loader(tv_full)),
        Case("tv_full_touch", "tv.load() full, verified + touch", "load", ".tv", touched(tv_full)),
        Case("hash_only", "xxh3-128 of the in-memory tensors", "cpu", "", hash_only, False),
    ]


SMALL_KEYS = ("torch_save", "torch_load", "st_save", "st_load", "tv_save", "tv_full", "tv_lazy")


def small_cases(workload: Workload) -> list[Case]:
    by_key = {case.key: case for case in big_cases(workload, with_raw_read=False)}
    cases = [by_key[key] for key in SMALL_KEYS]
    for key in ("tv_save", "tv_full"):
        case = by_key[key]
        cases.append(
            Case(
                f"{key}_nogc",
                f"{case.label} [diagnostic: gc disabled]",
                case.kind,
                case.suffix,
                without_gc(case.fn),
                memory=False,
            )
        )
    return cases


# ----------------------------------------------------------------------------- results


@dataclass
class Result:
    workload: Workload
    case: Case
    seconds: list[float] = field(default_factory=list)
    file_bytes: int | None = None
    peak_extra_mib: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def gbps(self) -> float:
        return self.workload.nbytes / self.median / 1e9

    def us_per_tensor(self, seconds: float | None = None) -> float:
        return (self.median if seconds is None else seconds) / self.workload.count * 1e6


@dataclass(frozen=True)
class Target:
    label: str
    value: float
    limit: float
    at_least: bool  # True: value >= limit passes
    unit: str = "x"
    extra: bool = False  # from anchors section 8, beyond the brief's list

    @property
    def passed(self) -> bool:
        return self.value >= self.limit if self.at_least else self.value <= self.limit

    def row(self) -> str:
        sign = ">=" if self.at_least else "<="
        tag = " (extra, anchors section 8)" if self.extra else ""
        verdict = "PASS" if self.passed else "**MISS**"
        return (
            f"| {self.label}{tag} | {_fmt(self.value)} {self.unit} | {sign} "
            f"{_fmt(self.limit)} {self.unit} | {verdict} |"
        )


def _fmt(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 10 else f"{value:,.1f}"


# ----------------------------------------------------------------------------- timing


def clear(path: Path) -> None:
    path.unlink(missing_ok=True)


def cleanup(workloads: list[Workload]) -> None:
    """Delete the files this script wrote (other files under WORK are left alone)."""
    for workload in workloads:
        for suffix in (".raw", ".pt", ".safetensors", ".tv"):
            for prefix in ("", "mem-"):
                clear(WORK / f"{prefix}{workload.name}{suffix}")


def run_once(case: Case, workload: Workload, sd: StateDict) -> float:
    path = case.path(workload)
    if case.kind == "save":
        clear(path)
    gc.collect()
    start = time.perf_counter()
    result = case.fn(sd, path)
    elapsed = time.perf_counter() - start
    del result
    gc.collect()
    return elapsed


def time_cases(
    workload: Workload, cases: list[Case], sd: StateDict, runs: int, warmup: int
) -> list[Result]:
    results = [Result(workload, case) for case in cases]
    for round_ in range(warmup + runs):
        for result in results:
            settle()
            elapsed = run_once(result.case, workload, sd)
            if round_ >= warmup:
                result.seconds.append(elapsed)
        log(f"{workload.name}: round {round_ + 1}/{warmup + runs} done")
    for result in results:
        if result.case.kind == "save":
            result.file_bytes = result.case.path(workload).stat().st_size
    return results


SETTLE = {"seconds": 0.0, "prefault_bytes": 0}  # --settle, --prefault


def settle() -> None:
    """Run before each measurement (untimed).

    With --settle S: flush everything and pause S seconds, so it starts on an idle disk. Off
    by default: on the reference VM it changed which saves were slow rather than removing
    the noise (see RESULTS.md).

    With a prefault size: allocate, touch and free that much memory, so the page cache the
    measurement writes into gets pages the hypervisor still backs. On the reference VM
    (Firecracker) memory left free for a few seconds goes back to the host, and touching it
    again costs ~1.5 s/GiB instead of ~0.2 s/GiB; a save that lands on such pages looks like
    a disk five times slower, whichever library made it.
    """
    if SETTLE["seconds"] > 0:
        os.sync()
        time.sleep(SETTLE["seconds"])
    if SETTLE["prefault_bytes"] > 0:
        torch.empty(int(SETTLE["prefault_bytes"]), dtype=torch.uint8).fill_(1)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- memory


def rss_anon_kib() -> int:
    with open("/proc/self/status", "rb") as handle:
        for line in handle:
            if line.startswith(b"RssAnon:"):
                return int(line.split()[1])
    raise RuntimeError("no RssAnon in /proc/self/status")


class AnonSampler:
    """Samples RssAnon every ``interval`` seconds in a thread; ``peak`` is in KiB."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> AnonSampler:
        self.baseline = self.peak = rss_anon_kib()
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        self.peak = max(self.peak, rss_anon_kib())

    def __exit__(self, *_: object) -> None:
        self.sample()  # the result is still alive here
        self._stop.set()
        self._thread.join()

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.baseline) / 1024


def child_main(args: argparse.Namespace) -> None:
    """Run one measurement in this fresh process; print its peak extra RssAnon as JSON."""
    workload = big_workload(args.size_mib, args.tensor_mib)
    case = next(c for c in big_cases(workload, with_raw_read=False) if c.key == args.child)
    sd = workload.build() if case.kind != "load" else {}
    path = case.path(workload, prefix="mem-" if case.kind == "save" else "")
    if case.kind == "save":
        clear(path)
    gc.collect()
    sys.setswitchinterval(0.0005)  # let the sampler in even while Python code runs
    time.sleep(0.05)
    with AnonSampler() as sampler:
        result = case.fn(sd, path)
        sampler.sample()
    del result
    if case.kind == "save":
        clear(path)
    print(json.dumps({"key": case.key, "extra_mib": sampler.extra_mib}))


def measure_memory(results: list[Result], args: argparse.Namespace) -> None:
    for result in results:
        if not result.case.memory:
            continue
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            result.case.key,
            "--size-mib",
            str(args.size_mib),
            "--tensor-mib",
            str(args.tensor_mib),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"memory child {result.case.key} failed:\n{done.stderr}")
        result.peak_extra_mib = json.loads(done.stdout.strip().splitlines()[-1])["extra_mib"]
        log(f"memory {result.case.key}: +{result.peak_extra_mib:.1f} MiB anon")


# ----------------------------------------------------------------------------- saving over a file


SAVE_CASES = {
    "new": "new path (the old file deleted, untimed, before each save)",
    "overwrite": "over the previous file at the same path",
    "overwrite+load": "over the previous file, each save followed by a load of it",
}


@dataclass
class SaveRun:
    """One case of the save comparison: tv.save against torch.save + fsync, same rounds."""

    case: str
    tv: list[float] = field(default_factory=list)
    torch: list[float] = field(default_factory=list)
    freed: list[float] = field(default_factory=list)  # after tv.save returned, until freed
    tv_load: list[float] = field(default_factory=list)
    torch_load: list[float] = field(default_factory=list)

    @property
    def ratio_of_medians(self) -> float:
        return statistics.median(self.torch) / statistics.median(self.tv)

    @property
    def paired_ratio(self) -> float:
        """The median over rounds of torch.save time / tv.save time in the same round."""
        return statistics.median(b / a for a, b in zip(self.tv, self.torch, strict=True))


def wait_for_frees() -> None:
    """Wait for the files tv.save replaced to be freed (untimed: in training, this runs on
    a background thread during the next steps). Older torchvault frees them in the save."""
    try:
        from torchvault import _freeing
    except ImportError:
        return
    _freeing.wait_for_frees()


def save_runs(workload: Workload, sd: StateDict, runs: int, warmup: int) -> list[SaveRun]:
    """tv.save and torch.save + fsync of ``sd``, alternating (which goes first alternates
    too), in each case of SAVE_CASES, one case after the other. No prefaulting: the saves
    get whatever memory the previous round left, as in a training loop."""
    results = []
    for case in SAVE_CASES:
        tv_path = WORK / f"saves-{workload.name}.tv"
        pt_path = WORK / f"saves-{workload.name}.pt"
        for path in (tv_path, pt_path):
            clear(path)
        result = SaveRun(case)
        for round_ in range(warmup + runs):
            timings = {}
            order = ("tv", "torch") if round_ % 2 == 0 else ("torch", "tv")
            for side in order:
                timings.update(save_once(side, case, sd, tv_path if side == "tv" else pt_path))
            if round_ >= warmup:
                for key, seconds in timings.items():
                    getattr(result, key).append(seconds)
        log(
            f"saves {case}: tv.save {statistics.median(result.tv):.3f} s, torch.save "
            f"{statistics.median(result.torch):.3f} s, ratio {result.ratio_of_medians:.2f}"
        )
        results.append(result)
        for path in (tv_path, pt_path):
            clear(path)
    return results


def save_once(side: str, case: str, sd: StateDict, path: Path) -> dict[str, float]:
    """Time one save (and for overwrite+load, one load of it) by ``side``."""
    if case == "new":
        clear(path)
    gc.collect()
    times = {}
    start = time.perf_counter()
    if side == "tv":
        tv.save(sd, path)
        times["tv"] = time.perf_counter() - start
        wait_for_frees()
        times["freed"] = time.perf_counter() - start - times["tv"]
    else:
        torch_save(sd, path)
        times["torch"] = time.perf_counter() - start
    if case == "overwrite+load":
        start = time.perf_counter()
        loaded = touched(tv_full if side == "tv" else torch_load)(sd, path)
        times[f"{side}_load"] = time.perf_counter() - start
        del loaded
        gc.collect()
    return times


def save_table(results: list[SaveRun]) -> list[str]:
    def spread(values: list[float]) -> str:
        if not values:
            return ""
        return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"

    lines = [
        "| Case | tv.save s | torch.save + fsync s | tv.save / torch.save throughput, "
        "ratio of medians | median of per-round ratios | freed after tv.save returned s | "
        "tv.load() + touch s | torch.load(weights_only) + touch s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines.extend(
        f"| {SAVE_CASES[r.case]} | {spread(r.tv)} | {spread(r.torch)} | "
        f"{r.ratio_of_medians:.2f} x | {r.paired_ratio:.2f} x | {spread(r.freed)} | "
        f"{spread(r.tv_load)} | {spread(r.torch_load)} |"
        for r in results
    )
    return lines


def save_targets(results: list[SaveRun]) -> list[Target]:
    return [
        Target(
            f"tv.save / torch.save throughput, {SAVE_CASES[r.case]}", r.ratio_of_medians, 1.25, True
        )
        for r in results
    ]


def save_section(results: list[SaveRun], args: argparse.Namespace) -> list[str]:
    workload = big_workload(args.save_size_mib or args.size_mib, args.tensor_mib)
    return [
        f"## Saving to a new path and over an existing file: {workload.describe()}",
        "",
        f"One process, {args.runs} rounds after {args.warmup} warm-up round per case, the cases "
        "one after the other. Each round saves with tv.save and with torch.save + fsync, each "
        "to its own file, alternating which goes first; figures are median (min-max). No "
        "prefaulting: every save gets the memory the previous ones left, as in a training "
        "loop (the new-path case frees hot pages just before each save, when it deletes the "
        "old file). After each tv.save the benchmark waits, untimed, until the file it "
        "replaced is freed (torchvault does that on a background thread; the column shows "
        "how long it took) so that freeing never overlaps the other library's save.",
        "",
        *save_table(results),
        "",
    ]


# ----------------------------------------------------------------------------- report


def big_table(results: list[Result]) -> list[str]:
    lines = [
        "| Measurement | median s | min s | max s | GB/s (median) | file bytes | peak extra RssAnon MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        size = f"{r.file_bytes:,}" if r.file_bytes is not None else ""
        mem = f"{r.peak_extra_mib:,.1f}" if r.peak_extra_mib is not None else ""
        lines.append(
            f"| {r.case.label} | {r.median:.4f} | {min(r.seconds):.4f} | "
            f"{max(r.seconds):.4f} | {r.gbps:.2f} | {size} | {mem} |"
        )
    return lines


def small_table(results: list[Result]) -> list[str]:
    payload = results[0].workload.nbytes
    count = results[0].workload.count
    lines = [
        "| Measurement | median us/tensor | min | max | median s (total) | file bytes over payload per tensor |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        over = f"{(r.file_bytes - payload) / count:.1f}" if r.file_bytes is not None else ""
        lines.append(
            f"| {r.case.label} | {r.us_per_tensor():.1f} | "
            f"{r.us_per_tensor(min(r.seconds)):.1f} | {r.us_per_tensor(max(r.seconds)):.1f} "
            f"| {r.median:.3f} | {over} |"
        )
    return lines


def targets(big: dict[str, Result], small: dict[str, Result]) -> list[Target]:
    med = {key: r.median for key, r in big.items()}
    tv_small = small["tv_save"]
    many = f"{tv_small.workload.count:,} x 1 KiB"
    over = ((tv_small.file_bytes or 0) - tv_small.workload.nbytes) / tv_small.workload.count
    checks = [
        Target("tv.save / torch.save throughput", med["torch_save"] / med["tv_save"], 1.25, True),
        Target(
            "tv.save / raw write+fsync throughput", med["raw_write"] / med["tv_save"], 0.85, True
        ),
        Target(
            "tv.load full (verified) / torch.load(weights_only) time",
            med["tv_full"] / med["torch_load"],
            0.5,
            False,
        ),
        Target(
            "tv.load lazy open / torch.load(weights_only) time",
            med["tv_lazy"] / med["torch_load"],
            0.02,
            False,
        ),
        Target(f"{many}: tv.save per tensor", tv_small.us_per_tensor(), 25, False, "us"),
        Target(
            f"{many}: tv.load full (verified) per tensor",
            small["tv_full"].us_per_tensor(),
            25,
            False,
            "us",
        ),
        *memory_targets(big),
        Target(
            "tv.load full + touch / torch.load(weights_only) time",
            med["tv_full_touch"] / med["torch_load"],
            0.15,
            False,
            extra=True,
        ),
        Target(
            "tv.load lazy open, absolute (1 ms + 20 us/tensor)",
            med["tv_lazy"] * 1e3,
            1 + 0.02 * big["tv_lazy"].workload.count,
            False,
            "ms",
            extra=True,
        ),
        Target(
            f"{many}: tv.load lazy per tensor",
            small["tv_lazy"].us_per_tensor(),
            25,
            False,
            "us",
            extra=True,
        ),
        Target(f"{many}: tv file bytes over payload per tensor", over, 128, False, "B", extra=True),
    ]
    return checks


def memory_targets(big: dict[str, Result]) -> list[Target]:
    save, lazy = big["tv_save"].peak_extra_mib, big["tv_lazy"].peak_extra_mib
    if save is None or lazy is None:
        return []  # --no-memory
    largest_mib = big["tv_save"].workload.numel * 4 / MIB
    return [
        Target("tv.save peak extra RssAnon", save, 64 + largest_mib, False, "MiB"),
        Target("tv.load lazy peak extra RssAnon", lazy, 64, False, "MiB"),
    ]


def notes(big: dict[str, Result], small: dict[str, Result], checks: list[Target]) -> list[str]:
    lines = [
        "- All reads are warm (page cache never dropped), like the reference baselines; "
        "in the workload tables, saves write a new file each run and include fsync.",
        *big_notes(big),
        *small_notes(small),
    ]
    noisy = [r for r in (*big.values(), *small.values()) if max(r.seconds) > 1.5 * min(r.seconds)]
    if noisy:
        lines.append(
            "- Noisy (max > 1.5 x min; the machine was shared): "
            + ", ".join(
                f"{r.workload.name} {r.case.key} {min(r.seconds):.3g}-{max(r.seconds):.3g} s"
                for r in noisy
            )
            + "."
        )
    missed = [t for t in checks if not t.passed]
    if missed:
        lines.append(
            "- Misses: "
            + "; ".join(
                f"{t.label} = {_fmt(t.value)} {t.unit} (target {'>=' if t.at_least else '<='} "
                f"{_fmt(t.limit)} {t.unit})"
                for t in missed
            )
            + "."
        )
    return lines


def big_notes(big: dict[str, Result]) -> list[str]:
    med = {key: r.median for key, r in big.items()}
    gib = big["tv_save"].workload.nbytes / (1 << 30)
    return [
        f"- Save ({gib:.2f} GiB): raw write+fsync {med['raw_write']:.3f} s, xxh3-128 of the same "
        f"bytes alone {med['hash_only']:.3f} s, tv.save {med['tv_save']:.3f} s (tv.save - raw = "
        f"{med['tv_save'] - med['raw_write']:+.3f} s; tv.save hashes serially with its writes).",
        f"- Throughput relative to raw write+fsync: torch.save {med['raw_write'] / med['torch_save']:.2f}"
        f" x (reference: 0.7-0.85 x), tv.save {med['raw_write'] / med['tv_save']:.2f} x. All are "
        f"bound by the disk: at exactly raw speed, tv.save / torch.save would be "
        f"{med['torch_save'] / med['raw_write']:.2f} x.",
        f"- Load: lazy open {med['tv_lazy'] * 1e3:.1f} ms, lazy + touch (no verify) "
        f"{med['tv_lazy_touch']:.3f} s, full verified {med['tv_full']:.3f} s, full + touch "
        f"{med['tv_full_touch']:.3f} s; torch.load(weights_only) {med['torch_load']:.3f} s, "
        f"safetensors open + touch {med['st_load_touch']:.3f} s, raw read {med['raw_read']:.3f} s.",
        "- Memory: mapped file pages count as RssFile, not RssAnon, so mmap-based loads show "
        "~0 extra anonymous memory even when every byte is touched; torch.load(weights_only) "
        "allocates the whole checkpoint.",
    ]


def small_notes(small: dict[str, Result]) -> list[str]:
    us = {key: r.us_per_tensor() for key, r in small.items()}
    workload = small["tv_save"].workload
    over = {
        key: ((small[key].file_bytes or 0) - workload.nbytes) / workload.count
        for key in ("tv_save", "st_save")
    }
    return [
        f"- {workload.count:,} x 1 KiB per tensor: tv.save {us['tv_save']:.1f} us vs torch.save "
        f"{us['torch_save']:.1f} / safetensors {us['st_save']:.1f}; tv.load full {us['tv_full']:.1f} "
        f"us, lazy {us['tv_lazy']:.1f} us vs torch.load {us['torch_load']:.1f} / safetensors "
        f"{us['st_load']:.1f}. With Python's cyclic GC disabled during the call (diagnostic): "
        f"tv.save {us['tv_save_nogc']:.1f} us, tv.load full {us['tv_full_nogc']:.1f} us.",
        f"- Header bytes per tensor: the safetensors part costs {over['st_save']:.0f} B (as in a "
        f"plain safetensors file); torchvault's members add {over['tv_save'] - over['st_save']:.0f} "
        "B (the tree repeats every name, plus a table index and a 32-hex-digit checksum).",
    ]


@dataclass(frozen=True)
class Start:
    """What is recorded when the run starts (the source may change while it runs)."""

    load: str
    source: str

    @classmethod
    def now(cls) -> Start:
        return cls(loadavg(), source_state())


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine(start: Start) -> list[str]:
    cpu = _grep("/proc/cpuinfo", "model name")
    mem_kib = int(_grep("/proc/meminfo", "MemTotal").split()[0])
    df = subprocess.run(["df", "-T", str(WORK)], capture_output=True, text=True, check=False)
    fs = df.stdout.splitlines()[-1].split() if df.returncode == 0 else ["?", "?"]
    return [
        f"- CPU: {cpu}; nproc {len(os.sched_getaffinity(0))}; memory {mem_kib / (1 << 20):.1f} GiB",
        f"- Kernel: {platform.release()}; work dir filesystem: {fs[1]} on {fs[0]}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, safetensors "
        f"{safetensors.__version__}, torchvault {tv.__version__}, numpy {np.__version__}, "
        f"xxhash {xxhash.VERSION}; torchvault source at start: {start.source}",
        f"- Load average (1/5/15 min) at start / end: {start.load} / {loadavg()}",
    ]


def source_state() -> str:
    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], capture_output=True, text=True, check=False, cwd=ROOT)
        return done.stdout.strip() if done.returncode == 0 else "?"

    dirty = git("status", "--porcelain", "--", "src")
    return f"git {git('rev-parse', '--short', 'HEAD')}" + (
        " with uncommitted changes under src/" if dirty else ""
    )


def _grep(path: str, key: str) -> str:
    with open(path) as handle:
        for line in handle:
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return "?"


def command_line() -> str:
    exe = Path(sys.executable)
    shown = os.path.relpath(exe, ROOT) if exe.is_relative_to(ROOT) else str(exe)
    script = os.path.relpath(Path(__file__).resolve(), ROOT)
    return shlex.join([shown, script, *sys.argv[1:]])


def report(
    big: list[Result],
    small: list[Result],
    saves: list[SaveRun],
    args: argparse.Namespace,
    start: Start,
) -> str:
    if not big:
        return saves_report(saves, args, start)
    by_big = {r.case.key: r for r in big}
    by_small = {r.case.key: r for r in small}
    checks = targets(by_big, by_small) + save_targets(saves)
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    lines = [
        "# torchvault file benchmark results",
        "",
        f"- Date: {stamp}",
        *machine(start),
        f"- Command: `{command_line()}` (from the repository root)",
        f"- Each figure: median of {args.runs} runs (after {args.warmup} warm-up round), "
        "round-robin over the measurements; warm page cache (nothing dropped); no settling between measurements unless --settle is given; "
        f"{args.prefault:g} x workload A's size of memory touched and freed before each measurement (--prefault: this VM hands memory "
        "left free for a few seconds back to its host, and a save whose page cache lands on such pages runs several times slower, "
        "whichever library writes; see benchmarks/README.md). "
        "Peak memory: one run per measurement in a fresh subprocess, RssAnon sampled every 1 ms.",
        "",
        f"## Workload A: {big[0].workload.describe()}",
        "",
        *big_table(big),
        "",
        f"## Workload B: {small[0].workload.describe()}",
        "",
        *small_table(small),
        "",
        *(save_section(saves, args) if saves else []),
        "## Ratios and targets",
        "",
        "| Metric | measured | target | |",
        "|---|---:|---:|---|",
        *[t.row() for t in checks],
        "",
        "## Notes",
        "",
        *notes(by_big, by_small, checks),
        "",
    ]
    return "\n".join(lines)


def saves_report(saves: list[SaveRun], args: argparse.Namespace, start: Start) -> str:
    """The report of ``--only saves``: the machine and the save comparison alone."""
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    checks = save_targets(saves)
    return "\n".join(
        [
            "# torchvault save benchmark results (--only saves)",
            "",
            f"- Date: {stamp}",
            *machine(start),
            f"- Command: `{command_line()}` (from the repository root)",
            "",
            *save_section(saves, args),
            "## Targets",
            "",
            "| Metric | measured | target | |",
            "|---|---:|---:|---|",
            *[t.row() for t in checks],
            "",
        ]
    )


# ----------------------------------------------------------------------------- main


def publish(text: str, results: Path) -> None:
    """Print the report and write it to ``results`` (``-``: print only)."""
    print(text)
    if str(results) != "-":
        results.write_text(text)
        log(f"wrote {results}")


def bench_parser(
    doc: str, results: Path, *, runs: int = 5, prefault: float | None = None
) -> argparse.ArgumentParser:
    """The options every benchmark script shares. Scripts that time disk I/O pass their
    ``prefault`` default and get ``--settle`` and ``--prefault`` too (see :func:`settle`);
    they must also define ``--size-mib``, the size ``--prefault`` multiplies."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--runs", type=int, default=runs, help="timed runs per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument(
        "--results",
        type=Path,
        default=results,
        help="markdown report to (over)write; '-' for none",
    )
    if prefault is not None:
        parser.add_argument(
            "--settle",
            type=float,
            default=0.0,
            help="os.sync() and pause this long before each measurement",
        )
        parser.add_argument(
            "--prefault",
            type=float,
            default=prefault,
            help="touch and free this many times --size-mib of memory before each "
            "measurement (0: off; see bench_file.settle)",
        )
    return parser


def parse_bench_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, then apply --settle and --prefault (when the parser has them)."""
    args = parser.parse_args(argv)
    if hasattr(args, "settle"):
        SETTLE["seconds"] = args.settle
        SETTLE["prefault_bytes"] = int(args.prefault * args.size_mib * MIB)
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__, HERE / "RESULTS.md", prefault=3.0)
    parser.add_argument("--size-mib", type=int, default=1024, help="workload A size (MiB)")
    parser.add_argument("--tensor-mib", type=int, default=16, help="workload A tensor size")
    parser.add_argument("--small-count", type=int, default=20_000, help="workload B tensors")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument(
        "--save-size-mib",
        type=int,
        default=0,
        help="state size of the new-path / overwrite save comparison (0: --size-mib)",
    )
    parser.add_argument(
        "--only",
        choices=("all", "saves"),
        default="all",
        help="'saves': only the new-path / overwrite save comparison",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parse_bench_args(parser, argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    if args.child:
        child_main(args)
        return
    start = Start.now()
    save_load = big_workload(args.save_size_mib or args.size_mib, args.tensor_mib)
    log(f"saves: {save_load.describe()}")
    saves = save_runs(save_load, save_load.build(), args.runs, args.warmup)
    big: list[Result] = []
    small: list[Result] = []
    big_load = big_workload(args.size_mib, args.tensor_mib)
    small_load = small_workload(args.small_count)
    if args.only == "all":
        log(f"workload A: {big_load.describe()}")
        sd = big_load.build()
        big = time_cases(big_load, big_cases(big_load), sd, args.runs, args.warmup)
        del sd
        if not args.no_memory:
            measure_memory(big, args)
        log(f"workload B: {small_load.describe()}")
        small = time_cases(
            small_load, small_cases(small_load), small_load.build(), args.runs, args.warmup
        )
    text = report(big, small, saves, args, start)
    publish(text, args.results)
    cleanup([big_load, small_load])


if __name__ == "__main__":
    main()
