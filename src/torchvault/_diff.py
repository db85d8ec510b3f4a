"""``diff``: compare two checkpoints leaf by leaf, after verifying both.

Each side is a checkpoint file (every checksum verified as ``tv.load`` does) or one
checkpoint of a run, ``RUN@STEP`` (every object verified against its hash). Trees are
flattened to dotted paths. Tensors (and numpy arrays) with the same dtype and shape are
compared value by value: the maximum absolute difference is computed in float64 (complex128
for complex dtypes) on the CPU, one block of at most :data:`CHUNK_ELEMENTS` elements at a
time, so a large tensor never needs a second full-size copy. NaNs in the same place count as
equal. Dtypes torch cannot compute with (``bits8``, ``float4_e2m1fn_x2``, ...) are compared bit
for bit, without a difference value. Other leaves are compared with ``==``.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Iterator
from functools import cache
from typing import Protocol

import numpy as np
import torch

from . import _args
from ._open import load
from ._report import DiffChange, DiffLeaf, DiffReport, DiffSide
from ._sources import open_run, parse_source, resolve_step
from ._tree import flatten
from .errors import CheckpointNotFoundError
from .run import _readers

CHUNK_ELEMENTS = 1 << 21
"""Elements compared at once: each float64 temporary of a block is at most 16 MiB."""

_VALUE_WIDTH = 40
_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class ProgressSink(Protocol):
    """Where :func:`diff_trees` reports its progress (the CLI's progress bar)."""

    total: int | None

    def advance(self, amount: int) -> None: ...


def diff(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    atol: float = 0.0,
    item: str | None = None,
) -> DiffReport:
    """Compare two checkpoints: the tensors and values added, removed and changed.

    Both sides are verified completely first (every checksum of a file, every object hash of
    a run's checkpoint), so a damaged file is an error, never a small "change".

    Args:
        a: a checkpoint file (torchvault, safetensors, torch.save, a Hugging Face folder), a
            run folder (its latest checkpoint) or ``"RUN@STEP"`` (a number, latest or best).
        b: the same, compared against ``a``.
        atol: tensor values differ only where their largest absolute difference is above
            ``atol`` (with 0, where any element differs); NaN is never within it.
        item: compare only this item of ``RUN@STEP`` sides (a file holds what it holds).

    Returns:
        A :class:`DiffReport`; ``report.identical`` says whether anything differs.

    Raises:
        TypeError: ``a`` or ``b`` is not a path, ``atol`` is not a number, or ``item`` is
            not a str.
        ValueError: a negative or non-finite ``atol``; a ``RUN@STEP`` whose step is not a
            step, or without a run (naming ``a`` or ``b``).
        CheckpointNotFoundError: a side does not exist, or lacks the step or ``item``.
        CorruptCheckpointError: a side is damaged; the message names the file.

    Example:
        >>> report = tv.diff("runs/exp1@10", "runs/exp1@best")
        >>> [(c.key, c.max_abs_diff) for c in report.changed]
    """
    a, b = (_args.path(v, name, also=" or 'RUN@STEP'") for v, name in ((a, "a"), (b, "b")))
    if isinstance(atol, bool) or not isinstance(atol, int | float):
        raise TypeError(f"`atol` must be a number >= 0, got {type(atol).__name__}")
    if not math.isfinite(atol) or atol < 0:
        raise ValueError(f"`atol` must be a finite number >= 0, got {atol!r}")
    if item is not None and not isinstance(item, str):
        raise TypeError(f"`item` must be an item name (a str) or None, got {type(item).__name__}")
    _check_spec(a, "a")
    _check_spec(b, "b")
    side_a, tree_a = open_side(a, item)
    side_b, tree_b = open_side(b, item)
    return diff_trees(side_a, tree_a, side_b, tree_b, atol=float(atol))


def _check_spec(spec: str, name: str) -> None:
    """A malformed ``RUN@STEP`` is the caller's argument: name it, before anything is read."""
    try:
        parse_source(spec)
    except ValueError as exc:
        raise ValueError(f"{name} {exc}") from None


def open_side(spec: str, item: str | None = None) -> tuple[DiffSide, object]:
    """One side of a diff, read and verified: a file, or a run's checkpoint (its items, or
    one of them)."""
    path, ref = parse_source(spec)
    if ref is None:
        return DiffSide(spec, "file", path), load(path)  # every checksum verified
    store = open_run(path)
    step = resolve_step(store, ref)
    _, state = _readers.load_tree(store, step, map_location="cpu")  # every object verified
    items = state[_readers.ITEMS]
    if item is not None:
        if item not in items:
            names = ", ".join(sorted(str(name) for name in items)) or "none"
            raise CheckpointNotFoundError(
                f"step {step} of {store.root} has no item {item!r}; its items: {names}.",
                path=path,
            )
        items = items[item]
    return DiffSide(spec, "run", path, step), items


def diff_trees(
    side_a: DiffSide,
    a: object,
    side_b: DiffSide,
    b: object,
    *,
    atol: float = 0.0,
    progress: ProgressSink | None = None,
) -> DiffReport:
    """Compare two decoded trees. Values of tensors differ when their max abs difference is
    above ``atol`` (with ``atol=0``: when any element differs)."""
    left = dict(flatten(a))
    right = dict(flatten(b))
    changed: list[DiffChange] = []
    removed: list[tuple[str, DiffLeaf]] = []
    unchanged = 0
    pairs: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    for key, value in left.items():
        if key not in right:
            removed.append((key, describe(value)))
            continue
        other = right[key]
        da, db = describe(value), describe(other)
        if da.kind != db.kind:
            changed.append(DiffChange(key, da, db, "type"))
        elif da.kind == "value":
            if _values_equal(value, other):
                unchanged += 1
            else:
                changed.append(DiffChange(key, da, db, "value"))
        elif da.dtype != db.dtype or da.shape != db.shape:
            what = [
                w
                for w, d in (("dtype", da.dtype != db.dtype), ("shape", da.shape != db.shape))
                if d
            ]
            changed.append(DiffChange(key, da, db, ", ".join(what)))
        else:
            pairs.append((key, as_tensor(value), as_tensor(other)))
    added = tuple((key, describe(value)) for key, value in right.items() if key not in left)
    if progress is not None:
        progress.total = sum(x.numel() * x.element_size() for _, x, _ in pairs)
    for key, x, y in pairs:
        differs, biggest = compare(x, y, progress)
        if differs and (atol == 0 or not biggest <= atol):  # NaN is never within atol
            max_abs = None if _raw(x.dtype) else biggest
            leaf_a, leaf_b = describe(left[key]), describe(right[key])
            changed.append(DiffChange(key, leaf_a, leaf_b, "values", max_abs))
        else:
            unchanged += 1
    order = {key: i for i, key in enumerate(left)}
    changed.sort(key=lambda change: order[change.key])
    return DiffReport(side_a, side_b, atol, tuple(changed), added, tuple(removed), unchanged)


def describe(value: object) -> DiffLeaf:
    """A leaf's kind, dtype and shape (tensors) or shortened repr (values)."""
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return DiffLeaf("tensor", dtype, tuple(value.shape), value.numel() * value.element_size())
    if isinstance(value, np.ndarray):
        return DiffLeaf("array", str(value.dtype), tuple(value.shape), int(value.nbytes))
    text = _printable(repr(value))
    if len(text) > _VALUE_WIDTH:
        text = text[: _VALUE_WIDTH - 3] + "..."
    return DiffLeaf("value", text=text)


def _printable(text: str) -> str:
    # a value read from a file must not drive the terminal it is shown on
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


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
    x: torch.Tensor, y: torch.Tensor, progress: ProgressSink | None = None
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
