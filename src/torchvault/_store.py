"""The run folder: content-addressed tensor objects, per-checkpoint manifests, pointer files.

Layout::

    RUN/
      torchvault-run.json                 format marker of the folder
      objects/ab/ab12...ef                one file per distinct tensor byte string, named by
                                          the xxh3-128 of its bytes (dedup key and checksum)
      checkpoints/step-000000001200.json  the manifest: tree, tensor table, object list
      refs/latest.json  refs/best.json    {"step": 1200}, replaced atomically
      lock                                flock'ed by the one writer

A checkpoint exists if and only if its manifest exists: objects are written and made durable
first, the manifest is published last (atomically, through ``_commit``), pointers after it,
deletions after that. Every JSON file is sealed like a torchvault header: its first member is
the xxh3-128 of the bytes after it. Readers take no lock and trust no byte.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import _commit, _dtypes, _format
from ._format import Blob, Entry
from .errors import CheckpointNotFoundError, CorruptCheckpointError, UnsupportedFormatError

RUN_FILE = "torchvault-run.json"
RUN_FORMAT = 1
_STEP_FILE = re.compile(r"step-(\d{12})\.json")
_OBJECT = re.compile(r"[0-9a-f]{32}")
_SEAL = b'{"integrity":"'
_MAX_JSON = 512 << 20


@dataclass(frozen=True)
class StoredBlob:
    """An object a manifest refers to."""

    digest: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    def entry(self) -> Entry:
        return Entry(self.digest, self.dtype, self.shape, 0, self.nbytes)


def seal(document: dict[str, Any]) -> bytes:
    """JSON bytes whose first member is the checksum of everything after it."""
    if not document:
        raise ValueError("an empty document has nothing to seal")
    body = json.dumps(document, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    rest = body[1:].encode("ascii")
    return _SEAL + _format.hash_bytes(rest).encode("ascii") + b'",' + rest


def unseal(raw: bytes, path: str) -> dict[str, Any]:
    """Check and parse bytes written by :func:`seal`.

    Raises:
        CorruptCheckpointError: the checksum or the JSON is wrong.
    """
    cut = len(_SEAL) + _format.HASH_HEX
    if not raw.startswith(_SEAL) or raw[cut : cut + 2] != b'",':
        raise _corrupt(path, "it does not start with its checksum")
    rest = raw[cut + 2 :]
    if _format.hash_bytes(rest).encode("ascii") != raw[len(_SEAL) : cut]:
        raise _corrupt(path, "its checksum does not match its bytes")
    document = _format.strict_json(b"{" + rest, path, "the file")
    if not isinstance(document, dict):
        raise _corrupt(path, "it is not a JSON object")
    return document


def _corrupt(path: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path}: {what}; the run folder is damaged (bit rot, a bad copy or tampering).",
        path=path,
    )


class RunStore:
    """Reads and writes one run folder. Writers must hold the run's lock (the manager does)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    # ------------------------------------------------------------------ layout

    def object_path(self, digest: str) -> Path:
        return self.root / "objects" / digest[:2] / digest

    def manifest_path(self, step: int) -> Path:
        return self.root / "checkpoints" / f"step-{step:012d}.json"

    def ref_path(self, name: str) -> Path:
        return self.root / "refs" / f"{name}.json"

    # ------------------------------------------------------------------ writing

    def create(self) -> None:
        """Create the folder layout, or check the marker of an existing run."""
        marker = self.root / RUN_FILE
        if marker.exists():
            self._check_marker(marker)
            return
        for folder in ("objects", "checkpoints", "refs"):
            _commit.make_dirs(self.root / folder)
        self._publish(marker, {"torchvault": "run", "format": RUN_FORMAT})

    def put(self, blob: Blob) -> tuple[StoredBlob, bool]:
        """Store a blob's bytes unless an identical object exists; return it and whether it
        was written."""
        data = _format.flat_bytes(blob.source).to("cpu")
        view = memoryview(data.numpy())  # type: ignore[arg-type]
        digest = _format.hash_bytes(view)
        stored = StoredBlob(digest, blob.dtype, blob.shape, blob.nbytes)
        path = self.object_path(digest)
        if _size(path) == blob.nbytes:
            return stored, False
        _commit.make_dirs(path.parent)
        with _commit.atomic_file(path) as handle:
            handle.write(view)
        return stored, True

    def commit(self, step: int, manifest: dict[str, Any]) -> None:
        """Publish the manifest of ``step``: from here on the checkpoint exists."""
        self._publish(self.manifest_path(step), manifest)

    def set_ref(self, name: str, step: int) -> None:
        self._publish(self.ref_path(name), {"step": step})

    def _publish(self, path: Path, document: dict[str, Any]) -> None:
        with _commit.atomic_file(path) as handle:
            handle.write(seal(document))

    def delete(self, step: int) -> None:
        """Delete a checkpoint's manifest (its objects go with :meth:`collect_garbage`)."""
        _commit.remove(self.manifest_path(step))

    def collect_garbage(self, keep: Iterable[str]) -> int:
        """Delete every object not in ``keep``; return the bytes freed. Only files named like
        objects are touched."""
        wanted = set(keep)
        freed = 0
        for path in self._object_files():
            if path.name not in wanted:
                freed += _size(path)
                _commit.remove(path)
        return freed

    def remove_temp_files(self) -> None:
        """Delete temp files of interrupted saves (only the lock holder may call this)."""
        for path in self.root.rglob(f"*{_commit.TEMP_MARK}*"):
            _commit.remove(path)

    # ------------------------------------------------------------------ reading

    def exists(self) -> bool:
        return (self.root / RUN_FILE).is_file()

    def steps(self) -> list[int]:
        """Every committed step, ascending."""
        folder = self.root / "checkpoints"
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return []
        found = (_STEP_FILE.fullmatch(name) for name in names)
        return sorted(int(match[1]) for match in found if match)

    def manifest(self, step: int) -> dict[str, Any]:
        """The checked manifest of ``step``."""
        path = self.manifest_path(step)
        document = unseal(self._read(path), str(path))
        if document.get("step") != step:
            raise _corrupt(
                str(path), f"it is named for step {step} but says {document.get('step')!r}"
            )
        return document

    def ref(self, name: str) -> int | None:
        """The step a pointer file names, or None when there is none."""
        path = self.ref_path(name)
        if not path.exists():
            return None
        step = unseal(self._read(path), str(path)).get("step")
        if type(step) is not int or step < 0:
            raise _corrupt(str(path), "it does not name a step")
        return step

    def referenced(self) -> set[str]:
        """The digests of every object some committed manifest refers to."""
        digests: set[str] = set()
        for step in self.steps():
            digests.update(
                blob.digest for blob in blobs_of(self.manifest(step), str(self.manifest_path(step)))
            )
        return digests

    def map_object(self, blob: StoredBlob, *, verify: bool = True) -> torch.Tensor:
        """The object's bytes as a uint8 tensor on a private map, checked against its digest."""
        path = self.object_path(blob.digest)
        if blob.nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        try:
            with open(path, "rb") as handle:
                if os.fstat(handle.fileno()).st_size != blob.nbytes:
                    raise _corrupt(str(path), f"the object is not {blob.nbytes} bytes long")
                mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        except FileNotFoundError as exc:
            raise _corrupt(str(path), "a manifest refers to this object but it is missing") from exc
        if verify and _format.hash_bytes(memoryview(mapping)) != blob.digest:
            raise _corrupt(str(path), "the object's bytes do not match its name (checksum)")
        return torch.frombuffer(mapping, dtype=torch.uint8)

    def object_bytes(self) -> int:
        return sum(_size(path) for path in self._object_files())

    def _object_files(self) -> list[Path]:
        folder = self.root / "objects"
        if not folder.is_dir():
            return []
        return [
            p
            for p in folder.glob("??/*")
            if _OBJECT.fullmatch(p.name) and p.parent.name == p.name[:2]
        ]

    def _read(self, path: Path) -> bytes:
        try:
            with open(path, "rb") as handle:
                raw = handle.read(_MAX_JSON + 1)
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(f"{path} does not exist.", path=path) from exc
        if len(raw) > _MAX_JSON:
            raise _corrupt(str(path), f"it is larger than {_MAX_JSON} bytes")
        return raw

    def _check_marker(self, marker: Path) -> None:
        document = unseal(self._read(marker), str(marker))
        version = document.get("format")
        if document.get("torchvault") != "run" or type(version) is not int:
            raise _corrupt(str(marker), "it is not a torchvault run marker")
        if version > RUN_FORMAT:
            raise UnsupportedFormatError(
                f"{self.root} was written by a newer torchvault (run format {version}); "
                "upgrade with `pip install -U torchvault`.",
                path=self.root,
            )


def blobs_of(manifest: dict[str, Any], path: str) -> list[StoredBlob]:
    """The objects a manifest lists, each field checked."""
    raw = manifest.get("blobs")
    if not isinstance(raw, list):
        raise _corrupt(path, "its object list is missing")
    out = []
    for item in raw:
        if (
            not isinstance(item, list)
            or len(item) != 4
            or not isinstance(item[0], str)
            or not _OBJECT.fullmatch(item[0])
            or item[1] not in _dtypes.SAFETENSORS_ITEMSIZE
            or not _format.int_list(item[2], _format.MAX_DIMS)
            or type(item[3]) is not int
        ):
            raise _corrupt(path, f"its object entry {str(item)[:80]} is malformed")
        digest, dtype, shape, nbytes = item
        itemsize = _dtypes.SAFETENSORS_ITEMSIZE[dtype]
        size = itemsize
        for dim in shape:
            size *= dim
        if size != nbytes:
            raise _corrupt(path, f"object {digest} of shape {shape} does not hold {nbytes} bytes")
        out.append(StoredBlob(digest, dtype, tuple(shape), nbytes))
    return out


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return -1
        raise
