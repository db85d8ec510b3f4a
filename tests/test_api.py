"""The public API is locked: names, docstrings, signatures and the error tree."""

from __future__ import annotations

import inspect
import re

import pytest

import torchvault as tv
from torchvault import errors

PUBLIC = [
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
DOCUMENTED = [name for name in PUBLIC if name != "__version__"]
ERRORS = [
    (tv.CheckpointNotFoundError, FileNotFoundError),
    (tv.CorruptCheckpointError, ValueError),
    (tv.UnsupportedFormatError, ValueError),
    (tv.UnsupportedTypeError, TypeError),
    (tv.UnsafeCheckpointError, ValueError),
    (tv.ExportMismatchError, RuntimeError),
    (tv.ExportError, RuntimeError),
    (tv.StateDictMismatchError, RuntimeError),
    (tv.CheckpointWriteError, OSError),
    (tv.RestoreMismatchError, RuntimeError),
    (tv.RunLockedError, RuntimeError),
    (tv.ManagerClosedError, RuntimeError),
]


def test_all_is_sorted() -> None:
    assert tv.__all__ == sorted(tv.__all__)


def test_all_is_exactly_the_public_api() -> None:
    assert tv.__all__ == PUBLIC


def test_every_public_name_exists() -> None:
    assert all(hasattr(tv, name) for name in PUBLIC)


@pytest.mark.parametrize("name", DOCUMENTED)
def test_every_public_name_has_its_own_docstring(name: str) -> None:
    obj = getattr(tv, name)
    doc = obj.__doc__
    assert doc
    assert doc.strip()
    assert not doc.startswith(f"{name}("), "an auto-generated dataclass docstring"


def test_version_is_a_version_string() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", tv.__version__)


@pytest.mark.parametrize(
    ("function", "positional"),
    [
        (tv.save, ["obj", "path"]),
        (tv.load, ["path"]),
        (tv.load_into, ["module", "source"]),
        (tv.inspect, ["path"]),
        (tv.verify, ["path"]),
        (tv.load_legacy, ["path"]),
        (tv.scan, ["path"]),
        (tv.convert, ["source", "destination"]),
        (tv.diff, ["a", "b"]),
        (tv.export_onnx, ["model", "example_inputs", "path"]),
        (tv.export_program, ["model", "example_inputs", "path"]),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_options_are_keyword_only(function: object, positional: list[str]) -> None:
    parameters = inspect.signature(function).parameters.values()  # type: ignore[arg-type]
    assert [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD] == positional
    assert all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in parameters)


@pytest.mark.parametrize(("error", "builtin"), ERRORS, ids=lambda e: e.__name__)
def test_error_inherits_the_builtin_callers_already_catch(
    error: type[Exception], builtin: type[Exception]
) -> None:
    assert issubclass(error, builtin)


@pytest.mark.parametrize("error", [e for e, _ in ERRORS], ids=lambda e: e.__name__)
def test_every_error_is_a_torchvault_error(error: type[Exception]) -> None:
    assert issubclass(error, tv.TorchVaultError)


def test_public_errors_are_the_ones_in_the_errors_module() -> None:
    assert all(getattr(tv, name) is getattr(errors, name) for name in errors.__all__)


def test_torchvault_error_is_an_exception() -> None:
    assert issubclass(tv.TorchVaultError, Exception)


def test_error_carries_its_path_and_key() -> None:
    error = tv.CorruptCheckpointError("bad", path="model.tv", key="w")
    assert (str(error), error.path, error.key) == ("bad", "model.tv", "w")


def test_write_error_carries_errno_and_filename() -> None:
    error = tv.CheckpointWriteError("full", path="model.tv", errno=28)
    assert (error.errno, error.filename, error.strerror) == (28, "model.tv", "full")
