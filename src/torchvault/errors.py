"""Every exception torchvault raises.

One tree, rooted at :class:`TorchVaultError`; each leaf also inherits the builtin a caller
would already catch for that kind of failure::

    TorchVaultError(Exception)
    ├── CheckpointNotFoundError(FileNotFoundError)   no file or folder at the path
    ├── CorruptCheckpointError(ValueError)           malformed, truncated or checksum mismatch
    ├── UnsupportedFormatError(ValueError)           written by a newer torchvault, or not ours
    ├── UnsafeCheckpointError(ValueError)            a pickle names code torchvault will not run
    ├── UnsupportedTypeError(TypeError)              a value the format cannot hold
    ├── StateDictMismatchError(RuntimeError)         load_into found keys or shapes that differ
    ├── RestoreMismatchError(RuntimeError)           restore found items without a target
    ├── RunLockedError(RuntimeError)                 another writer holds the run folder
    ├── ManagerClosedError(RuntimeError)             a closed CheckpointManager was used
    ├── CollectiveError(RuntimeError)                another rank failed, died or timed out
    ├── ExportError(RuntimeError)                    the model could not be exported, checked or run
    ├── ExportMismatchError(RuntimeError)            an exported artifact computes something else
    └── CheckpointWriteError(OSError)                the disk refused a write (ENOSPC, EIO, ...)

Every message says what happened, to which file and key, and how to fix it.

Who is blamed follows one rule, held by every public function (``tests/test_public_api_args.py``
calls each with generated wrong arguments):

* a wrong **argument** raises the builtin ``TypeError`` (wrong type) or ``ValueError`` (wrong
  value) whose message names the argument and what it accepts, before any file is read:
  ``map_location="gpu"``, a ``map_location`` naming a device this machine lacks, a URL
  path (``s3://...``: object storage is not supported yet), ``metadata={1: "a"}``, a
  ``load_into`` target that is not a module. Such an error is never a :class:`TorchVaultError`
  (except :class:`UnsupportedTypeError`, itself a ``TypeError``, for a value the format cannot
  hold), so it never says a valid file is damaged;
* a wrong **file** raises a :class:`TorchVaultError` whose ``path`` is the file and whose
  message names it; a file given to the wrong function (``load_legacy`` of a torchvault file,
  ``load_program`` of a checkpoint, ``load`` of a ``.pt2`` program or an ONNX model) is an
  :class:`UnsupportedFormatError` that names the function that reads it;
* nothing else escapes: no ``AttributeError``, ``AssertionError``, ``KeyError`` or torch
  ``RuntimeError`` from inside. (A callable the caller passed, such as a ``map_location``
  function, may raise its own errors; they pass through unchanged.)
"""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "CollectiveError",
    "CorruptCheckpointError",
    "ExportError",
    "ExportMismatchError",
    "ManagerClosedError",
    "RestoreMismatchError",
    "RunLockedError",
    "StateDictMismatchError",
    "TorchVaultError",
    "UnsafeCheckpointError",
    "UnsupportedFormatError",
    "UnsupportedTypeError",
]


class TorchVaultError(Exception):
    """Base class of every torchvault error.

    Attributes:
        path: the file concerned, when there is one.
        key: the tensor or tree path concerned, when there is one.
    """

    def __init__(
        self, message: str, *, path: str | os.PathLike[str] | None = None, key: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = None if path is None else os.fspath(path)
        self.key = key

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled as its message plus its attributes: torch.distributed.checkpoint sends a
        # rank's exception to the others with pickle, and the keyword-only arguments of the
        # subclasses (path=, errno=, global_name=) cannot be passed again positionally
        state = dict(vars(self))
        if isinstance(self, OSError):  # errno, strerror and filename are slots, not in vars
            state.update(errno=self.errno, strerror=self.strerror, filename=self.filename)
        return (_rebuild, (type(self), self.args), state)


def _rebuild(kind: type[TorchVaultError], args: tuple[Any, ...]) -> TorchVaultError:
    """An unpickled error, before its attributes are set back (``__reduce__``)."""
    error = kind.__new__(kind, *args)
    error.args = args  # OSError's __new__ leaves them to an __init__ that is not run here
    return error


class CheckpointNotFoundError(TorchVaultError, FileNotFoundError):
    """There is no checkpoint at the given path."""


class CorruptCheckpointError(TorchVaultError, ValueError):
    """The file is malformed, truncated, or its bytes do not match their checksums."""


class UnsupportedFormatError(TorchVaultError, ValueError):
    """The file is not a format this version of torchvault reads (too new, or foreign)."""


class UnsafeCheckpointError(TorchVaultError, ValueError):
    """A pickled checkpoint refers to a global (a function or class) outside the allowlist,
    or uses an opcode that only running code needs. Nothing from the file was run.

    Attributes:
        global_name: the refused ``module.name``, when a global was the reason.
    """

    def __init__(
        self,
        message: str,
        *,
        global_name: str | None,
        path: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(message, path=path)
        self.global_name = global_name


class UnsupportedTypeError(TorchVaultError, TypeError):
    """A value in the saved object has a type the pickle-free format cannot represent, or a
    file holds another kind of object than the call needs (``load_into`` of a list)."""


class StateDictMismatchError(TorchVaultError, RuntimeError):
    """``load_into`` found missing, unexpected or mismatched keys with ``strict=True``.

    Attributes:
        report: the :class:`torchvault.LoadReport` describing every difference.
    """

    def __init__(self, message: str, *, report: object, path: str | None = None) -> None:
        super().__init__(message, path=path)
        self.report = report


class CheckpointWriteError(TorchVaultError, OSError):
    """Writing a checkpoint failed; nothing was committed and the previous file is intact."""

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str],
        errno: int | None,
        ranks: tuple[int, ...] = (),
    ) -> None:
        TorchVaultError.__init__(self, message, path=path)
        self.errno = errno
        self.ranks = ranks  # in a multi-rank save: the ranks that failed
        self.strerror = message
        self.filename = self.path


class CollectiveError(TorchVaultError, RuntimeError):
    """A collective checkpoint operation (``CheckpointManager`` under torch.distributed)
    failed on another rank, or a peer rank died or did not answer within the manager's
    ``collective_timeout``.

    Attributes:
        ranks: the ranks that failed or did not answer, when known.
    """

    def __init__(
        self, message: str, *, ranks: tuple[int, ...] = (), path: str | None = None
    ) -> None:
        super().__init__(message, path=path)
        self.ranks = ranks


class RunLockedError(TorchVaultError, RuntimeError):
    """Another CheckpointManager is writing to this run folder."""


class ManagerClosedError(TorchVaultError, RuntimeError):
    """A method of a closed :class:`~torchvault.CheckpointManager` was called. Its lock is
    released (another writer may hold the run now), so it writes and reads nothing more."""


class RestoreMismatchError(TorchVaultError, RuntimeError):
    """``restore`` found saved items without a target, or targets without a saved item.

    Attributes:
        missing: saved items that were given no target.
        unexpected: targets the checkpoint has no item for.
    """

    def __init__(
        self, message: str, *, missing: tuple[str, ...], unexpected: tuple[str, ...], path: str
    ) -> None:
        super().__init__(message, path=path)
        self.missing = missing
        self.unexpected = unexpected


class ExportError(TorchVaultError, RuntimeError):
    """A model could not be exported: torch.export could not trace it, torch.onnx could not
    translate an operator, the file failed onnx's checker, or onnxruntime could not load or
    run it. Nothing was left at the destination; the exporter's exception is chained."""


class ExportMismatchError(TorchVaultError, RuntimeError):
    """An exported model (ONNX, torch.export program, quantized model) does not compute what
    the PyTorch model computes within the tolerance; nothing was left at the destination.

    Attributes:
        report: the :class:`torchvault.ExportReport` (or ``QuantizationReport``) with the
            measured differences.
    """

    def __init__(self, message: str, *, report: object, path: str | None = None) -> None:
        super().__init__(message, path=path)
        self.report = report
