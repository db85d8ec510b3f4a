"""torch.export programs: a whole model in one file that runs without the model's class, and a
loader that runs nothing the file asks for.

A program file is what ``torch.export.save`` writes (the "pt2 archive" of torch 2.13): a zip,
every entry under one folder::

    archive_format, archive_version          "pt2", "0"
    models/model.json                        the graph, its signature and symbolic shapes
    data/weights/model_weights_config.json   per weight: record, dtype, sizes, strides
    data/weights/weight_N                    raw tensor bytes
    data/constants/...                       the same for tensor constants
    data/sample_inputs/model.pt              the example inputs, a torch.save pickle
    .data/version, byteorder, .data/serialization_id   the zip writer's own records

``torch.export.load``, ``ExportedProgram.module()`` and a call run code from such a file
through (torch 2.13's ``export/pt2_archive/_package.py``, ``_export/serde/serialize.py``,
``export/_unlift.py``, ``fx/graph.py``, ``utils/_pytree.py``):

* the example inputs: ``torch.load(weights_only=True)``, and on any failure again with
  ``weights_only=False``;
* a weight or constant marked ``use_pickle``: ``torch.load(weights_only=False)``;
  ``opaque_obj_N`` constants: ``pickle.loads``; ``custom_obj_N``: TorchScript's unpickler;
* a symbolic shape's ``expr_str``: ``sympy.sympify``, which is ``eval``;
* ``guards_code``: Python source that ``module()`` execs when example inputs are present;
* a parameter or buffer name: pasted between double quotes into the generated ``forward``;
* a node's ``target``: any callable reachable from ``torch``, ``operator`` or ``math``;
* a pytree spec's context: an ``{"__enum__": ...}`` object imports the module it names;
* ``data/aotinductor/``: shared libraries, loaded.

A planted command runs (the tests' positive controls) through the example inputs, a
``use_pickle`` weight, an ``opaque_obj_N`` constant, ``expr_str``, ``guards_code`` and a
parameter name; the other paths are read from the source.

So :func:`load_program` never gives torch the file. It validates the zip with torchvault's
strict reader (layout, names, every CRC), accepts only the entries above, reads the example
inputs with torchvault's restricted unpickler (a pickle naming any other global is refused)
and then drops them, and checks every string of the JSON against what its field may hold:
operators against an allowlist, shape expressions against a grammar of sympy arithmetic,
names as identifiers. torch then loads an archive rebuilt in memory from the checked parts
(raw tensors, re-serialized JSON, no example inputs, no guards): it unpickles nothing, and
``module(check_guards=False)`` execs no guard code.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import io
import math
import mmap
import os
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from .. import _args, _commit
from .._report import ExportReport
from ..errors import (
    CheckpointNotFoundError,
    ExportError,
    ExportMismatchError,
    TorchVaultError,
    UnsupportedFormatError,
)
from ..legacy._reader import is_onnx, open_mapped, sniff
from ..run._readers import StepRef, resolve
from ..run._store import PROGRAMS, RUN_FILE, RunStore, program
from ..storage import LocalStorage
from . import _compare
from ._pt2 import build, first_line, rebuild

# ----------------------------------------------------------------------------- exporting


def export_program(
    model: torch.nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    path: str | os.PathLike[str],
    *,
    dynamic_shapes: object = None,
    validate: bool = True,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    samples: int = 8,
) -> ExportReport:
    """Export ``model`` with ``torch.export`` to one file that :func:`load_program` runs
    without the model's Python class, and prove it computes what the model computes.

    The model is captured in eval mode by ``torch.export.export`` and serialized by
    ``torch.export.save``. The bytes then pass every check :func:`load_program` makes; with
    ``validate=True`` they are loaded the way :func:`load_program` loads them and run on the
    example inputs, on ``samples`` random inputs of the same shapes and dtypes and, when dim 0
    of every input is dynamic in the program, on batch sizes 1 and ``2 * batch + 1`` (those
    its range allows); every output must match the model's within
    ``|program - model| <= atol + rtol * |model|``. Only then is the file written under a temp
    name beside ``path``, fsynced and renamed over it (and the folder fsynced); on any failure
    nothing is left at ``path`` and a file already there is untouched. The training flag of
    every submodule is restored.

    Args:
        model: the module to export; its ``forward`` must be traceable by ``torch.export``.
        example_inputs: one tensor, or a sequence of tensors passed as positional arguments.
        path: the ``.pt2`` file to write; for a run folder, :func:`program_path` names it.
        dynamic_shapes: ``"batch"`` makes dim 0 of every input one dynamic dimension named
            ``batch`` (the example's batch must be 2 or more); anything else is passed to
            ``torch.export.export`` as is. ``None`` exports static shapes.
        validate: load the program back and compare. ``False`` only exports and checks the
            file: the report has ``checked == 0``, no batch sizes, and NaN for the
            differences and both latencies.
        rtol: relative tolerance of the comparison.
        atol: absolute tolerance of the comparison.
        samples: random input sets compared besides the example inputs.

    Returns:
        An :class:`~torchvault.ExportReport` with format ``"program"``: the file's size, the
        input sets and batch sizes compared, the largest differences, median latencies of
        the model and of the loaded program on the example inputs, and the graph's input
        and output names.

    Raises:
        ExportMismatchError: the program's outputs differ beyond the tolerance, or it failed
            on an input the model accepts; ``.report`` holds the figures. Nothing was written.
        ExportError: ``torch.export`` could not capture or serialize the model, or
            the program holds something :func:`load_program` refuses (a custom operator, a
            pickled tensor subclass); the message names the model class and the cause is
            chained.
        CheckpointWriteError: the destination is a folder, its folder is missing, or a write,
            fsync or rename failed.
        RunLockedError: ``path`` is in a run folder (:func:`program_path`) that a
            CheckpointManager is writing: use its ``export_program`` instead.
        ValueError: ``dynamic_shapes="batch"`` with a scalar input, another string, or a
            negative ``samples``.

    Example:
        >>> report = export_program(model, torch.randn(8, 3, 32, 32), "model.pt2",
        ...                         dynamic_shapes="batch")
        >>> report.max_abs_diff, report.batch_sizes
        (0.0, (1, 8, 17))
        >>> program = load_program("model.pt2")  # no import of the model's class needed
    """
    path = _args.exporting(model, path, validate, {"rtol": rtol, "atol": atol}, samples)
    inputs = _compare.as_inputs(example_inputs)
    if samples < 0:
        raise ValueError(f"samples must be 0 or more, got {samples}")
    job = _Job(type(model).__name__, Path(path), samples, rtol, atol)
    _compare.check_destination(job.dest, "model.pt2")
    shapes = _compare.dynamic_shapes(dynamic_shapes, inputs)
    with _compare.eval_mode(model):
        program = job.capture(model, inputs, shapes)
        data = job.serialize(program)
        try:  # the file must be one load_program accepts, validated or not
            rebuilt = rebuild(data, str(job.dest))
            loaded = build(rebuilt, str(job.dest)) if validate else None
        except TorchVaultError as exc:
            raise ExportError(
                f"cannot export {job.model} as a program that load_program accepts: {exc.message}",
                path=job.dest,
            ) from exc
        with torch.no_grad():
            if loaded is None:
                report = _report(job, len(data), program)
            else:
                report = _validate(job, len(data), model, program, loaded, inputs)
    with _run_lock(job.dest), _commit.atomic_file(job.dest) as handle:
        handle.write(data)
    return report


# The run whose lock the caller (a CheckpointManager) already holds: a second flock from the
# same process would be refused.
_HELD: contextvars.ContextVar[str | None] = contextvars.ContextVar("torchvault_run", default=None)


@contextlib.contextmanager
def held_run(run: str | os.PathLike[str]) -> Iterator[None]:
    """Within this block, the caller holds the writer lock of ``run``."""
    token = _HELD.set(os.path.realpath(run))
    try:
        yield
    finally:
        _HELD.reset(token)


def _run_lock(dest: Path) -> AbstractContextManager[None]:
    """The writer lock of the run whose programs folder ``dest`` is in (nothing writes into a
    run without it: a trainer's prune could race the write), or nothing for other paths.

    Raises:
        RunLockedError: a CheckpointManager (or a prune) is writing the run.
    """
    run = dest.parent.parent
    if dest.parent.name != PROGRAMS or not (run / RUN_FILE).is_file():
        return contextlib.nullcontext()
    if _HELD.get() == os.path.realpath(run):
        return contextlib.nullcontext()
    return LocalStorage(run).lock()


def program_path(run: str | os.PathLike[str], step: int) -> Path:
    """The program file of checkpoint ``step`` of a run folder, which
    ``load_program(run, step=...)`` reads.

    Args:
        run: the run folder of a :class:`~torchvault.CheckpointManager`.
        step: the checkpoint's step.

    Returns:
        ``run/programs/step-<step, 12 digits>.pt2``; the folder may not exist yet.

    Example:
        >>> export_program(model, x, program_path("runs/exp1", 1200))
        >>> program = load_program("runs/exp1", step=1200)
    """
    return Path(run) / program(step)


@dataclasses.dataclass(frozen=True)
class _Job:
    """One export: the model's class name, the destination and the comparison settings."""

    model: str
    dest: Path
    samples: int
    rtol: float
    atol: float

    def capture(
        self, model: torch.nn.Module, inputs: _compare.Inputs, shapes: object
    ) -> torch.export.ExportedProgram:
        try:
            return torch.export.export(model, inputs, dynamic_shapes=shapes)  # type: ignore[arg-type]
        except Exception as exc:
            raise ExportError(
                f"cannot export {self.model} as a program: torch.export.export failed: "
                f"{first_line(exc)}. To fix: make forward traceable by torch.export (no "
                "Python branches on tensor values, use torch.cond; see https://pytorch.org/"
                'docs/stable/generated/exportdb/index.html); with dynamic_shapes="batch", '
                "give an example batch of 2 or more and keep forward from fixing the batch size.",
                path=self.dest,
            ) from exc

    def serialize(self, program: torch.export.ExportedProgram) -> bytes:
        buffer = io.BytesIO()
        try:
            torch.export.save(program, buffer)
        except Exception as exc:
            raise ExportError(
                f"cannot export {self.model} as a program: torch.export.save could not "
                f"serialize it: {first_line(exc)}. Custom objects and unregistered custom "
                "operators cannot be saved; replace them with tensors and registered operators.",
                path=self.dest,
            ) from exc
        return buffer.getvalue()


# ----------------------------------------------------------------------------- validation


def _validate(
    job: _Job,
    size: int,
    model: torch.nn.Module,
    program: torch.export.ExportedProgram,
    loaded: torch.nn.Module,
    inputs: _compare.Inputs,
) -> ExportReport:
    """Run the loaded program against the model on the samples, time both, and raise on a
    mismatch or a failure."""
    count = job.samples
    batch, extra = _batch_sizes(program, inputs)
    diffs = _compare.Differences(job.rtol, job.atol)
    first_miss = failure = ""
    for index, sample in enumerate(_compare.samples(inputs, count, batch_sizes=extra)):
        expected = _compare.outputs_of(model(*sample))
        try:
            actual = _compare.outputs_of(loaded(*sample))
        except Exception as exc:
            failure = failure or f"{_sample(index, count, extra)} ({first_line(exc)})"
            actual = []
        diffs.add(expected, actual)
        if not diffs.within and not first_miss:
            first_miss = _sample(index, count, extra)
    latencies = (
        _compare.latency(lambda: model(*inputs)),
        _compare.latency(lambda: loaded(*inputs)),
    )
    report = _report(job, size, program, diffs, (*batch, *extra), latencies)
    if not diffs.within:
        raise ExportMismatchError(
            _mismatch(job.model, report, failure or first_miss, bool(failure)),
            report=report,
            path=str(job.dest),
        )
    return report


def _mismatch(title: str, report: ExportReport, where: str, failed: bool) -> str:
    what = (
        f"fails where the model runs, at {where}"
        if failed
        else f"does not compute what the model computes: max abs diff {report.max_abs_diff:.3g}, "
        f"max rel diff {report.max_rel_diff:.3g} over {report.checked} input sets (batch sizes "
        f"{list(report.batch_sizes)}); first beyond atol={report.atol:g} + rtol="
        f"{report.rtol:g} * |model| at {where}"
    )
    return (
        f"the program exported from {title} {what}. Nothing was written to {report.path}. "
        "Differences near float rounding: raise atol or rtol. Large ones or failures mean the "
        "export froze something forward computes differently at run time (Python state, a "
        "branch on a shape or a value): export the varying dimensions with dynamic_shapes, or "
        "make forward traceable by torch.export."
    )


def _batch_sizes(
    program: torch.export.ExportedProgram, inputs: _compare.Inputs
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The example's batch size, and the others to compare: 1 and ``2 * batch + 1`` when dim 0
    of every input is one symbol in the program, within its range."""
    if any(t.dim() == 0 for t in inputs):
        return (), ()
    batch = int(inputs[0].shape[0])
    user = set(program.graph_signature.user_inputs)
    symbols: set[object] = set()
    for node in program.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" and node.name in user else None
        if isinstance(value, torch.Tensor):
            dim = value.shape[0] if value.dim() else None
            if not isinstance(dim, torch.SymInt):
                return (batch,), ()
            symbols.add(dim.node.expr)
    if len(symbols) != 1:
        return (batch,), ()
    bounds = program.range_constraints.get(symbols.pop())
    low = int(bounds.lower) if bounds is not None and bounds.lower.is_Integer else 0
    high = int(bounds.upper) if bounds is not None and bounds.upper.is_Integer else math.inf
    extra = sorted(size for size in {1, 2 * batch + 1} - {batch} if low <= size <= high)
    return (batch,), tuple(extra)


def _sample(index: int, count: int, extra: tuple[int, ...]) -> str:
    if index == 0:
        return "the example inputs"
    if index <= count:
        return f"random input set {index} of {count}"
    return f"a random input of batch size {extra[index - count - 1]}"


def _report(
    job: _Job,
    size: int,
    program: torch.export.ExportedProgram,
    diffs: _compare.Differences | None = None,
    batch_sizes: tuple[int, ...] = (),
    latencies: tuple[_compare.Latency, _compare.Latency] | None = None,
) -> ExportReport:
    """The report; without ``latencies`` (nothing was run) differences and latencies are NaN."""
    nan = _compare.Latency(math.nan, math.nan)
    torch_ms, runtime_ms = latencies or (nan, nan)
    diffs = diffs or _compare.Differences(job.rtol, job.atol)
    compared = latencies is not None
    signature = program.graph_signature
    return ExportReport(
        path=str(job.dest),
        format="program",
        file_bytes=size,
        checked=diffs.checked,
        batch_sizes=tuple(sorted(batch_sizes)),
        max_abs_diff=diffs.max_abs if compared else math.nan,
        max_rel_diff=diffs.max_rel if compared else math.nan,
        rtol=diffs.rtol,
        atol=diffs.atol,
        torch_latency_ms=torch_ms.median_ms,
        runtime_latency_ms=runtime_ms.median_ms,
        torch_latency_iqr_ms=torch_ms.iqr_ms,
        runtime_latency_iqr_ms=runtime_ms.iqr_ms,
        opset=None,
        input_names=tuple(str(name) for name in signature.user_inputs),
        output_names=tuple(str(name) for name in signature.user_outputs if name is not None),
    )


# ----------------------------------------------------------------------------- loading


def load_program(path: str | os.PathLike[str], *, step: StepRef | None = None) -> torch.nn.Module:
    """Load a program written by :func:`export_program` (or ``torch.export.save``) as a module
    that runs without the model's Python class, running nothing the file asks for.

    The file is checked before torch sees any of it (see the module notes): the zip by
    torchvault's strict reader with every CRC, the example inputs by its restricted
    unpickler, every operator, name and shape expression of the graph against what
    ``torch.export`` writes. torch then loads a copy rebuilt from the checked parts, without
    example inputs or guard code, so it unpickles nothing and execs nothing from the file.

    Args:
        path: a ``.pt2`` program file, or a run folder (with ``step``).
        step: for a run folder: ``"latest"``, ``"best"`` or a step number; the program of that
            checkpoint, at :func:`program_path`, is loaded. A run folder without ``step``
            means ``"latest"``.

    Returns:
        A ``torch.fx.GraphModule`` with the weights inside; call it like the model. It is
        inference-only: ``.train()`` and ``.eval()`` raise ``NotImplementedError`` (torch's
        own rule for exported programs). Input shapes outside what was exported raise.

    Raises:
        UnsafeCheckpointError: the file holds something torch.export.load would run (a
            pickle naming a global outside the allowlist, a pickled weight or constant, a
            custom object, compiled code, an operator outside the allowlist, a shape
            expression outside the grammar); the message names it. Nothing was run.
        CorruptCheckpointError: the zip or its JSON is malformed, truncated or fails a CRC.
        UnsupportedFormatError: not a program archive (a torch.save file, another archive
            version), or torch could not rebuild the program from it.
        CheckpointNotFoundError: no file at ``path``, or the run has no program for the step.

    Example:
        >>> program = load_program("model.pt2")
        >>> logits = program(torch.randn(4, 3, 32, 32))
        >>> best = load_program("runs/exp1", step="best")
    """
    name, data = open_mapped(_program_file(_args.path(path), step))
    _not_a_checkpoint(name, data)
    return build(rebuild(data, name), name)


def _not_a_checkpoint(name: str, data: bytes | mmap.mmap) -> None:
    """Refuse, naming the function that reads it, a file that is no program archive."""
    kind, head = sniff(data), bytes(data[:512])
    if kind == "safetensors":
        why = (
            "is a torchvault (or safetensors) checkpoint, not a program; load it with "
            "tv.load(path) or tv.load_into(model, path), or write a program from the model "
            "with tv.export_program(model, example_inputs, path)"
        )
    elif kind in ("pickle", "tar"):
        why = "is a torch.save file, not a torch.export program; read it with tv.load_legacy"
    elif is_onnx(head, name):
        why = "is an ONNX model, not a torch.export program; run it with onnxruntime"
    else:
        return
    raise UnsupportedFormatError(f"{name}: {why}.", path=name)


def _program_file(path: str | os.PathLike[str], step: StepRef | None) -> str:
    """The file ``path`` and ``step`` name: ``path`` itself, or a run's program of ``step``."""
    if step is not None:
        _args.step(step, refs=True)  # checked before any file is read
    if not os.path.isdir(path):
        if step is None:
            return os.fspath(path)
        if os.path.isfile(path):  # never read a step the file cannot have as ignored
            raise ValueError(
                f"step={step!r} applies to a run folder, and {os.fspath(path)} is a file; "
                "drop step to load this program"
            )
    store = RunStore(path)
    if not store.exists():
        raise CheckpointNotFoundError(
            f"{os.fspath(path)} is not a torchvault run folder; pass a .pt2 file, or a run "
            "folder with step=",
            path=path,
        )
    if isinstance(step, int) and program_path(store.root, step).is_file():
        return str(program_path(store.root, step))  # kept even if its checkpoint was pruned
    chosen = resolve(store, "latest" if step is None else step)  # step 0 is a step
    if chosen is None:
        raise CheckpointNotFoundError(f"{store.root} has no checkpoint yet.", path=store.root)
    file = program_path(store.root, chosen)
    if not file.is_file():
        found = sorted(p.name for p in (store.root / PROGRAMS).glob("step-*.pt2"))
        raise CheckpointNotFoundError(
            f"step {chosen} of {store.root} has no program ({file} does not exist); programs "
            f"in the run: {found[-10:] or 'none'}. Write one with export_program(model, "
            f"inputs, program_path(run, {chosen})).",
            path=file,
        )
    return str(file)
