"""What torchvault's operations report back: frozen dataclasses, printable as tables."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint, as ``inspect`` sees it (no data read)."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    stored_as: str | None = None  # "int8", "bfloat16", "float16": how ``save`` stored it


@dataclass(frozen=True)
class StoredTensor:
    """A tensor ``save`` stored in another form (``dtype=`` or ``quantize=``).

    Attributes:
        key: its path in the saved object.
        dtype: its dtype in memory, which ``load`` gives back (for half precision: with
            ``restore_dtype=True``).
        stored_as: ``"int8"`` (per-channel, with a float32 scale per row) or the half dtype.
        max_abs_error: the largest absolute difference the conversion made.
    """

    key: str
    dtype: str
    stored_as: str
    max_abs_error: float


@dataclass(frozen=True)
class SaveReport:
    """What :func:`torchvault.save` wrote.

    Attributes:
        path: the file written.
        file_bytes: its size.
        tensors: tensors saved.
        stored: the tensors stored in another form, with the error each conversion made.
    """

    path: str
    file_bytes: int
    tensors: int
    stored: tuple[StoredTensor, ...] = ()


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint file holds: returned by :func:`torchvault.inspect`.

    Attributes:
        path: the file.
        format: ``"torchvault"`` or ``"safetensors"`` (a plain safetensors file).
        format_version: the torchvault format version, ``None`` for plain safetensors.
        tensors: every tensor of the saved tree, keyed by its dotted path.
        file_bytes: the size of the file.
        metadata: the user metadata given to ``save``.
        versions: torch, torchvault, Python and numpy versions of the writer.
        created: ISO-8601 UTC time of the save, when recorded.
    """

    path: str
    format: str
    format_version: int | None
    tensors: tuple[TensorInfo, ...]
    file_bytes: int
    metadata: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created: str | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(t.key for t in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        """Bytes of tensor data (views of a shared tensor count each time)."""
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class VerifyReport:
    """The result of :func:`torchvault.verify` on a file that passed."""

    path: str
    tensors: int
    checked_bytes: int
    checksummed: bool

    def __str__(self) -> str:
        how = "checksums match" if self.checksummed else "structure valid (no checksums)"
        return f"{self.path}: OK, {self.tensors} tensors, {self.checked_bytes} bytes, {how}"


@dataclass(frozen=True)
class ShapeMismatch:
    """A key present in both, with different shapes."""

    key: str
    file_shape: tuple[int, ...]
    model_shape: tuple[int, ...]


@dataclass(frozen=True)
class DtypeCast:
    """A key loaded with a cast from the file's dtype to the model's."""

    key: str
    file_dtype: str
    model_dtype: str


@dataclass(frozen=True)
class RenamedKey:
    """A source key matched to a model key under another name, and why."""

    source: str
    target: str
    reason: str


@dataclass(frozen=True)
class LoadReport:
    """Every difference :func:`torchvault.load_into` found between a state dict and a model.

    Attributes:
        loaded: model keys that received values.
        missing: model keys the source has no value for.
        unexpected: source keys the model has no place for.
        mismatched: keys present in both with different shapes (not loaded).
        casts: keys loaded with a dtype conversion.
        renamed: source keys matched under another name (DDP ``module.``, torch.compile
            ``_orig_mod.``, or a ``rename`` rule).
    """

    loaded: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[ShapeMismatch, ...] = ()
    casts: tuple[DtypeCast, ...] = ()
    renamed: tuple[RenamedKey, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every model key was loaded and every source key used."""
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} keys"]
        lines += [f"  missing in source: {k}" for k in self.missing]
        lines += [f"  unexpected in source: {k}" for k in self.unexpected]
        lines += [
            f"  shape mismatch: {m.key}: file {list(m.file_shape)} vs model {list(m.model_shape)}"
            for m in self.mismatched
        ]
        lines += [f"  cast: {c.key}: {c.file_dtype} -> {c.model_dtype}" for c in self.casts]
        lines += [f"  renamed: {r.source} -> {r.target} ({r.reason})" for r in self.renamed]
        return "\n".join(lines)


@dataclass(frozen=True)
class ResumeReport:
    """What :meth:`CheckpointManager.restore` did.

    Attributes:
        step: the step restored.
        restored: items loaded in place into the targets given.
        values: plain values saved with the checkpoint (``epoch=3``), by name.
        missing: saved items given no target (only with ``strict=False``).
        unexpected: targets with no saved item (only with ``strict=False``).
        rng: the random generators restored (python, numpy, torch, cuda).
        metrics: the metrics saved with the step.
        metadata: the metadata saved with the step.
        load_reports: the :class:`LoadReport` of each module item (a checkpoint saved by one
            process; a sharded one is loaded through torch.distributed.checkpoint, strictly).
        created: ISO-8601 UTC time of the save.
        versions: versions of the writer.
        resharded_from: the number of ranks that saved a sharded checkpoint, when it differs
            from the ranks restoring it (tensors were resharded; per-rank random states were
            not restored); None otherwise.
    """

    step: int
    restored: tuple[str, ...] = ()
    values: dict[str, object] = field(default_factory=dict)
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    rng: tuple[str, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    load_reports: dict[str, LoadReport] = field(default_factory=dict)
    created: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    resharded_from: int | None = None


@dataclass(frozen=True)
class CheckpointSummary:
    """One committed checkpoint of a run, as ``CheckpointManager.list`` and ``torchvault ls``
    show it."""

    step: int
    created: str | None
    metrics: dict[str, float]
    total_bytes: int
    new_bytes: int
    latest: bool
    best: bool


@dataclass(frozen=True)
class GlobalRef:
    """A global (``module.name``) a pickled checkpoint refers to, as ``scan`` found it.

    Attributes:
        name: as written in the file (``"collections.OrderedDict"``, ``"os.system"``).
        allowed: on torchvault's allowlist of data types; False means loading the file with
            ``torch.load(weights_only=False)`` would import and possibly run it.
        count: how many times the file names it.
    """

    name: str
    allowed: bool
    count: int


@dataclass(frozen=True)
class ScanReport:
    """What :func:`torchvault.scan` found in a file or folder, without running anything.

    Attributes:
        path: the file or folder scanned.
        format: ``"torchvault"``, ``"safetensors"``, ``"torch-zip"``, ``"torch-legacy"``,
            ``"torch-tar"``, ``"torch-program"``, ``"pickle"``, ``"hf-folder"``, ``"folder"``
            or ``"unknown"``.
        globals: every global the pickles name, allowed or refused.
        anomalies: container or data problems (bad CRC, malformed records, refused opcodes).
        files: the files scanned (one, or each file of a folder).
    """

    path: str
    format: str
    globals: tuple[GlobalRef, ...] = ()
    anomalies: tuple[str, ...] = ()
    files: tuple[str, ...] = ()

    @property
    def unsafe_globals(self) -> tuple[str, ...]:
        """The names of refused globals."""
        return tuple(ref.name for ref in self.globals if not ref.allowed)

    @property
    def safe(self) -> bool:
        """True when nothing is refused and nothing is malformed."""
        return not self.anomalies and not self.unsafe_globals


@dataclass(frozen=True)
class SalvageReport:
    """The weights recovered from a whole pickled model by ``load_legacy(salvage=True)``.

    Attributes:
        path: the file read.
        state_dict: every tensor by its dotted state-dict name.
        classes: the classes (``module.QualName``) the file instantiates (the model's own);
            none was imported.
        unsafe: the refused globals the file *calls* with its own arguments (``posix.system``):
            ``torch.load(weights_only=False)`` would have run them. Nothing was run here, but
            such a file was crafted or is not what it claims to be; a warning says so.
    """

    path: str
    state_dict: dict[str, object]
    classes: tuple[str, ...]
    unsafe: tuple[str, ...] = ()

    @property
    def safe(self) -> bool:
        """True when the file calls no refused global (only classes were refused)."""
        return not self.unsafe


@dataclass(frozen=True)
class ConvertReport:
    """What :func:`torchvault.convert` wrote.

    Attributes:
        source: the file or folder read.
        destination: the file or folder written.
        format: ``"torchvault"``, ``"safetensors"``, ``"hf"`` or ``"torch"``.
        tensors: tensors written (aliases of one storage count once).
        bytes: tensor bytes written.
        aliases: ``(name, stored_as)`` pairs for tensors stored once under another name.
        files: the files written.
        classes: with ``salvage=True``, the model classes the source instantiates.
        unsafe: with ``salvage=True``, the refused globals the source calls (see
            :class:`SalvageReport`).
    """

    source: str
    destination: str
    format: str
    tensors: int
    bytes: int
    aliases: tuple[tuple[str, str], ...] = ()
    files: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    unsafe: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote and how closely it matches the PyTorch model.

    Attributes:
        path: the file written.
        format: ``"onnx"`` or ``"program"`` (a torch.export program).
        file_bytes: the size of the file.
        checked: input sets compared (the example inputs plus random ones).
        batch_sizes: the batch sizes compared (more than one when the batch axis is dynamic).
        max_abs_diff: the largest absolute difference over every output element.
        max_rel_diff: the largest ``|a - b| / max(|b|, tiny)`` over every output element.
        rtol: the relative tolerance the comparison used.
        atol: the absolute tolerance the comparison used.
        torch_latency_ms: median latency of the PyTorch model on the example inputs.
        runtime_latency_ms: median latency of the exported artifact (onnxruntime, or the
            loaded program) on the same inputs.
        opset: the ONNX opset (None for programs).
        input_names: the graph's input names.
        output_names: the graph's output names.
        torch_latency_iqr_ms: the interquartile range of the PyTorch model's latencies
            (the middle half of the timed runs lies within it): the spread of the median.
        runtime_latency_iqr_ms: the same for the exported artifact.
    """

    path: str
    format: str
    file_bytes: int
    checked: int
    batch_sizes: tuple[int, ...]
    max_abs_diff: float
    max_rel_diff: float
    rtol: float
    atol: float
    torch_latency_ms: float
    runtime_latency_ms: float
    opset: int | None = None
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    torch_latency_iqr_ms: float = math.nan
    runtime_latency_iqr_ms: float = math.nan


@dataclass(frozen=True)
class QuantizationReport:
    """What ``tv.quantize`` did and what it costs in accuracy.

    Attributes:
        method: ``"int8-dynamic"`` or ``"int8-weight-only"``.
        backend: the library that quantized (``"torchao"`` or ``"torch.ao"``, which
            ``backend="torch"`` chooses).
        modules: the names of the quantized modules.
        float_bytes: bytes of the float model's state saved as a torchvault file.
        quantized_bytes: bytes of the quantized model's state saved as a torchvault file.
        max_abs_diff: the largest output difference against the float model on the samples.
        max_rel_diff: the largest relative output difference on the samples.
        float_latency_ms: median latency of the float model on the sample inputs.
        quantized_latency_ms: median latency of the quantized model on the same inputs.
        samples: input sets compared.
        float_latency_iqr_ms: the interquartile range of the float model's latencies (the
            middle half of the timed runs lies within it).
        quantized_latency_iqr_ms: the same for the quantized model.
    """

    method: str
    backend: str
    modules: tuple[str, ...]
    float_bytes: int
    quantized_bytes: int
    max_abs_diff: float
    max_rel_diff: float
    float_latency_ms: float
    quantized_latency_ms: float
    samples: int
    float_latency_iqr_ms: float = math.nan
    quantized_latency_iqr_ms: float = math.nan


@dataclass(frozen=True)
class DiffSide:
    """One side of :func:`torchvault.diff`: a checkpoint file, or one checkpoint of a run.

    Attributes:
        source: the operand as given (``"model.tv"``, ``"runs/exp1@best"``).
        kind: ``"file"`` or ``"run"``.
        path: the file, folder or run folder read.
        step: the run's step compared (``None`` for a file).
    """

    source: str
    kind: str
    path: str
    step: int | None = None

    def label(self) -> str:
        """``model.tv``, or ``runs/exp1@best (step 30)``."""
        return self.source if self.step is None else f"{self.source} (step {self.step})"


@dataclass(frozen=True)
class DiffLeaf:
    """One leaf of a compared tree, described.

    Attributes:
        kind: ``"tensor"``, ``"array"`` (numpy) or ``"value"``.
        dtype: for tensors and arrays.
        shape: for tensors and arrays.
        nbytes: bytes of tensor or array data.
        text: for values, their ``repr``, shortened.
    """

    kind: str
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    nbytes: int = 0
    text: str = ""

    def describe(self) -> str:
        """``float32 [2, 3]`` or the value's shortened ``repr``."""
        if self.kind == "value":
            return self.text
        return f"{self.dtype} [{', '.join(str(n) for n in self.shape or ())}]"


@dataclass(frozen=True)
class DiffChange:
    """A key whose leaf differs between the two sides.

    Attributes:
        key: the dotted path of the leaf.
        a: the leaf in A.
        b: the leaf in B.
        reason: ``"values"``, ``"dtype"``, ``"shape"``, ``"dtype, shape"``, ``"type"`` (a
            tensor against a value) or ``"value"`` (two values not ``==``).
        max_abs_diff: for ``"values"``, the largest absolute difference (NaN where one side
            has a NaN the other has not); ``None`` for bit-compared dtypes and other reasons.
    """

    key: str
    a: DiffLeaf
    b: DiffLeaf
    reason: str
    max_abs_diff: float | None = None


@dataclass(frozen=True)
class DiffReport:
    """What :func:`torchvault.diff` found between two verified checkpoints.

    Attributes:
        a: the first side.
        b: the second side.
        atol: tensor values within this absolute difference counted as unchanged.
        changed: keys in both whose leaves differ, in A's order.
        added: keys only B has, with their leaves.
        removed: keys only A has, with their leaves.
        unchanged: keys in both whose leaves are equal (within ``atol``).
    """

    a: DiffSide
    b: DiffSide
    atol: float
    changed: tuple[DiffChange, ...] = ()
    added: tuple[tuple[str, DiffLeaf], ...] = ()
    removed: tuple[tuple[str, DiffLeaf], ...] = ()
    unchanged: int = 0

    @property
    def identical(self) -> bool:
        """True when nothing was added, removed or changed."""
        return not (self.added or self.removed or self.changed)
