"""Int8 quantization of a model's Linear layers, and its cost measured.

``quantize`` applies torchao (``quantize_`` with ``Int8DynamicActivationInt8WeightConfig`` or
``Int8WeightOnlyConfig``), or, where torchao is not installed, PyTorch's own
``torch.ao.quantization.quantize_dynamic`` (int8-dynamic only). The report records which. The
file format of the result is in ``_quantized_file``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import _args, _file
from .._report import QuantizationReport
from . import _compare
from ._quantize_backends import (
    METHODS,
    _apply,
    _check_float,
    _quantized_modules,
    chosen_backend,
)
from ._quantized_file import _save

# ----------------------------------------------------------------------------- quantize


def quantize(
    model: torch.nn.Module,
    method: str = "int8-dynamic",
    *,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    samples: int = 8,
    inplace: bool = False,
    backend: str | None = None,
) -> tuple[torch.nn.Module, QuantizationReport]:
    """Quantize the Linear layers of ``model`` to int8 and measure what it costs.

    torchao is used where it is installed; without it, ``"int8-dynamic"`` falls back to
    PyTorch's (deprecated) ``torch.ao.quantization.quantize_dynamic``. The quantized model is
    in eval mode. Check ``report.quantized_latency_ms``: on some CPUs torchao's int8 kernels
    are slower than float32.

    Args:
        model: a float model; it is deep-copied first unless ``inplace`` is true.
        method: ``"int8-dynamic"`` (int8 weights, activations quantized to int8 on the fly)
            or ``"int8-weight-only"`` (int8 weights, float activations).
        example_inputs: the inputs of one forward call. The model's outputs on them and on
            ``samples`` random inputs like them are compared with the float model's, and the
            latencies are timed on them. Without them nothing is guessed: the differences and
            latencies in the report are NaN and ``report.samples`` is 0.
        samples: random input sets compared besides the example inputs.
        inplace: quantize ``model`` itself (it is also left in eval mode) instead of a copy.
        backend: ``"torchao"`` or ``"torch"`` (PyTorch's ``torch.ao`` dynamic quantization,
            ``"int8-dynamic"`` only; recorded as ``"torch.ao"``). ``None``: torchao where it
            is installed, else torch for ``"int8-dynamic"``. At batch 1 on small layers
            torch's dynamic int8 can be several times faster than torchao's: compare
            ``report.quantized_latency_ms``.

    Returns:
        The quantized model and a :class:`QuantizationReport`: the quantized modules, file
        sizes as torchvault files (float ``tv.save`` and ``save_quantized``), the largest
        output differences, and median latencies.

    Raises:
        ValueError: an unknown ``method``, a model that is already quantized or has no
            ``nn.Linear`` layer, or a negative ``samples``; an unknown ``backend``, one that
            cannot do ``method``, or one that is not installed.
        ImportError: the method needs torchao and it is not installed, naming the extra.

    Example:
        >>> qmodel, report = tv.quantize(model, "int8-dynamic", example_inputs=x)
        >>> report.quantized_bytes / report.float_bytes, report.max_abs_diff
    """
    _args.module(model)
    _args.flag(inplace, "inplace")
    _check_method(method)
    _args.count(samples, "samples")
    _check_float(model)
    _check_has_linear(model)
    chosen = chosen_backend(method, backend)
    inputs = None if example_inputs is None else _compare.as_inputs(example_inputs)
    with _eval_mode(model, restore=not inplace):
        float_bytes = _file_bytes(lambda path: _file.save(model, path))
        reference = None if inputs is None else _Measured.of(model, inputs, samples)
        quantized = model if inplace else copy.deepcopy(model)
    quantized.eval()
    _apply(quantized, method, chosen)
    report = QuantizationReport(
        method=method,
        backend=chosen,
        modules=_quantized_modules(quantized, chosen),
        float_bytes=float_bytes,
        quantized_bytes=_file_bytes(lambda path: _save(quantized, path, method, chosen, None)),
        **_comparison(quantized, reference),
    )
    return quantized, report


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {list(METHODS)}")


def _check_has_linear(model: torch.nn.Module) -> None:
    if not any(_is_linear(module) for module in model.modules()):
        raise ValueError(
            f"`model` ({type(model).__name__}) has no nn.Linear layer: int8 quantization "
            "here applies to Linear layers only."
        )


def _is_linear(module: torch.nn.Module) -> bool:
    # Both backends skip MultiheadAttention's out_proj: its weight is read by F.linear
    # inside the attention kernel, which cannot take a quantized weight.
    excluded = torch.nn.modules.linear.NonDynamicallyQuantizableLinear
    return isinstance(module, torch.nn.Linear) and not isinstance(module, excluded)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module, *, restore: bool) -> Iterator[None]:
    """Put ``model`` in eval mode; with ``restore``, give every module its mode back after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        if restore:
            for module, training in modes:
                module.training = training


def _file_bytes(write: Callable[[Path], object]) -> int:
    with tempfile.TemporaryDirectory(prefix="torchvault-quantize-") as folder:
        path = Path(folder) / "model.tv"
        write(path)
        return path.stat().st_size


# ----------------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class _Measured:
    """The float model's outputs on every sample input set, and its latency."""

    inputs: list[_compare.Inputs]
    outputs: list[list[torch.Tensor]]
    latency: _compare.Latency

    @classmethod
    def of(cls, model: torch.nn.Module, example: _compare.Inputs, count: int) -> _Measured:
        inputs = [
            tuple(t.to(e.device) for t, e in zip(drawn, example, strict=True))
            for drawn in _compare.samples(example, count)
        ]
        return cls(inputs, _outputs(model, inputs), _latency_ms(model, example))


def _outputs(model: torch.nn.Module, inputs: list[_compare.Inputs]) -> list[list[torch.Tensor]]:
    with torch.no_grad():
        return [_compare.outputs_of(model(*one)) for one in inputs]


def _latency_ms(model: torch.nn.Module, inputs: _compare.Inputs) -> _compare.Latency:
    with torch.no_grad():
        return _compare.latency(lambda: model(*inputs))


def _comparison(model: torch.nn.Module, reference: _Measured | None) -> dict[str, Any]:
    """The report's accuracy and latency fields: NaN and 0 samples without example inputs."""
    if reference is None:
        nan = math.nan
        return {
            "max_abs_diff": nan,
            "max_rel_diff": nan,
            "float_latency_ms": nan,
            "quantized_latency_ms": nan,
            "samples": 0,
            "float_latency_iqr_ms": nan,
            "quantized_latency_iqr_ms": nan,
        }
    diffs = _compare.Differences(rtol=0.0, atol=0.0)
    for want, got in zip(reference.outputs, _outputs(model, reference.inputs), strict=True):
        diffs.add(want, got)
    quantized = _latency_ms(model, reference.inputs[0])
    return {
        "max_abs_diff": diffs.max_abs,
        "max_rel_diff": diffs.max_rel,
        "float_latency_ms": reference.latency.median_ms,
        "quantized_latency_ms": quantized.median_ms,
        "samples": diffs.checked,
        "float_latency_iqr_ms": reference.latency.iqr_ms,
        "quantized_latency_iqr_ms": quantized.iqr_ms,
    }
