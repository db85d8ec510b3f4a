"""What a path holds and which reader opens it: ``tv.load``, ``tv.inspect`` and ``tv.verify``.

A torchvault or safetensors file goes to the file layer (``_file``); a torch.save file or a
Hugging Face model folder (``legacy.is_foreign``) to the restricted reader in ``legacy/``;
one checkpoint of a run, ``RUN@STEP`` or a bare run folder (``_sources``), to the run
readers in ``run/`` (sharded checkpoints come back whole, no lock taken).
This module sits above both, so that neither imports the other to find its way in: ``_file``
knows nothing of other formats, and ``legacy/`` reads the native files it meets (a model
folder's safetensors shards, a ``convert`` source) through ``_file`` directly.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

from . import _args, _placement, _source
from ._file import (
    PathLike,
    Source,
    checked_source,
    inspect_native,
    load_native,
    verify_native,
)
from ._report import CheckpointInfo, VerifyReport
from ._tensors import MapLocation
from .legacy import _foreign

if TYPE_CHECKING:
    from .run._store import RunStore


def load(
    path: Source,
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
            do not apply). Or the same contents in memory: ``bytes``, ``bytearray``,
            ``memoryview`` or a binary file object (``io.BytesIO``, ``open(..., "rb")``),
            read from its current position to its end. These are copied once into private
            memory (an open file read from its start is mapped instead), so loaded tensors
            never alias a buffer the caller can change, and are checked as strictly as a
            file. Or one checkpoint of a run: ``"RUN@STEP"`` (``STEP`` a number, ``latest``
            or ``best``) or a bare run folder (its latest), giving what the checkpoint
            holds with full, unsharded tensors: ``{item: state}`` for a CheckpointManager's
            checkpoint, the saved state for one written by ``dcp.save`` with
            :class:`torchvault.distributed.StorageWriter`. Every object is verified against
            its hash and no lock is taken (``lazy``, ``verify`` and ``restore_dtype`` do not
            apply). An existing file whose name holds an ``@`` is a file.
        map_location: where tensors go, as ``torch.load`` takes it: a device (``"cpu"``,
            ``"cuda:0"``, ``"meta"``), ``None`` for the device each tensor was saved from, a
            dict from saved device to target device, or a callable
            ``(storage, location) -> storage | None`` (``lambda storage, loc: storage`` keeps
            everything on the CPU).
        lazy: map the file and read no tensor byte until a tensor is used.
        verify: check every tensor's checksum before returning (with ``lazy=False``). The
            header is always checked. With ``lazy=True`` data checksums are not read: use
            ``tv.verify(path)`` for that.
        restore_dtype: cast tensors saved with ``save(..., dtype=...)`` back to the dtype
            they had (int8-quantized tensors are always dequantized).

    Raises:
        TypeError, ValueError: a wrong argument, naming it: a URL or non-path ``path``, a
            ``map_location`` that is not a device, or a device this machine lacks; a
            ``RUN@STEP`` of a run folder whose ``STEP`` is not a step.
        CheckpointNotFoundError: no file at ``path``; no run, or no such step in it.
        CorruptCheckpointError: the file is malformed, truncated or fails a checksum; the
            message names the tensor.
        UnsupportedFormatError: the file was written by a newer torchvault.
        UnsafeCheckpointError: a torch.save file names code outside the allowlist.
        TypeError: ``path`` is not a path, bytes-like object or binary file object.
        ValueError: ``path`` is a file object that is closed or not open for reading.

    Example:
        >>> state = tv.load("model.tv")
        >>> model.load_state_dict(state)
        >>> state = tv.load(response.content)  # bytes
        >>> state = tv.load("runs/exp1@best")  # {"model": ..., "optimizer": ...}
    """
    placement = _placement.check(map_location)
    lazy, verify = _args.flag(lazy, "lazy"), _args.flag(verify, "verify")
    restore_dtype = _args.flag(restore_dtype, "restore_dtype")
    run = _run_checkpoint(checked_source(path))
    if run is not None:
        from .run import _consolidate

        return _consolidate.load(run[0], run[1], map_location=map_location)
    with _source.reading(checked_source(path)) as (where, _):
        return _load(where, placement, lazy, verify, restore_dtype)


def inspect(path: Source) -> CheckpointInfo:
    """Describe a checkpoint's tensors, metadata and versions without reading tensor data.

    Args:
        path: what :func:`load` accepts: a path, bytes or a binary file object, or
            ``"RUN@STEP"`` (or a run folder): then read from its manifest alone, every
            tensor with its global shape, keyed as ``tv.load("RUN@STEP")`` nests it.

    Raises:
        CheckpointNotFoundError, CorruptCheckpointError, UnsupportedFormatError: as
            :func:`load`; TypeError and ValueError for a ``path`` of the wrong kind.

    Example:
        >>> info = tv.inspect("model.tv")
        >>> [(t.key, t.dtype, t.shape) for t in info.tensors]
    """
    run = _run_checkpoint(checked_source(path))
    if run is not None:
        from .run import _consolidate

        return _consolidate.describe(*run)
    with _source.reading(checked_source(path)) as (where, name):
        return dataclasses.replace(_inspect(where), path=name)


def verify(path: Source) -> VerifyReport:
    """Check a file completely: header, tree, tensor table and every tensor's checksum.

    Plain safetensors files carry no checksums: their structure is checked. torch.save files
    are read with the restricted reader, every zip CRC-32 checked; model folders shard by
    shard.

    Args:
        path: what :func:`load` accepts: a path, bytes or a binary file object, or
            ``"RUN@STEP"`` (or a run folder): then the manifest's seal, every chunk layout
            and every object against its hash, one object in memory at a time.

    Raises:
        CorruptCheckpointError: naming the tensor or the part of the file that is damaged.
        TypeError, ValueError: a ``path`` of the wrong kind, as :func:`load`.
        CheckpointNotFoundError: as :func:`load`.

    Example:
        >>> tv.verify("model.tv").checked_bytes
        >>> tv.verify("runs/exp1@best")
    """
    run = _run_checkpoint(checked_source(path))
    if run is not None:
        from .run import _consolidate

        return _consolidate.verify(*run)
    with _source.reading(checked_source(path)) as (where, name):
        return dataclasses.replace(_verify(where), path=name)


def _run_checkpoint(path: Source) -> tuple[RunStore, int, str] | None:
    """``run._consolidate.checkpoint_of`` for a path (bytes and file objects are contents)."""
    if not _source.is_path(path):
        return None
    from .run import _consolidate  # run/ reads through load_into, which imports this module

    return _consolidate.checkpoint_of(os.fspath(path))  # type: ignore[arg-type]


def _load(
    path: PathLike, placement: _placement.Placement, lazy: bool, verify: bool, restore_dtype: bool
) -> object:
    if _foreign.is_foreign(path):
        return _foreign.load(path, map_location=placement)
    return load_native(path, placement, lazy, verify, restore_dtype)


def _inspect(path: PathLike) -> CheckpointInfo:
    if _foreign.is_foreign(path):
        return _foreign.inspect(path)
    return inspect_native(path)


def _verify(path: PathLike) -> VerifyReport:
    if _foreign.is_foreign(path):
        return _foreign.verify(path)
    return verify_native(path)
