"""Malicious and malformed DCP folders: every one refused with a typed error naming the file,
and nothing run.

Each case starts from a real folder written by ``dcp.save`` and changes its ``.metadata``
(rewritten with ``pickle`` from torch's own metadata classes, or from crafted objects whose
``__reduce__`` calls a payload) or its data files. Every payload touches a marker file; the
positive controls show the same payloads do run under ``pickle.loads``.
"""

from __future__ import annotations

import builtins
import copy
import copyreg
import dataclasses
import importlib
import os
import pickle
import shutil
import subprocess
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

import torchvault as tv

# dcp.save in one process says it assumes a single process: that is the setup here
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

Unsafe, Corrupt, Unsupported = (
    tv.UnsafeCheckpointError,
    tv.CorruptCheckpointError,
    tv.UnsupportedFormatError,
)


class Call:
    """Pickles as ``func(*args)``: what an attacker's ``.metadata`` holds."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.func, self.args


class Index:
    """Pickles as NEWOBJ + BUILD of this class; :func:`_duplicate_item` renames the class to
    MetadataIndex in the (protocol 2, text-named) stream, so two equal items are two keys."""

    def __init__(self, fqn: str, offset: tuple[int, ...]) -> None:
        self.fqn, self.offset = fqn, offset

    def __reduce_ex__(self, protocol: object) -> tuple[Any, ...]:
        state = {"fqn": self.fqn, "offset": torch.Size(self.offset), "index": None}
        return copyreg.__newobj__, (Index,), state  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dcp") / "base"
    state = {"w": torch.arange(12.0).reshape(4, 3), "b": torch.arange(5), "step": 7}
    dcp.save(state, checkpoint_id=folder)
    return folder


def metadata(folder: Path) -> Metadata:
    """The folder's metadata, read by torch's own reader (our own test file: trusted)."""
    return copy.deepcopy(FileSystemReader(folder).read_metadata())


def index(meta: Metadata, fqn: str) -> MetadataIndex:
    return next(i for i in meta.storage_data if i.fqn == fqn)


def with_chunks(meta: Metadata, key: str, size: Any, *boxes: tuple[Any, Any]) -> Metadata:
    entry = meta.state_dict_metadata[key]
    assert isinstance(entry, TensorStorageMetadata)
    chunks = [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in boxes]
    meta.state_dict_metadata[key] = dataclasses.replace(entry, size=size, chunks=chunks)
    where = meta.storage_data.pop(index(meta, key))
    for o, _ in boxes:
        meta.storage_data[MetadataIndex(key, o)] = where
    return meta


def with_location(meta: Metadata, key: str, **changes: Any) -> Metadata:
    at = index(meta, key)
    meta.storage_data[at] = dataclasses.replace(meta.storage_data[at], **changes)
    return meta


def set_field(obj: Any, name: str, value: Any) -> Any:
    object.__setattr__(obj, name, value)  # dataclass fields hold anything when pickled
    return obj


# Each case: (name, make(meta, folder, command) -> the new .metadata object or bytes, error).
Make = Callable[[Metadata, Path, str], object]


def _raw(obj: object, protocol: int) -> Make:
    return lambda meta, folder, cmd: pickle.dumps(obj(cmd) if callable(obj) else obj, protocol)


def _data_payload(meta: Metadata, folder: Path, cmd: str) -> Metadata:
    """The bytes of ``step`` (a torch.save archive in the .distcp file) replaced by one that
    calls os.system: the data files go through the restricted reader too."""
    data = next(folder.glob("*.distcp"))
    start = data.stat().st_size
    with open(data, "ab") as file:
        torch.save(Call(os.system, cmd), file)
    return with_location(meta, "step", offset=start, length=data.stat().st_size - start)


def _symlinked(meta: Metadata, folder: Path, cmd: str) -> Metadata:
    data = next(folder.glob("*.distcp"))
    outside = folder.parent / f"outside-{folder.name}"
    shutil.copy(data, outside)
    data.unlink()
    data.symlink_to(outside)
    return meta


def _missing_file(meta: Metadata, folder: Path, cmd: str) -> Metadata:
    next(folder.glob("*.distcp")).unlink()
    return meta


def _wrong_chunk_data(meta: Metadata, folder: Path, cmd: str) -> Metadata:
    where = meta.storage_data[index(meta, "b")]  # a 5-element int64 tensor
    return with_location(meta, "w", offset=where.offset, length=where.length)


def _duplicate_item(meta: Metadata, folder: Path, cmd: str) -> bytes:
    where = meta.storage_data.pop(index(meta, "w"))
    meta.storage_data[Index("w", (0, 0))] = where  # type: ignore[index]
    meta.storage_data[Index("w", (0, 0))] = where  # type: ignore[index]
    raw = pickle.dumps(meta, protocol=2)
    ours = f"c{Index.__module__}\nIndex\n".encode()
    assert raw.count(ours) == 1
    return raw.replace(ours, b"ctorch.distributed.checkpoint.metadata\nMetadataIndex\n")


def _payload_offset(meta: Metadata, folder: Path, cmd: str) -> Metadata:
    entry = meta.state_dict_metadata["w"]
    assert isinstance(entry, TensorStorageMetadata)
    entry.chunks = [set_field(copy.copy(entry.chunks[0]), "offsets", Call(os.system, cmd))]
    return meta


def _truncated(meta: Metadata, folder: Path, cmd: str) -> bytes:
    raw = (folder / ".metadata").read_bytes()
    return raw[: len(raw) // 2]


def _in_entry(meta: Metadata, folder: Path, cmd: str) -> Metadata:
    meta.state_dict_metadata["w"] = Call(os.system, cmd)  # type: ignore[assignment]
    return meta


def _in_bytes_entry_state(meta: Metadata, folder: Path, cmd: str) -> Metadata:
    meta.state_dict_metadata["step"] = set_field(BytesStorageMetadata(), "x", Call(os.system, cmd))
    return meta


def _properties(meta: Metadata, **fields: Any) -> Metadata:
    entry = meta.state_dict_metadata["w"]
    assert isinstance(entry, TensorStorageMetadata)
    props = TensorProperties(dtype=torch.float32)
    for name, value in fields.items():
        set_field(props, name, value)
    entry.properties = props
    return meta


def _tensor_in_metadata(meta: Metadata, folder: Path, cmd: str) -> Metadata:
    meta.planner_data = {"w": torch.ones(2)}  # pickled by torch's reducers
    return meta


CASES: list[tuple[str, Make, type[Exception]]] = [
    # code execution through globals outside DCP's metadata classes: refused by name
    ("os_system_protocol_0", _raw(lambda c: Call(os.system, c), 0), Unsafe),
    ("os_system_protocol_2", _raw(lambda c: Call(os.system, c), 2), Unsafe),
    ("os_system_protocol_5", _raw(lambda c: Call(os.system, c), 5), Unsafe),
    (
        "builtins_eval",
        _raw(lambda c: Call(builtins.eval, f"__import__('os').system({c!r})"), 4),
        Unsafe,
    ),
    (
        "builtins_exec",
        _raw(lambda c: Call(builtins.exec, f"import os; os.system({c!r})"), 4),
        Unsafe,
    ),
    ("subprocess_popen", _raw(lambda c: Call(subprocess.Popen, c.split()), 4), Unsafe),
    ("subprocess_run", _raw(lambda c: Call(subprocess.run, c.split()), 2), Unsafe),
    ("importlib_import_module", _raw(lambda c: Call(importlib.import_module, "os"), 4), Unsafe),
    ("payload_as_an_entry", _in_entry, Unsafe),
    (
        "payload_in_planner_data",
        lambda m, f, c: set_field(m, "planner_data", {"w": Call(os.system, c)}),
        Unsafe,
    ),
    (
        "payload_as_checkpoint_id",
        lambda m, f, c: set_field(m.storage_meta, "checkpoint_id", Call(os.system, c)) and m,
        Unsafe,
    ),
    (
        "payload_as_a_relative_path",
        lambda m, f, c: with_location(m, "w", relative_path=Call(os.system, c)),
        Unsafe,
    ),
    ("payload_as_a_chunk_offset", _payload_offset, Unsafe),
    ("payload_in_a_record_state", _in_bytes_entry_state, Unsafe),
    ("payload_in_a_data_file_item", _data_payload, Unsafe),
    ("a_tensor_inside_the_metadata", _tensor_in_metadata, Unsafe),
    (
        "ordered_dict_entries",
        lambda m, f, c: set_field(m, "state_dict_metadata", OrderedDict(m.state_dict_metadata)),
        Unsafe,
    ),
    # fields of the wrong type or value
    (
        "entries_as_a_list",
        lambda m, f, c: set_field(m, "state_dict_metadata", list(m.state_dict_metadata)),
        Corrupt,
    ),
    ("size_as_a_list", lambda m, f, c: with_chunks(m, "w", [4, 3], ((0, 0), (4, 3))), Corrupt),
    (
        "negative_size",
        lambda m, f, c: with_chunks(m, "w", torch.Size([-4, 3]), ((0, 0), (4, 3))),
        Corrupt,
    ),
    (
        "int64_overflowing_size",
        lambda m, f, c: with_chunks(m, "w", torch.Size([2**62, 2**62]), ((0, 0), (4, 3))),
        Corrupt,
    ),
    (
        "huge_shape_tiny_chunk",
        lambda m, f, c: with_chunks(m, "w", torch.Size([2**40, 3]), ((0, 0), (4, 3))),
        Corrupt,
    ),
    (
        "chunk_out_of_bounds",
        lambda m, f, c: with_chunks(m, "w", torch.Size([4, 3]), ((2, 0), (4, 3))),
        Corrupt,
    ),
    (
        "chunks_overlap",
        lambda m, f, c: with_chunks(m, "w", torch.Size([4, 3]), ((0, 0), (3, 3)), ((2, 0), (2, 3))),
        Corrupt,
    ),
    (
        "chunks_leave_a_gap",
        lambda m, f, c: with_chunks(m, "w", torch.Size([4, 3]), ((0, 0), (2, 3))),
        Corrupt,
    ),
    (
        "chunk_of_another_rank",
        lambda m, f, c: with_chunks(m, "w", torch.Size([4, 3]), ((0,), (12,))),
        Corrupt,
    ),
    (
        "negative_chunk_offset",
        lambda m, f, c: with_chunks(m, "w", torch.Size([4, 3]), ((-1, 0), (4, 3))),
        Corrupt,
    ),
    (
        "relative_path_parent",
        lambda m, f, c: with_location(m, "w", relative_path="../outside.distcp"),
        Corrupt,
    ),
    (
        "relative_path_absolute",
        lambda m, f, c: with_location(m, "w", relative_path="/etc/passwd"),
        Corrupt,
    ),
    (
        "relative_path_in_a_subfolder",
        lambda m, f, c: with_location(m, "w", relative_path="sub/__0_0.distcp"),
        Corrupt,
    ),
    (
        "relative_path_to_the_metadata",
        lambda m, f, c: with_location(m, "w", relative_path=".metadata"),
        Corrupt,
    ),
    ("data_file_is_a_symlink", _symlinked, Corrupt),
    ("data_file_missing", _missing_file, Corrupt),
    ("storage_offset_past_the_file", lambda m, f, c: with_location(m, "w", offset=10**9), Corrupt),
    ("storage_length_past_the_file", lambda m, f, c: with_location(m, "w", length=10**9), Corrupt),
    ("storage_offset_negative", lambda m, f, c: with_location(m, "w", offset=-5), Corrupt),
    ("storage_length_a_float", lambda m, f, c: with_location(m, "w", length=12.0), Corrupt),
    ("chunk_data_of_another_shape", _wrong_chunk_data, Corrupt),
    ("duplicate_items", _duplicate_item, Corrupt),
    ("dtype_as_text", lambda m, f, c: _properties(m, dtype="float32"), Corrupt),
    ("requires_grad_as_text", lambda m, f, c: _properties(m, requires_grad="yes"), Corrupt),
    ("key_index_not_text", lambda m, f, c: set_field(index(m, "w"), "fqn", 7) and m, Corrupt),
    ("version_as_a_number", lambda m, f, c: set_field(m, "version", 1), Corrupt),
    ("unknown_metadata_field", lambda m, f, c: set_field(m, "evil", 1), Corrupt),
    ("truncated_metadata", _truncated, Corrupt),
    (
        "planner_path_too_deep",
        lambda m, f, c: set_field(
            m, "planner_data", {"w": ("a",) * 10**5, "b": ("b",), "step": ("step",)}
        ),
        Corrupt,
    ),
    (
        "item_behind_an_extension",
        lambda m, f, c: with_location(m, "w", transform_descriptors=["zstd"]),
        Unsupported,
    ),
]


def build(base: Path, tmp_path: Path, make: Make) -> tuple[Path, Path]:
    folder = tmp_path / "ckpt"
    shutil.copytree(base, folder)
    marker = tmp_path / "marker"
    made = make(metadata(folder), folder, f"touch {marker}")
    (folder / ".metadata").write_bytes(made if isinstance(made, bytes) else pickle.dumps(made))
    return folder, marker


@pytest.mark.parametrize(("name", "make", "error"), CASES, ids=[c[0] for c in CASES])
def test_malicious_metadata_is_refused_and_runs_nothing(
    base: Path, tmp_path: Path, name: str, make: Make, error: type[Exception]
) -> None:
    folder, marker = build(base, tmp_path, make)
    for call in (tv.load, tv.verify, lambda p: tv.load_into(torch.nn.Linear(3, 4), p)):
        with pytest.raises(error) as caught:
            call(folder)
        assert isinstance(caught.value, tv.TorchVaultError)
        assert str(folder) in str(caught.value)  # names the file
    report = tv.scan(folder)  # never raises
    if error is Unsafe:
        assert not report.safe
    assert not marker.exists()


def test_a_tensor_in_more_chunks_than_the_limit_is_refused(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvault.legacy import _dcp_metadata

    monkeypatch.setattr(_dcp_metadata, "MAX_CHUNKS", 4)  # 65,536 in earnest; same check
    boxes = [((i, 0), (1, 3)) for i in range(5)]
    folder, _ = build(
        base, tmp_path, lambda m, f, c: with_chunks(m, "w", torch.Size([5, 3]), *boxes)
    )
    with pytest.raises(Corrupt, match="up to 4"):
        tv.load(folder)
    monkeypatch.setattr(_dcp_metadata, "MAX_CHUNKS", 5)  # within it, the data is what is wrong
    with pytest.raises(Corrupt, match=r"\.distcp: the chunk of 'w'"):
        tv.load(folder)


def test_there_are_at_least_30_cases() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", ["os_system_protocol_2", "builtins_exec", "payload_as_an_entry"])
def test_positive_control_the_payloads_run_under_pickle(
    base: Path, tmp_path: Path, name: str
) -> None:
    make = next(c[1] for c in CASES if c[0] == name)
    folder, marker = build(base, tmp_path, make)
    pickle.loads((folder / ".metadata").read_bytes())  # what dcp.load does
    assert marker.exists()


def test_the_untouched_base_folder_loads(base: Path, tmp_path: Path) -> None:
    folder, _ = build(base, tmp_path, lambda m, f, c: m)
    state = tv.load(folder)
    assert isinstance(state, dict)
    assert torch.equal(state["w"], torch.arange(12.0).reshape(4, 3))
    assert state["step"] == 7


def test_a_rewritten_bytes_item_is_read_as_written(base: Path, tmp_path: Path) -> None:
    """The data-file payload case without a payload: the rewriting itself is sound."""

    def benign(meta: Metadata, folder: Path, cmd: str) -> Metadata:
        data = next(folder.glob("*.distcp"))
        start = data.stat().st_size
        with open(data, "ab") as file:
            torch.save({"epoch": 3}, file)
        return with_location(meta, "step", offset=start, length=data.stat().st_size - start)

    folder, _ = build(base, tmp_path, benign)
    assert tv.load(folder)["step"] == {"epoch": 3}
