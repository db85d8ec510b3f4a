"""Benchmark torchvault's legacy reader (load_legacy, scan, convert) against torch.load.

Two torch.save'd state dicts: workload A, ``--size-mib`` in 64 fp32 tensors, and workload B,
``--small-count`` fp32 tensors of 1 KiB. Each is saved in both of torch.save's formats: the
zip format (torch >= 1.6) and the legacy stacked pickles
(``_use_new_zipfile_serialization=False``). Every measurement runs ``--runs`` times,
round-robin over the measurements (the order rotates each round), and is reported as the
median with min and max; the page cache is never dropped (reads are warm), as in
``bench_file.py``. Peak extra anonymous memory (``RssAnon``) is measured once per measurement
in a fresh subprocess (this script with ``--child``), sampled every 1 ms. Once per run,
before the timings, the script checks that ``tv.load_legacy`` gives back tensors byte-equal
to ``torch.load``'s, in both formats, and that the converted file holds the same bytes.

    .venv/bin/python benchmarks/bench_legacy.py --runs 5          # full: 1 GiB, 20k x 1 KiB
    .venv/bin/python benchmarks/bench_legacy.py --size-mib 64 --runs 3 --small-count 2000
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import safetensors.torch
import torch

import torchvault as tv
from bench_file import (
    MIB,
    WORK,
    AnonSampler,
    Start,
    Workload,
    bench_parser,
    fsync_path,
    log,
    machine,
    parse_bench_args,
    publish,
    settle,
    small_workload,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BASE = WORK / "legacy"  # everything this script writes; deleted at the end
COUNT = 64  # tensors in workload A
LOAD_TARGET = 1.2  # tv.load_legacy time / torch.load(weights_only=True) time
MEMORY_TARGET = 1.1  # tv.load_legacy peak extra RssAnon / state size

Format = Literal["zip", "legacy"]
Op = Callable[[Path, Path], object]  # (torch.save file, output file) -> result


# ----------------------------------------------------------------------------- workloads


def big_workload(size_mib: int) -> Workload:
    """64 fp32 tensors, ``size_mib`` MiB in all."""
    if size_mib < 1:
        raise SystemExit("--size-mib must be at least 1")
    return Workload("A", COUNT, (4 * size_mib, 1024))


def source(workload: Workload, fmt: Format) -> Path:
    """The torch.save file of ``workload`` in format ``fmt``."""
    return BASE / f"{workload.name}-{fmt}.pt"


def write_sources(workload: Workload) -> None:
    """torch.save the workload's state dict in both formats (untimed)."""
    sd = workload.build()
    torch.save(sd, source(workload, "zip"))
    torch.save(sd, source(workload, "legacy"), _use_new_zipfile_serialization=False)


# ----------------------------------------------------------------------------- operations


def torch_load(src: Path, _: Path) -> object:
    return torch.load(src, weights_only=True)


def torch_mmap(src: Path, _: Path) -> object:
    return torch.load(src, weights_only=True, mmap=True)


def tv_load_legacy(src: Path, _: Path) -> object:
    return tv.load_legacy(src)


def tv_scan(src: Path, _: Path) -> object:
    return tv.scan(src)


def tv_convert(src: Path, out: Path) -> object:
    return tv.convert(src, out, to="safetensors")


def st_convert(src: Path, out: Path) -> None:
    """The plain way: torch.load, then safetensors save_file (+ fsync, as tv.convert does)."""
    safetensors.torch.save_file(torch.load(src, weights_only=True), str(out))
    fsync_path(out)


@dataclass(frozen=True)
class Case:
    """One measurement: ``fn(source, out)`` on the workload's file in format ``fmt``."""

    key: str
    label: str
    fmt: Format
    fn: Op
    writes: bool = False  # writes ``out``, deleted (untimed) before and after each run

    def source(self, workload: Workload) -> Path:
        return source(workload, self.fmt)

    def out(self, workload: Workload, prefix: str = "") -> Path:
        return BASE / f"{prefix}{workload.name}-{self.key}.safetensors"


CASES = (
    Case("torch_load", "torch.load(weights_only=True) [baseline]", "zip", torch_load),
    Case("torch_mmap", "torch.load(weights_only=True, mmap=True) [reference]", "zip", torch_mmap),
    Case("tv_legacy", "tv.load_legacy (every CRC checked, zero-copy)", "zip", tv_load_legacy),
    Case("torch_load_old", "torch.load(weights_only=True), legacy format", "legacy", torch_load),
    Case("tv_legacy_old", "tv.load_legacy, legacy format", "legacy", tv_load_legacy),
    Case("scan", "tv.scan", "zip", tv_scan),
    Case("convert", "tv.convert(to='safetensors') (fsync, rename)", "zip", tv_convert, True),
    Case(
        "st_convert",
        "safetensors save_file(torch.load(weights_only=True)) + fsync",
        "zip",
        st_convert,
        True,
    ),
)
BY_KEY = {case.key: case for case in CASES}
PAIRS = (("tv_legacy", "torch_load"), ("tv_legacy_old", "torch_load_old"))  # target: <= 1.2


# ----------------------------------------------------------------------------- checks


def byte_equal(got: object, want: object, what: str) -> int:
    """Raise unless ``got`` holds the same names, dtypes, shapes and bytes as ``want``;
    return the number of tensors compared."""
    if not isinstance(got, Mapping) or not isinstance(want, Mapping):
        raise RuntimeError(f"{what}: expected a state dict, got {type(got).__name__}")
    if list(got) != list(want):
        raise RuntimeError(f"{what}: the names differ from torch.load's")
    for name, tensor in want.items():
        other = got[name]
        if (
            not isinstance(other, torch.Tensor)
            or (other.dtype, other.shape) != (tensor.dtype, tensor.shape)
            or not torch.equal(_raw(other), _raw(tensor))
        ):
            raise RuntimeError(f"{what}: tensor {name!r} differs from torch.load's")
    return len(want)


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def verify(workload: Workload) -> str:
    """Check, once, that load_legacy and convert give back torch.load's bytes exactly and
    that scan finds the file safe; a one-line summary for the notes."""
    want = torch.load(source(workload, "zip"), weights_only=True)
    for fmt in ("zip", "legacy"):
        path = source(workload, fmt)
        byte_equal(torch.load(path, weights_only=True), want, f"torch.load, {fmt} format")
        byte_equal(tv.load_legacy(path), want, f"tv.load_legacy, {fmt} format")
        report = tv.scan(path)
        if not report.safe:
            raise RuntimeError(f"tv.scan found {path} unsafe: {report}")
    out = BASE / f"check-{workload.name}.safetensors"
    tv.convert(source(workload, "zip"), out, to="safetensors")
    count = byte_equal(safetensors.torch.load_file(out), want, "tv.convert's safetensors file")
    out.unlink()
    return (
        f"{workload.name}: tv.load_legacy byte-equal to torch.load for all {count:,} tensors in "
        "both formats; tv.convert's file (read by safetensors load_file) byte-equal; tv.scan safe"
    )


# ----------------------------------------------------------------------------- timing


@dataclass
class Result:
    workload: Workload
    case: Case
    seconds: list[float] = field(default_factory=list)
    peak_extra_mib: float | None = None
    fresh_seconds: float | None = None  # the one run in a fresh process (the memory child)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def memory_fraction(self) -> float | None:
        if self.peak_extra_mib is None:
            return None
        return self.peak_extra_mib * MIB / self.workload.nbytes


def run_once(case: Case, workload: Workload) -> float:
    out = case.out(workload)
    if case.writes:
        out.unlink(missing_ok=True)
    gc.collect()
    start = time.perf_counter()
    result = case.fn(case.source(workload), out)
    elapsed = time.perf_counter() - start
    del result
    if case.writes:
        out.unlink()  # untimed; keeps the disk needed to the sources plus one output
    gc.collect()
    return elapsed


def time_cases(workload: Workload, runs: int, warmup: int) -> list[Result]:
    results = [Result(workload, case) for case in CASES]
    count = len(results)
    for round_ in range(warmup + runs):
        for result in results[round_ % count :] + results[: round_ % count]:
            settle()
            elapsed = run_once(result.case, workload)
            if round_ >= warmup:
                result.seconds.append(elapsed)
        log(f"{workload.name}: round {round_ + 1}/{warmup + runs} done")
    return results


# ----------------------------------------------------------------------------- memory


def workloads(args: argparse.Namespace) -> dict[str, Workload]:
    return {"A": big_workload(args.size_mib), "B": small_workload(args.small_count)}


def child_main(args: argparse.Namespace) -> None:
    """Run one measurement in this fresh process; print its peak extra RssAnon as JSON."""
    workload = workloads(args)[args.workload]
    case = BY_KEY[args.child]
    out = case.out(workload, prefix="mem-")
    out.unlink(missing_ok=True)
    gc.collect()
    sys.setswitchinterval(0.0005)  # let the sampler in even while Python code runs
    time.sleep(0.05)
    with AnonSampler() as sampler:
        begin = time.perf_counter()
        result = case.fn(case.source(workload), out)
        seconds = time.perf_counter() - begin
        sampler.sample()
    del result
    out.unlink(missing_ok=True)
    print(json.dumps({"key": case.key, "extra_mib": sampler.extra_mib, "seconds": seconds}))


def measure_memory(results: list[Result], args: argparse.Namespace) -> None:
    for result in results:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            result.case.key,
            "--workload",
            result.workload.name,
            "--size-mib",
            str(args.size_mib),
            "--small-count",
            str(args.small_count),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"memory child {result.case.key} failed:\n{done.stderr}")
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        result.peak_extra_mib, result.fresh_seconds = figures["extra_mib"], figures["seconds"]
        log(f"memory {result.workload.name} {result.case.key}: +{result.peak_extra_mib:.1f} MiB")


# ----------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Check:
    """A figure against its target (``limit`` None: reported, no target)."""

    label: str
    value: float
    limit: float | None
    unit: str = "x"

    @property
    def passed(self) -> bool | None:
        return None if self.limit is None else self.value <= self.limit

    @property
    def verdict(self) -> str:
        return {None: "info", True: "PASS", False: "**MISS**"}[self.passed]

    def target(self) -> str:
        return "" if self.limit is None else f"<= {self.limit:.2f} {self.unit}"

    def row(self) -> str:
        return f"| {self.label} | {self.value:.3f} {self.unit} | {self.target()} | {self.verdict} |"


def checks(results: list[Result]) -> list[Check]:
    by = {(r.workload.name, r.case.key): r for r in results}
    found = []
    for name in ("A", "B"):
        med = {key: by[name, key].median for key in BY_KEY}
        for tv_key, torch_key in PAIRS:
            fmt = BY_KEY[tv_key].fmt
            found.append(
                Check(
                    f"{name}: tv.load_legacy / torch.load time, {fmt} format",
                    med[tv_key] / med[torch_key],
                    LOAD_TARGET,
                )
            )
        found += [
            Check(
                f"{name}: torch.load mmap / torch.load time",
                med["torch_mmap"] / med["torch_load"],
                None,
            ),
            Check(f"{name}: tv.scan / torch.load time", med["scan"] / med["torch_load"], None),
            Check(
                f"{name}: tv.convert / (torch.load + save_file + fsync) time",
                med["convert"] / med["st_convert"],
                None,
            ),
        ]
        for key in ("tv_legacy", "tv_legacy_old", "torch_load"):
            fraction = by[name, key].memory_fraction
            if fraction is not None:
                # Only A has a memory target: with 1 KiB tensors, the Python and tensor
                # objects outweigh the data (torch.load itself needs ~2 x the state).
                limit = MEMORY_TARGET if name == "A" and key != "torch_load" else None
                what = BY_KEY[key].label.split(" (")[0].replace(" [baseline]", "")
                found.append(
                    Check(f"{name}: {what} peak extra RssAnon / state size", fraction, limit)
                )
    return found


def results_table(results: list[Result]) -> list[str]:
    workload = results[0].workload
    lines = [
        "| Measurement | file | median s | min s | max s | GB/s (median) | us/tensor (median) "
        "| fresh process s (1 run) | peak extra RssAnon MiB | x state |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        fresh = "" if r.fresh_seconds is None else f"{r.fresh_seconds:.4f}"
        mem = "" if r.peak_extra_mib is None else f"{r.peak_extra_mib:,.1f}"
        frac = "" if r.memory_fraction is None else f"{r.memory_fraction:.3f}"
        lines.append(
            f"| {r.case.label} | {r.case.fmt} | {r.median:.4f} | {min(r.seconds):.4f} | "
            f"{max(r.seconds):.4f} | {workload.nbytes / r.median / 1e9:.2f} | "
            f"{r.median / workload.count * 1e6:.1f} | {fresh} | {mem} | {frac} |"
        )
    return lines


def file_sizes(workload: Workload) -> str:
    zip_bytes = source(workload, "zip").stat().st_size
    old_bytes = source(workload, "legacy").stat().st_size
    return (
        f"- {workload.name} files: zip {zip_bytes:,} bytes, legacy {old_bytes:,} bytes "
        f"(state {workload.nbytes:,} bytes)."
    )


def notes(results: list[Result], found: list[Check], verified: list[str]) -> list[str]:
    lines = [
        *(f"- Verified once before timing: {line}." for line in verified),
        *(file_sizes(w) for w in {r.workload.name: r.workload for r in results}.values()),
        "- torch.load(weights_only=True) reads every byte into fresh memory; tv.load_legacy maps "
        "the file and checks every zip CRC-32 (which reads every byte), and its tensors are "
        "views of the map. torch.load(mmap=True) checks no CRC and reads nothing until touched; "
        "it is shown for reference only (it cannot read the legacy format).",
        "- tv.scan is a full read in permissive mode (the same reader, refused names kept as "
        "stubs). tv.convert reads with tv.load and writes a strict safetensors file atomically "
        "(fsync, rename, folder fsync); the baseline is torch.load + safetensors save_file + "
        "fsync.",
        "- Memory: mapped file pages count as RssFile, not RssAnon, so a zero-copy load shows "
        "almost no extra anonymous memory; torch.load allocates the whole state.",
        "- The timed runs repeat each call in one process, so torch.load gets back the heap "
        "memory its previous run freed, already faulted in; a program that loads once pays "
        "the page faults. The `fresh process` column is the one run in the memory subprocess "
        "(a single sample, so noisier), closer to that case.",
        f"- torch intra-op threads: {torch.get_num_threads()}.",
    ]
    noisy = [r for r in results if max(r.seconds) > 1.5 * min(r.seconds)]
    if noisy:
        lines.append(
            "- Noisy (max > 1.5 x min; the machine is shared): "
            + ", ".join(
                f"{r.workload.name} {r.case.key} {min(r.seconds):.3g}-{max(r.seconds):.3g} s"
                for r in noisy
            )
            + "."
        )
    lines += [
        f"- MISS: {c.label} = {c.value:.3f} {c.unit} (target {c.target()})."
        for c in found
        if c.passed is False
    ]
    return lines


def command_line() -> str:
    exe = Path(sys.executable)
    shown = os.path.relpath(exe, ROOT) if exe.is_relative_to(ROOT) else str(exe)
    return shlex.join([shown, os.path.relpath(Path(__file__).resolve(), ROOT), *sys.argv[1:]])


def report(
    big: list[Result],
    small: list[Result],
    verified: list[str],
    args: argparse.Namespace,
    start: Start,
) -> str:
    found = checks([*big, *small])
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    lines = [
        "# torchvault legacy reader benchmark results",
        "",
        f"- Date: {stamp}",
        *machine(start),
        f"- Command: `{command_line()}` (from the repository root)",
        f"- Each figure: median of {args.runs} runs (after {args.warmup} warm-up round), "
        "round-robin over the measurements, order rotated each round; warm page cache "
        "(nothing dropped); no settling between measurements unless --settle is given. "
        "Ratios are ratios of medians. Peak memory: one run per measurement in a fresh "
        "subprocess, RssAnon sampled every 1 ms.",
        "",
        f"## Workload A: {big[0].workload.describe()}",
        "",
        *results_table(big),
        "",
        f"## Workload B: {small[0].workload.describe()}",
        "",
        *results_table(small),
        "",
        "## Ratios and targets",
        "",
        "| Metric | measured | target | |",
        "|---|---:|---:|---|",
        *[c.row() for c in found],
        "",
        "## Notes",
        "",
        *notes([*big, *small], found, verified),
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__, HERE / "RESULTS-legacy.md", prefault=0.0)
    parser.add_argument(
        "--size-mib", type=int, default=1024, help="workload A size (MiB, 64 tensors)"
    )
    parser.add_argument(
        "--small-count", type=int, default=20_000, help="workload B tensors (1 KiB each)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workload", choices=("A", "B"), help=argparse.SUPPRESS)
    return parse_bench_args(parser, argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return
    start = Start.now()
    shutil.rmtree(BASE, ignore_errors=True)
    BASE.mkdir(parents=True)
    try:
        timed: dict[str, list[Result]] = {}
        verified = []
        for workload in workloads(args).values():
            log(f"workload {workload.name}: {workload.describe()}")
            write_sources(workload)
            verified.append(verify(workload))
            timed[workload.name] = time_cases(workload, args.runs, args.warmup)
            if not args.no_memory:
                measure_memory(timed[workload.name], args)
        text = report(timed["A"], timed["B"], verified, args, start)
    finally:
        shutil.rmtree(BASE, ignore_errors=True)
    publish(text, args.results)


if __name__ == "__main__":
    main()
