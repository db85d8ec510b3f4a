"""Benchmark tv.quantize: int8 file size, CPU latency and output deviation against fp32.

Three models: a Linear-dominated stack of 4 x Linear(1024, 1024), and the MLP and small
transformer of ``tests/test_quantize.py``. Each is quantized three ways: int8-dynamic and
int8-weight-only with torchao, and int8-dynamic with torch.ao (the fallback used where
torchao is missing). For each it records the sizes of the float ``tv.save`` file and the
``save_quantized`` file, the largest output deviation over the example input and 8 random
inputs (from the report of ``tv.quantize``), and checks that ``save_quantized`` then
``load_quantized`` into a fresh model gives bit-identical outputs. Latencies are taken
``--runs`` times, round-robin over every model variant (the order rotates each round); each
run is the median of ``--repeats`` forward calls, and the report gives the median, min and
max over the runs.

    .venv/bin/python benchmarks/bench_quantize.py --runs 5          # full: ~1 min on 2 cores
    .venv/bin/python benchmarks/bench_quantize.py --runs 2 --repeats 5 --results -   # quick
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import shlex
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bench_file import Start, bench_parser, log, machine, parse_bench_args, publish
from torchvault._report import QuantizationReport
from torchvault.export import _compare, load_quantized, quantize, save_quantized

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_quantize import MLP, TinyTransformer  # noqa: E402  (the models the tests use)

SIZE_TARGET = 0.3  # int8 file / fp32 file, for the Linear-dominated model
SEED = 20240611


# ----------------------------------------------------------------------------- subjects


class LinearStack(nn.Module):
    """4 x Linear(1024, 1024) with ReLU between: ~99.9% of the bytes are Linear weights."""

    def __init__(self, width: int = 1024, depth: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else torch.relu(layer(x))
        return x


@dataclass(frozen=True)
class Subject:
    """A model to quantize and the inputs of one forward call for a batch size."""

    name: str
    describe: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], torch.Tensor]
    target: bool  # the size target applies (Linear-dominated)

    def model(self, seed: int = SEED) -> nn.Module:
        torch.manual_seed(seed)
        return self.build().eval()


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(SEED + 1)


SUBJECTS = [
    Subject(
        "linear4x1024",
        "4 x Linear(1024, 1024), ReLU between; input (batch, 1024)",
        LinearStack,
        lambda batch: torch.randn(batch, 1024, generator=_generator()),
        True,
    ),
    Subject(
        "test-mlp",
        "tests' MLP: Linear(128, 512), 2 x Linear(512, 512), LayerNorm, Linear(512, 10); "
        "input (batch, 128)",
        MLP,
        lambda batch: torch.randn(batch, 128, generator=_generator()),
        True,
    ),
    Subject(
        "test-transformer",
        "tests' TinyTransformer: Embedding(64, 128), 2 pre-norm blocks (qkv, proj, 4x MLP), "
        "Linear head; input (batch, 16) token ids",
        TinyTransformer,
        lambda batch: torch.randint(0, 64, (batch, 16), generator=_generator()),
        False,
    ),
]


@dataclass(frozen=True)
class Variant:
    method: str
    backend: str

    @property
    def label(self) -> str:
        return f"{self.method} ({self.backend})"


VARIANTS = [
    Variant("int8-dynamic", "torchao"),
    Variant("int8-weight-only", "torchao"),
    Variant("int8-dynamic", "torch.ao"),
]


# ----------------------------------------------------------------------------- measuring


@dataclass
class Quantized:
    subject: Subject
    variant: Variant
    model: nn.Module
    report: QuantizationReport
    output_scale: float  # the largest |output| of the float model on the example input
    bit_identical: bool


def quantize_all(subjects: list[Subject], batch: int) -> list[Quantized]:
    out = []
    for subject in subjects:
        example = subject.inputs(batch)
        with torch.no_grad():
            scale = float(subject.model()(example).abs().max())
        for variant in VARIANTS:
            model, report = quantize(
                subject.model(),
                variant.method,
                example_inputs=example,
                samples=8,
                backend=variant.backend,
            )
            identical = round_trip(subject, model, example)
            out.append(Quantized(subject, variant, model, report, scale, identical))
            log(f"{subject.name} {variant.label}: quantized, round trip identical: {identical}")
    return out


def round_trip(subject: Subject, model: nn.Module, example: torch.Tensor) -> bool:
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as folder:
        path = Path(folder) / "q.tv"
        save_quantized(model, path)
        loaded = load_quantized(subject.model(seed=SEED + 7), path)
    with torch.no_grad():
        return torch.equal(model(example), loaded(example))


@dataclass
class Timing:
    subject: Subject
    batch: int
    label: str
    run: Callable[[], object]
    ms: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.ms)


def timings(quantized: list[Quantized], batches: list[int]) -> list[Timing]:
    out = []
    for subject in dict.fromkeys(q.subject for q in quantized):
        models = [("fp32", subject.model())]
        models += [(q.variant.label, q.model) for q in quantized if q.subject is subject]
        for batch in batches:
            inputs = subject.inputs(batch)
            out += [Timing(subject, batch, label, forward(m, inputs)) for label, m in models]
    return out


def forward(model: nn.Module, inputs: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return model(inputs)

    return run


def time_all(cases: list[Timing], runs: int, warmup: int, repeats: int) -> None:
    for round_ in range(warmup + runs):
        shift = round_ % len(cases)
        for case in cases[shift:] + cases[:shift]:
            ms = _compare.latency(case.run, repeats=repeats, warmup=2).median_ms
            if round_ >= warmup:
                case.ms.append(ms)
        log(f"latency round {round_ + 1}/{warmup + runs} done")


# ----------------------------------------------------------------------------- report


def size_table(quantized: list[Quantized]) -> list[str]:
    lines = [
        "| model | method (backend) | quantized modules | fp32 file bytes | int8 file bytes "
        "| int8 / fp32 | target | max abs diff | max abs diff / max abs output | max rel diff "
        "| reload bit-identical |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for q in quantized:
        r = q.report
        ratio = r.quantized_bytes / r.float_bytes
        target = ""
        if q.subject.target:
            verdict = "PASS" if ratio <= SIZE_TARGET else "**MISS**"
            target = f"<= {SIZE_TARGET} {verdict}"
        lines.append(
            f"| {q.subject.name} | {q.variant.label} | {len(r.modules)} | {r.float_bytes:,} | "
            f"{r.quantized_bytes:,} | {ratio:.3f} | {target} | {r.max_abs_diff:.4g} | "
            f"{r.max_abs_diff / q.output_scale:.4f} | {r.max_rel_diff:.3g} | "
            f"{'yes' if q.bit_identical else '**NO**'} |"
        )
    return lines


def latency_table(cases: list[Timing]) -> list[str]:
    lines = [
        "| model | batch | variant | median ms | min ms | max ms | vs fp32 (median) |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    base: dict[tuple[str, int], float] = {}
    for case in cases:
        key = (case.subject.name, case.batch)
        base.setdefault(key, case.median)  # fp32 comes first for each model and batch
        lines.append(
            f"| {case.subject.name} | {case.batch} | {case.label} | {case.median:.3f} | "
            f"{min(case.ms):.3f} | {max(case.ms):.3f} | {case.median / base[key]:.2f} x |"
        )
    return lines


def notes(quantized: list[Quantized], cases: list[Timing]) -> list[str]:
    lines = [
        "- File sizes are of torchvault files: `tv.save(model)` for fp32, `save_quantized` for "
        "int8 (int8 weights, one float32 scale and one int8 zero point per row for torchao, one "
        "scale per tensor for torch.ao; biases, norms and embeddings stay float32).",
        "- Deviations come from the `QuantizationReport` of `tv.quantize`: the example input "
        "plus 8 random inputs like it; `max abs diff / max abs output` divides by the largest "
        "|output| of the float model on the example input. The max rel diff divides by each "
        "float output element, so elements near zero dominate it.",
        "- `vs fp32` below 1 means the int8 model is faster. Every model runs in eager mode "
        "(no torch.compile; tv.quantize leaves torch._inductor's settings alone).",
        *fastest(cases),
    ]
    noisy = [c for c in cases if max(c.ms) > 1.5 * min(c.ms)]
    if noisy:
        lines.append(
            "- Noisy (max > 1.5 x min; the machine is shared): "
            + ", ".join(
                f"{c.subject.name} b{c.batch} {c.label} {min(c.ms):.3g}-{max(c.ms):.3g} ms"
                for c in noisy
            )
            + "."
        )
    misses = [q for q in quantized if not q.bit_identical]
    if misses:
        lines.append(
            "- MISS: reload not bit-identical for "
            + ", ".join(f"{q.subject.name} {q.variant.label}" for q in misses)
            + "."
        )
    return lines


def fastest(cases: list[Timing]) -> list[str]:
    """One line: the fastest variant of each model and batch, against fp32."""
    groups: dict[tuple[str, int], list[Timing]] = {}
    for case in cases:
        groups.setdefault((case.subject.name, case.batch), []).append(case)
    parts = []
    for (name, batch), group in groups.items():
        best = min(group[1:], key=lambda c: c.median)
        parts.append(f"{name} b{batch}: {best.label} {best.median / group[0].median:.2f} x")
    return ["- Fastest int8 variant (median vs fp32): " + "; ".join(parts) + "."]


def command_line() -> str:
    exe = Path(sys.executable)
    shown = os.path.relpath(exe, ROOT) if exe.is_relative_to(ROOT) else str(exe)
    return shlex.join([shown, os.path.relpath(Path(__file__).resolve(), ROOT), *sys.argv[1:]])


def versions() -> str:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return (
        f"- torchao {version('torchao')}; torch quantized engine "
        f"{torch.backends.quantized.engine}; torch intra-op threads {torch.get_num_threads()}"
    )


def report(
    quantized: list[Quantized], cases: list[Timing], args: argparse.Namespace, start: Start
) -> str:
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    lines = [
        "# torchvault quantization benchmark results",
        "",
        f"- Date: {stamp}",
        *machine(start),
        versions(),
        f"- Command: `{command_line()}` (from the repository root)",
        f"- Latency: median of {args.runs} runs (after {args.warmup} warm-up round), each run "
        f"the median of {args.repeats} forward calls under no_grad, round-robin over every "
        "model variant, order rotated each round.",
        "",
        "## Models",
        "",
        *[f"- `{s.name}`: {s.describe}" for s in dict.fromkeys(q.subject for q in quantized)],
        "",
        f"## File size and output deviation (accuracy inputs: batch {args.batches[0]})",
        "",
        *size_table(quantized),
        "",
        "## Latency on this CPU",
        "",
        *latency_table(cases),
        "",
        "## Notes",
        "",
        *notes(quantized, cases),
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__, HERE / "RESULTS-quantize.md")
    parser.add_argument("--repeats", type=int, default=20, help="forward calls per run")
    parser.add_argument(
        "--batches",
        type=lambda text: [int(b) for b in text.split(",")],
        default=[1, 32],
        help="batch sizes timed, comma-separated; the first is also the accuracy input",
    )
    return parse_bench_args(parser, argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = Start.now()
    quantized = quantize_all(SUBJECTS, args.batches[0])
    cases = timings(quantized, args.batches)
    time_all(cases, args.runs, args.warmup, args.repeats)
    text = report(quantized, cases, args, start)
    publish(text, args.results)


if __name__ == "__main__":
    main()
