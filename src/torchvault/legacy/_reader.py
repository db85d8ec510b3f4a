"""Read torch.save files (zip and legacy stacked-pickle formats) without running their code.

A :class:`Session` is one read of one file: its own allowlist table, its own record of every
global the file named, and in ``permissive`` mode (scan, salvage) inert stubs in place of
refused names, so that the whole stream can be walked and reported without building or
calling anything the file asked for.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import stat
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from .._placement import MapLocation, Misplaced, Placement, check
from ..errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    TorchVaultError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
)
from . import _allowlist
from ._finish import finish
from ._hf import is_model_folder
from ._unpickler import Building, Global, Unpickler
from ._zip import ZipArchive

MAX_PICKLE_BYTES = 1 << 30
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
_KEY = re.compile(r"[0-9A-Za-z_.\-]{1,128}")
_OURS = ("zip", "tar", "pickle")
_UNEXPECTED = (ValueError, TypeError, RuntimeError, OverflowError, IndexError, KeyError)
_PROTOCOL_0_STARTS = tuple(bytes([c]) for c in b"(}])NIJKFGSVXci")
_WRAPPERS = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"7z\xbc\xaf\x27\x1c": "7z",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
}


class Stub(Global, Building):
    """A refused name in permissive mode: it records what the stream did to it, runs nothing.

    ``calls`` (shared by every stub of one read) collects the names the stream *calls*
    (REDUCE): what ``torch.load(weights_only=False)`` would call with the file's arguments,
    as opposed to classes it would only instantiate (NEWOBJ) and fill with state.
    """

    what = "stub"

    def __init__(
        self, name: str, args: tuple[Any, ...] = (), calls: set[str] | None = None
    ) -> None:
        super().__init__(name)
        self.args: object = args
        self.state: object = None
        self.items: list[object] = []
        self.pairs: list[tuple[object, object]] = []
        self.calls = calls

    def call(self, args: tuple[Any, ...]) -> object:
        if self.calls is not None:
            self.calls.add(self.name)
        return Stub(self.name, args, self.calls)

    def new(self, args: tuple[Any, ...]) -> object:
        return Stub(self.name, args, self.calls)

    def build(self, state: object) -> None:
        self.state = state

    def setitem(self, key: object, value: object) -> None:
        self.pairs.append((key, value))

    def append(self, value: object) -> None:
        self.items.append(value)

    def value(self, finish: Callable[[object], object]) -> object:
        self.args = finish(self.args)
        self.state = finish(self.state)
        self.items = [finish(item) for item in self.items]
        self.pairs = [(finish(k), finish(v)) for k, v in self.pairs]
        return self


class Session:
    """One read of one file."""

    def __init__(
        self,
        path: str,
        *,
        map_location: MapLocation | Placement = "cpu",
        permissive: bool = False,
    ) -> None:
        self.path = path
        self.placement = check(map_location)
        self.permissive = permissive
        self.seen: Counter[str] = Counter()
        self.refused: set[str] = set()
        self.called: set[str] = set()  # refused names the stream calls (permissive mode)
        self.anomalies: list[str] = []
        self.format = "unknown"
        self.context = _allowlist.Context(self._place)
        self.table = _allowlist.table(self.context)
        self.persistent: Callable[[object], object] | None = None  # the tar format's own
        self.storages: dict[str, _allowlist.Storage] = {}
        self._placed: dict[str, torch.Tensor] = {}

    def release(self) -> None:
        """Let go of the storages this read made. The session is in a reference cycle (its
        context calls back into it), so without this they would live until the garbage
        collector runs: a read of one tensor after another would hold all of them."""
        self.storages.clear()
        self._placed.clear()

    # -- the unpickler's callbacks ------------------------------------------------------

    def resolve(self, module: str, name: str) -> object:
        written = f"{module}.{name}"
        self.seen[written] += 1
        entry = self.table.get(_allowlist.canonical(module, name))
        if entry is not None:
            return entry
        self.refused.add(written)
        if self.permissive:
            return Stub(written, calls=self.called)
        raise UnsafeCheckpointError(
            f"{self.path}: the pickle refers to {written}, which is not on torchvault's "
            "allowlist of data types; loading it with torch.load(weights_only=False) would run "
            "it. Nothing was run. If this is a whole model saved with torch.save(model), "
            "recover its weights with tv.load_legacy(path, salvage=True).",
            global_name=written,
            path=self.path,
        )

    def corrupt(self, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.path}: {what}", path=self.path)

    def recover(self, exc: TorchVaultError) -> object:
        self.anomalies.append(exc.message)
        if isinstance(exc, UnsafeCheckpointError) and exc.global_name:
            self.refused.add(exc.global_name)
        return Stub("<rejected>")

    def storage(self, pid: object, with_view: bool) -> object:
        width = 6 if with_view else 5
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module" and with_view:
            return pid[1]  # the class of a pickled module (its GLOBAL was already judged)
        if not (isinstance(pid, tuple) and len(pid) == width and pid[0] == "storage"):
            raise CorruptCheckpointError(
                f"a persistent id {pid!r:.80} is not a ('storage', ...) record"
            )
        kind, key, location, numel = pid[1:5]
        if with_view and pid[5] is not None:
            raise UnsupportedFormatError(
                "uses storage views (torch < 0.4); re-save it with a newer torch"
            )
        if not isinstance(kind, _allowlist.StorageType):
            raise CorruptCheckpointError("a storage has no storage type")
        if not (isinstance(key, str) and _KEY.fullmatch(key) and isinstance(location, str)):
            raise CorruptCheckpointError(f"storage key {key!r:.80} is malformed")
        if type(numel) is not int or numel < 0:
            raise CorruptCheckpointError(f"storage {key} has a malformed size")
        known = self.storages.get(key)
        if known is None:
            known = _allowlist.Storage(key, kind.dtype, numel, location)
            self.storages[key] = known
        elif known.nbytes != numel * (1 if kind.dtype is None else kind.dtype.itemsize):
            raise CorruptCheckpointError(f"storage {key} is declared twice with different sizes")
        return known

    def _place(self, storage: _allowlist.Storage) -> torch.Tensor:
        """A storage's bytes where ``map_location`` puts them, once per storage, so tensors
        sharing a storage share it on the target device too."""
        placed = self._placed.get(storage.key)
        if placed is None:
            if storage.data is None:
                raise CorruptCheckpointError(f"storage {storage.key} was never read")
            if not _allowlist.DEVICE.fullmatch(storage.location):
                raise CorruptCheckpointError(
                    f"a tensor was saved on device {storage.location!r:.40}, which is not a "
                    "device name"
                )
            try:
                placed = self.placement.place(storage.data, storage.location)
            except TorchVaultError:
                raise
            except Exception as exc:  # map_location's fault, or its callable's: not the file's
                raise Misplaced(exc) from exc
            self._placed[storage.key] = placed
        return placed

    # -- running a stream ------------------------------------------------------------------

    def unpickle(
        self, data: memoryview | bytes, start: int, *, legacy_ids: bool
    ) -> tuple[object, int]:
        def persistent_load(pid: object) -> object:
            return self.storage(pid, legacy_ids)

        unpickler = Unpickler(
            data,
            resolve=self.resolve,
            persistent_load=self.persistent or persistent_load,
            start=start,
            recover=self.recover if self.permissive else None,
        )
        try:
            return unpickler.load()
        except TorchVaultError as exc:
            raise located(exc, self.path) from exc
        except _UNEXPECTED as exc:  # a gap in the checks above: still a typed error
            raise self.corrupt(f"a malformed pickle ({type(exc).__name__}: {exc})") from exc

    def trailing(self, data: memoryview | bytes, at: int, what: str) -> CorruptCheckpointError:
        """The error for bytes after the last pickle; a scan first reads them as further
        pickles, to name the globals a stacked payload would use."""
        with contextlib.suppress(TorchVaultError):
            while self.permissive and at < len(data):
                _, at = self.unpickle(data, at, legacy_ids=True)
        return self.corrupt(what)

    def finish(self, obj: object) -> object:
        try:
            return finish(obj, keep=lambda o: isinstance(o, Stub))
        except Misplaced as exc:
            raise exc.error from None
        except TorchVaultError as exc:
            raise located(exc, self.path) from exc
        except RecursionError:  # a caller already deep in its own stack
            raise self.corrupt("the pickled object is nested too deeply to walk") from None
        except _UNEXPECTED as exc:
            raise self.corrupt(f"a malformed object ({type(exc).__name__}: {exc})") from exc


def located(exc: TorchVaultError, path: str) -> TorchVaultError:
    """``exc`` with the file named, if it did not name one."""
    if exc.path is not None:
        return exc
    message = f"{path}: {exc.message}"
    if isinstance(exc, UnsafeCheckpointError):
        return UnsafeCheckpointError(message, global_name=exc.global_name, path=path)
    return type(exc)(message, path=path)


# -- files ----------------------------------------------------------------------------------


def open_mapped(path: str | os.PathLike[str]) -> tuple[str, mmap.mmap | bytes]:
    """A private copy-on-write map of the file (or its bytes, when empty)."""
    name = os.fspath(path)
    try:
        if not stat.S_ISREG(os.stat(name).st_mode) and not os.path.isdir(name):
            raise UnsupportedFormatError(
                f"{name}: not a regular file (a pipe or a device); copy it to a file first",
                path=name,
            )
        with open(name, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size == 0:
                return name, b""
            return name, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{name}: no such file", path=name) from None
    except IsADirectoryError:
        raise UnsupportedFormatError(
            f"{name}: is a folder, not a checkpoint file", path=name
        ) from None


def is_foreign(path: str | os.PathLike[str]) -> bool:
    """True for a model folder or a torch.save file: what ``tv.load`` hands to this package."""
    if os.path.isdir(path):
        from ._dcp import is_dcp_folder  # imports this module

        return is_model_folder(os.fspath(path)) or is_dcp_folder(os.fspath(path))
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False  # the native reader reports it, without opening a pipe
        with open(path, "rb") as file:
            head = file.read(512)
            # an ONNX model too: this package's error names the function that reads it
            return kind_of(head, os.fstat(file.fileno()).st_size) in _OURS or is_onnx(
                head, os.fspath(path)
            )
    except OSError:
        return False  # the native reader reports it


def sniff(data: mmap.mmap | bytes) -> str:
    """The container kind of a whole file (see :func:`kind_of`)."""
    return kind_of(bytes(data[:512]), len(data))


def kind_of(head: bytes, size: int) -> str:
    """The container kind from a file's first 512 bytes: ``zip``, ``tar``, ``pickle``, a
    compression wrapper, or ``safetensors`` (an 8-byte little-endian header length, then
    the header's ``{``), which is checked first since any first byte can start it."""
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[257:262] == b"ustar":
        return "tar"
    for magic, name in _WRAPPERS.items():
        if head.startswith(magic):
            return name
    if head[:1] == b"\x80" or head[:1] in _PROTOCOL_0_STARTS:
        return "pickle"
    return "unknown"


def is_onnx(head: bytes, path: str) -> bool:
    """An ONNX model: a protobuf whose first field is ``ir_version`` (tag 0x08) and whose
    producer is named near the start, or any file named ``*.onnx`` that is no checkpoint."""
    if kind_of(head, 1 << 62) != "unknown":
        return False
    return path.lower().endswith(".onnx") or (
        head[:1] == b"\x08" and (b"pytorch" in head or b"onnx" in head.lower())
    )


def read(session: Session, data: mmap.mmap | bytes, *, scan: bool = False) -> object:
    """The object in a torch.save file, unpickled by ``session``, finished.

    ``scan``: the read only lists globals (a permissive session), so DCP's ``.metadata``,
    which loading refuses, is read too.
    """
    try:
        return _read(session, data, scan=scan)
    finally:
        session.release()


def _read(session: Session, data: mmap.mmap | bytes, *, scan: bool) -> object:
    kind = sniff(data)
    if kind == "zip":
        return session.finish(_read_zip(session, ZipArchive(data, session.path)))
    if kind == "pickle" and os.path.basename(session.path) == ".metadata" and not scan:
        raise UnsupportedFormatError(
            f"{session.path}: is the metadata of a torch.distributed.checkpoint folder, a raw "
            "pickle that DCP itself loads with pickle.load (it can run code), not a torch.save "
            "file. Read the whole checkpoint without running anything with tv.load(folder), "
            "tv.inspect(folder) or tv.convert(folder, ...).",
            path=session.path,
        )
    if kind == "pickle":
        return session.finish(_read_pickles(session, data))
    if kind == "tar":
        from ._tar import read_tar  # imports this module

        return session.finish(read_tar(session, data))
    raise unsupported(session.path, kind, bytes(data[:512]))


def unsupported(path: str, kind: str, head: bytes = b"") -> UnsupportedFormatError:
    """The error for a file this reader does not read, naming the function that does."""
    if kind == "safetensors":
        why = (
            "is a torchvault or safetensors checkpoint, not a torch.save file; load it with "
            "tv.load(path) or tv.load_into(model, path)"
        )
    elif is_onnx(head, path):
        why = (
            "is an ONNX model, not a checkpoint; run it with onnxruntime (torchvault writes "
            "ONNX with tv.export_onnx, and reads weights from torchvault, safetensors and "
            "torch.save files)"
        )
    elif kind in _WRAPPERS.values():
        why = (
            f"is wrapped in {kind} compression; decompress it yourself (checking its size) "
            "and open the inner file, so that no archive can expand without limit"
        )
    else:
        why = "is not a torch.save file (zip or pickle), a torchvault file or a safetensors file"
    return UnsupportedFormatError(f"{path} {why}.", path=path)


def _read_zip(session: Session, archive: ZipArchive) -> object:
    path = session.path
    session.format = "torch-zip"
    if archive.find("constants.pkl") or any("/code/" in n for n in archive.entries):
        raise UnsupportedFormatError(
            f"{path}: is a TorchScript archive (torch.jit.save). Loading one runs its code "
            "(CVE-2025-32434 used exactly this); torchvault reads weights only. Export the "
            "weights with torch.jit.load in a sandbox and save model.state_dict().",
            path=path,
        )
    pickle = archive.find("data.pkl")
    if pickle is None and any(n.rsplit("/", 1)[-1] == "archive_format" for n in archive.entries):
        raise UnsupportedFormatError(
            f"{path}: is a torch.export program (.pt2), not a checkpoint; load it with "
            "tv.load_program(path)",
            path=path,
        )
    if pickle is None:
        raise UnsupportedFormatError(
            f"{path}: is a zip archive without data.pkl, so not a torch.save file",
            path=path,
        )
    order = archive.find("byteorder")
    if order is not None and bytes(archive.read(order)) != b"little":
        raise UnsupportedFormatError(
            f"{path}: was saved on a big-endian machine; the legacy reader reads little-endian "
            "files only",
            path=path,
        )
    if pickle.size > MAX_PICKLE_BYTES:
        raise CorruptCheckpointError(f"{path}: data.pkl is larger than 1 GiB", path=path)
    obj, end = session.unpickle(archive.read(pickle), 0, legacy_ids=False)
    if end != pickle.size:
        raise session.trailing(
            archive.read(pickle),
            end,
            f"data.pkl has {pickle.size - end} bytes after its STOP opcode (a second, hidden "
            "pickle?)",
        )
    for storage in session.storages.values():
        entry = archive.find(f"data/{storage.key}")
        if entry is None:
            raise CorruptCheckpointError(
                f"{path}: storage {storage.key} has no data/{storage.key} entry", path=path
            )
        if entry.size != storage.nbytes:
            raise CorruptCheckpointError(
                f"{path}: storage {storage.key} declares {storage.nbytes} bytes but its entry "
                f"holds {entry.size}",
                path=path,
            )
        storage.data = bytes_tensor(archive.data, entry.start, entry.size)
    archive.check_all()  # every CRC, the records torch ignores included
    return obj


def bytes_tensor(data: mmap.mmap | bytes | memoryview, start: int, size: int) -> torch.Tensor:
    if size == 0:
        return torch.empty(0, dtype=torch.uint8)
    tensor = torch.frombuffer(data, dtype=torch.uint8, count=size, offset=start)
    # a crafted file can misalign storages, and an archive inside a DCP file starts anywhere
    # in it; keep every dtype view aligned (the address, not the offset, decides)
    return tensor if tensor.data_ptr() % 16 == 0 else tensor.clone()


def _read_pickles(session: Session, data: mmap.mmap | bytes) -> object:
    view = memoryview(data)
    first, at = session.unpickle(view, 0, legacy_ids=True)
    legacy = type(first) is int and first == LEGACY_MAGIC
    session.format = "torch-legacy" if legacy else "pickle"
    if not legacy:
        if at != len(view):
            raise session.trailing(
                view,
                at,
                f"a pickle followed by {len(view) - at} more bytes; a torch.save file of the "
                "legacy format starts with its magic number",
            )
        if session.storages:
            raise CorruptCheckpointError(
                f"{session.path}: a bare pickle refers to tensor storages it does not hold",
                path=session.path,
            )
        return first
    protocol, at = session.unpickle(view, at, legacy_ids=True)
    if type(protocol) is not int or protocol != LEGACY_PROTOCOL:
        raise UnsupportedFormatError(
            f"{session.path}: legacy protocol {protocol!r:.20} (torchvault reads {LEGACY_PROTOCOL})",
            path=session.path,
        )
    info, at = session.unpickle(view, at, legacy_ids=True)
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise UnsupportedFormatError(
            f"{session.path}: was saved on a big-endian machine or has no system record",
            path=session.path,
        )
    obj, at = session.unpickle(view, at, legacy_ids=True)
    keys, at = session.unpickle(view, at, legacy_ids=True)
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)) or sorted(
        keys
    ) != sorted(session.storages):
        raise CorruptCheckpointError(
            f"{session.path}: the storage key list does not match the storages the pickle uses",
            path=session.path,
        )
    for key in keys:
        at = _legacy_storage(session, data, at, session.storages[key])
    if at != len(view):
        raise session.trailing(
            view, at, f"{len(view) - at} unexplained bytes after the last storage"
        )
    return obj


def _legacy_storage(
    session: Session, data: mmap.mmap | bytes, at: int, storage: _allowlist.Storage
) -> int:
    if at + 8 > len(data):
        raise CorruptCheckpointError(
            f"{session.path}: truncated before storage {storage.key}", path=session.path
        )
    count = int.from_bytes(data[at : at + 8], "little")
    itemsize = 1 if storage.dtype is None else storage.dtype.itemsize
    if count * itemsize != storage.nbytes or at + 8 + storage.nbytes > len(data):
        raise CorruptCheckpointError(
            f"{session.path}: storage {storage.key} declares {storage.nbytes} bytes but holds "
            f"{count * itemsize} (or the file is truncated)",
            path=session.path,
        )
    storage.data = bytes_tensor(data, at + 8, storage.nbytes)
    return at + 8 + storage.nbytes
