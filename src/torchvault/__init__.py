"""torchvault: save, load, resume and ship PyTorch models safely, fast and exactly.

>>> import torchvault as tv
>>> tv.save(model, "model.tv")
>>> report = tv.load_into(model, "model.tv")
"""

from __future__ import annotations

from . import retention
from ._file import inspect, load, save, verify
from ._load_into import load_into
from ._manager import CheckpointManager
from ._report import (
    CheckpointInfo,
    CheckpointSummary,
    DtypeCast,
    LoadReport,
    RenamedKey,
    ResumeReport,
    ShapeMismatch,
    TensorInfo,
    VerifyReport,
)
from ._version import __version__
from .errors import (
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    RestoreMismatchError,
    RunLockedError,
    StateDictMismatchError,
    TorchVaultError,
    UnsupportedFormatError,
    UnsupportedTypeError,
)

__all__ = [
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointSummary",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "DtypeCast",
    "LoadReport",
    "RenamedKey",
    "RestoreMismatchError",
    "ResumeReport",
    "RunLockedError",
    "ShapeMismatch",
    "StateDictMismatchError",
    "TensorInfo",
    "TorchVaultError",
    "UnsupportedFormatError",
    "UnsupportedTypeError",
    "VerifyReport",
    "__version__",
    "inspect",
    "load",
    "load_into",
    "retention",
    "save",
    "verify",
]
