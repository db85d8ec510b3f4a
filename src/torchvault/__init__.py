"""torchvault: save, load, resume and ship PyTorch models safely, fast and exactly.

>>> import torchvault as tv
>>> tv.save(model, "model.tv")
>>> report = tv.load_into(model, "model.tv")
"""

from __future__ import annotations

from . import retention
from ._diff import diff
from ._file import save
from ._load_into import load_into
from ._open import inspect, load, verify
from ._report import (
    CheckpointInfo,
    CheckpointSummary,
    ConvertReport,
    DiffChange,
    DiffLeaf,
    DiffReport,
    DiffSide,
    DtypeCast,
    ExportReport,
    GlobalRef,
    LoadReport,
    QuantizationReport,
    RenamedKey,
    ResumeReport,
    SalvageReport,
    SaveReport,
    ScanReport,
    ShapeMismatch,
    StoredTensor,
    TensorInfo,
    VerifyReport,
)
from ._version import __version__
from .errors import (
    CheckpointNotFoundError,
    CheckpointWriteError,
    CollectiveError,
    CorruptCheckpointError,
    ExportError,
    ExportMismatchError,
    ManagerClosedError,
    RestoreMismatchError,
    RunLockedError,
    StateDictMismatchError,
    TorchVaultError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
    UnsupportedTypeError,
)
from .export import (
    export_onnx,
    export_program,
    load_program,
    load_quantized,
    quantize,
    save_quantized,
)
from .legacy import convert, load_legacy, scan
from .run._manager import CheckpointManager

__all__ = [
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointSummary",
    "CheckpointWriteError",
    "CollectiveError",
    "ConvertReport",
    "CorruptCheckpointError",
    "DiffChange",
    "DiffLeaf",
    "DiffReport",
    "DiffSide",
    "DtypeCast",
    "ExportError",
    "ExportMismatchError",
    "ExportReport",
    "GlobalRef",
    "LoadReport",
    "ManagerClosedError",
    "QuantizationReport",
    "RenamedKey",
    "RestoreMismatchError",
    "ResumeReport",
    "RunLockedError",
    "SalvageReport",
    "SaveReport",
    "ScanReport",
    "ShapeMismatch",
    "StateDictMismatchError",
    "StoredTensor",
    "TensorInfo",
    "TorchVaultError",
    "UnsafeCheckpointError",
    "UnsupportedFormatError",
    "UnsupportedTypeError",
    "VerifyReport",
    "__version__",
    "convert",
    "diff",
    "export_onnx",
    "export_program",
    "inspect",
    "load",
    "load_into",
    "load_legacy",
    "load_program",
    "load_quantized",
    "quantize",
    "retention",
    "save",
    "save_quantized",
    "scan",
    "verify",
]
