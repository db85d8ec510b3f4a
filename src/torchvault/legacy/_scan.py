"""``scan``: list every global a checkpoint names and everything malformed in it, running
nothing.

A scan is a full read in permissive mode: the same zip reader and unpickler that loads the
file (no second parser an attacker could find a differential against), with refused names
kept as inert stubs so that the whole stream is walked and every name reported.
"""

from __future__ import annotations

import mmap
import os
import stat
from collections import Counter
from typing import cast

from .. import _args
from .._file import _gc_paused
from .._report import GlobalRef, ScanReport
from ..errors import CheckpointNotFoundError, CorruptCheckpointError, TorchVaultError
from ..run._store import RUN_FILE
from . import _dcp
from ._dcp_metadata import parse
from ._foreign import verify_file
from ._reader import Session, kind_of, open_mapped, read, sniff

CHECKPOINT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".tv",
    ".pkl",
    ".pickle",
    ".tar",
    ".pt2",
)


def scan(path: str | os.PathLike[str]) -> ScanReport:
    """Report the globals a checkpoint file (or every checkpoint in a folder) refers to, and
    anything malformed, without running or importing anything.

    Args:
        path: a torchvault, safetensors or torch.save file, or a folder of them (a Hugging
            Face model folder, a run folder).

    Returns:
        A :class:`ScanReport`; ``report.safe`` is False when any global is refused or
        anything is malformed.

    Raises:
        CheckpointNotFoundError: nothing at ``path``.

    Example:
        >>> report = tv.scan("downloads/model.bin")
        >>> report.safe, report.unsafe_globals
    """
    name = _args.path(path)
    if os.path.isdir(name):
        return _scan_folder(name)
    if not os.path.exists(name):
        raise CheckpointNotFoundError(f"{name}: no such file or folder", path=name)
    return _scan_file(name)


def _scan_folder(folder: str) -> ScanReport:
    """Every file under ``folder`` that holds a checkpoint (by content, whatever its name:
    ``model_best.pth.tar`` is a torch zip) or is named like one, at any depth."""
    reports = [_scan_file(path) for path in _candidates(folder)]
    if os.path.isfile(os.path.join(folder, RUN_FILE)):
        reports.append(_scan_run(folder))
    counts: Counter[str] = Counter()
    allowed: dict[str, bool] = {}
    anomalies: list[str] = []
    for report in reports:
        anomalies += report.anomalies
        for ref in report.globals:
            counts[ref.name] += ref.count
            allowed[ref.name] = allowed.get(ref.name, True) and ref.allowed
    if not reports:
        anomalies.append(f"{folder}: no checkpoint file in the folder, so nothing was vouched for")
    hf = os.path.exists(os.path.join(folder, "config.json"))
    run = os.path.isfile(os.path.join(folder, RUN_FILE))
    refs = tuple(GlobalRef(n, allowed[n], c) for n, c in sorted(counts.items()))
    files = tuple(f for r in reports for f in r.files)
    dcp = _dcp.is_dcp_folder(folder)
    kind = "run" if run else "hf-folder" if hf else "dcp" if dcp else "folder"
    return ScanReport(folder, kind, refs, tuple(anomalies), files)


def _scan_run(folder: str) -> ScanReport:
    """A CheckpointManager run: no pickle anywhere; every committed checkpoint's manifest
    and objects are read and verified (a sharded checkpoint's objects one at a time, never
    assembled: a scan of a large run costs no model-sized memory)."""
    from ..run import _consolidate  # run/ imports load_into, whose tv.load imports us
    from ..run._store import RunStore

    anomalies = []
    try:
        store = RunStore(folder)
        store.check()
        steps = store.steps()
        for step in steps:
            _consolidate.verify(store, step, f"{folder}@{step}")
    except TorchVaultError as exc:
        anomalies.append(exc.message)
        steps = []
    manifests = tuple(str(store.manifest_path(step)) for step in steps) if not anomalies else ()
    return ScanReport(folder, "run", anomalies=tuple(anomalies), files=manifests)


def _candidates(folder: str) -> list[str]:
    """The files of ``folder`` that some loader would read: everything named like a
    checkpoint, and everything whose bytes are a checkpoint container or a binary pickle,
    whatever its name (dotfiles included: DCP's ``.metadata`` is a pickle that
    torch.distributed.checkpoint reads with ``pickle.load``)."""
    found = []
    for root, dirs, names in os.walk(folder):
        if RUN_FILE in names and "objects" in dirs:
            dirs.remove("objects")  # a run's raw tensor blobs: no format, nothing to run
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            with open(path, "rb") as file:
                head = file.read(512)
                kind = kind_of(head, os.fstat(file.fileno()).st_size)
            if name.endswith(CHECKPOINT_SUFFIXES) or kind not in ("unknown", "pickle"):
                found.append(path)
            elif kind == "pickle" and _binary_pickle(head):
                # a text file may start like a protocol 0 pickle; PROTO 2-5 is what
                # pickle.dump and torch.save write
                found.append(path)
    return found


def _binary_pickle(head: bytes) -> bool:
    return len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5


def _scan_file(name: str) -> ScanReport:
    try:
        _, data = open_mapped(name)
    except TorchVaultError as exc:
        return ScanReport(name, "unknown", anomalies=(exc.message,), files=(name,))
    kind = sniff(data)
    if kind == "pickle" and os.path.basename(name) == _dcp.METADATA:
        return _scan_dcp_metadata(name, data)
    if name.endswith(".distcp") and _dcp.is_dcp_folder(os.path.dirname(name)):
        return _scan_dcp_data(name)
    if kind == "zip":
        from ..export._pt2 import is_program, scan_program  # export imports legacy

        if is_program(data):
            return scan_program(name, data)
    if kind not in ("zip", "pickle", "tar"):
        return _scan_native(name)
    session = Session(name, permissive=True)
    anomalies = []
    try:
        with _gc_paused():
            read(session, data, scan=True)
    except TorchVaultError as exc:
        anomalies.append(exc.message)
    anomalies = [*session.anomalies, *anomalies]
    refs = tuple(GlobalRef(g, g not in session.refused, n) for g, n in sorted(session.seen.items()))
    return ScanReport(name, session.format, refs, tuple(anomalies), (name,))


def _scan_dcp_metadata(name: str, data: mmap.mmap | bytes) -> ScanReport:
    """DCP's metadata pickle, read with DCP's allowlist (its metadata classes) as loading
    reads it; what the records hold is checked too, as loading checks it."""
    session = _dcp.dcp_session(name, permissive=True)
    anomalies = []
    try:
        with _gc_paused():
            obj = read(session, data, scan=True)
        if not session.refused:
            parse(name, obj)
    except TorchVaultError as exc:
        anomalies.append(exc.message)
    refs = tuple(GlobalRef(g, g not in session.refused, n) for g, n in sorted(session.seen.items()))
    return ScanReport(name, "dcp-metadata", refs, (*session.anomalies, *anomalies), (name,))


def _scan_dcp_data(name: str) -> ScanReport:
    """A ``.distcp`` file: each torch.save archive in it, at the byte ranges the folder's
    metadata gives (the file as a whole is no archive)."""
    folder = os.path.dirname(name)
    try:
        meta = _dcp.read_metadata(folder)
    except TorchVaultError as exc:
        return ScanReport(name, "dcp-data", anomalies=(exc.message,), files=(name,))
    _, data = open_mapped(name)
    seen: Counter[str] = Counter()
    refused: set[str] = set()
    anomalies: list[str] = []
    for (key, _), where in meta.locations.items():
        if where.file != os.path.basename(name):
            continue
        session = Session(name, permissive=True)
        try:
            if where.offset + where.length > len(data):
                raise CorruptCheckpointError(f"{name}: {key!r:.80} is past the end", path=name)
            with _gc_paused():
                read(
                    session,
                    cast("bytes", memoryview(data)[where.offset : where.offset + where.length]),
                )
        except TorchVaultError as exc:
            anomalies.append(f"item {key!r:.80}: {exc.message}")
        seen.update(session.seen)
        refused |= session.refused
        anomalies += session.anomalies
    refs = tuple(GlobalRef(g, g not in refused, n) for g, n in sorted(seen.items()))
    return ScanReport(name, "dcp-data", refs, tuple(anomalies), (name,))


def _scan_native(name: str) -> ScanReport:
    try:
        report = verify_file(name)  # a torchvault or safetensors file: no pickle at all
    except TorchVaultError as exc:
        return ScanReport(name, "unknown", anomalies=(exc.message,), files=(name,))
    kind = "torchvault" if report.checksummed else "safetensors"
    return ScanReport(name, kind, files=(name,))
