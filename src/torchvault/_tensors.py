"""The tensor table: which stored bytes each tensor of the tree is, and how to rebuild it.

Saving groups tensors by the storage they live in. A tensor alone in its storage is stored
as itself (contiguous, under its tree path, with its own dtype when safetensors knows it).
Tensors sharing a storage (tied weights, views of one buffer) are stored once: under the
member that covers all the others when there is one, else as the raw bytes of the span they
cover; the others become views (dtype, shape, stride, byte offset) into it. Loading builds
each stored blob once, so views come back sharing storage, as they were saved.

Table entries are a blob index (the tensor is exactly that stored blob, with the dtype and
shape of its safetensors entry) or an object::

    {"s": blob index, "dtype": "float32", "shape": [2, 3],
     "stride": [3, 1], "offset": 24,        # only for views into a shared blob (bytes)
     "param": true, "grad": true,           # nn.Parameter / requires_grad
     "device": "cuda:0",                    # saved-from device when not the CPU
     "np": "<f4"}                           # a numpy array, with its dtype

Blob indices count the safetensors header's tensors in header order.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import numpy as np
import torch

from . import _dtypes, _placement
from ._format import MAX_TENSORS, META, Blob, Deferred, Entry, fits_int64
from ._placement import MapLocation, Placement
from .errors import CorruptCheckpointError, UnsupportedTypeError

__all__ = ["MapLocation", "TensorPlan", "TensorTable"]
_ALIGN = 16  # bytes a shared span is rounded down to, so every view offset stays aligned
_DEVICE_RE = re.compile(r"[a-z_]{1,32}(:[0-9]{1,6})?")
_ENTRY_KEYS = {"s", "dtype", "shape", "stride", "offset", "param", "grad", "device", "np"}
_PLAIN = {"s", "dtype", "shape"}
_NO_FIELDS: dict[str, Any] = {}
_NUMPY_ANY_ORDER = {
    dtype.newbyteorder(order).str: dtype.newbyteorder(order)
    for dtype in _dtypes.NUMPY_DTYPES.values()
    for order in ("<", ">")
}
# The torch dtype whose bytes each numpy dtype is stored as: an entry naming a numpy dtype
# must store exactly that one (torch has no numpy form of bfloat16, float8 or complex32).
_TORCH_OF_NUMPY = {
    name: torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    for name, dtype in _dtypes.NUMPY_DTYPES.items()
}
MAX_TABLE_ENTRIES = MAX_TENSORS
"""Tensors one file or checkpoint holds. Each entry can become a tensor object of about 1 KB
however few header bytes it takes (an int entry is 2), so the count is capped, as the
header's blobs are; writers refuse more too."""


@dataclass
class _Member:
    index: int
    path: str
    tensor: torch.Tensor  # a meta placeholder for a Deferred one
    start: int = 0  # byte range inside its storage
    end: int = 0
    deferred: Deferred | None = None


@dataclass
class TensorPlan:
    """Collects the tensors met while encoding a tree (``add`` is the tree's TensorSink)."""

    entries: list[dict[str, Any] | int] = field(default_factory=list)
    deferred: dict[str, Deferred] = field(default_factory=dict)
    """By blob name, the blobs whose bytes a :class:`Deferred` makes only when written: their
    ``source`` is a meta placeholder, for :func:`reading` to replace."""
    _members: list[_Member] = field(default_factory=list)
    _memo: dict[int, int] = field(default_factory=dict)
    _keep: list[object] = field(default_factory=list)

    def add(self, value: torch.Tensor | np.ndarray[Any, Any] | Deferred, path: str) -> int:
        """Register a tensor or array, or a :class:`Deferred` tensor (stored alone, made
        when written); the same object twice gets the same index."""
        known = self._memo.get(id(value))
        if known is not None:
            return known
        self._keep.append(value)  # keeps id(value) unique while the plan lives
        deferred = value if isinstance(value, Deferred) else None
        if isinstance(value, Deferred):
            tensor = torch.empty(value.shape, dtype=value.dtype, device="meta")
            entry = _tensor_entry(torch.empty(0, dtype=value.dtype), path)
            entry["shape"] = list(value.shape)
        elif isinstance(value, np.ndarray):
            tensor, entry = _from_numpy(value, path)
        else:
            tensor, entry = value.detach(), _tensor_entry(value, path)
        index = len(self.entries)
        self.entries.append(entry)
        self._members.append(_Member(index, path, tensor, deferred=deferred))
        self._memo[id(value)] = index
        return index

    def finish(self) -> list[Blob]:
        """Decide what is stored: fill in each entry's blob and return the blobs to write,
        ordered by alignment so every tensor in the file starts on a multiple of its
        element size."""
        if len(self.entries) > MAX_TABLE_ENTRIES:
            raise UnsupportedTypeError(
                f"the object holds {len(self.entries)} tensors; a torchvault file holds at "
                f"most {MAX_TABLE_ENTRIES}. Split it over several files."
            )
        names: set[str] = set()
        stored = [self._store_group(group, names) for group in _group_by_storage(self._members)]
        stored.sort(key=lambda item: -item[0])
        for index, (_, blob, group) in enumerate(stored):
            for member in group:
                entry = self.entries[member.index]
                assert isinstance(entry, dict)
                entry["s"] = index
                exact = _dtypes.SAFETENSORS_NAME.get(member.tensor.dtype) == blob.dtype
                if exact and entry.keys() == _PLAIN and tuple(entry["shape"]) == blob.shape:
                    self.entries[member.index] = index
        return [blob for _, blob, _ in stored]

    def _store_group(
        self, group: list[_Member], names: set[str]
    ) -> tuple[int, Blob, list[_Member]]:
        first = group[0]
        name = _unique_name(first.path, names)
        align = max(m.tensor.element_size() for m in group)
        if len(group) == 1:
            tensor = first.tensor
            stored = _dtypes.SAFETENSORS_NAME.get(tensor.dtype)
            nbytes = tensor.numel() * tensor.element_size()
            if first.deferred is not None:
                self.deferred[name] = first.deferred
            if stored is None:
                return align, Blob(name, "U8", (nbytes,), tensor, nbytes), group
            return align, Blob(name, stored, tuple(tensor.shape), tensor, nbytes), group
        base, lo, hi = _cover(group)
        if base is None:
            lo -= lo % _ALIGN
            span = torch.empty(0, dtype=torch.uint8, device=first.tensor.device)
            span.set_(first.tensor.untyped_storage(), lo, (hi - lo,), (1,))
            blob = Blob(_unique_name(name + "#storage", names), "U8", (hi - lo,), span, hi - lo)
        else:
            stored = _dtypes.SAFETENSORS_NAME[base.dtype]
            blob = Blob(name, stored, tuple(base.shape), base, hi - lo)
        for member in group:
            if member.tensor is not base:
                entry = self.entries[member.index]
                assert isinstance(entry, dict)
                entry["stride"] = list(member.tensor.stride())
                entry["offset"] = member.start - lo
        return align, blob, group


def reading(blobs: list[Blob], deferred: dict[str, Deferred]) -> Iterator[Blob]:
    """``blobs`` for ``_format.write_blobs``, each deferred one made as it is asked for (and
    let go once written), its dtype and shape checked against what the header says."""
    for blob in blobs:
        made = deferred.get(blob.name)
        if made is None:
            yield blob
            continue
        tensor = made.read()
        if (tensor.dtype, tuple(tensor.shape)) != (made.dtype, tuple(made.shape)):
            raise CorruptCheckpointError(
                f"{blob.name}: its source made a {tensor.dtype} {list(tensor.shape)} tensor, "
                f"not the {made.dtype} {list(made.shape)} it declared"
            )
        yield blob._replace(source=tensor)
        del tensor  # the writer holds it through the blob only while it writes


def _tensor_entry(tensor: torch.Tensor, path: str) -> dict[str, Any]:
    name = _dtypes.DTYPE_NAMES.get(tensor.dtype)
    device = tensor.device
    problem = None
    if tensor.is_nested:  # its layout may say strided, and its shape raises deep in torch
        problem = "a nested tensor; save its components (`list(t.unbind())`) instead"
    elif tensor.layout != torch.strided:
        problem = f"a {tensor.layout} tensor; convert it with `.to_dense()` first"
    elif device.type == "meta":
        problem = "a meta tensor, which has no data; materialize it before saving"
    elif name not in _dtypes.STORABLE:
        problem = f"a {tensor.dtype} tensor; call `.dequantize()` or `.int_repr()` first"
    if problem:
        raise UnsupportedTypeError(f"`{path or 'the object'}` is {problem}.", key=path)
    entry: dict[str, Any] = {"dtype": name, "shape": list(tensor.shape)}
    if type(tensor) is torch.nn.Parameter:
        entry["param"] = True
    if tensor.requires_grad:
        entry["grad"] = True
    if device.type != "cpu":
        entry["device"] = str(device)
    return entry


def _from_numpy(array: np.ndarray[Any, Any], path: str) -> tuple[torch.Tensor, dict[str, Any]]:
    little = array.dtype.newbyteorder("<")
    if array.dtype.hasobject or little.str not in _dtypes.NUMPY_DTYPES:
        raise UnsupportedTypeError(
            f"`{path or 'the object'}` is a numpy array of dtype {array.dtype}; only bool, "
            "integer, float and complex arrays are stored. Convert it with `.astype(...)`.",
            key=path,
        )
    data = np.asarray(array, dtype=little, order="C")  # ascontiguousarray makes 0-d 1-d
    tensor = torch.from_numpy(data if data.flags.writeable else data.copy())
    return tensor, {
        "dtype": _dtypes.DTYPE_NAMES[tensor.dtype],
        "shape": list(tensor.shape),
        "np": array.dtype.str,
    }


def _group_by_storage(members: list[_Member]) -> list[list[_Member]]:
    groups: dict[object, list[_Member]] = {}
    for member in members:
        tensor = member.tensor
        size = tensor.element_size()
        numel = tensor.numel()
        if numel == 0 or member.deferred is not None:  # alone: no storage to share
            groups[("alone", member.index)] = [member]
            continue
        if not tensor.is_contiguous():
            pairs = zip(tensor.shape, tensor.stride(), strict=True)
            numel = int(sum((n - 1) * s for n, s in pairs)) + 1
        member.start = int(tensor.storage_offset()) * size
        member.end = member.start + numel * size
        key = (tensor.device, tensor.untyped_storage().data_ptr())
        groups.setdefault(key, []).append(member)
    return list(groups.values())


def _cover(group: list[_Member]) -> tuple[torch.Tensor | None, int, int]:
    """The member whose bytes cover the whole group, if one can be stored natively."""
    lo = min(m.start for m in group)
    hi = max(m.end for m in group)
    for member in group:
        tensor = member.tensor
        if (
            member.start == lo
            and member.end == hi
            and tensor.is_contiguous()
            and tensor.dtype in _dtypes.SAFETENSORS_NAME
            and all((m.start - lo) % m.tensor.element_size() == 0 for m in group)
        ):
            return tensor, lo, hi
    return None, lo, hi


def _unique_name(path: str, names: set[str]) -> str:
    name = path or "tensor"
    if name == META or name in names:
        name = next(f"{name}#{n}" for n in range(2, len(names) + 3) if f"{name}#{n}" not in names)
    names.add(name)
    return name


# ----------------------------------------------------------------------------- loading


class TensorTable:
    """Rebuilds tensor ``index`` of a file on demand; the tree decoder's TensorSource.

    Every field of an entry is checked against the validated header before a tensor is
    built, so a wrong stride, offset or dtype becomes an error, never an out-of-bounds view.
    """

    def __init__(
        self,
        entries: list[Any],
        blobs: tuple[Entry, ...],
        mapping: Callable[[Entry], torch.Tensor],
        path: str,
        map_location: MapLocation | Placement = "cpu",
    ) -> None:
        if len(entries) > MAX_TABLE_ENTRIES:
            raise CorruptCheckpointError(
                f"{path}: the tensor table lists {len(entries)} tensors (cap "
                f"{MAX_TABLE_ENTRIES}); the file is damaged or crafted to exhaust memory.",
                path=path,
            )
        self._entries = entries
        self._blobs = blobs
        self._mapping = mapping
        self._path = path
        self._placement = _placement.check(map_location)
        self._bases: dict[tuple[int, str | None], torch.Tensor] = {}
        self._built: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, index: int) -> object:
        """The tensor (or numpy array) of entry ``index``; the same object on every call."""
        built = self._built.get(index)
        if built is None:
            built = self._build(index)
            self._built[index] = built
        return built

    def describe(self, index: int) -> tuple[torch.dtype, tuple[int, ...], int, dict[str, Any]]:
        """The dtype, shape, blob index and extra fields of entry ``index``, validated,
        without reading data."""
        entry = self._entries[index] if 0 <= index < len(self._entries) else None
        if type(entry) is int:
            blob = self._blob(index, entry)
            dtype = _dtypes.SAFETENSORS_DTYPE.get(blob.dtype)
            if dtype is None:
                raise self._corrupt(index, f"is a {blob.dtype} blob this torch cannot hold")
            return dtype, blob.shape, entry, _NO_FIELDS
        if not isinstance(entry, dict) or not entry.keys() <= _ENTRY_KEYS:
            raise self._corrupt(index, "is not a valid table entry")
        name = entry.get("dtype")
        dtype = _dtypes.STORABLE.get(name) if isinstance(name, str) else None
        shape = entry.get("shape")
        if dtype is None or not _dims(shape):
            raise self._corrupt(index, "has an unknown dtype or a malformed shape")
        if not fits_int64(shape, dtype.itemsize):
            raise self._corrupt(index, f"has shape {shape}, too large for torch (int64)")
        blob_index = entry.get("s")
        self._blob(index, blob_index)
        return dtype, tuple(shape), blob_index, entry  # type: ignore[return-value]

    def check(self, index: int) -> tuple[torch.dtype, tuple[int, ...], int, dict[str, Any]]:
        """:meth:`describe`, with every other check :meth:`get` makes (view bounds, numpy
        form, gradients, device syntax) and no tensor built: checking a whole table costs
        no memory per entry."""
        dtype, shape, blob_index, entry = self.describe(index)
        nbytes = self._blobs[blob_index].nbytes
        if "stride" in entry or "offset" in entry:
            self._view_fits(index, entry, nbytes, dtype, shape)
        elif math.prod(shape) * dtype.itemsize != nbytes:
            raise self._corrupt(
                index,
                f"has shape {list(shape)} of {dtype}, which does not "
                f"fill its {nbytes} stored bytes",
            )
        device = entry.get("device", "cpu")
        if not isinstance(device, str) or not _DEVICE_RE.fullmatch(device):
            raise self._corrupt(index, "has a malformed device")
        if "np" in entry:
            name = entry["np"]
            wanted = _NUMPY_ANY_ORDER.get(name) if isinstance(name, str) else None
            if wanted is None:
                raise self._corrupt(
                    index, f"has numpy dtype {name!r}, which torchvault never writes"
                )
            if _TORCH_OF_NUMPY[wanted.newbyteorder("<").str] != dtype:
                raise self._corrupt(index, f"stores {dtype} bytes for a {name} array")
        elif entry.get("grad", False) is True and not (dtype.is_floating_point or dtype.is_complex):
            raise self._corrupt(index, f"asks for gradients on a {dtype} tensor")
        return dtype, shape, blob_index, entry

    def _blob(self, index: int, blob: object) -> Entry:
        if type(blob) is not int or not 0 <= blob < len(self._blobs):
            raise self._corrupt(index, f"refers to blob {blob!r}, which the header does not have")
        return self._blobs[blob]

    def _build(self, index: int) -> object:
        dtype, shape, blob_index, entry = self.check(index)  # the device's syntax too
        base = self._base(blob_index, None if "np" in entry else entry.get("device", "cpu"))
        if "stride" in entry or "offset" in entry:
            view = torch.empty(0, dtype=dtype, device=base.device)
            offset = entry.get("offset", 0) // dtype.itemsize
            tensor = view.set_(base.untyped_storage(), offset, shape, entry["stride"])
        else:
            tensor = base.view(dtype).reshape(shape)
        return self._finish(index, entry, tensor) if entry else tensor

    def _base(self, blob_index: int, saved: str | None) -> torch.Tensor:
        """The blob's bytes where ``map_location`` puts a tensor saved on ``saved``
        (``None``: a numpy array, always on the CPU)."""
        key = (blob_index, saved)
        base = self._bases.get(key)
        if base is None:
            base = self._mapping(self._blobs[blob_index])
            if saved is not None:
                base = self._placement.place(base, saved)
            self._bases[key] = base
        return base

    def _view_fits(
        self,
        index: int,
        entry: dict[str, Any],
        nbytes: int,
        dtype: torch.dtype,
        shape: tuple[int, ...],
    ) -> None:
        stride, offset, size = entry.get("stride"), entry.get("offset"), dtype.itemsize
        if not _dims(stride) or len(stride) != len(shape) or type(offset) is not int:
            raise self._corrupt(index, "has a malformed stride or offset")
        numel = math.prod(shape)
        extent = (
            0 if numel == 0 else sum((n - 1) * s for n, s in zip(shape, stride, strict=True)) + 1
        )
        if offset < 0 or offset % size or offset + extent * size > nbytes:
            raise self._corrupt(
                index, f"is a view at byte {offset} reaching past its {nbytes}-byte blob"
            )
        if not fits_int64(shape, size, stride, offset // size):
            raise self._corrupt(index, "has strides too large for torch (int64)")

    def _finish(self, index: int, entry: dict[str, Any], tensor: torch.Tensor) -> object:
        np_dtype = entry.get("np")
        if np_dtype is not None:
            return self._numpy(index, np_dtype, tensor)
        grad = entry.get("grad", False) is True
        try:
            if entry.get("param", False) is True:
                return torch.nn.Parameter(tensor, requires_grad=grad)
            return tensor.requires_grad_(True) if grad else tensor
        except RuntimeError as exc:
            raise self._corrupt(index, f"asks for gradients on a {tensor.dtype} tensor") from exc

    def _numpy(self, index: int, name: str, tensor: torch.Tensor) -> object:
        wanted = _NUMPY_ANY_ORDER[name]  # check() made sure torch has this numpy form
        array = tensor.numpy()
        return array if array.dtype == wanted else array.astype(wanted)

    def _corrupt(self, index: int, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{self._path}: tensor table entry {index} {what}. The file is damaged or was not "
            "written by torchvault; restore it from a good copy.",
            path=self._path,
        )


def _dims(value: object) -> TypeGuard[list[int]]:
    return (
        isinstance(value, list)
        and len(value) <= 64
        and all(type(v) is int and 0 <= v < 2**62 for v in value)
    )
