"""The one-file API: ``save``, ``load``, ``inspect`` and ``verify``."""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import platform
from collections.abc import Iterator, Mapping

import numpy as np
import torch

from . import _format, _stored, _tree
from ._commit import atomic_file
from ._contents import (
    CREATED,
    FORMAT,
    TENSORS,
    TREE,
    VERSIONS,
    Contents,
    dumps,
    open_file,
)
from ._report import CheckpointInfo, SaveReport, TensorInfo, VerifyReport
from ._stored import Storing
from ._tensors import MapLocation, TensorPlan
from ._version import __version__
from .errors import UnsupportedTypeError

PathLike = str | os.PathLike[str]


def save(
    obj: object,
    path: PathLike,
    *,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
    quantize: str | None = None,
) -> SaveReport:
    """Save ``obj`` to ``path`` atomically, durably and without pickle.

    The file is a valid safetensors file: every tensor is readable with
    ``safetensors.safe_open``. torchvault's own metadata restores the exact nested structure.

    Args:
        obj: an ``nn.Module`` (its ``state_dict()`` is saved), a state dict, or any nesting of
            dict, OrderedDict, list, tuple, str, bytes, bool, None, int, float, complex,
            torch dtype/device/Size, numpy arrays and scalars, and tensors.
        path: the destination file. It is replaced atomically: a crash leaves the old file
            or the new one, never a partial one.
        metadata: strings to store with the file (keys must not start with ``torchvault.``).
        dtype: ``torch.bfloat16`` or ``torch.float16`` to store float32/float64 tensors in
            half precision (half the bytes); the original dtypes are recorded, and
            ``load(..., restore_dtype=True)`` casts back.
        quantize: ``"int8"`` to store float matrices (2 or more dimensions, at least 256
            elements) as int8 with one float32 scale per row (about 4x smaller than
            float32); ``load`` always dequantizes them to their original dtype. The report
            gives the largest error per tensor.

    Returns:
        A :class:`SaveReport`: the file's size, and each tensor stored in another form with
        the error its conversion made.

    Raises:
        UnsupportedTypeError: a value the format cannot hold, naming its path in the tree.
        CheckpointWriteError: the disk refused the write; the old file is intact.

    Example:
        >>> tv.save(model, "model.tv", metadata={"run": "exp1"})
    """
    state = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
    with _gc_paused():
        plan = TensorPlan()
        storing = Storing(plan, dtype, quantize)
        tree = _tree.encode(state, storing.add if dtype or quantize else plan.add)
        count = len(plan.entries) - sum(1 for r in storing.records.values() if "scale" in r)
        blobs = plan.finish()
        members = _members(tree, plan, len(blobs), metadata) | storing.member()
        header = _format.build_header(blobs, members)
    with atomic_file(path) as handle:
        handle.seek(8 + len(header))
        checksums = _format.write_blobs(handle, blobs)
        handle.seek(0)
        handle.write(_format.seal_header(header, checksums))
        size = handle.seek(0, os.SEEK_END)
    return SaveReport(os.fspath(path), size, count, tuple(storing.report))


def _members(
    tree: _tree.Json, plan: TensorPlan, count: int, user: Mapping[str, str] | None
) -> dict[str, str]:
    members = {
        **_format.placeholders(count),
        FORMAT: str(_format.FORMAT_VERSION),
        TREE: dumps(tree),
        TENSORS: dumps(plan.entries),  # type: ignore[arg-type]
        VERSIONS: dumps(versions()),  # type: ignore[arg-type]
        CREATED: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for key, value in (user or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise UnsupportedTypeError(
                f"metadata must map str to str; got {key!r}: {type(value).__name__}. "
                "Convert values with str() or json.dumps().",
                key=str(key),
            )
        if key.startswith(_format.RESERVED) or key == _format.META:
            raise ValueError(f"metadata key {key!r} is reserved for torchvault; rename it.")
        members[key] = value
    return members


def versions() -> dict[str, str]:
    """The versions recorded in every file torchvault writes."""
    return {
        "torchvault": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def load(
    path: PathLike,
    *,
    map_location: MapLocation = "cpu",
    lazy: bool = False,
    verify: bool = True,
    restore_dtype: bool = False,
) -> object:
    """Load what :func:`save` saved, exactly: same types, structure, dtypes and sharing.

    Tensors are backed by a private, copy-on-write map of the file: loading costs no copy,
    and changing a loaded tensor never changes the file.

    Args:
        path: a torchvault file, or any safetensors file (loaded as a dict of tensors), or a
            torch.save file or Hugging Face model folder, read by the restricted reader of
            :func:`load_legacy` (zero-copy, every zip CRC checked; ``lazy`` and ``verify``
            do not apply).
        map_location: where tensors go: a device (``"cpu"``, ``"cuda:0"``), ``None`` for the
            device each tensor was saved from, or a dict from saved device to target device.
        lazy: map the file and read no tensor byte until a tensor is used.
        verify: check every tensor's checksum before returning (with ``lazy=False``). The
            header is always checked. With ``lazy=True`` data checksums are not read: use
            ``tv.verify(path)`` for that.
        restore_dtype: cast tensors saved with ``save(..., dtype=...)`` back to the dtype
            they had (int8-quantized tensors are always dequantized).

    Raises:
        CheckpointNotFoundError: no file at ``path``.
        CorruptCheckpointError: the file is malformed, truncated or fails a checksum; the
            message names the tensor.
        UnsupportedFormatError: the file was written by a newer torchvault.
        UnsafeCheckpointError: a torch.save file names code outside the allowlist.

    Example:
        >>> state = tv.load("model.tv")
        >>> model.load_state_dict(state)
    """
    from .legacy import _dispatch  # imported here: the legacy package imports this module

    if _dispatch.is_foreign(path):
        return _dispatch.load(path, map_location=map_location)
    with _gc_paused():
        contents, mapping = open_file(path)
        if verify and not lazy:
            contents.verify_data(mapping)
        table = contents.table(mapping, map_location)
        stored = _stored.records(contents.header.metadata, contents.path)
        _stored.check(stored, table, contents.path)
        return contents.decode(
            _stored.source(table.get, stored, restore_dtype=restore_dtype, path=contents.path)
        )


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many small acyclic containers.

    Each collection re-walks every live object of the process, and a save or load of many
    tensors allocates enough containers to trigger several: measured here, that was a third
    of ``save``'s time for 20,000 tensors in a process with a large heap.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def inspect(path: PathLike) -> CheckpointInfo:
    """Describe a checkpoint's tensors, metadata and versions without reading tensor data.

    Example:
        >>> info = tv.inspect("model.tv")
        >>> [(t.key, t.dtype, t.shape) for t in info.tensors]
    """
    from .legacy import _dispatch

    if _dispatch.is_foreign(path):
        return _dispatch.inspect(path)
    contents, _ = open_file(path)
    tensors = _tensor_infos(contents)
    meta = contents.header.metadata
    torchvault = contents.header.is_torchvault
    return CheckpointInfo(
        path=contents.path,
        format="torchvault" if torchvault else "safetensors",
        format_version=int(meta[FORMAT]) if torchvault else None,
        tensors=tensors,
        file_bytes=contents.header.file_size,
        metadata=contents.user_metadata,
        versions=contents.versions,
        created=meta.get(CREATED),
    )


def _tensor_infos(contents: Contents) -> tuple[TensorInfo, ...]:
    table = contents.table(None)
    tree = contents.decode(_Ref)
    stored = _stored.records(contents.header.metadata, contents.path)
    infos = []
    for key, leaf in _tree.flatten(tree):
        if isinstance(leaf, _Ref):
            dtype, shape, _, _ = table.describe(leaf.index)
            nbytes = dtype.itemsize
            for n in shape:
                nbytes *= n
            name = str(dtype).removeprefix("torch.")
            record = stored.get(leaf.index)
            if record is not None:
                infos.append(TensorInfo(key, record["dtype"], shape, nbytes, record["as"]))
            else:
                infos.append(TensorInfo(key, name, shape, nbytes))
    return tuple(infos)


class _Ref:
    """A tensor leaf that ``inspect`` describes without building it."""

    def __init__(self, index: int) -> None:
        self.index = index


class _ArrayRef(_Ref):
    """A numpy leaf for ``verify``: unhashable like the array, so a tree that uses one as a
    dict key fails verify as it fails load."""

    __hash__ = None  # type: ignore[assignment]


def verify(path: PathLike) -> VerifyReport:
    """Check a file completely: header, tree, tensor table and every tensor's checksum.

    Plain safetensors files carry no checksums: their structure is checked. torch.save files
    are read with the restricted reader, every zip CRC-32 checked; model folders shard by
    shard.

    Raises:
        CorruptCheckpointError: naming the tensor or the part of the file that is damaged.

    Example:
        >>> tv.verify("model.tv").checked_bytes
    """
    from .legacy import _dispatch

    if _dispatch.is_foreign(path):
        return _dispatch.verify(path)
    contents, mapping = open_file(path)
    checked = contents.verify_data(mapping)
    if not contents.checksums:
        checked = sum(e.nbytes for e in contents.header.entries)
    table = contents.table(mapping)
    for index in range(len(table)):
        table.check(index)  # every check load makes, building no tensor (no memory per entry)
    _stored.check(_stored.records(contents.header.metadata, contents.path), table, contents.path)

    refs: dict[int, _Ref] = {}

    def checked_ref(index: int) -> _Ref:
        ref = refs.get(index)
        if ref is None:  # one object per index, as load builds one tensor per index
            ref = _ArrayRef(index) if "np" in table.check(index)[3] else _Ref(index)
            refs[index] = ref
        return ref

    tree = contents.decode(checked_ref)
    tensors = sum(1 for _, leaf in _tree.flatten(tree) if isinstance(leaf, _Ref))
    return VerifyReport(contents.path, tensors, checked, bool(contents.checksums))
