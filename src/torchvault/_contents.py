"""An opened checkpoint file: its validated header, its tree and tensor table, its checksums.

Plain safetensors files open too: their tree is a flat dict of their tensors and they carry
no checksums, so only their structure can be verified.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch

from . import _dtypes, _format, _tree
from ._placement import Where
from ._tensors import TensorTable
from ._tree import Json
from .errors import CheckpointNotFoundError, CorruptCheckpointError, UnsupportedFormatError

TREE, TENSORS, CHECKSUMS = "torchvault.tree", "torchvault.tensors", _format.CHECKSUMS
ALIASES = "torchvault_aliases"  # in plain files written by convert; not a sealed member
VERSIONS, CREATED, FORMAT = "torchvault.versions", "torchvault.created", "torchvault.format"
_HEX = re.compile(r"[0-9a-f]*")


@dataclass(frozen=True)
class Contents:
    """What a file holds, validated, before any tensor byte is read."""

    path: str
    header: _format.Header
    tree: Json
    entries: list[Any]
    checksums: str  # 32 hex digits per stored tensor, in header order; "" for plain files
    versions: dict[str, str]

    @property
    def user_metadata(self) -> dict[str, str]:
        return {k: v for k, v in self.header.metadata.items() if not k.startswith(_format.RESERVED)}

    def table(self, mapping: mmap.mmap | None, map_location: Where = "cpu") -> TensorTable:
        """The tensor table over ``mapping`` (a private map of the whole file; ``None`` to
        describe tensors without building them).

        Tensors built on the map keep it alive; it is never closed explicitly, since
        ``torch.frombuffer`` holds no buffer export that would stop an early close.
        """

        def blob(entry: _format.Entry) -> torch.Tensor:
            if mapping is None:
                raise AssertionError("a table without a mapping only describes tensors")
            if entry.nbytes == 0:
                return torch.empty(0, dtype=torch.uint8)
            return torch.frombuffer(
                mapping, dtype=torch.uint8, count=entry.nbytes, offset=entry.start
            )

        return TensorTable(self.entries, self.header.entries, blob, self.path, map_location)

    def decode(self, source: Callable[[int], object]) -> object:
        """The saved object, its tensor leaves taken from ``source``; errors name the file."""
        try:
            return _tree.decode(self.tree, source)
        except CorruptCheckpointError as exc:
            if exc.path is not None:
                raise
            raise CorruptCheckpointError(
                f"{self.path}: {exc.message}", path=self.path, key=exc.key
            ) from exc

    def verify_data(self, mapping: mmap.mmap) -> int:
        """Check every stored tensor against its checksum; return the bytes checked.

        Raises:
            CorruptCheckpointError: naming the first tensor whose bytes do not match.
        """
        if not self.checksums:
            return 0
        view = memoryview(mapping)
        parts = [view[entry.start : entry.end] for entry in self.header.entries]
        try:
            digests = _format.hash_all(parts)
        finally:
            for part in parts:
                part.release()
            view.release()
        width = _format.HASH_HEX
        for i, (entry, digest) in enumerate(zip(self.header.entries, digests, strict=True)):
            if digest != self.checksums[i * width : (i + 1) * width]:
                raise CorruptCheckpointError(
                    f"{self.path}: tensor `{entry.name}` does not match its checksum: its "
                    f"{entry.nbytes} bytes changed after it was written (bit rot, a bad "
                    "copy or tampering). Restore the file from a good copy.",
                    path=self.path,
                    key=entry.name,
                )
        return sum(entry.nbytes for entry in self.header.entries)


def open_file(path: str | os.PathLike[str]) -> tuple[Contents, mmap.mmap]:
    """Open, validate and privately map ``path``.

    The map is copy-on-write: tensors built on it can be modified without touching the file.
    Torchvault only ever replaces files by rename, so a map stays valid while a newer
    checkpoint is saved to the same path.

    Raises:
        CheckpointNotFoundError, CorruptCheckpointError, UnsupportedFormatError.
    """
    name = os.fspath(path)
    with contextlib.suppress(OSError):  # a missing file is reported by open() below
        if stat.S_ISFIFO(os.stat(name).st_mode) or stat.S_ISCHR(os.stat(name).st_mode):
            raise UnsupportedFormatError(
                f"{name}: not a regular file (a pipe or a device); copy it to a file first",
                path=name,
            )
    try:
        handle = open(name, "rb")  # noqa: SIM115 - closed below; the map outlives it
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(
            f"no checkpoint at {name}: the file does not exist. Check the path.", path=name
        ) from exc
    except IsADirectoryError as exc:
        raise CheckpointNotFoundError(
            f"{name} is a folder, not a checkpoint file; pass the path of the file inside it.",
            path=name,
        ) from exc
    with handle:
        header = _format.read_header(handle, name)
        contents = _parse(header, name)
        try:
            mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        except OSError as exc:
            raise CorruptCheckpointError(
                f"{name}: cannot map the file ({os.strerror(exc.errno or errno.EIO)})", path=name
            ) from exc
    return contents, mapping


def _parse(header: _format.Header, path: str) -> Contents:
    if not header.is_torchvault:
        return _plain_safetensors(header, path)
    meta = header.metadata
    tree = _json_member(meta, TREE, path)
    entries = _json_member(meta, TENSORS, path)
    checksums = meta.get(CHECKSUMS, "")
    versions = _json_member(meta, VERSIONS, path)
    if not isinstance(entries, list):
        raise _corrupt(path, f"`{TENSORS}` is not an array")
    if len(checksums) != _format.HASH_HEX * len(header.entries) or not _HEX.fullmatch(checksums):
        raise _corrupt(path, f"`{CHECKSUMS}` does not hold one checksum per stored tensor")
    if not isinstance(versions, dict) or not all(isinstance(v, str) for v in versions.values()):
        raise _corrupt(path, f"`{VERSIONS}` is not a map of strings")
    return Contents(path, header, tree, entries, checksums, cast(dict[str, str], versions))


def _plain_safetensors(header: _format.Header, path: str) -> Contents:
    for entry in header.entries:
        if entry.dtype not in _dtypes.SAFETENSORS_DTYPE:
            raise UnsupportedFormatError(
                f"{path}: tensor `{entry.name}` has dtype {entry.dtype}, which torch "
                f"{torch.__version__} cannot hold; upgrade torch to load it.",
                path=path,
                key=entry.name,
            )
    index = {entry.name: i for i, entry in enumerate(header.entries)}
    members: dict[str, Json] = {name: {"tensor": i} for name, i in index.items()}
    for alias, stored in _aliases(header.metadata.get(ALIASES), index, path).items():
        members[alias] = {"tensor": index[stored]}
    tree: Json = {"dict": members}
    return Contents(path, header, tree, list(range(len(header.entries))), "", {})


def _aliases(raw: str | None, index: dict[str, int], path: str) -> dict[str, str]:
    """Names ``convert`` stored once under another name (tied weights): alias -> stored."""
    if raw is None:
        return {}
    aliases = _format.strict_json(raw.encode("utf-8"), path, ALIASES)
    if not isinstance(aliases, dict) or not all(
        isinstance(alias, str)
        and alias not in index
        and isinstance(stored, str)
        and stored in index
        for alias, stored in aliases.items()
    ):
        raise _corrupt(path, f"`{ALIASES}` is not a map from new names to stored tensors")
    return aliases


def _json_member(meta: dict[str, str], key: str, path: str) -> Json:
    text = meta.get(key)
    if text is None:
        raise _corrupt(path, f"the torchvault member `{key}` is missing")
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _corrupt(path, f"the torchvault member `{key}` is not valid UTF-8") from exc
    parsed: Json = _format.strict_json(raw, path, key)
    return parsed


def _corrupt(path: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path}: {what}. The file is damaged or was not written by torchvault; restore it "
        "from a good copy.",
        path=path,
    )


def dumps(value: Json) -> str:
    """Compact JSON, as every torchvault member is written."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
