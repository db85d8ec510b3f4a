"""The run folder: content-addressed tensor objects, per-checkpoint manifests, pointer files.

Layout::

    RUN/
      torchvault-run.json                 format marker of the folder
      objects/ab12...ef                   one file per distinct tensor byte string, named by
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

import contextlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import _dtypes, _format
from .._format import Blob, Entry
from ..errors import CheckpointNotFoundError, CorruptCheckpointError, UnsupportedFormatError
from ..storage import LocalStorage, Storage

RUN_FILE = "torchvault-run.json"
RUN_FORMAT = 1
_STEP_FILE = re.compile(r"step-([0-9]{12})\.json")  # not \d: it matches any script's digits
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
    """Reads and writes one run folder through a :class:`~torchvault.storage.Storage`.
    Writers must hold the storage's lock (the manager does); readers need none."""

    def __init__(self, location: str | os.PathLike[str] | Storage) -> None:
        self.storage: Storage = (
            location if isinstance(location, Storage) else LocalStorage(location)
        )
        self.root: Path = Path(
            location if not isinstance(location, Storage) else self.storage.describe("")
        )

    # ------------------------------------------------------------------ layout

    def manifest_path(self, step: int) -> Path:
        return Path(self.storage.describe(_manifest(step)))

    def ref_path(self, name: str) -> Path:
        return Path(self.storage.describe(f"refs/{name}.json"))

    # ------------------------------------------------------------------ writing

    def create(self) -> None:
        """Mark a new run, or check the marker of an existing one."""
        if self.exists():
            self.check()
        else:
            self._publish(RUN_FILE, {"torchvault": "run", "format": RUN_FORMAT})

    def put_all(
        self, blobs: list[Blob], digests: list[str | None] | None = None
    ) -> tuple[list[StoredBlob], int]:
        """Store every blob whose bytes no object holds yet; return all of them as stored,
        and the bytes written. Each blob is hashed straight from its tensor's memory (GPU
        tensors are copied to the CPU one at a time), and new objects are published in one
        batch (:meth:`Storage.put_many`). A blob given with its digest must already be stored
        (an async save passes unchanged tensors so, without their bytes)."""
        stored: list[StoredBlob] = []
        written = 0

        given = digests or [None] * len(blobs)

        def new_objects() -> Iterator[tuple[str, list[memoryview]]]:
            nonlocal written
            seen: set[str] = set()
            unhashed = [
                blob.source for blob, known in zip(blobs, given, strict=True) if known is None
            ]
            with contextlib.closing(_format.hashed_views(unhashed)) as hashed:
                for blob, known in zip(blobs, given, strict=True):
                    if known is not None:
                        if self.storage.size(_object(known)) != blob.nbytes:
                            raise _corrupt(
                                self.storage.describe(_object(known)),
                                "the object vanished while an asynchronous save was in flight",
                            )
                        stored.append(StoredBlob(known, blob.dtype, blob.shape, blob.nbytes))
                        continue
                    view, digest = next(hashed)
                    stored.append(StoredBlob(digest, blob.dtype, blob.shape, blob.nbytes))
                    if digest in seen or self.storage.size(_object(digest)) == blob.nbytes:
                        continue
                    seen.add(digest)
                    written += blob.nbytes
                    yield _object(digest), [view]

        self.storage.put_many(new_objects())
        return stored, written

    def commit(self, step: int, manifest: dict[str, Any]) -> None:
        """Publish the manifest of ``step``: from here on the checkpoint exists."""
        self._publish(_manifest(step), manifest)

    def set_ref(self, name: str, step: int) -> None:
        self._publish(f"refs/{name}.json", {"step": step})

    def _publish(self, name: str, document: dict[str, Any]) -> None:
        self.storage.put(name, [seal(document)])

    def delete(self, step: int) -> None:
        """Delete a checkpoint's manifest (its objects go with :meth:`collect_garbage`), then
        the program exported for it, if any."""
        self.storage.delete(_manifest(step))
        self.storage.delete(program(step))

    def collect_garbage(self, keep: Iterable[str]) -> int:
        """Delete every object not in ``keep``; return the bytes freed. Only names shaped
        like objects are touched."""
        wanted = set(keep)
        freed = 0
        for name, digest in self._objects():
            if digest not in wanted:
                freed += self.storage.size(name) or 0
                self.storage.delete(name)
        return freed

    def remove_temp_files(self) -> None:
        """Delete leftovers of interrupted saves (only the lock holder may call this)."""
        self.storage.clean()

    # ------------------------------------------------------------------ reading

    def committed(self, step: int) -> bool:
        """Whether the manifest of ``step`` is in place."""
        return self.storage.size(_manifest(step)) is not None

    def exists(self) -> bool:
        return self.storage.size(RUN_FILE) is not None

    def steps(self) -> list[int]:
        """Every committed step, ascending."""
        names = self.storage.list("checkpoints/")
        found = (_STEP_FILE.fullmatch(name.removeprefix("checkpoints/")) for name in names)
        return sorted(int(match[1]) for match in found if match)

    def manifest(self, step: int) -> dict[str, Any]:
        """The checked manifest of ``step``."""
        document = self._document(_manifest(step))
        where = self.storage.describe(_manifest(step))
        if type(document.get("step")) is not int or document["step"] != step:
            raise _corrupt(
                where, f"it is named for step {step} but says {document.get('step')!r:.40}"
            )
        _check_manifest(document, where)
        return document

    def ref(self, name: str) -> int | None:
        """The step a pointer file names, or None when there is none."""
        key = f"refs/{name}.json"
        if self.storage.size(key) is None:
            return None
        step = self._document(key).get("step")
        if type(step) is not int or step < 0:
            raise _corrupt(self.storage.describe(key), "it does not name a step")
        return step

    def referenced(self) -> set[str]:
        """The digests of every object some committed manifest refers to."""
        digests: set[str] = set()
        for step in self.steps():
            where = self.storage.describe(_manifest(step))
            digests.update(blob.digest for blob in blobs_of(self.manifest(step), where))
        return digests

    def map_objects(self, blobs: Iterable[StoredBlob]) -> dict[str, torch.Tensor]:
        """Each object's bytes as a uint8 tensor on a private map, by digest, every one
        checked against its digest (on two threads when there is much to check)."""
        unique = list({blob.digest: blob for blob in blobs}.values())
        views = []
        for blob in unique:
            try:
                view = self.storage.map(_object(blob.digest))
            except FileNotFoundError as exc:
                where = self.storage.describe(_object(blob.digest))
                raise CheckpointNotFoundError(f"{where} is missing.", path=where) from exc
            if len(view) != blob.nbytes:
                raise _corrupt(
                    self.storage.describe(_object(blob.digest)),
                    f"the object is {len(view)} bytes, not {blob.nbytes}",
                )
            views.append(view)
        for blob, digest in zip(unique, _format.hash_all(views), strict=True):
            if digest != blob.digest:
                raise _corrupt(
                    self.storage.describe(_object(blob.digest)),
                    "the object's bytes do not match its name (checksum)",
                )
        return {
            blob.digest: torch.frombuffer(view, dtype=torch.uint8)
            if blob.nbytes
            else torch.empty(0, dtype=torch.uint8)
            for blob, view in zip(unique, views, strict=True)
        }

    def stored(self) -> set[str]:
        """The digest of every object in the run, referenced or not."""
        return {digest for _, digest in self._objects()}

    def object_bytes(self) -> int:
        return sum(self.storage.size(name) or 0 for name, _ in self._objects())

    def _objects(self) -> list[tuple[str, str]]:
        names = self.storage.list("objects/")
        return [(n, n[-32:]) for n in names if _OBJECT.fullmatch(n[-32:]) and n == _object(n[-32:])]

    def _document(self, name: str) -> dict[str, Any]:
        where = self.storage.describe(name)
        try:
            raw = self.storage.get(name, limit=_MAX_JSON)
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(f"{where} does not exist.", path=where) from exc
        except ValueError as exc:
            raise _corrupt(where, str(exc)) from exc
        return unseal(raw, where)

    def check(self) -> None:
        """Check the run marker: a torchvault run of a format this version reads."""
        document = self._document(RUN_FILE)
        version = document.get("format")
        if document.get("torchvault") != "run" or type(version) is not int:
            raise _corrupt(self.storage.describe(RUN_FILE), "it is not a torchvault run marker")
        if version > RUN_FORMAT:
            raise UnsupportedFormatError(
                f"{self.root} was written by a newer torchvault (run format {version}); "
                "upgrade with `pip install -U torchvault`.",
                path=self.root,
            )


def _object(digest: str) -> str:
    return f"objects/{digest}"


PROGRAMS = "programs"


def program(step: int) -> str:
    """The storage name of the torch.export program attached to checkpoint ``step``."""
    return f"{PROGRAMS}/step-{step:012d}.pt2"


def _manifest(step: int) -> str:
    return f"checkpoints/step-{step:012d}.json"


def _check_manifest(document: dict[str, Any], where: str) -> None:
    """The type of every field a reader uses (a field may be absent: readers default it), so
    a sealed but hand-edited manifest is refused here, not deep inside a reader."""
    strings = (str, type(None))
    fields: dict[str, Any] = {
        "items": lambda v: _str_map(v, str),
        "metadata": lambda v: _str_map(v, object),
        "versions": lambda v: _str_map(v, str),
        "bytes": lambda v: _str_map(v, int) and all(n >= 0 for n in v.values()),
        "created": lambda v: isinstance(v, strings),
        "blobs": lambda v: isinstance(v, list),
        "tensors": lambda v: isinstance(v, list),
    }
    for name, valid in fields.items():
        if name in document and not valid(document[name]):
            raise _corrupt(where, f"its {name!r} field is malformed")


def _str_map(value: object, kind: type) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, kind) and (kind is not int or type(v) is int)
        for k, v in value.items()
    )


def blobs_of(manifest: dict[str, Any], path: str) -> list[StoredBlob]:
    """The objects a manifest lists, each field checked."""
    raw = manifest.get("blobs")
    if not isinstance(raw, list):
        raise _corrupt(path, "its object list is missing")
    if len(raw) > _format.MAX_TENSORS:  # each one is mapped: a few bytes of JSON, ~1 KB here
        raise _corrupt(path, f"it lists {len(raw)} objects (cap {_format.MAX_TENSORS})")
    out = []
    for item in raw:
        if (
            not isinstance(item, list)
            or len(item) != 4
            or not isinstance(item[0], str)
            or not _OBJECT.fullmatch(item[0])
            or not isinstance(item[1], str)
            or item[1] not in _dtypes.SAFETENSORS_ITEMSIZE
            or not _format.int_list(item[2], _format.MAX_DIMS)
            or not _format.fits_int64(item[2], _dtypes.SAFETENSORS_ITEMSIZE[item[1]])
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
