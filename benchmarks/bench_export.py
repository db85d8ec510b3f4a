"""Benchmark torchvault's exports: how fast and how close each artifact is to eager PyTorch.

One function per section; ``main`` runs every section in ``SECTIONS`` and writes one report.
Each latency is the mean of ``--calls`` back-to-back calls on the same inputs (one "run");
runs alternate between the runtimes being compared (round-robin, order rotated each round),
and the table gives the median, min and max over ``--runs`` runs, after ``--warmup`` untimed
rounds. Deviations are the largest differences ``export_onnx`` measured over its samples.

    .venv/bin/python benchmarks/bench_export.py                       # full: batch 32, 7 runs
    .venv/bin/python benchmarks/bench_export.py --runs 3 --calls 20   # quick check
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench_file import WORK, Start, bench_parser, log, machine, parse_bench_args, publish
from torchvault import export_onnx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BASE = WORK / "export"  # everything this script writes; deleted at the end
SEED = 20240611


# ----------------------------------------------------------------------------- models


class TwoInTwoOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 128)
        self.b = nn.Linear(32, 128)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.a(x) * torch.sigmoid(self.b(y))
        return hidden.relu(), hidden.sum(dim=-1)


def cnn() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # not the identity a fresh one is
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model


@dataclass(frozen=True)
class Model:
    """One benchmarked model: how to build it and its example inputs at batch size ``b``."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], tuple[torch.Tensor, ...]]

    def describe(self, batch: int) -> str:
        return ", ".join(str(list(t.shape)) for t in self.inputs(batch))


MODELS = (
    Model(
        "MLP 256-512-512-10 (GELU)",
        lambda: nn.Sequential(
            nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 10)
        ),
        lambda b: (torch.randn(b, 256),),
    ),
    Model("CNN 2 conv + BatchNorm, 32x32", cnn, lambda b: (torch.randn(b, 3, 32, 32),)),
    Model(
        "TransformerEncoderLayer d=32 h=4, seq 16",
        lambda: nn.TransformerEncoderLayer(d_model=32, nhead=4, batch_first=True),
        lambda b: (torch.randn(b, 16, 32),),
    ),
    Model(
        "two inputs, two outputs",
        TwoInTwoOut,
        lambda b: (torch.randn(b, 64), torch.randn(b, 32)),
    ),
)


# ----------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Milliseconds per call, one figure per run."""

    runs: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    def cell(self) -> str:
        return f"{self.median:.4f} ({min(self.runs):.4f}-{max(self.runs):.4f})"


def per_call_ms(call: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls * 1000.0


def round_robin(
    callables: dict[str, Callable[[], object]], args: argparse.Namespace
) -> dict[str, Timing]:
    """Time every callable ``args.runs`` times, alternating, the order rotated each round."""
    names = list(callables)
    timings = {name: Timing([]) for name in names}
    for round_ in range(args.warmup + args.runs):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            ms = per_call_ms(callables[name], args.calls)
            if round_ >= args.warmup:
                timings[name].runs.append(ms)
    return timings


# ----------------------------------------------------------------------------- sections


def onnx_section(args: argparse.Namespace) -> list[str]:
    """ONNX Runtime (CPU) against eager PyTorch on the files ``export_onnx`` writes."""
    import onnxruntime as ort

    rows = [onnx_row(spec, BASE / f"model-{i}.onnx", args) for i, spec in enumerate(MODELS)]
    return [
        "## ONNX Runtime vs eager PyTorch",
        "",
        '`export_onnx(model, inputs, path, dynamic_shapes="batch")` (defaults: 8 random '
        f"samples, rtol 1e-4, atol 1e-5), then both runtimes on the example inputs (batch "
        f"{args.batch}). ms per call: median (min-max) of {args.runs} runs of {args.calls} "
        f"calls. PyTorch: eval mode, `torch.no_grad()`, {torch.get_num_threads()} threads "
        "(TransformerEncoderLayer takes its fused fast path). "
        f"ONNX Runtime {ort.__version__}: CPUExecutionProvider, all graph optimizations, "
        f"{args.threads or 'one'} intra-op thread{'s' if args.threads > 1 else ''}"
        f"{'' if args.threads else ' per core'}, idle threads not spinning (spinning ones slow the eager runs "
        "that follow them several-fold on this machine). Max deviations and input "
        "sets are from the export's own comparison (example + 8 random + batch sizes 1 and "
        "2b+1); the export time includes that comparison and its latency measurement.",
        "",
        "| Model | inputs | params | eager ms | ONNX Runtime ms | eager / ORT | max abs diff "
        "| max rel diff | input sets (batch sizes) | file KiB | export s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
        *rows,
    ]


def onnx_row(spec: Model, path: Path, args: argparse.Namespace) -> str:
    import onnxruntime as ort

    torch.manual_seed(SEED)
    model = spec.build().eval()
    inputs = spec.inputs(args.batch)
    log(f"onnx: {spec.name}")
    started = time.perf_counter()
    report = export_onnx(model, inputs, path, dynamic_shapes="batch")
    export_s = time.perf_counter() - started
    options = ort.SessionOptions()
    # spinning idle threads would steal the cores of the eager runs interleaved with these
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = args.threads  # 0: one per core
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    with torch.no_grad():
        timings = round_robin(
            {"eager": lambda: model(*inputs), "ort": lambda: session.run(None, feed)}, args
        )
    eager, runtime = timings["eager"], timings["ort"]
    params = sum(p.numel() for p in model.parameters())
    sizes = ", ".join(map(str, report.batch_sizes))
    return (
        f"| {spec.name} | {spec.describe(args.batch)} | {params:,} | {eager.cell()} | "
        f"{runtime.cell()} | {eager.median / runtime.median:.2f} | "
        f"{report.max_abs_diff:.2e} | {report.max_rel_diff:.2e} | {report.checked} ({sizes}) | "
        f"{report.file_bytes / 1024:,.1f} | {export_s:.2f} |"
    )


# Later sections (quantization, bf16) add a function here; each returns markdown lines.
def stored_section(args: argparse.Namespace) -> list[str]:
    """File sizes of ``tv.save`` in float32, with ``dtype=bfloat16`` and ``quantize="int8"``."""
    import torchvault as tv

    models = (
        ("4 x Linear(1024, 1024)", nn.Sequential(*(nn.Linear(1024, 1024) for _ in range(4)))),
        *((spec.name, spec.build()) for spec in MODELS),
    )
    rows = []
    for name, model in models:
        sizes = {}
        errors = {}
        for form, options in (("fp32", {}), ("bf16", {"dtype": torch.bfloat16}),
                              ("int8", {"quantize": "int8"})):  # fmt: skip
            report = tv.save(model, BASE / f"stored-{form}.tv", **options)  # type: ignore[arg-type]
            sizes[form] = report.file_bytes
            errors[form] = max((t.max_abs_error for t in report.stored), default=0.0)
        rows.append(
            f"| {name} | {sizes['fp32']:,} | {sizes['bf16']:,} | {sizes['bf16'] / sizes['fp32']:.3f}"
            f" | {errors['bf16']:.2g} | {sizes['int8']:,} | {sizes['int8'] / sizes['fp32']:.3f}"
            f" | {errors['int8']:.2g} |"
        )
    return [
        "## Half-precision and int8 storage (`tv.save(dtype=...)`, `tv.save(quantize=...)`)",
        "",
        "File bytes of the model's state saved three ways, and the largest absolute error any "
        "tensor's conversion made (from the save report). int8 stores matrices of 256+ "
        "elements per-channel with float32 scales; smaller tensors stay float32.",
        "",
        "| Model | fp32 bytes | bf16 bytes | bf16 / fp32 | bf16 max error | int8 bytes "
        "| int8 / fp32 | int8 max error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]


SECTIONS: tuple[Callable[[argparse.Namespace], list[str]], ...] = (onnx_section, stored_section)


# ----------------------------------------------------------------------------- report


def command_line() -> str:
    exe = Path(sys.executable)
    shown = os.path.relpath(exe, ROOT) if exe.is_relative_to(ROOT) else str(exe)
    script = os.path.relpath(Path(__file__).resolve(), ROOT)
    return shlex.join([shown, script, *sys.argv[1:]])


def report(sections: list[list[str]], args: argparse.Namespace, start: Start) -> str:
    import onnx
    import onnxruntime as ort
    import onnxscript

    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    lines = [
        "# torchvault export benchmark results",
        "",
        f"- Date: {stamp}",
        *machine(start),
        f"- onnx {onnx.__version__}, onnxruntime {ort.__version__}, onnxscript "
        f"{onnxscript.__version__}",
        f"- Command: `{command_line()}` (from the repository root)",
        f"- Each latency: mean of {args.calls} back-to-back calls per run; median (min-max) of "
        f"{args.runs} runs after {args.warmup} warm-up round(s), round-robin over the runtimes "
        "compared, order rotated each round.",
    ]
    for section in sections:
        lines += ["", *section]
    return "\n".join([*lines, ""])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__, HERE / "RESULTS-export.md", runs=7)
    parser.add_argument("--calls", type=int, default=100, help="calls per timed run")
    parser.add_argument("--batch", type=int, default=32, help="batch size of the inputs")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="intra-op threads of both PyTorch and ONNX Runtime (0: each library's default)",
    )
    return parse_bench_args(parser, argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = Start.now()
    shutil.rmtree(BASE, ignore_errors=True)
    BASE.mkdir(parents=True)
    try:
        text = report([section(args) for section in SECTIONS], args, start)
    finally:
        shutil.rmtree(BASE, ignore_errors=True)
    publish(text, args.results)


if __name__ == "__main__":
    main()
