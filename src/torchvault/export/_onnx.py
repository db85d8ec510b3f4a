"""ONNX export that proves itself: torch.onnx's torch.export-based exporter writes the file,
onnx's checker reads it back, and onnxruntime must compute what the PyTorch model computes
on the example inputs and random ones before the file is published at its path.

The file is staged under a temp name beside the destination (the name ``_commit`` gives, so a
killed export's leftovers are removed by the next one) and renamed over the destination only
when every check passed. A model whose weights exceed ``_SINGLE_FILE_LIMIT`` keeps them in a
``<name>.data`` file beside it (ONNX's external data; a protobuf holds at most 2 GiB).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import _args, _commit
from .._report import ExportReport
from ..errors import CheckpointWriteError, ExportError, ExportMismatchError
from . import _compare

_EXTRA = 'pip install "torchvault[export]"'
_SINGLE_FILE_LIMIT = 3 << 29  # 1.5 GiB of weights: torch.onnx's own external-data threshold


def export_onnx(
    model: torch.nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    path: str | os.PathLike[str],
    *,
    dynamic_shapes: object = None,
    opset: int | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    validate: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    samples: int = 8,
) -> ExportReport:
    """Export ``model`` to an ONNX file and prove that onnxruntime computes what it computes.

    The model is exported in eval mode without gradients by ``torch.onnx.export(dynamo=True)``
    and checked with ``onnx.checker``. With ``validate=True`` onnxruntime (CPU) then runs the
    file on the example inputs, on ``samples`` random inputs of the same shapes and dtypes, and,
    when the batch axis (dim 0 of every input) is dynamic in the file, on batch sizes 1 and
    ``2 * batch + 1``; every output must match the PyTorch model's within
    ``|onnx - torch| <= atol + rtol * |torch|``. Only then is the file renamed over ``path``
    (and its folder fsynced); on any failure nothing is left at ``path`` and a file already
    there is untouched. The model's training flags (of every submodule) are restored.

    Args:
        model: the module to export; its ``forward`` must be traceable by ``torch.export``.
        example_inputs: one tensor, or a sequence of tensors passed as positional arguments.
        path: the ``.onnx`` file to write. Weights over 1.5 GiB go to ``<path>.data`` beside
            it (that file is published first; a crash between the two renames can pair an
            older file at ``path`` with the newer weights).
        dynamic_shapes: ``"batch"`` makes dim 0 of every input one dynamic axis named
            ``batch``; anything else is passed to ``torch.onnx.export`` as torch.export's
            ``dynamic_shapes`` (a tuple per input or a dict keyed by argument name, of
            ``{axis: torch.export.Dim(...)}``). ``None`` exports static shapes.
        opset: the ONNX (``ai.onnx``) opset to target; ``None`` lets torch choose.
        input_names: names for the graph's inputs, in order (default: ``forward``'s names).
        output_names: names for the graph's outputs, in order.
        validate: run onnxruntime and compare. ``False`` only exports and checks the file:
            onnxruntime need not be installed, and the report has ``checked == 0``, no batch
            sizes and NaN for the differences and both latencies.
        rtol: relative tolerance of the comparison.
        atol: absolute tolerance of the comparison.
        samples: random input sets compared besides the example inputs.

    Returns:
        An :class:`~torchvault.ExportReport`: the file's size (with its ``.data`` file, if
        any), the input sets compared, the largest differences, median latencies of PyTorch
        and onnxruntime on the example inputs (onnxruntime's idle threads do not spin, so
        that they leave the cores to PyTorch), the opset and the graph's input and output
        names.

    Raises:
        ExportMismatchError: onnxruntime's outputs differ beyond the tolerance; ``.report``
            holds the figures. Nothing was written.
        ExportError: torch.onnx could not export the model, the file failed
            ``onnx.checker``, or onnxruntime could not load or run it; the message names the
            model class and the step, and the exporter's exception is chained.
        CheckpointWriteError: the destination is a folder, its folder is missing, or a write,
            fsync or rename failed.
        ValueError: ``dynamic_shapes="batch"`` with an input that has no dimension, another
            string, or a negative ``samples``.
        TypeError: ``example_inputs`` is not a tensor or a sequence of tensors.
        ImportError: onnx, onnxscript or (with ``validate=True``) onnxruntime is missing;
            ``pip install "torchvault[export]"``.

    Example:
        >>> report = tv.export_onnx(model, torch.randn(8, 3, 32, 32), "model.onnx",
        ...                         dynamic_shapes="batch")
        >>> report.max_abs_diff, report.batch_sizes, report.runtime_latency_ms
    """
    path = _args.exporting(model, path, validate, {"rtol": rtol, "atol": atol}, samples)
    onnx = _require("onnx")
    _require("onnxscript")  # torch.onnx's exporter translates through it
    ort = _require("onnxruntime") if validate else None
    inputs = _compare.as_inputs(example_inputs)
    if samples < 0:
        raise ValueError(f"samples must be 0 or more, got {samples}")
    dest = Path(path)
    job = _Job(type(model).__name__, dest, _commit.temp_name(dest))
    _compare.check_destination(job.dest, "model.onnx")
    shapes = _compare.dynamic_shapes(dynamic_shapes, inputs)
    with _compare.eval_mode(model), torch.no_grad():
        program = _export(job, model, inputs, shapes, opset, input_names, output_names)
        _commit.remove_orphans(job.dest)
        try:
            external = _save(job, program)
            graph = _Graph.read(job, onnx)
            if ort is None:
                report = _report(job, graph, _compare.Differences(rtol, atol), (), None)
            else:
                report = _validate(job, graph, model, inputs, ort, samples, rtol, atol)
            file_bytes = _publish(job, onnx, external)
        except BaseException:
            job.discard()
            raise
    return dataclasses.replace(report, file_bytes=file_bytes)  # relinking resized the file


@dataclasses.dataclass(frozen=True)
class _Job:
    """One export: the model's class name, the destination and the temp file staged for it."""

    model: str
    dest: Path
    staged: Path

    def write_error(self, exc: OSError) -> CheckpointWriteError:
        return _commit.write_error(self.dest, exc, "export to")

    def error(self, step: str, doing: str, exc: BaseException, hint: str) -> ExportError:
        """The torchvault error for a failed ``step`` (export, save, check or run)."""
        root = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
        lines = str(root).strip().splitlines()
        reason = lines[0].rstrip(".") if lines else ""
        return ExportError(
            f"cannot export {self.model} to ONNX ({step} step): {doing} "
            f"({type(root).__name__}: {reason}). To fix: {hint}.",
            path=self.dest,
        )

    def file_bytes(self) -> int:
        data = _data_file(self.staged)
        return self.staged.stat().st_size + (data.stat().st_size if data.exists() else 0)

    def discard(self) -> None:
        for leftover in (self.staged, _data_file(self.staged)):
            with contextlib.suppress(OSError):
                os.unlink(leftover)


# ----------------------------------------------------------------------------- preparing


def _require(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(
            f"export_onnx needs onnx, onnxscript and onnxruntime, and {name} is not "
            f"installed: {_EXTRA}"
        ) from exc


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's notices about torch's own internals; errors still surface."""
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping ..." per op
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used")
            yield
    finally:
        registry.setLevel(level)


# ----------------------------------------------------------------------------- the file


def _export(
    job: _Job,
    model: torch.nn.Module,
    inputs: _compare.Inputs,
    shapes: object,
    opset: int | None,
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
) -> Any:
    """The ``torch.onnx.ONNXProgram`` of ``model``, not yet written anywhere."""
    try:
        with _quiet():
            return torch.onnx.export(
                model,
                inputs,
                dynamo=True,
                verbose=False,
                opset_version=opset,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=shapes,  # type: ignore[arg-type]
            )
    except Exception as exc:
        if type(exc).__name__ == "TorchExportError":  # torch.onnx's step 1 of 3
            doing, hint = "torch.export could not trace forward", _TRACE_HINT
        else:
            doing, hint = "torch.onnx could not translate the traced graph", _OP_HINT
        raise job.error("export", doing, exc, hint) from exc


_TRACE_HINT = (
    "make forward traceable by torch.export (no Python branches on tensor values; see "
    "https://pytorch.org/docs/stable/generated/exportdb/index.html)"
)
_OP_HINT = (
    "replace the operator named above by standard torch operations, or give torch.onnx.export "
    "a custom_translation_table for it and export yourself"
)


def _save(job: _Job, program: Any) -> bool:
    """Write the program to the staged file; True when its weights went to a ``.data`` file."""
    weights: int = sum(
        value.const_value.nbytes
        for value in program.model.graph.initializers.values()
        if value.const_value is not None
    )
    external = weights > _SINGLE_FILE_LIMIT
    try:
        program.save(job.staged, external_data=external)
    except OSError as exc:
        raise job.write_error(exc) from exc
    except Exception as exc:
        raise job.error("save", "torch.onnx could not write the graph", exc, _BUG_HINT) from exc
    return external


_BUG_HINT = "this is a torch.onnx bug; try another opset"


def _data_file(model_file: Path) -> Path:
    """Where ``ONNXProgram.save`` puts the weights of ``model_file`` kept outside it."""
    return model_file.with_name(f"{model_file.name}.data")


@dataclasses.dataclass(frozen=True)
class _Graph:
    """What the written file declares: opset, input and output names, a dynamic batch axis."""

    opset: int | None
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_batch: bool

    @classmethod
    def read(cls, job: _Job, onnx: Any) -> _Graph:
        try:  # by path: a model with external data is checked whole, even over 2 GiB
            onnx.checker.check_model(str(job.staged))
        except Exception as exc:
            raise job.error("check", "the file fails onnx.checker", exc, _BUG_HINT) from exc
        proto = onnx.load(str(job.staged), load_external_data=False)
        opsets = [op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")]
        dims = [value.type.tensor_type.shape.dim for value in proto.graph.input]
        return cls(
            opset=opsets[0] if opsets else None,
            inputs=tuple(value.name for value in proto.graph.input),
            outputs=tuple(value.name for value in proto.graph.output),
            dynamic_batch=bool(dims) and all(d and not d[0].HasField("dim_value") for d in dims),
        )


def _publish(job: _Job, onnx: Any, external: bool) -> int:
    """Rename the checked file (its weights first) over the destination, durably; return
    the bytes published."""
    try:
        if external:
            _relink(onnx, job.staged, _data_file(job.dest).name)
        file_bytes = job.file_bytes()
        if external:
            _commit.fsync_file(_data_file(job.staged))
            os.replace(_data_file(job.staged), _data_file(job.dest))
        _commit.fsync_file(job.staged)
        os.replace(job.staged, job.dest)
    except OSError as exc:
        raise job.write_error(exc) from exc
    try:
        _commit.fsync_dir(job.dest.parent)
    except OSError as exc:
        raise CheckpointWriteError(
            f"exported {job.dest}, but syncing its folder failed ({exc.strerror or exc}): the "
            "new file is in place but may not survive a power loss. Export again to be sure.",
            path=job.dest,
            errno=exc.errno,
        ) from exc
    return file_bytes


def _relink(onnx: Any, staged: Path, location: str) -> None:
    """Point the staged file's external weights at the name they are published under."""
    proto = onnx.load(str(staged), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    staged.write_bytes(proto.SerializeToString())


# ----------------------------------------------------------------------------- validation

_RUN_HINT = "try another opset, or validate=False to keep a file onnxruntime cannot run"


def _validate(
    job: _Job,
    graph: _Graph,
    model: torch.nn.Module,
    inputs: _compare.Inputs,
    ort: Any,
    count: int,
    rtol: float,
    atol: float,
) -> ExportReport:
    """Compare onnxruntime with PyTorch, time both, and raise on a mismatch."""
    batch = inputs[0].shape[0] if inputs[0].dim() else None
    extra = tuple(sorted({1, 2 * batch + 1} - {batch})) if graph.dynamic_batch and batch else ()
    run = _runner(job, ort)
    diffs = _compare.Differences(rtol, atol)
    first_miss = ""
    for index, sample in enumerate(_compare.samples(inputs, count, batch_sizes=extra)):
        diffs.add(_compare.outputs_of(model(*sample)), run(sample))
        if not diffs.within and not first_miss:
            first_miss = _describe_sample(index, count, extra)
    latencies = (
        _compare.latency(_torch_call(model, inputs)),
        _compare.latency(lambda: run(inputs)),
    )
    batch_sizes = tuple(sorted({batch, *extra})) if batch is not None else ()
    report = _report(job, graph, diffs, batch_sizes, latencies)
    if not diffs.within:
        raise ExportMismatchError(
            _mismatch_message(job, report, first_miss), report=report, path=str(job.dest)
        )
    return report


def _runner(job: _Job, ort: Any) -> Callable[[_compare.Inputs], list[Any]]:
    """A function running the staged file in onnxruntime (CPU) on one input set."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no notices about removed initializers
    # idle threads that spin steal the cores PyTorch's runs, interleaved with these, need
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(
            str(job.staged), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise job.error("run", "onnxruntime could not load the file", exc, _RUN_HINT) from exc
    names = [value.name for value in session.get_inputs()]

    def run(sample: _compare.Inputs) -> list[Any]:
        try:
            feed = {n: t.detach().cpu().numpy() for n, t in zip(names, sample, strict=True)}
            return list(session.run(None, feed))
        except Exception as exc:
            raise job.error("run", "onnxruntime could not run the file", exc, _RUN_HINT) from exc

    return run


def _torch_call(model: torch.nn.Module, inputs: _compare.Inputs) -> Callable[[], object]:
    cuda = any(t.is_cuda for t in inputs)

    def call() -> object:
        result = model(*inputs)
        if cuda:  # the time of the work, not of queueing it
            torch.cuda.synchronize()
        return result

    return call


def _describe_sample(index: int, count: int, extra: tuple[int, ...]) -> str:
    if index == 0:
        return "the example inputs"
    if index <= count:
        return f"random input set {index} of {count}"
    return f"a random input of batch size {extra[index - count - 1]}"


def _mismatch_message(job: _Job, report: ExportReport, first_miss: str) -> str:
    return (
        f"the ONNX export of {job.model} does not compute what the model computes: max abs "
        f"diff {report.max_abs_diff:.3g}, max rel diff {report.max_rel_diff:.3g} over "
        f"{report.checked} input sets (batch sizes {list(report.batch_sizes)}); first beyond "
        f"atol={report.atol:g} + rtol={report.rtol:g} * |torch| at {first_miss}. Nothing was "
        f"written to {job.dest}. Differences near float rounding come from onnxruntime "
        "fusing and reordering ops: raise atol or rtol. Large ones mean the export froze "
        "something forward computes differently at run time (Python state, a branch on a "
        "shape or a value): make forward traceable by torch.export."
    )


def _report(
    job: _Job,
    graph: _Graph,
    diffs: _compare.Differences,
    batch_sizes: tuple[int, ...],
    latencies: tuple[_compare.Latency, _compare.Latency] | None,
) -> ExportReport:
    """The report; without ``latencies`` (nothing was run) differences and latencies are NaN."""
    nan = _compare.Latency(math.nan, math.nan)
    torch_ms, runtime_ms = latencies or (nan, nan)
    compared = latencies is not None
    return ExportReport(
        path=str(job.dest),
        format="onnx",
        file_bytes=job.file_bytes(),
        checked=diffs.checked,
        batch_sizes=batch_sizes,
        max_abs_diff=diffs.max_abs if compared else math.nan,
        max_rel_diff=diffs.max_rel if compared else math.nan,
        rtol=diffs.rtol,
        atol=diffs.atol,
        torch_latency_ms=torch_ms.median_ms,
        runtime_latency_ms=runtime_ms.median_ms,
        torch_latency_iqr_ms=torch_ms.iqr_ms,
        runtime_latency_iqr_ms=runtime_ms.iqr_ms,
        opset=graph.opset,
        input_names=graph.inputs,
        output_names=graph.outputs,
    )
