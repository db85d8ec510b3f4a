"""Comparing two checkpoint trees leaf by leaf, for ``torchvault diff``.

Trees are flattened to dotted paths. Tensors (and numpy arrays) with the same dtype and shape
are compared value by value: the maximum absolute difference is computed in float64
(complex128 for complex dtypes) on the CPU, one block of at most :data:`CHUNK_ELEMENTS`
elements at a time, so a large tensor never needs a second full-size copy. NaNs in the same
place count as equal. Dtypes torch cannot compute with (``bits8``, ``float4_e2m1fn_x2``, ...)
are compared bit for bit, without a difference value. Other leaves are compared with ``==``.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
import torch

from .._tree import flatten
from ._exit import one_line
from ._progress import Progress
from ._render import shape_text

CHUNK_ELEMENTS = 1 << 21
"""Elements compared at once: each float64 temporary of a block is at most 16 MiB."""

_VALUE_WIDTH = 40
_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class Leaf:
    """One leaf of a flattened tree, described."""

    kind: str  # "tensor", "array" (numpy) or "value"
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    nbytes: int = 0
    text: str = ""  # the repr of a value, shortened

    def describe(self) -> str:
        if self.kind == "value":
            return self.text
        return f"{self.dtype} {shape_text(self.shape or ())}"

    def as_json(self) -> dict[str, Any]:
        if self.kind == "value":
            return {"kind": "value", "repr": self.text}
        return {"kind": self.kind, "dtype": self.dtype, "shape": list(self.shape or ())}


@dataclass(frozen=True)
class Change:
    """A key whose leaf differs between the two trees.

    Attributes:
        reason: ``"values"``, ``"dtype"``, ``"shape"``, ``"dtype, shape"``, ``"type"``
            (a tensor against a value) or ``"value"`` (two values not ``==``).
        max_abs_diff: for ``"values"``, the largest absolute difference (NaN where one side
            has a NaN the other has not); ``None`` for bit-compared dtypes and other reasons.
    """

    key: str
    a: Leaf
    b: Leaf
    reason: str
    max_abs_diff: float | None = None


@dataclass
class TreeDiff:
    """What differs between tree A and tree B."""

    added: list[tuple[str, Leaf]] = field(default_factory=list)
    removed: list[tuple[str, Leaf]] = field(default_factory=list)
    changed: list[Change] = field(default_factory=list)
    unchanged: int = 0

    @property
    def identical(self) -> bool:
        return not (self.added or self.removed or self.changed)


def diff_trees(a: object, b: object, *, atol: float = 0.0, label: str = "diff") -> TreeDiff:
    """Compare two decoded trees. Values of tensors differ when their max abs difference is
    above ``atol`` (with ``atol=0``: when any element differs)."""
    left = dict(flatten(a))
    right = dict(flatten(b))
    result = TreeDiff()
    pairs: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    for key, value in left.items():
        if key not in right:
            result.removed.append((key, describe(value)))
            continue
        other = right[key]
        da, db = describe(value), describe(other)
        if da.kind != db.kind:
            result.changed.append(Change(key, da, db, "type"))
        elif da.kind == "value":
            if _values_equal(value, other):
                result.unchanged += 1
            else:
                result.changed.append(Change(key, da, db, "value"))
        elif da.dtype != db.dtype or da.shape != db.shape:
            what = [
                w
                for w, d in (("dtype", da.dtype != db.dtype), ("shape", da.shape != db.shape))
                if d
            ]
            result.changed.append(Change(key, da, db, ", ".join(what)))
        else:
            pairs.append((key, as_tensor(value), as_tensor(other)))
    result.added = [(key, describe(value)) for key, value in right.items() if key not in left]
    total = sum(x.numel() * x.element_size() for _, x, _ in pairs)
    with Progress(label, total) as progress:
        for key, x, y in pairs:
            differs, biggest = compare(x, y, progress)
            if differs and (atol == 0 or not biggest <= atol):  # NaN is never within atol
                max_abs = None if _raw(x.dtype) else biggest
                leaf_a, leaf_b = describe(left[key]), describe(right[key])
                result.changed.append(Change(key, leaf_a, leaf_b, "values", max_abs))
            else:
                result.unchanged += 1
    order = {key: i for i, key in enumerate(left)}
    result.changed.sort(key=lambda change: order[change.key])
    return result


def describe(value: object) -> Leaf:
    """A leaf's kind, dtype and shape (tensors) or shortened repr (values)."""
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return Leaf("tensor", dtype, tuple(value.shape), value.numel() * value.element_size())
    if isinstance(value, np.ndarray):
        return Leaf("array", str(value.dtype), tuple(value.shape), int(value.nbytes))
    text = one_line(repr(value))
    if len(text) > _VALUE_WIDTH:
        text = text[: _VALUE_WIDTH - 3] + "..."
    return Leaf("value", text=text)


def as_tensor(value: object) -> torch.Tensor:
    """A tensor, or a numpy array as a tensor sharing its memory."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    with warnings.catch_warnings():  # a read-only array: we only read it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(value)


def _values_equal(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:  # an == that raises or returns no truth value: compare the text
        return repr(a) == repr(b)


def compare(
    x: torch.Tensor, y: torch.Tensor, progress: Progress | None = None
) -> tuple[bool, float]:
    """Whether two tensors of one dtype and shape differ, and their max abs difference.

    Works block by block on the CPU; a block of the other device is copied over alone.
    """
    if _raw(x.dtype):  # no arithmetic for this dtype: compare the bits
        same_width = _SAME_WIDTH_INT[x.element_size()]
        x, y = x.view(same_width), y.view(same_width)
    differs, biggest = False, 0.0
    for index in blocks(tuple(x.shape), CHUNK_ELEMENTS):
        bx = x[index].reshape(-1).cpu()
        by = y[index].reshape(-1).cpu()
        block_differs, block_max = _compare_block(bx, by)
        differs = differs or block_differs
        if math.isnan(block_max):
            biggest = math.nan
        elif not math.isnan(biggest):
            biggest = max(biggest, block_max)
        if progress is not None:
            progress.advance(bx.numel() * bx.element_size())
    return differs, biggest


def _compare_block(x: torch.Tensor, y: torch.Tensor) -> tuple[bool, float]:
    unequal = x != y
    if not bool(unequal.any()):
        return False, 0.0
    wide = torch.complex128 if x.is_complex() else torch.float64
    xw, yw = x.to(wide), y.to(wide)
    if x.is_floating_point() or x.is_complex():
        unequal &= ~(xw.isnan() & yw.isnan())
        if not bool(unequal.any()):
            return False, 0.0
    gap = torch.where(unequal, (xw - yw).abs(), 0.0)
    return True, float(gap.max().item())


def blocks(shape: tuple[int, ...], limit: int) -> Iterator[tuple[int | slice, ...]]:
    """Indexes that cut a tensor of ``shape`` into row-major blocks of at most ``limit``
    elements (at least one row of the last dimension), in order; they depend on the shape
    only, so two tensors of one shape are cut alike whatever their strides."""
    inner, k = 1, len(shape)
    while k > 0 and inner * shape[k - 1] <= limit:
        inner *= shape[k - 1]
        k -= 1
    if k == 0:
        yield ()
        return
    rows = max(1, limit // inner)
    for lead in itertools.product(*(range(n) for n in shape[: k - 1])):
        for start in range(0, shape[k - 1], rows):
            yield (*lead, slice(start, start + rows))


@cache
def _raw(dtype: torch.dtype) -> bool:
    """Whether torch has no arithmetic for ``dtype`` (bit-packed and opaque dtypes)."""
    try:
        probe = torch.empty(1, dtype=dtype)
        _ = probe != probe
        probe.to(torch.complex128 if probe.is_complex() else torch.float64)
    except (RuntimeError, NotImplementedError, TypeError):
        return True
    return False
