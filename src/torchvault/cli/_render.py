"""Turning torchvault's reports into text and JSON for the terminal."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .._report import (
    CheckpointInfo,
    CheckpointSummary,
    DiffLeaf,
    DiffReport,
    DiffSide,
    TensorInfo,
    VerifyReport,
)
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
        [one_line(t.key), _dtype_text(t), shape_text(t.shape), human_bytes(t.nbytes)]
        for t in info.tensors
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


def _dtype_text(info: TensorInfo) -> str:
    return info.dtype if info.stored_as is None else f"{info.dtype} (as {info.stored_as})"


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


# ---------------------------------------------------------------------- runs

_METRICS_WIDTH = 48


def json_number(value: float) -> float | str:
    """A float for JSON: non-finite values as the strings ``"nan"``, ``"inf"``, ``"-inf"``
    (strict JSON has no literal for them)."""
    return value if math.isfinite(value) else repr(value)


def metrics_text(metrics: Mapping[str, float]) -> str:
    """``loss=0.3124 acc=0.91``, in saved order, cut to one table cell."""
    text = " ".join(f"{one_line(name)}={value:.4g}" for name, value in metrics.items())
    return text if len(text) <= _METRICS_WIDTH else text[: _METRICS_WIDTH - 3] + "..."


def created_text(created: str | None) -> str:
    """An ISO-8601 UTC time as ``2024-05-01 12:00:00``."""
    if not created:
        return "-"
    return one_line(created.replace("T", " ").removesuffix("+00:00"))


def refs_text(summary: CheckpointSummary) -> str:
    return " ".join(name for name, on in (("latest", summary.latest), ("best", summary.best)) if on)


def ls_text(run: str, checkpoints: Sequence[CheckpointSummary], object_bytes: int) -> str:
    """The ``torchvault ls`` table and footer."""
    if not checkpoints:
        return f"{one_line(run)}: no checkpoints yet"
    rows = [
        [
            str(c.step),
            created_text(c.created),
            metrics_text(c.metrics) or "-",
            human_bytes(c.total_bytes),
            human_bytes(c.new_bytes),
            refs_text(c),
        ]
        for c in checkpoints
    ]
    header = ["step", "created (UTC)", "metrics", "size", "new", "refs"]
    lines = table(header, rows, right={0, 3, 4})
    count = len(checkpoints)
    lines += [
        "",
        f"{count} checkpoint{'' if count == 1 else 's'}; {_exact(object_bytes)} of objects "
        f"on disk in {one_line(run)}",
    ]
    return "\n".join(lines)


def ls_json(
    run: str, checkpoints: Sequence[CheckpointSummary], object_bytes: int
) -> dict[str, Any]:
    """The ``torchvault ls --json`` object."""
    return {
        "run": run,
        "latest": next((c.step for c in checkpoints if c.latest), None),
        "best": next((c.step for c in checkpoints if c.best), None),
        "object_bytes": object_bytes,
        "checkpoints": [
            {
                "step": c.step,
                "created": c.created,
                "metrics": {name: json_number(v) for name, v in c.metrics.items()},
                "total_bytes": c.total_bytes,
                "new_bytes": c.new_bytes,
                "latest": c.latest,
                "best": c.best,
            }
            for c in checkpoints
        ],
    }


# ---------------------------------------------------------------------- diff


def diff_number(value: float | None) -> str:
    if value is None:
        return "bits differ"
    return f"{value:.6g}"


def diff_text(result: DiffReport) -> str:
    """The ``torchvault diff`` report."""
    lines = [f"--- a: {one_line(result.a.label())}", f"+++ b: {one_line(result.b.label())}"]
    if result.changed:
        rows = [
            [
                one_line(c.key),
                one_line(c.a.describe()),
                one_line(c.b.describe()),
                diff_number(c.max_abs_diff) if c.reason == "values" else f"{c.reason} differs",
            ]
            for c in result.changed
        ]
        lines += ["", f"changed ({len(result.changed)}):"]
        lines += _indent(table(["key", "a", "b", "max abs diff"], rows, right=set()))
    for title, side, leaves in (("added", "b", result.added), ("removed", "a", result.removed)):
        if leaves:
            rows = [[one_line(key), one_line(leaf.describe())] for key, leaf in leaves]
            lines += ["", f"{title} ({len(leaves)}):"]
            lines += _indent(table(["key", side], rows, right=set()))
    within = f" (atol {result.atol:g})" if result.atol else ""
    summary = (
        f"{len(result.changed)} changed{within}, {len(result.added)} added, "
        f"{len(result.removed)} removed, {result.unchanged} unchanged"
    )
    verdict = "identical" if result.identical else "different"
    lines += ["", f"{verdict}: {summary}"]
    return "\n".join(lines)


def _indent(lines: list[str]) -> list[str]:
    return [f"  {line}" for line in lines]


def _side_json(side: DiffSide) -> dict[str, Any]:
    return {"source": side.source, "kind": side.kind, "path": side.path, "step": side.step}


def _leaf_json(leaf: DiffLeaf) -> dict[str, Any]:
    if leaf.kind == "value":
        return {"kind": "value", "repr": leaf.text}
    return {"kind": leaf.kind, "dtype": leaf.dtype, "shape": list(leaf.shape or ())}


def diff_json(result: DiffReport) -> dict[str, Any]:
    """The ``torchvault diff --json`` object."""
    return {
        "a": _side_json(result.a),
        "b": _side_json(result.b),
        "atol": result.atol,
        "identical": result.identical,
        "changed": [
            {
                "key": c.key,
                "reason": c.reason,
                "a": _leaf_json(c.a),
                "b": _leaf_json(c.b),
                "max_abs_diff": None if c.max_abs_diff is None else json_number(c.max_abs_diff),
            }
            for c in result.changed
        ],
        "added": [{"key": key, **_leaf_json(leaf)} for key, leaf in result.added],
        "removed": [{"key": key, **_leaf_json(leaf)} for key, leaf in result.removed],
        "unchanged": result.unchanged,
    }
