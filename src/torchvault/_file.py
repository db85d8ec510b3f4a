"""The file layer: ``save``, and reading torchvault and safetensors files.

``tv.load``, ``tv.inspect`` and ``tv.verify`` (``_open``) hand a path here when it holds one of
these formats (``load_native``, ``inspect_native``, ``verify_native``), and to ``legacy/``
otherwise; this module knows nothing of other formats.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import platform
from collections.abc import Iterable, Iterator, Mapping
from typing import BinaryIO, TypeVar, cast

import numpy as np
import torch

from . import _args, _format, _placement, _source, _stored, _tree
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
from ._tensors import TensorPlan, reading
from ._version import __version__
from .errors import TorchVaultError

PathLike = str | os.PathLike[str]
_S = TypeVar("_S")
Source = _source.Readable


def save(
    obj: object,
    path: PathLike | BinaryIO,
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
            dict, OrderedDict, list, tuple, set, frozenset, str, bytes, bytearray, bool, None,
            int, float, complex, torch dtype/device/Size, numpy arrays and scalars, tensors,
            ``argparse.Namespace`` and ``torch.Generator`` (its device and state; loaded as a
            new generator).
        path: the destination file. It is replaced atomically and durably: a crash leaves
            the old file or the new one, never a partial one. Or a seekable binary file
            object (``io.BytesIO()``, ``open(..., "wb")``): the file is written from its
            current position, which is left after the last byte written, as ``torch.save``
            does; it is flushed but neither atomic nor synced to disk, which only a path
            allows.
        metadata: strings to store with the file (keys must not start with ``torchvault.``).
        dtype: ``torch.bfloat16`` or ``torch.float16`` to store float32/float64 tensors in
            half precision (half the bytes); the original dtypes are recorded, and
            ``load(..., restore_dtype=True)`` casts back.
        quantize: ``"int8"`` to store float matrices (2 or more dimensions, at least 256
            elements) as int8 with one float32 scale per row (about 4x smaller than
            float32); ``load`` always dequantizes them to their original dtype. The report
            gives the largest error per tensor.

    A model returned by :func:`torchvault.quantize` (torchao or torch.ao) is stored as
    :func:`torchvault.save_quantized` stores it; read it back with ``load_into(float_model,
    path)`` or ``load_quantized``.

    Returns:
        A :class:`SaveReport`: the file's size, and each tensor stored in another form with
        the error its conversion made.

    Raises:
        TypeError, ValueError: an argument of the wrong type or value (a URL ``path``, a
            ``metadata`` key or value that is not a ``str``), naming it.
        UnsupportedTypeError: a value the format cannot hold, naming its path in the tree.
        CheckpointWriteError: the disk refused the write; the old file is intact.
        TypeError: ``path`` is neither a path nor a binary file object, or is in text mode.
        ValueError: ``path`` is a file object that is closed, read-only or cannot seek.

    Example:
        >>> tv.save(model, "model.tv", metadata={"run": "exp1"})
        >>> buffer = io.BytesIO(); tv.save(model, buffer)
    """
    checked_target(path)
    metadata = _args.metadata(metadata)
    if isinstance(obj, torch.nn.Module) and _is_quantized(obj, dtype, quantize):
        from .export._quantized_file import save_quantized  # the export package imports us

        return save_quantized(obj, path, metadata=metadata)
    state = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
    with _gc_paused():
        plan = TensorPlan()
        storing = Storing(plan, dtype, quantize)
        tree = _tree.encode(state, storing.add if dtype or quantize else plan.add)
        count = len(plan.entries) - sum(1 for r in storing.records.values() if "scale" in r)
        blobs = plan.finish()
        members = _members(tree, plan, len(blobs), metadata) | storing.member()
        header = _format.build_header(blobs, members)
    written = reading(blobs, plan.deferred) if plan.deferred else blobs
    if not _source.is_path(path):
        size = _write_stream(cast(BinaryIO, path), header, written)
        return SaveReport(_source.display_name(path), size, count, tuple(storing.report))
    with atomic_file(cast(PathLike, path)) as handle:
        size = _write(handle, header, written)
    return SaveReport(os.fspath(cast(PathLike, path)), size, count, tuple(storing.report))


def _is_quantized(module: torch.nn.Module, dtype: object, quantize: object) -> bool:
    """A model from ``tv.quantize``: its weights are no plain tensors, so it is stored as
    :func:`save_quantized` stores it (which ``load_into`` and ``load_quantized`` read)."""
    from .export._quantized_file import is_quantized

    if not is_quantized(module):
        return False
    for name, value in (("dtype", dtype), ("quantize", quantize)):
        if value is not None:
            raise ValueError(
                f"`{name}={value!r}` does not apply to a model quantized by tv.quantize: its "
                f"int8 weights are stored as they are. Drop `{name}`, or save the float model."
            )
    return True


def _write_stream(target: BinaryIO, header: bytes, blobs: Iterable[_format.Blob]) -> int:
    """:func:`_write` to a caller's file object, which then ends after the checkpoint (as
    ``open(..., "wb")`` would leave it): stale bytes after it would make every load refuse
    it as padded.

    Raises:
        ValueError: ``target`` refused an operation without an OS error number: a seek back
            to the checkpoint's start in a compressed or forward-only stream that claims to
            seek (an I/O error with an errno propagates as it is).
    """
    try:
        size = _write(_source.whole_writes(target), header, blobs)
    except (OSError, ValueError) as exc:
        if isinstance(exc, TorchVaultError) or getattr(exc, "errno", None) is not None:
            raise
        raise ValueError(
            f"`path` ({_source.display_name(target)}) refused a write or seek ({exc}): save "
            "writes the header last, so a file object must seek back to where the checkpoint "
            "starts, which a compressed stream cannot. Save to an io.BytesIO() and write its "
            "getvalue() to the stream."
        ) from exc
    truncate = getattr(target, "truncate", None)
    if callable(truncate):
        with contextlib.suppress(OSError, ValueError):  # a stream that cannot: as it is
            truncate()
    return size


def _write(handle: BinaryIO, header: bytes, blobs: Iterable[_format.Blob]) -> int:
    """Write the file at ``handle``'s position (the header last, over its placeholder's
    room); leave the position after it and return the bytes written."""
    start = handle.tell()
    handle.seek(start + 8 + len(header))
    checksums = _format.write_blobs(handle, blobs)
    end = handle.tell()
    handle.seek(start)
    handle.write(_format.seal_header(header, checksums))
    handle.seek(end)
    handle.flush()
    return end - start


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


def checked_target(path: object) -> None:
    """Refuse a ``path`` that is neither a local path (no URL) nor a writable binary file
    object, naming the argument."""
    if _source.is_path(path):
        _args.path(path)
    else:
        _source.check_writable(path, "path")


def checked_source(path: _S) -> _S:
    """``path`` checked as a local path (no URL); bytes and file objects pass unchecked."""
    if _source.is_path(path):
        _args.path(path)
    return path


def load_native(
    path: PathLike, placement: _placement.Placement, lazy: bool, verify: bool, restore_dtype: bool
) -> object:
    """``tv.load`` of a torchvault or safetensors file at ``path``, arguments checked."""
    with _gc_paused():
        contents, mapping = open_file(path)
        if verify and not lazy:
            contents.verify_data(mapping)
        table = contents.table(mapping, placement)
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


def inspect_native(path: PathLike) -> CheckpointInfo:
    """``tv.inspect`` of a torchvault or safetensors file at ``path``."""
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


def verify_native(path: PathLike) -> VerifyReport:
    """``tv.verify`` of a torchvault or safetensors file at ``path``."""
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
