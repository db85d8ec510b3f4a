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

import dataclasses
import errno
import io
import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from .. import _commit
from .._report import ExportReport, GlobalRef, ScanReport
from .._run import StepRef, resolve
from .._store import RunStore
from ..errors import (
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    ExportError,
    ExportMismatchError,
    TorchVaultError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
)
from ..legacy._reader import Session, open_mapped, read
from ..legacy._zip import Entry, ZipArchive
from . import _compare

PROGRAMS = "programs"
"""The folder of a run that holds its programs: ``RUN/programs/step-000000001200.pt2``."""

_REPEATS = 20  # latency runs per side (after 3 warm-up runs)
_MAX_JSON = 1 << 30
_MODEL = "models/model.json"
_WEIGHTS = "data/weights/model_weights_config.json"
_CONSTANTS = "data/constants/model_constants_config.json"
_SAMPLE_INPUTS = "data/sample_inputs/model.pt"
_WRITER_RECORDS = ("archive_format", "archive_version", "byteorder", ".data/version")
_RECORD = re.compile(r"data/weights/weight_\d+|data/constants/tensor_\d+")
_NATIVE = ("data/aotinductor/", "data/executorch/", "data/mtia", "xl_model_weights/")
_PICKLED_CONSTANT = re.compile(r"data/constants/(custom_obj|opaque_obj)_\d+")


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
        ValueError: ``dynamic_shapes="batch"`` with a scalar input, another string, or a
            negative ``samples``.

    Example:
        >>> report = export_program(model, torch.randn(8, 3, 32, 32), "model.pt2",
        ...                         dynamic_shapes="batch")
        >>> report.max_abs_diff, report.batch_sizes
        (0.0, (1, 8, 17))
        >>> program = load_program("model.pt2")  # no import of the model's class needed
    """
    inputs = _compare.as_inputs(example_inputs)
    if samples < 0:
        raise ValueError(f"samples must be 0 or more, got {samples}")
    job = _Job(type(model).__name__, Path(path), samples, rtol, atol)
    job.check_destination()
    shapes = _compare.dynamic_shapes(dynamic_shapes, inputs)
    with _compare.eval_mode(model):
        program = job.capture(model, inputs, shapes)
        data = job.serialize(program)
        try:  # the file must be one load_program accepts, validated or not
            rebuilt = _rebuild(data, str(job.dest))
            loaded = _build(rebuilt, str(job.dest)) if validate else None
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
    with _commit.atomic_file(job.dest) as handle:
        handle.write(data)
    return report


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
    return Path(run) / PROGRAMS / f"step-{step:012d}.pt2"


@dataclasses.dataclass(frozen=True)
class _Job:
    """One export: the model's class name, the destination and the comparison settings."""

    model: str
    dest: Path
    samples: int
    rtol: float
    atol: float

    def check_destination(self) -> None:
        """Fail before the (slow) export when the file could not be written anyway."""
        if self.dest.is_dir():
            raise CheckpointWriteError(
                f"cannot export to {self.dest}: it is a folder; pass a file path such as "
                f"{self.dest / 'model.pt2'}",
                path=self.dest,
                errno=errno.EISDIR,
            )
        if not self.dest.parent.is_dir():
            missing = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
            raise _commit._write_error(self.dest, missing, "export to")

    def capture(
        self, model: torch.nn.Module, inputs: _compare.Inputs, shapes: object
    ) -> torch.export.ExportedProgram:
        try:
            return torch.export.export(model, inputs, dynamic_shapes=shapes)  # type: ignore[arg-type]
        except Exception as exc:
            raise ExportError(
                f"cannot export {self.model} as a program: torch.export.export failed: "
                f"{_first_line(exc)}. To fix: make forward traceable by torch.export (no "
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
                f"serialize it: {_first_line(exc)}. Custom objects and unregistered custom "
                "operators cannot be saved; replace them with tensors and registered operators.",
                path=self.dest,
            ) from exc
        return buffer.getvalue()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0].rstrip('.') if lines else ''}"


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
            failure = failure or f"{_sample(index, count, extra)} ({_first_line(exc)})"
            actual = []
        diffs.add(expected, actual)
        if not diffs.within and not first_miss:
            first_miss = _sample(index, count, extra)
    latencies = (
        _compare.median_ms(lambda: model(*inputs), repeats=_REPEATS),
        _compare.median_ms(lambda: loaded(*inputs), repeats=_REPEATS),
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
    latencies: tuple[float, float] | None = None,
) -> ExportReport:
    """The report; without ``latencies`` (nothing was run) differences and latencies are NaN."""
    torch_ms, runtime_ms = latencies or (math.nan, math.nan)
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
        torch_latency_ms=torch_ms,
        runtime_latency_ms=runtime_ms,
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
    name, data = open_mapped(_program_file(path, step))
    return _build(_rebuild(data, name), name)


def _program_file(path: str | os.PathLike[str], step: StepRef | None) -> str:
    """The file ``path`` and ``step`` name: ``path`` itself, or a run's program of ``step``."""
    if step is None and not os.path.isdir(path):
        return os.fspath(path)
    store = RunStore(path)
    if not store.exists():
        raise CheckpointNotFoundError(
            f"{os.fspath(path)} is not a torchvault run folder; pass a .pt2 file, or a run "
            "folder with step=",
            path=path,
        )
    if isinstance(step, int) and program_path(store.root, step).is_file():
        return str(program_path(store.root, step))  # kept even if its checkpoint was pruned
    chosen = resolve(store, step or "latest")
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


def _build(archive: io.BytesIO, name: str) -> torch.nn.Module:
    """The module of a rebuilt (checked) archive."""
    try:
        program = torch.export.load(archive)
        module: torch.nn.Module = program.module(check_guards=False)
    except Exception as exc:
        raise UnsupportedFormatError(
            f"{name}: passed torchvault's checks, but torch {torch.__version__} could not "
            f"rebuild the program ({_first_line(exc)}). It may come from another torch "
            "version: export it again with this one.",
            path=name,
        ) from exc
    return module


def _rebuild(data: Any, name: str) -> io.BytesIO:
    """Check a program archive and return a copy holding only what was checked: the JSON as
    re-serialized, without guard code, the raw tensors, and empty example inputs.

    Raises:
        UnsafeCheckpointError, CorruptCheckpointError, UnsupportedFormatError: see
            :func:`load_program`.
    """
    from torch.export.pt2_archive import PT2ArchiveWriter  # ~1 s (torch._inductor): lazily

    checked = _Checked.of(data, name)
    model = checked.documents[0]
    model["guards_code"] = []  # Python source; torch execs it only with example inputs
    rebuilt = io.BytesIO()
    with PT2ArchiveWriter(rebuilt) as writer:
        for document, rel in zip(checked.documents, _DOCUMENTS, strict=True):
            writer.write_string(rel, json.dumps(document))
        for rel in checked.records:
            writer.write_bytes(rel, bytes(checked.archive.read(checked.members[rel])))
        writer.write_bytes(_SAMPLE_INPUTS, b"")  # no example inputs: nothing to unpickle
    rebuilt.seek(0)
    return rebuilt


@dataclasses.dataclass(frozen=True)
class _Checked:
    """A program archive that passed every check, and the parts a rebuild takes from it."""

    archive: ZipArchive
    members: dict[str, Entry]
    documents: tuple[dict[str, Any], dict[str, Any], dict[str, Any]]
    records: tuple[str, ...]

    @classmethod
    def of(cls, data: Any, name: str) -> _Checked:
        archive = ZipArchive(data, name)
        archive.check_all()
        members = {e.name[len(archive.prefix) :]: e for e in archive.entries.values()}
        _check_members(members, name)
        _check_values(archive, members, name)
        model, weights, constants = (_json(archive, members, rel, name) for rel in _DOCUMENTS)
        records = (
            *_payloads(weights, "data/weights/", "weight_", members, name),
            *_payloads(constants, "data/constants/", "tensor_", members, name),
        )
        for document, rel in zip((model, weights, constants), _DOCUMENTS, strict=True):
            _Checker(f"{name}: {rel}").run(document)
        _check_sample_inputs(archive, members.get(_SAMPLE_INPUTS), name)
        return cls(archive, members, (model, weights, constants), records)


def is_program(data: Any) -> bool:
    """Whether the bytes of a file are a zip laid out as a program archive (for ``tv.scan``,
    which reads other zips as torch.save files); a malformed zip is not."""
    try:
        archive = ZipArchive(data, "")
    except TorchVaultError:
        return False
    return archive.find("archive_format") is not None and archive.find(_MODEL) is not None


def scan_program(name: str, data: Any) -> ScanReport:
    """``tv.scan`` of a program archive: every check :func:`load_program` makes, nothing
    loaded. A refused global (of the example inputs, or a graph's call target) is listed."""
    try:
        _Checked.of(data, name)
    except TorchVaultError as exc:
        refused = exc.global_name if isinstance(exc, UnsafeCheckpointError) else None
        found = (GlobalRef(refused, False, 1),) if refused else ()
        return ScanReport(name, "torch-program", found, (exc.message,), (name,))
    return ScanReport(name, "torch-program", files=(name,))


_DOCUMENTS = (_MODEL, _WEIGHTS, _CONSTANTS)


def _unsafe(name: str, what: str, global_name: str | None = None) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{name}: {what}. Nothing from the file was run. Export the model again with "
        "torchvault.export_program, or open the file with torch.export.load only if you "
        "trust whoever wrote it.",
        global_name=global_name,
        path=name,
    )


def _check_members(members: dict[str, Entry], name: str) -> None:
    """Accept only the entries of a program archive; name what the others would run."""
    if "data.pkl" in members:
        raise UnsupportedFormatError(
            f"{name}: is a torch.save file, not a torch.export program; read it with "
            "torchvault.load_legacy",
            path=name,
        )
    missing = [
        rel for rel in ("archive_format", "archive_version", *_DOCUMENTS) if rel not in members
    ]
    if missing:
        raise UnsupportedFormatError(
            f"{name}: is not a torch.export program archive (no {missing[0]}); programs are "
            "written by torchvault.export_program or torch.export.save",
            path=name,
        )
    for rel in members:
        if rel.startswith(_NATIVE):
            raise _unsafe(name, f"it holds compiled code ({rel}) that torch.export.load loads")
        if _PICKLED_CONSTANT.fullmatch(rel):
            raise _unsafe(
                name,
                f"it holds a pickled object ({rel}) that torch.export.load would unpickle with "
                "pickle.loads or TorchScript's unpickler, running whatever it names",
            )
        known = rel in (*_WRITER_RECORDS, *_DOCUMENTS, _SAMPLE_INPUTS, ".data/serialization_id")
        if not (known or _RECORD.fullmatch(rel) or rel.startswith("extra/")):
            raise UnsupportedFormatError(
                f"{name}: entry {rel!r} is not part of a torch.export program (another model, "
                "a pickled weight file of an older format, or something added); export the "
                "model again with this torch",
                path=name,
            )


def _check_values(archive: ZipArchive, members: dict[str, Entry], name: str) -> None:
    from torch.export.pt2_archive import constants

    expected = {
        "archive_format": constants.ARCHIVE_FORMAT_VALUE,
        "archive_version": constants.ARCHIVE_VERSION_VALUE,
        "byteorder": "little",
    }
    for rel, want in expected.items():
        entry = members.get(rel)
        if entry is None:
            continue
        got = bytes(archive.read(entry)[:64])
        if got != want.encode():
            raise UnsupportedFormatError(
                f"{name}: its {rel} is {got!r}, and torch {torch.__version__} reads "
                f"{want!r} only; export the model again with this torch",
                path=name,
            )


def _json(archive: ZipArchive, members: dict[str, Entry], rel: str, name: str) -> dict[str, Any]:
    entry = members[rel]
    if entry.size > _MAX_JSON:
        raise CorruptCheckpointError(f"{name}: {rel} is larger than 1 GiB", path=name)
    try:
        document = json.loads(bytes(archive.read(entry)), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{name}: {rel} is not valid JSON ({exc})", path=name) from exc
    if not isinstance(document, dict):
        raise CorruptCheckpointError(f"{name}: {rel} is not a JSON object", path=name)
    return document


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        raise ValueError("a key appears twice in one object")  # two readers, two meanings
    return document


def _payloads(
    document: dict[str, Any], folder: str, prefix: str, members: dict[str, Entry], name: str
) -> list[str]:
    """The raw tensor records a payload config uses, each entry checked; pickled ones are
    refused."""
    config = document.get("config")
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"{name}: {folder} config has no 'config' map", path=name)
    used: set[str] = set()
    for fqn, meta in config.items():
        if not isinstance(meta, dict):
            raise CorruptCheckpointError(f"{name}: {folder} entry {fqn!r} is malformed", path=name)
        if meta.get("use_pickle") is not False:
            raise _unsafe(
                name,
                f"{fqn!r} is stored as a pickle (a tensor subclass, such as a quantized weight), "
                "which torch.export.load unpickles with torch.load(weights_only=False); "
                "torchvault loads programs whose weights and constants are plain tensors",
            )
        record = meta.get("path_name")
        rel = f"{folder}{record}"
        if not (isinstance(record, str) and re.fullmatch(prefix + r"\d+", record)):
            raise CorruptCheckpointError(f"{name}: {fqn!r} names record {record!r}", path=name)
        if rel not in members:
            raise CorruptCheckpointError(
                f"{name}: {fqn!r} refers to {rel}, which is missing", path=name
            )
        _check_extent(meta.get("tensor_meta"), members[rel], name, fqn)
        used.add(rel)
    stray = sorted(rel for rel in members if rel.startswith(folder) and _RECORD.fullmatch(rel))
    if set(stray) - used:
        extra = sorted(set(stray) - used)[0]
        raise CorruptCheckpointError(f"{name}: record {extra} belongs to no tensor", path=name)
    return sorted(used)


def _check_extent(meta: object, entry: Entry, name: str, fqn: str) -> None:
    """A tensor's sizes, strides and offset must fit its record (each element at least one
    byte; torch checks the exact bound): no allocation is sized by the JSON alone."""
    try:
        if not isinstance(meta, dict):
            raise TypeError("not a map")
        sizes = [_as_int(d) for d in meta["sizes"]]
        strides = [_as_int(d) for d in meta["strides"]]
        offset = _as_int(meta["storage_offset"])
        if len(sizes) != len(strides):
            raise TypeError("sizes and strides differ in length")
    except (KeyError, TypeError) as exc:
        raise CorruptCheckpointError(
            f"{name}: {fqn!r}: its tensor_meta is malformed", path=name, key=fqn
        ) from exc
    if 0 in sizes:
        return
    last = offset + sum((size - 1) * stride for size, stride in zip(sizes, strides, strict=True))
    if last >= entry.size:
        raise CorruptCheckpointError(
            f"{name}: {fqn!r} declares sizes {sizes}, strides {strides} and offset {offset}, "
            f"which reach past its record of {entry.size} bytes",
            path=name,
            key=fqn,
        )


def _as_int(value: object) -> int:
    number = value.get("as_int") if isinstance(value, dict) else None
    if type(number) is not int or number < 0:
        raise TypeError("not a non-negative as_int")
    return number


def _check_sample_inputs(archive: ZipArchive, entry: Entry | None, name: str) -> None:
    """Read the example inputs with torchvault's restricted unpickler: a pickle naming any
    global outside the allowlist is refused. They are dropped either way."""
    if entry is None or entry.size == 0:
        return
    session = Session(f"{name}: {_SAMPLE_INPUTS}")
    try:
        with warnings.catch_warnings():  # tensors view read-only bytes; they are dropped
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            read(session, bytes(archive.read(entry)))
    except UnsafeCheckpointError as exc:
        raise _unsafe(
            name,
            f"its example inputs ({_SAMPLE_INPUTS}) are a pickle that names "
            f"{exc.global_name or 'code'}, outside torchvault's allowlist; torch.export.load "
            "unpickles them with torch.load(weights_only=False) when weights_only fails",
            global_name=exc.global_name,
        ) from exc


# ----------------------------------------------------------------------------- the JSON rules

_IDENTIFIER_FIELDS = frozenset({"name", "as_name", "as_names", "user_input_name"})
_IDENTIFIER_LIST_FIELDS = frozenset({"forward_arg_names"})
_FQN_FIELDS = frozenset({"parameter_name", "buffer_name", "tensor_constant_name", "fqn"})
_TEXT_FIELDS = frozenset({"as_string", "as_strings", "guards_code"})
_REFUSED_FIELDS = {
    "custom_obj_values": "a custom (TorchScript) object, rebuilt by running its class's code",
    "as_custom_obj": "a custom (TorchScript) object, rebuilt by running its class's code",
    "custom_obj": "a custom (TorchScript) object, rebuilt by running its class's code",
    "class_fqn": "a custom (TorchScript) object, rebuilt by running its class's code",
    "treespec_namedtuple_fields": "a named tuple type, looked up by name",
}
_TOKEN = re.compile(r"[A-Za-z0-9_]*")
_VERSION = re.compile(r"[A-Za-z0-9_.+\-<=]*")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_FQN_PART = re.compile(r"[^\"'\\\x00-\x1f\x7f-\x9f\u2028\u2029.]+")
_OP_NAME = re.compile(r"_?[A-Za-z][A-Za-z0-9_]*")
_SPEC_TYPES = frozenset(
    {None, "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict"}
)


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_SYMBOLIC_OPERATORS = frozenset(
    [
        *(
            f"_operator.{op}"
            for op in _words(
                "eq ne le ge lt gt neg pos mul add sub floordiv mod pow truediv and_ or_ "
                "lshift rshift getitem"
            )
        ),
        "math.trunc",
        *(f"torch.sym_{op}" for op in _words("not int float ite max min sqrt")),
    ]
)
"""Python operators on symbolic sizes, as torch.export writes them (serde's ``_SYM_OPS``)."""

_HIGHER_ORDER = _words(
    "cond while_loop map_impl scan associative_scan wrap_with_set_grad_enabled "
    "wrap_with_autocast auto_functionalized auto_functionalized_v2 invoke_subgraph "
    "out_dtype flex_attention"
)
"""Higher-order operators that take graphs of the same file (checked as well) and tensors."""

_REFUSED_ATEN = frozenset({"save", "from_file", "_print", "record_stream"})
"""aten operators that read or write files or streams, which no model needs."""

_EXPRESSION = re.compile(
    r"\s+|(?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)"
    r"|(?P<string>'(?:[A-Za-z_][A-Za-z0-9_]*|[+\-]?[0-9.]+(?:[eE][+\-]?[0-9]+)?)')"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<operator>\*\*|//|<=|>=|==|!=|[-+*/%(),=<>])"
)
_QUOTING = frozenset({"Symbol", "Float"})
"""The only calls a quoted string may be the first argument of: sympy functions such as
``sqrt`` or ``Rational`` sympify a string argument, which is another ``eval``."""
_SYMBOL = re.compile(r"[a-z]+[0-9]+")
_EXPRESSION_NAMES = _words(
    # sympy's arithmetic, comparisons and logic as srepr writes them, and keyword arguments
    "Symbol Integer Rational Float Add Mul Pow Mod Min Max Abs floor ceiling sqrt Eq Ne Lt Le "
    "Gt Ge Equality Unequality StrictLessThan StrictGreaterThan LessThan GreaterThan And Or "
    "Not Piecewise ExprCondPair Tuple true false True False oo zoo nan Infinity "
    "NegativeInfinity NaN ComplexInfinity One Zero NegativeOne Half int_oo IntInfinity "
    "NegativeIntInfinity positive negative nonnegative nonpositive integer real finite "
    "infinite zero nonzero even odd rational commutative extended_real precision "
    # torch.utils._sympy.functions, as the deserializer lists them
    "FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt CeilDiv LShift "
    "RShift PowByNatural FloatPow FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator "
    "TruncToFloat TruncToInt RoundToInt RoundDecimal ToFloat Identity"
)
"""Names a shape expression may use: sympy.sympify evaluates it as Python, and with only
these names, numbers, quoted symbol names and operators (no attribute access, no other
calls) it can build sympy expressions and nothing else."""


class _Checker:
    """Walks a program's JSON and refuses any string its field may not hold."""

    def __init__(self, where: str) -> None:
        self.where = where

    def run(self, document: object) -> None:
        stack: list[tuple[object, str, str]] = [(document, "", "")]
        while stack:
            value, key, parent = stack.pop()
            if key in _REFUSED_FIELDS and value not in ({}, [], None):
                raise _unsafe(self.where, f"it holds {_REFUSED_FIELDS[key]} ({key})")
            if isinstance(value, dict):
                for child, item in value.items():
                    self.key(child, key)
                    stack.append((item, child, key))
            elif isinstance(value, list):
                stack.extend((item, key, parent) for item in value)
            elif isinstance(value, str):
                self.string(value, key, parent)
            elif not (value is None or isinstance(value, (bool, int, float))):
                raise CorruptCheckpointError(f"{self.where}: {key!r} holds {value!r:.40}")

    def key(self, key: str, parent: str) -> None:
        if parent == "as_string_to_argument":
            self.text(key, parent)
        elif parent == "config":
            self.fqn(key, parent)
        elif not (key.isidentifier() or (parent == "metadata" and _TOKEN.fullmatch(key))):
            self.refuse(parent or "the document", key, "is not a key torch.export writes there")

    def string(self, value: str, key: str, parent: str) -> None:
        if parent == "metadata" or key in _TEXT_FIELDS:
            self.text(value, key)
        elif key in _IDENTIFIER_FIELDS or key in _IDENTIFIER_LIST_FIELDS:
            if value and not value.isidentifier():
                self.refuse(key, value, "is not a Python identifier (torch generates code with it)")
        elif key in _FQN_FIELDS:
            self.fqn(value, key)
        elif key in ("target", "as_operator"):
            if not _allowed_operator(value):
                raise _unsafe(
                    self.where,
                    f"the graph calls {value!r}, which is not an operator torchvault allows "
                    "(aten operators, sympy arithmetic on sizes, control-flow operators); "
                    "torch.export.load would call whatever it names",
                    global_name=value,
                )
        elif key == "expr_str":
            self.expression(value)
        elif key in ("in_spec", "out_spec"):
            self.spec(value, key)
        elif key == "torch_version":
            if not _VERSION.fullmatch(value):
                self.refuse(key, value, "is not a version")
        elif not _TOKEN.fullmatch(value):
            self.refuse(key, value, "is not a value torch.export writes there")

    def text(self, value: str, key: str) -> None:
        if _CONTROL.search(value):
            self.refuse(key, value, "holds control characters (they end a comment in source)")

    def fqn(self, value: str, key: str) -> None:
        if value and not all(_FQN_PART.fullmatch(part) for part in value.split(".")):
            self.refuse(key, value, "is not a dotted attribute path (torch pastes it into code)")

    def expression(self, text: str) -> None:
        at, before = 0, ["", ""]  # the last two tokens
        while at < len(text):
            token = _EXPRESSION.match(text, at)
            if token is None:
                self.refuse("expr_str", text, f"has {text[at : at + 12]!r}, outside the grammar")
            at = token.end()
            word = token.group("name")
            if word and word not in _EXPRESSION_NAMES and not _SYMBOL.fullmatch(word):
                self.refuse("expr_str", text, f"uses the name {word!r}, outside the grammar")
            if token.group("string") and not (before[0] in _QUOTING and before[1] == "("):
                self.refuse("expr_str", text, "quotes a string outside Symbol('...') or Float")
            if not token.group().isspace():
                before = [before[1], token.group()]

    def spec(self, text: str, key: str) -> None:
        """A pytree spec (JSON in a string): only tuples, lists and dicts of tensors."""
        try:
            spec = json.loads(text, object_pairs_hook=_unique_keys)
        except (ValueError, RecursionError):
            self.refuse(key, text, "is not JSON")
        if not (isinstance(spec, list) and len(spec) == 2 and spec[0] == 1):
            self.refuse(key, text, "is not a version 1 pytree spec")
        nodes = [spec[1]]
        while nodes:
            node = nodes.pop()
            if not (isinstance(node, dict) and isinstance(node.get("children_spec"), list)):
                self.refuse(key, text, "is not a pytree spec")
            kind = node.get("type")
            if kind not in _SPEC_TYPES:
                self.refuse(key, text, f"names the container type {kind!r} (resolved by name)")
            if not _plain_context(node.get("context")):
                self.refuse(key, text, "has a context other than a list of plain keys")
            nodes.extend(node["children_spec"])

    def refuse(self, key: str, value: str, why: str) -> NoReturn:
        raise _unsafe(self.where, f"field {key!r} holds {value!r:.120}, which {why}")


def _plain_context(context: object) -> bool:
    """A spec node's context: none, or JSON of null or a list of plain dict keys. (torch
    decodes it with a hook that imports any module an ``{"__enum__": ...}`` object names.)"""
    if context is None:
        return True
    try:
        keys = json.loads(context) if isinstance(context, str) else object()
    except (ValueError, RecursionError):
        return False
    plain = (str, int, float, bool, type(None))
    return keys is None or (isinstance(keys, list) and all(isinstance(k, plain) for k in keys))


def _allowed_operator(target: str) -> bool:
    """aten operators (but file and stream I/O), allowlisted higher-order operators, and
    Python's operators on sizes; resolved the way torch resolves them, so that an attribute
    that is not an operator is refused."""
    if target in _SYMBOLIC_OPERATORS:
        return True
    parts = target.split(".")
    if not (parts[:2] == ["torch", "ops"] and all(_OP_NAME.fullmatch(p) for p in parts)):
        return False
    if len(parts) == 5 and parts[2] == "aten" and parts[3] not in _REFUSED_ATEN:
        packet = getattr(torch.ops.aten, parts[3], None)
        return isinstance(getattr(packet, parts[4], None), torch._ops.OpOverload)
    if len(parts) == 4 and parts[2] == "higher_order" and parts[3] in _HIGHER_ORDER:
        operator = getattr(torch.ops.higher_order, parts[3], None)
        return isinstance(operator, torch._ops.HigherOrderOperator)
    return False
