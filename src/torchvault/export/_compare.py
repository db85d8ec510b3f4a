"""Comparing an artifact with the model it came from: sample inputs, output differences
under ``allclose`` semantics, and latencies (median and interquartile range). Shared by every export and by quantize.
"""

from __future__ import annotations

import contextlib
import errno
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from .. import _commit
from ..errors import CheckpointWriteError

Inputs = tuple[torch.Tensor, ...]


def as_inputs(example: torch.Tensor | Sequence[torch.Tensor]) -> Inputs:
    """The example inputs as a tuple of tensors (a single tensor is one input)."""
    if isinstance(example, torch.Tensor):
        inputs: Inputs = (example,)
    elif isinstance(example, Sequence) and not isinstance(example, str | bytes):
        inputs = tuple(example)
    else:
        inputs = ()
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("example_inputs must be a tensor or a sequence of tensors")
    return inputs


def check_destination(dest: Path, example: str) -> None:
    """Fail before a (slow) export when ``dest`` could not be written anyway."""
    if dest.is_dir():
        raise CheckpointWriteError(
            f"cannot export to {dest}: it is a folder; pass a file path such as {dest / example}",
            path=dest,
            errno=errno.EISDIR,
        )
    if not dest.parent.is_dir():
        missing = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        raise _commit.write_error(dest, missing, "export to")


def dynamic_shapes(spec: object, inputs: Inputs) -> object:
    """torch.export's ``dynamic_shapes`` for ``spec`` (``"batch"`` spelled out)."""
    if not isinstance(spec, str):
        return spec
    if spec != "batch":
        raise ValueError(
            f'dynamic_shapes must be "batch", None or torch.export dynamic shapes, got {spec!r}'
        )
    scalars = [i for i, t in enumerate(inputs) if t.dim() == 0]
    if scalars:
        raise ValueError(
            f'dynamic_shapes="batch" makes dim 0 of every input dynamic, but input {scalars[0]} '
            "is a scalar; pass torch.export dynamic shapes for each input instead"
        )
    batch = torch.export.Dim("batch")
    return tuple({0: batch} for _ in inputs)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for an export; afterwards every submodule's own flag comes back as it was
    (``model.train(flag)`` would overwrite submodules deliberately kept in eval)."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def outputs_of(result: object) -> list[torch.Tensor]:
    """Every tensor of a model's output (a tensor, or nested tuples, lists and dicts), in order."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, Mapping):
        return [t for value in result.values() for t in outputs_of(value)]
    if isinstance(result, (list, tuple)):
        return [t for value in result for t in outputs_of(value)]
    return []


def samples(
    example: Inputs, count: int, *, batch_sizes: Sequence[int] = (), seed: int = 0
) -> Iterator[Inputs]:
    """The example inputs, then ``count`` random inputs of the same shapes and dtypes, then one
    random input per extra batch size (the first dimension of every input replaced).

    Floating inputs are drawn from a normal distribution with the example's mean and spread;
    integer inputs uniformly from the example's own range (token ids stay valid); booleans
    uniformly.
    """
    generator = torch.Generator().manual_seed(seed)
    yield example
    for _ in range(count):
        yield tuple(_like(t, t.shape, generator) for t in example)
    for batch in batch_sizes:
        yield tuple(_like(t, (batch, *t.shape[1:]), generator) for t in example)


def _like(t: torch.Tensor, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    if t.dtype == torch.bool:
        return torch.randint(0, 2, tuple(shape), generator=generator).bool()
    if t.dtype.is_floating_point:
        base = t.float()
        scale = float(base.std()) if base.numel() > 1 else 1.0
        mean = float(base.mean()) if base.numel() else 0.0
        drawn = torch.randn(tuple(shape), generator=generator) * (scale or 1.0) + mean
        return drawn.to(t.dtype)
    low = int(t.min()) if t.numel() else 0
    high = int(t.max()) + 1 if t.numel() else 1
    return torch.randint(low, max(high, low + 1), tuple(shape), generator=generator).to(t.dtype)


@dataclass
class Differences:
    """The running maximum differences between expected and actual outputs."""

    rtol: float
    atol: float
    max_abs: float = 0.0
    max_rel: float = 0.0
    within: bool = True
    checked: int = 0

    def add(self, expected: Sequence[torch.Tensor], actual: Sequence[torch.Tensor]) -> None:
        """Compare one input's outputs; a different count, shape or a NaN mismatch fails."""
        self.checked += 1
        if len(expected) != len(actual):
            self.within, self.max_abs = False, float("inf")
            return
        for want, got in zip(expected, actual, strict=True):
            want64 = want.detach().to("cpu", torch.float64)
            got64 = torch.as_tensor(got).detach().to("cpu", torch.float64)
            if want64.shape != got64.shape:
                self.within, self.max_abs = False, float("inf")
                continue
            if want64.numel() == 0:
                continue
            same_nan = torch.isnan(want64) == torch.isnan(got64)
            diff = (want64 - got64).abs().nan_to_num(0.0)
            rel = diff / want64.abs().clamp_min(torch.finfo(torch.float64).tiny)
            self.max_abs = max(self.max_abs, float(diff.max()))
            self.max_rel = max(self.max_rel, float(rel.max()))
            close = diff <= self.atol + self.rtol * want64.abs().nan_to_num(0.0)
            self.within = self.within and bool(same_nan.all()) and bool(close.all())


class Latency(NamedTuple):
    """Wall times of repeated calls: their median and interquartile range, in ms."""

    median_ms: float
    iqr_ms: float


def latency(run: Callable[[], object], *, repeats: int = 20, warmup: int = 3) -> Latency:
    """The median wall time of ``run()`` and the spread around it (the interquartile range:
    the middle half of the runs lies within it), in milliseconds."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000.0)
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return Latency(statistics.median(times), q3 - q1)
