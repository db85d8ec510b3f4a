"""Turning torchvault's reports into text and JSON for the terminal."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._report import CheckpointInfo, VerifyReport
from ._exit import one_line

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def human_bytes(n: int) -> str:
    """``n`` bytes in binary units: ``'512 B'``, ``'16.0 MiB'``, ``'1.2 GiB'``."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in _UNITS[1:]:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            break
    return f"{value:.1f} {unit}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], *, right: set[int]) -> list[str]:
    """Lines of a plain-text table with aligned columns; columns in ``right`` align right."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = (
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(padded).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(row) for row in rows)]


def _exact(n: int) -> str:
    return human_bytes(n) if n < 1024 else f"{human_bytes(n)} ({n:,} bytes)"


def shape_text(shape: Sequence[int]) -> str:
    """A shape as ``[4096, 1024]`` (``[]`` for a scalar)."""
    return "[" + ", ".join(str(n) for n in shape) + "]"


def inspect_text(info: CheckpointInfo) -> str:
    """The human-readable ``torchvault inspect`` report."""
    rows = [
        [one_line(t.key), t.dtype, shape_text(t.shape), human_bytes(t.nbytes)] for t in info.tensors
    ]
    lines = table(["key", "dtype", "shape", "size"], rows, right={3})
    count = len(info.tensors)
    lines += [
        "",
        f"{count} tensor{'' if count == 1 else 's'}, {_exact(info.tensor_bytes)} of tensor data; "
        f"file {_exact(info.file_bytes)}",
        "",
        *_fields(info),
    ]
    return "\n".join(lines)


def _fields(info: CheckpointInfo) -> list[str]:
    version = "" if info.format_version is None else f" (format version {info.format_version})"
    versions = ", ".join(
        f"{name} {info.versions[name]}" for name in sorted(info.versions, key=_version_order)
    )
    lines = [
        f"format:    {info.format}{version}",
        f"created:   {one_line(info.created) if info.created else '-'}",
        f"versions:  {one_line(versions) if versions else '-'}",
        f"metadata:  {'' if info.metadata else '-'}".rstrip(),
    ]
    lines += [f"  {one_line(k)}: {one_line(v)}" for k, v in sorted(info.metadata.items())]
    return lines


def _version_order(name: str) -> tuple[int, str]:
    first = ("torch", "torchvault", "python")
    return (first.index(name) if name in first else len(first), name)


def inspect_json(info: CheckpointInfo) -> dict[str, Any]:
    """The ``torchvault inspect --json`` object."""
    return {
        "path": info.path,
        "format": info.format,
        "format_version": info.format_version,
        "file_bytes": info.file_bytes,
        "tensor_bytes": info.tensor_bytes,
        "created": info.created,
        "versions": dict(info.versions),
        "metadata": dict(info.metadata),
        "tensors": [
            {"key": t.key, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes}
            for t in info.tensors
        ],
    }


def verify_text(result: VerifyReport) -> str:
    """The ``torchvault verify`` line for a file that passed."""
    how = "checksums match" if result.checksummed else "structure valid (no checksums)"
    count = f"{result.tensors} tensor{'' if result.tensors == 1 else 's'}"
    return f"OK  {one_line(result.path)}: {count}, {human_bytes(result.checked_bytes)}, {how}"


def verify_json(result: VerifyReport) -> dict[str, Any]:
    """The ``torchvault verify --json`` object for a file that passed."""
    return {
        "path": result.path,
        "ok": True,
        "tensors": result.tensors,
        "checked_bytes": result.checked_bytes,
        "checksummed": result.checksummed,
    }
