"""Where ``tv.load``, ``tv.load_into`` and ``tv.inspect`` (``_open``) hand over what is not a
torchvault or safetensors file: torch.save files, Hugging Face model folders and
torch.distributed.checkpoint folders.

``load_file`` and ``verify_file`` read a file this package meets itself (a model folder's
shard, a ``convert`` source) with the reader ``tv.load`` would choose: ours for a torch.save
file, the file layer's for a torchvault or safetensors file.
"""

from __future__ import annotations

import os

import torch

from .._file import _gc_paused, load_native, verify_native
from .._format import Deferred
from .._placement import Where, check
from .._report import CheckpointInfo, TensorInfo, VerifyReport
from .._tree import flatten
from . import _dcp
from ._hf import load_folder
from ._reader import Session, is_foreign, open_mapped, read, sniff
from ._zip import ZipArchive

__all__ = ["inspect", "is_foreign", "load", "load_file", "verify", "verify_file"]


def load(path: str | os.PathLike[str], *, map_location: Where = "cpu") -> object:
    """A torch.save file through the restricted reader, or a model folder's state dict."""
    name = _dcp.folder_of(os.fspath(path)) or os.fspath(path)
    if os.path.isdir(name) and _dcp.is_dcp_folder(name):
        return _dcp.load(name, map_location=map_location)
    if os.path.isdir(name):
        return load_folder(name, map_location=map_location)
    name, data = open_mapped(name)
    with _gc_paused():
        return read(Session(name, map_location=map_location), data)


def deferred(path: str | os.PathLike[str]) -> dict[str, Deferred] | None:
    """A DCP folder's flat state dict with each tensor read only when asked for (see
    :func:`._dcp.deferred`); None for any other source, or a DCP folder that is not one."""
    name = _dcp.folder_of(os.fspath(path)) or os.fspath(path)
    if os.path.isdir(name) and _dcp.is_dcp_folder(name):
        return _dcp.deferred(name)
    return None


def deferred_tree(path: str | os.PathLike[str]) -> object | None:
    """A DCP folder's whole state with each tensor read only when asked for (see
    :func:`._dcp.deferred_tree`); None for any other source."""
    name = _dcp.folder_of(os.fspath(path)) or os.fspath(path)
    if os.path.isdir(name) and _dcp.is_dcp_folder(name):
        return _dcp.deferred_tree(name)
    return None


def verify(path: str | os.PathLike[str]) -> VerifyReport:
    """A full read of a torch.save file (every CRC) or of every shard of a model folder."""
    name = _dcp.folder_of(os.fspath(path)) or os.fspath(path)
    if os.path.isdir(name) and _dcp.is_dcp_folder(name):
        return _dcp.verify(name)
    if os.path.isdir(name):
        reports = [verify_file(os.path.join(name, f)) for f in _weight_files(name)]
        return VerifyReport(
            name,
            sum(r.tensors for r in reports),
            sum(r.checked_bytes for r in reports),
            bool(reports) and all(r.checksummed for r in reports),
        )
    name, data = open_mapped(name)
    obj = load(name)
    tensors = [t for _, t in flatten(obj) if isinstance(t, torch.Tensor)]
    crcs = sniff(data) == "zip" and ZipArchive(data, name).has_crcs
    return VerifyReport(name, len(tensors), len(data), crcs)


def load_file(path: str | os.PathLike[str], *, map_location: Where = "cpu") -> object:
    """A model folder's shard or a ``convert`` source, read as ``tv.load`` reads it."""
    placement = check(map_location)
    if is_foreign(path):
        return load(path, map_location=placement)
    return load_native(path, placement, lazy=False, verify=True, restore_dtype=False)


def verify_file(path: str | os.PathLike[str]) -> VerifyReport:
    """A model folder's shard, or a file ``scan`` finds no pickle in, checked as
    ``tv.verify`` checks it."""
    return verify(path) if is_foreign(path) else verify_native(path)


def _weight_files(folder: str) -> list[str]:
    load_folder(folder)  # the index and the shards agree
    return sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin")))


def inspect(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Describe a torch.save file or a model folder (tensors are mapped, not read)."""
    name = _dcp.folder_of(os.fspath(path)) or os.fspath(path)
    if os.path.isdir(name) and _dcp.is_dcp_folder(name):
        return _dcp.inspect(name)
    if os.path.isdir(name):
        obj: object = load_folder(name)
        kind, size = "hf-folder", _folder_bytes(name)
    else:
        name, data = open_mapped(name)
        session = Session(name)
        with _gc_paused():
            obj = read(session, data)
        kind, size = session.format, len(data)
    tensors = tuple(
        TensorInfo(
            key, str(t.dtype).removeprefix("torch."), tuple(t.shape), t.numel() * t.element_size()
        )
        for key, t in flatten(obj)
        if isinstance(t, torch.Tensor)
    )
    return CheckpointInfo(
        path=name, format=kind, format_version=None, tensors=tensors, file_bytes=size,
        metadata={}, versions={}, created=None,
    )  # fmt: skip


def _folder_bytes(folder: str) -> int:
    return sum(
        os.path.getsize(os.path.join(folder, f))
        for f in os.listdir(folder)
        if os.path.isfile(os.path.join(folder, f))
    )
