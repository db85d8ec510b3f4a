"""Tensors stored in another form than they have: half precision (``save(dtype=...)``) and
per-channel int8 with scales (``save(quantize="int8")``).

On save, :class:`Storing` sits between the tree encoder and the tensor plan: it converts
each eligible tensor and records, by its index in the tensor table, what it was
(``torchvault.stored`` in the header: original dtype, Parameter-ness, the scale tensor's
index and the largest error the conversion made). On load, :func:`source` wraps the table:
int8 tensors are always dequantized to their original dtype; half-precision tensors are
cast back only when asked (``restore_dtype=True``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from . import _dtypes, _format
from ._report import StoredTensor
from ._tensors import TensorPlan, TensorTable
from .errors import CorruptCheckpointError

STORED = "torchvault.stored"
HALF = (torch.bfloat16, torch.float16)
INT8_MIN_NUMEL = 256  # smaller matrices (biases, norms) stay as they are
_WIDE = (torch.float32, torch.float64)
_AS = {"int8": torch.int8, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Storing:
    """A tensor sink for ``_tree.encode`` that stores eligible tensors converted."""

    def __init__(self, plan: TensorPlan, dtype: torch.dtype | None, quantize: str | None) -> None:
        if dtype is not None and dtype not in HALF:
            raise ValueError(f"dtype={dtype}: choose torch.bfloat16 or torch.float16")
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize={quantize!r}: the storage quantization is 'int8'")
        self.plan, self.dtype, self.quantize = plan, dtype, quantize
        self.records: dict[str, dict[str, Any]] = {}
        self.report: list[StoredTensor] = []
        self._memo: dict[int, int] = {}

    def add(self, value: torch.Tensor | np.ndarray[Any, Any], path: str) -> int:
        known = self._memo.get(id(value))
        if known is not None:
            return known
        if not isinstance(value, torch.Tensor) or value.dtype not in _WIDE + HALF:
            index = self.plan.add(value, path)
        elif self.quantize and value.dim() >= 2 and value.numel() >= INT8_MIN_NUMEL:
            index = self._int8(value, path)
        elif self.dtype is not None and value.dtype in _WIDE:
            index = self._half(value, path)
        else:
            index = self.plan.add(value, path)
        self._memo[id(value)] = index
        return index

    def _half(self, value: torch.Tensor, path: str) -> int:
        assert self.dtype is not None
        stored = value.detach().to(self.dtype)
        error = (
            float((stored.to(value.dtype) - value.detach()).abs().max()) if value.numel() else 0.0
        )
        if isinstance(value, torch.nn.Parameter):
            stored = torch.nn.Parameter(stored, requires_grad=value.requires_grad)
        index = self.plan.add(stored, path)
        self._record(index, path, value, str(self.dtype).removeprefix("torch."), error, {})
        return index

    def _int8(self, value: torch.Tensor, path: str) -> int:
        weights = value.detach()
        rows = weights.reshape(weights.shape[0], -1).to(torch.float32)
        scale = (rows.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(rows / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        error = float((q.to(torch.float32) * scale[:, None] - rows).abs().max())
        index = self.plan.add(q.reshape(weights.shape), path)
        scale_index = self.plan.add(scale, f"{path}.scale")
        extra = {"scale": scale_index}
        self._record(index, path, value, "int8", error, extra)
        return index

    def _record(
        self,
        index: int,
        path: str,
        value: torch.Tensor,
        stored_as: str,
        error: float,
        extra: dict[str, Any],
    ) -> None:
        original = str(value.dtype).removeprefix("torch.")
        self.records[str(index)] = {
            "as": stored_as,
            "dtype": original,
            "param": isinstance(value, torch.nn.Parameter),
            "grad": value.requires_grad,
            "error": error,
            **extra,
        }
        self.report.append(StoredTensor(path, original, stored_as, error))

    def member(self) -> dict[str, str]:
        """The header member recording the conversions (empty when there were none)."""
        return {STORED: json.dumps(self.records, separators=(",", ":"))} if self.records else {}


def records(metadata: dict[str, str], path: str) -> dict[int, dict[str, Any]]:
    """The conversions a file records, validated."""
    raw = metadata.get(STORED)
    if raw is None:
        return {}
    parsed = _format.strict_json(raw.encode("utf-8"), path, STORED)
    if not isinstance(parsed, dict):
        raise _corrupt(path, "is not an object")
    out: dict[int, dict[str, Any]] = {}
    for key, record in parsed.items():
        if not (_format.decimal(key, 9) and isinstance(record, dict) and _valid(record)):
            raise _corrupt(path, f"has a malformed record for tensor {key[:40]!r}")
        out[int(key)] = record
    return out


def _valid(record: dict[str, Any]) -> bool:
    kind, dtype = record.get("as"), record.get("dtype")
    stored_ok = isinstance(kind, str) and kind in _AS
    dtype_ok = isinstance(dtype, str) and _dtypes.STORABLE.get(dtype) in _WIDE + HALF
    scale_ok = kind != "int8" or type(record.get("scale")) is int
    flags_ok = type(record.get("param")) is bool and type(record.get("grad")) is bool
    return stored_ok and dtype_ok and scale_ok and flags_ok


def check(stored: dict[int, dict[str, Any]], table: TensorTable, path: str) -> None:
    """Check every record against the tensor table, without reading data: the tensor it
    names exists and is stored as the record says, and an int8 tensor's scale has one value
    per row. Load and verify both run this, so verify refuses whatever load would.

    Raises:
        CorruptCheckpointError: naming the file and the record.
    """
    for index, record in stored.items():
        if index >= len(table):
            raise _corrupt(path, f"has a record for tensor {index}, which the table lacks")
        dtype, shape, _, fields = table.check(index)
        if "np" in fields:
            raise _corrupt(path, f"has a record for tensor {index}, which is a numpy array")
        if dtype != _AS[record["as"]]:
            raise _corrupt(path, f"records tensor {index} as {record['as']}, but it is {dtype}")
        if record["as"] != "int8":
            continue
        scale = record["scale"]
        if not 0 <= scale < len(table) or "np" in table.check(scale)[3]:
            raise _corrupt(path, f"names scale tensor {scale}, which the table lacks")
        if not shape or table.check(scale)[1] != shape[:1]:
            raise _corrupt(path, "pairs an int8 tensor with scales of another shape")


def _corrupt(path: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path}: the `{STORED}` member {what}; the file is damaged.", path=path
    )


def source(
    get: Callable[[int], object],
    stored: dict[int, dict[str, Any]],
    *,
    restore_dtype: bool,
    path: str,
) -> Callable[[int], object]:
    """The table's ``get``, with int8 tensors dequantized and (when asked) half-precision
    tensors cast back to their original dtype."""
    if not stored:
        return get
    built: dict[int, object] = {}

    def fetch(index: int) -> object:
        record = stored.get(index)
        if record is None or (record["as"] != "int8" and not restore_dtype):
            return get(index)
        if index not in built:
            built[index] = _restore(get(index), record, get, path)
        return built[index]

    return fetch


def _restore(
    tensor: object, record: dict[str, Any], get: Callable[[int], object], path: str
) -> torch.Tensor:
    dtype = _dtypes.STORABLE[record["dtype"]]
    if not isinstance(tensor, torch.Tensor):
        raise _corrupt(path, "names a value that is not a tensor")
    if record["as"] == "int8":
        scale = get(record["scale"])
        if not (
            isinstance(scale, torch.Tensor)
            and tensor.dtype == torch.int8
            and tensor.dim() >= 1
            and scale.shape == (tensor.shape[0],)
        ):
            raise _corrupt(path, "pairs an int8 tensor with scales of another shape")
        # the row length spelled out: reshape(rows, -1) cannot infer it when rows is 0
        flat = tensor.reshape(tensor.shape[0], math.prod(tensor.shape[1:]))
        rows = flat.to(torch.float32) * scale.to(torch.float32)[:, None]
        value = rows.reshape(tensor.shape).to(dtype)
    else:
        value = tensor.detach().to(dtype)
    if record["param"]:
        return torch.nn.Parameter(value, requires_grad=record["grad"])
    return value.requires_grad_(True) if record["grad"] else value
