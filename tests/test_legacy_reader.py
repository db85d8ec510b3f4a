"""The restricted reader's own guarantees: fault injection on torch.save files (truncation,
bit flips, fuzzing), the anti-patterns of security anchor section 3 (no unsafe fallback,
no process-wide state, nothing imported), salvage, model folders and convert's aliases.

The malicious-sample corpus lives in test_legacy_attacks.py and the real-library files in
test_legacy_interop.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import struct
import sys
import tarfile
import threading
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchvault as tv
from torchvault.legacy import _allowlist, _reader, _unpickler

FAST = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
SOAK = settings(max_examples=20_000, deadline=None, suppress_health_check=list(HealthCheck))


def _state() -> dict[str, object]:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return OrderedDict(
        weight=base,
        column=base[:, 2],
        half=torch.ones(3, dtype=torch.float16),
        step=torch.tensor(7),
        meta={"lr": 0.1, "betas": (0.9, 0.999), "name": "adamw"},
    )


@pytest.fixture(scope="module")
def small_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("legacy")
    files = {"zip": folder / "state.pt", "stacked": folder / "state-legacy.pt"}
    torch.save(_state(), files["zip"])
    torch.save(_state(), files["stacked"], _use_new_zipfile_serialization=False)
    return files


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))  # type: ignore[arg-type]
    return a == b


@pytest.mark.parametrize("kind", ["zip", "stacked"])
def test_reads_both_torch_formats_exactly(small_files: dict[str, Path], kind: str) -> None:
    got = tv.load_legacy(small_files[kind])
    assert _same(torch.load(small_files[kind], weights_only=True), got)
    assert isinstance(got, OrderedDict)
    assert got["column"].untyped_storage().data_ptr() == got["weight"].untyped_storage().data_ptr()


def _zip_boundaries(data: bytes) -> set[int]:
    """Every structural offset of a zip: local headers, data starts and ends, descriptors,
    central directory entries, ZIP64 records and the end record."""
    marks = {0, len(data)}
    for signature in (
        b"PK\x03\x04",
        b"PK\x07\x08",
        b"PK\x01\x02",
        b"PK\x06\x06",
        b"PK\x06\x07",
        b"PK\x05\x06",
    ):
        at = data.find(signature)
        while at >= 0:
            marks.add(at)
            at = data.find(signature, at + 1)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            start = (
                info.header_offset
                + 30
                + len(info.filename.encode())
                + _local_extra(data, info.header_offset)
            )
            marks.update((start, start + info.file_size))
    return marks


def _local_extra(data: bytes, offset: int) -> int:
    (extra,) = struct.unpack_from("<H", data, offset + 28)
    return int(extra)


def _lengths(data: bytes, boundaries: set[int]) -> list[int]:
    lengths = {0, 1, 7, 8, 9, 15, 16}
    for mark in boundaries:
        lengths.update((mark - 1, mark, mark + 1))
    lengths.update(range(0, len(data), max(1, len(data) // 64)))
    return sorted(n for n in lengths if 0 <= n < len(data))


@pytest.mark.parametrize("kind", ["zip", "stacked"])
def test_every_truncation_is_a_typed_error(
    small_files: dict[str, Path], kind: str, tmp_path: Path
) -> None:
    data = small_files[kind].read_bytes()
    boundaries = _zip_boundaries(data) if kind == "zip" else {0, len(data)}
    lengths = _lengths(data, boundaries)
    assert len(lengths) >= 60
    for length in lengths:
        cut = tmp_path / f"cut-{length}.pt"
        cut.write_bytes(data[:length])
        with pytest.raises(tv.TorchVaultError):
            tv.load_legacy(cut)


def _entry_bytes(data: bytes) -> set[int]:
    """The offsets of every entry's stored bytes (the pickle, the tensors, the records)."""
    covered: set[int] = set()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            start = (
                info.header_offset
                + 30
                + len(info.filename)
                + _local_extra(data, info.header_offset)
            )
            covered.update(range(start, start + info.file_size))
    return covered


def test_every_bit_flip_is_detected_or_harmless(
    small_files: dict[str, Path], tmp_path: Path
) -> None:
    """A flipped bit in any entry's bytes is always an error (the CRC); anywhere else
    (timestamps, alignment padding) it is an error or leaves the loaded values
    bit-identical. torch.load checks no CRC at all."""
    data = bytearray(small_files["zip"].read_bytes())
    expected = torch.load(small_files["zip"], weights_only=True)
    stored = _entry_bytes(bytes(data))
    rng = random.Random(4)
    positions = [(i // 8, i % 8) for i in range(512)]
    positions += [(rng.randrange(len(data)), rng.randrange(8)) for _ in range(256)]
    positions += [(rng.choice(sorted(stored)), rng.randrange(8)) for _ in range(256)]
    for offset, bit in positions:
        data[offset] ^= 1 << bit
        flipped = tmp_path / "flip.pt"
        flipped.write_bytes(data)
        data[offset] ^= 1 << bit
        try:
            got = tv.load_legacy(flipped)
        except tv.TorchVaultError:
            continue
        assert offset not in stored, f"bit {bit} of stored byte {offset} went undetected"
        assert _same(expected, got), f"bit {bit} of byte {offset} changed the data silently"


def test_a_flipped_tensor_byte_names_the_entry_and_the_crc(
    small_files: dict[str, Path], tmp_path: Path
) -> None:
    data = bytearray(small_files["zip"].read_bytes())
    with zipfile.ZipFile(small_files["zip"]) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    start = (
        info.header_offset + 30 + len(info.filename) + _local_extra(bytes(data), info.header_offset)
    )
    data[start + 5] ^= 0x10
    flipped = tmp_path / "flip.pt"
    flipped.write_bytes(data)
    with pytest.raises(tv.CorruptCheckpointError, match=r"data/0.*CRC-32") as caught:
        tv.load_legacy(flipped)
    assert caught.value.path == str(flipped)


def test_zip_entries_must_be_stored_not_compressed(tmp_path: Path) -> None:
    source = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(1000)}, source)
    deflated = tmp_path / "deflated.pt"
    with (
        zipfile.ZipFile(source) as src,
        zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst,
    ):
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    with pytest.raises(tv.UnsupportedFormatError, match="compressed"):
        tv.load_legacy(deflated)


def test_junk_before_or_after_the_archive_is_refused(
    small_files: dict[str, Path], tmp_path: Path
) -> None:
    data = small_files["zip"].read_bytes()
    for name, body in (("prefix", b"\x80\x02junk" + data), ("suffix", data + b"tail")):
        path = tmp_path / f"{name}.pt"
        path.write_bytes(body)
        with pytest.raises(tv.TorchVaultError):
            tv.load_legacy(path)


# -- anti-patterns ---------------------------------------------------------------------------


def _evil_pickle(module: str, name: str, marker: Path) -> bytes:
    return (
        b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\nq\x00X"
        + struct.pack("<I", len(f"touch {marker}")) + f"touch {marker}".encode() + b"\x85R."
    )  # fmt: skip


def test_no_unsafe_loader_is_ever_called(
    small_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: object, **kwargs: object) -> object:
        raise AssertionError("an unsafe loader was called")

    for target, name in ((torch, "load"), (torch.jit, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(target, name, forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    tv.load_legacy(small_files["zip"])
    evil = tmp_path / "evil.pt"
    evil.write_bytes(_evil_pickle("os", "system", tmp_path / "marker"))
    with pytest.raises(tv.UnsafeCheckpointError):
        tv.load_legacy(evil)
    assert not (tmp_path / "marker").exists()


def test_force_unsafe_environment_variables_are_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0")
    evil = tmp_path / "evil.pt"
    evil.write_bytes(_evil_pickle("os", "system", tmp_path / "marker"))
    with pytest.raises(tv.UnsafeCheckpointError, match=r"os\.system"):
        tv.load_legacy(evil)
    assert not (tmp_path / "marker").exists()


def test_a_refused_name_is_never_imported(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pt"
    module = "torchvault_test_module_that_must_not_be_imported"
    evil.write_bytes(_evil_pickle(module, "run", tmp_path / "marker"))
    before = set(sys.modules)
    with pytest.raises(tv.UnsafeCheckpointError) as caught:
        tv.load_legacy(evil)
    assert caught.value.global_name == f"{module}.run"
    assert module not in sys.modules
    assert set(sys.modules) - before == set()


@pytest.mark.filterwarnings("ignore:.*the pickle calls os.system:UserWarning")  # salvage says so
def test_concurrent_loads_share_no_state(small_files: dict[str, Path], tmp_path: Path) -> None:
    """A salvage (permissive) read in one thread never makes a strict read in another
    accept a refused name: each call has its own table."""
    evil = tmp_path / "evil.pt"
    evil.write_bytes(_evil_pickle("os", "system", tmp_path / "marker"))
    failures: list[str] = []

    def strict() -> None:
        for _ in range(50):
            try:
                tv.load_legacy(evil)
                failures.append("a strict load accepted os.system")
            except tv.UnsafeCheckpointError:
                pass
            tv.load_legacy(small_files["zip"])

    def permissive() -> None:
        for _ in range(50):
            tv.scan(evil)
            with contextlib.suppress(tv.TorchVaultError):
                tv.load_legacy(evil, salvage=True)

    threads = [threading.Thread(target=strict), threading.Thread(target=permissive)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert not (tmp_path / "marker").exists()


# -- fuzzing ---------------------------------------------------------------------------------


def _run_bytes(data: bytes, tmp_path: Path) -> None:
    path = tmp_path / "fuzz.pt"
    path.write_bytes(data)
    with contextlib.suppress(tv.TorchVaultError):
        tv.load_legacy(path)
    report = tv.scan(path)
    assert isinstance(report.safe, bool)


def _mutations() -> st.SearchStrategy[list[tuple[int, int]]]:
    return st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=8)


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for offset, value in edits:
        out[offset % len(out)] = value
    return bytes(out)


def _seed(kind: str) -> bytes:
    buffer = io.BytesIO()
    torch.save(_state(), buffer, _use_new_zipfile_serialization=kind == "zip")
    return buffer.getvalue()


@FAST
@given(edits=_mutations())
def test_fuzz_mutated_zip_files_give_typed_errors(
    edits: list[tuple[int, int]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    _run_bytes(_mutate(_SEEDS["zip"], edits), tmp_path_factory.mktemp("fz"))


@FAST
@given(edits=_mutations())
def test_fuzz_mutated_pickles_give_typed_errors(
    edits: list[tuple[int, int]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    _run_bytes(_mutate(_SEEDS["stacked"], edits), tmp_path_factory.mktemp("fp"))


@FAST
@given(data=st.binary(min_size=1, max_size=512))
def test_fuzz_random_opcode_streams_never_escape(data: bytes) -> None:
    def refuse(*args: object) -> object:
        raise tv.UnsafeCheckpointError("refused", global_name=None)

    with contextlib.suppress(tv.TorchVaultError):
        _unpickler.Unpickler(b"\x80\x02" + data, resolve=refuse, persistent_load=refuse).load()


@pytest.mark.soak
@SOAK
@given(edits=_mutations(), kind=st.sampled_from(["zip", "stacked"]))
def test_soak_fuzz_mutated_torch_files(
    edits: list[tuple[int, int]], kind: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    _run_bytes(_mutate(_SEEDS[kind], edits), tmp_path_factory.mktemp("soak"))


_SEEDS = {"zip": _seed("zip"), "stacked": _seed("stacked")}


# -- salvage ---------------------------------------------------------------------------------


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
        self.head = torch.nn.Linear(4, 2)
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


def test_salvage_recovers_the_state_dict_of_a_pickled_model(tmp_path: Path) -> None:
    model = _Net()
    path = tmp_path / "model.pt"
    torch.save(model, path)
    with pytest.raises(tv.UnsafeCheckpointError, match="salvage=True"):
        tv.load_legacy(path)
    report = tv.load_legacy(path, salvage=True)
    expected = model.state_dict()
    assert list(report.state_dict) == list(expected)
    assert all(torch.equal(report.state_dict[k], v) for k, v in expected.items())  # type: ignore[arg-type]
    assert f"{__name__}._Net" in report.classes
    assert "torch.nn.modules.conv.Conv2d" in report.classes


class _Payload:
    """Pickles as a call of os.system; torch.save writes it without running anything."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_salvage_of_a_clean_model_is_safe_and_silent(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(_Net(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = tv.load_legacy(path, salvage=True)
    assert report.safe
    assert report.unsafe == ()


def test_salvage_of_a_file_that_calls_unsafe_globals_says_so(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "model.pt"
    torch.save({"model": _Net(), "hook": _Payload(marker)}, path)
    with pytest.warns(UserWarning, match=r"model\.pt.*posix\.system") as caught:
        report = tv.load_legacy(path, salvage=True)
    assert len(caught) == 1
    assert not marker.exists()
    assert not report.safe
    assert report.unsafe == ("posix.system",)
    assert "posix.system" not in report.classes
    assert f"{__name__}._Net" in report.classes
    assert set(report.state_dict) == {f"model.{k}" for k in _Net().state_dict()}


# -- model folders and convert ---------------------------------------------------------------


def test_a_shard_index_pointing_outside_the_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    tv.save({"w": torch.ones(2)}, folder / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {"w": "../model-00001-of-00001.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(tv.CorruptCheckpointError, match="weight_map"):
        tv.load(folder)


def test_a_shard_missing_a_listed_tensor_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    tv.convert(_write_state(tmp_path), folder, to="hf", max_shard_size=1)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost"] = next(iter(index["weight_map"].values()))
    index_path.write_text(json.dumps(index))
    with pytest.raises(tv.CorruptCheckpointError, match="ghost"):
        tv.load(folder)


def _write_state(tmp_path: Path) -> Path:
    path = tmp_path / "tied.pt"
    embed = torch.randn(5, 3)
    torch.save({"embed.weight": embed, "head.weight": embed, "head.bias": torch.zeros(5)}, path)
    return path


@pytest.mark.parametrize("to", ["hf", "safetensors"])
def test_convert_stores_tied_weights_once_and_records_the_alias(tmp_path: Path, to: str) -> None:
    source = _write_state(tmp_path)
    out = tmp_path / ("out" if to == "hf" else "out.safetensors")
    report = tv.convert(source, out, to=to)  # type: ignore[arg-type]
    assert report.aliases == (("head.weight", "embed.weight"),)
    assert report.tensors == 2
    if to == "hf":
        state = tv.load(out)
        assert isinstance(state, dict)
        assert torch.equal(state["head.weight"], state["embed.weight"])
        assert state["head.weight"] is state["embed.weight"]


def test_convert_refuses_nested_state_for_safetensors(tmp_path: Path) -> None:
    source = tmp_path / "nested.pt"
    torch.save({"model": {"w": torch.ones(1)}, "epoch": 3}, source)
    with pytest.raises(tv.UnsupportedTypeError, match="to='torchvault'"):
        tv.convert(source, tmp_path / "out.safetensors", to="safetensors")
    report = tv.convert(source, tmp_path / "out.tv")
    assert _same(tv.load(tmp_path / "out.tv"), torch.load(source, weights_only=True))
    assert report.tensors == 1


def test_scan_of_a_pickle_lists_globals_without_running_them(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(_evil_pickle("posix", "system", tmp_path / "marker"))
    report = tv.scan(evil)
    assert not report.safe
    assert report.unsafe_globals == ("posix.system",)
    assert not (tmp_path / "marker").exists()
    assert os.listdir(tmp_path) == ["evil.pkl"]


# -- the tar format of torch < 0.4 -----------------------------------------------------------


def _write_tar(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A checkpoint in the tar layout torch < 0.4 wrote (torch.load still reads it)."""

    def dump(obj: object, out: io.BytesIO) -> None:
        pickle.dump(obj, out, protocol=2)

    storages, records = io.BytesIO(), io.BytesIO()
    dump(len(tensors), storages)
    dump(len(tensors), records)
    for index, tensor in enumerate(tensors.values()):
        dump((index, "cpu", torch.FloatStorage), storages)
        storages.write(struct.pack("<q", tensor.numel()) + tensor.numpy().tobytes())
        dump((100 + index, index, torch.FloatTensor), records)
        records.write(struct.pack("<ii", tensor.dim(), 0))
        records.write(struct.pack(f"<{tensor.dim()}q", *tensor.shape))
        records.write(struct.pack(f"<{tensor.dim()}q", *tensor.stride()) + struct.pack("<q", 0))
    dump([], storages)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> str | None:
            for index, tensor in enumerate(tensors.values()):
                if obj is tensor:
                    return str(100 + index)
            return None

    main = io.BytesIO()
    Pickler(main, protocol=2).dump(dict(tensors))
    info = io.BytesIO()
    dump({"protocol_version": 1000, "little_endian": True}, info)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for name, body in (
            ("sys_info", info),
            ("pickle", main),
            ("tensors", records),
            ("storages", storages),
        ):
            member = tarfile.TarInfo(name)
            member.size = len(body.getvalue())
            archive.addfile(member, io.BytesIO(body.getvalue()))


def test_reads_the_tar_format_of_old_torch(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    tensors = {"w": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.float32)}
    _write_tar(path, tensors)
    reference = torch.load(path, weights_only=False)
    got = tv.load_legacy(path)
    assert _same(reference, got)
    assert _same(tensors, got)
    assert _same(tensors, tv.load(path))
    assert tv.scan(path).safe
    assert tv.scan(path).format == "torch-tar"


def test_a_tar_tensor_past_its_storage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    _write_tar(path, {"w": torch.randn(3, 4)})
    data = bytearray(path.read_bytes())
    sizes = struct.pack("<2q", 3, 4)
    at = data.find(sizes)
    data[at : at + 16] = struct.pack("<2q", 300, 4)
    path.write_bytes(data)
    with pytest.raises(tv.CorruptCheckpointError, match="reaches past"):
        tv.load_legacy(path)


def test_scanning_a_folder_reads_every_checkpoint_by_content_at_any_depth(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model_best.pth.tar").write_bytes(_evil_pickle("os", "system", tmp_path / "m"))
    torch.save({"w": torch.ones(1)}, tmp_path / "sub" / "weights.data")
    report = tv.scan(tmp_path)
    assert sorted(os.path.relpath(f, tmp_path) for f in report.files) == [
        "model_best.pth.tar",
        os.path.join("sub", "weights.data"),
    ]
    assert report.unsafe_globals == ("os.system",)


def _payload_pickle(protocol: int, marker: Path) -> bytes:
    """``posix.system("touch marker")`` as a binary pickle of ``protocol``, as DCP's pickle.dump
    writes ``.metadata``: PROTO, GLOBAL, a string, TUPLE1, REDUCE, STOP."""
    command = f"touch {marker}".encode()
    return (
        bytes([0x80, protocol]) + b"cposix\nsystem\n"
        + b"X" + struct.pack("<I", len(command)) + command + b"\x85R."
    )  # fmt: skip


@pytest.mark.parametrize("name", [".metadata", ".hidden.pt", "state", "rng_state"])
def test_scanning_a_folder_reads_every_pickle_whatever_its_name(tmp_path: Path, name: str) -> None:
    """A DCP folder: safe-looking tensor files, and a ``.metadata`` pickle that
    torch.distributed.checkpoint loads with pickle.load."""
    marker = tmp_path / "marker"
    torch.save({"w": torch.ones(1)}, tmp_path / "model.pt")
    (tmp_path / name).write_bytes(_payload_pickle(4, marker))
    report = tv.scan(tmp_path)
    assert str(tmp_path / name) in report.files
    assert not report.safe
    assert "posix.system" in report.unsafe_globals
    assert not marker.exists()


def test_scanning_a_dcp_metadata_file_names_its_globals(tmp_path: Path) -> None:
    path = tmp_path / ".metadata"
    path.write_bytes(_payload_pickle(5, tmp_path / "marker"))
    report = tv.scan(path)
    assert report.unsafe_globals == ("posix.system",)
    with pytest.raises(tv.UnsupportedFormatError, match=r"torch\.distributed\.checkpoint"):
        tv.load_legacy(path)  # loading it stays refused


def test_scanning_a_folder_skips_text_that_merely_starts_like_a_protocol_0_pickle(
    tmp_path: Path,
) -> None:
    torch.save({"w": torch.ones(1)}, tmp_path / "model.pt")
    (tmp_path / "NOTES").write_text("I trained this for 3 epochs\n")
    (tmp_path / ".gitignore").write_text("(build)\n")
    report = tv.scan(tmp_path)
    assert report.safe, report.anomalies
    assert report.files == (str(tmp_path / "model.pt"),)


def test_scanning_a_folder_without_checkpoints_vouches_for_nothing(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("no weights here")
    report = tv.scan(tmp_path)
    assert not report.safe
    assert report.files == ()


def test_convert_into_a_used_folder_removes_the_old_weights(tmp_path: Path) -> None:
    source = tmp_path / "ones.pt"
    torch.save({"w": torch.ones(64), "v": torch.ones(64)}, source)
    folder = tmp_path / "hf"
    tv.convert(_write_state(tmp_path), folder, to="hf", max_shard_size=1)
    tv.convert(source, folder, to="hf")
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors"]
    state = tv.load(folder)
    assert isinstance(state, dict)
    assert set(state) == {"w", "v"}


def test_a_pipe_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    for call in (tv.load_legacy, tv.load, tv.inspect):
        with pytest.raises(tv.UnsupportedFormatError, match="not a regular file"):
            call(fifo)  # type: ignore[operator]
    assert not tv.scan(fifo).safe


def test_verify_reads_a_torch_file_and_checks_its_crcs(
    small_files: dict[str, Path], tmp_path: Path
) -> None:
    report = tv.verify(small_files["zip"])
    assert (report.tensors, report.checksummed) == (4, True)
    assert not tv.verify(small_files["stacked"]).checksummed
    data = bytearray(small_files["zip"].read_bytes())
    data[sorted(_entry_bytes(bytes(data)))[-1]] ^= 1
    (tmp_path / "bad.pt").write_bytes(data)
    with pytest.raises(tv.CorruptCheckpointError, match="CRC-32"):
        tv.verify(tmp_path / "bad.pt")


def test_verify_checks_every_shard_of_a_model_folder(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    tv.convert(_write_state(tmp_path), folder, to="hf", max_shard_size=1)
    report = tv.verify(folder)
    assert report.tensors == 3  # the tied alias is a name of its own
    assert report.checked_bytes == 80


# -- structured fuzzing of the allowlist's handlers ------------------------------------------

_NAMES = [
    *sorted(name for name in _allowlist.table(_allowlist.Context(lambda _: torch.device("cpu")))),
    "os.system",
    "builtins.getattr",
    "torch.nn.modules.linear.Linear",
]
_TOKENS = [
    b"N", b"\x88", b"\x89", b"K\x00", b"K\x03", b"J\xff\xff\xff\xff", b"M\x00\x01",
    b"X\x01\x00\x00\x00a", b"X\x06\x00\x00\x00latin1", b"X\x07\x00\x00\x00storage",
    b"X\x03\x00\x00\x00cpu", b"X\x01\x00\x00\x000", b"C\x04abcd", b"G" + struct.pack(">d", 0.5),
    b")", b"}", b"]", b"(", b"t", b"\x85", b"\x86", b"\x87", b"R", b"b", b"u", b"e", b"s",
    b"a", b"\x81", b"Q", b"0", b"2", b"q\x00", b"h\x00", b"q\x01", b"h\x01", b"\x94",
    *(b"c" + n.rsplit(".", 1)[0].encode() + b"\n" + n.rsplit(".", 1)[1].encode() + b"\n" for n in _NAMES),
]  # fmt: skip


def _run_tokens(tokens: list[bytes], permissive: bool) -> None:
    session = _reader.Session("fuzz.pt", permissive=permissive)
    try:
        obj, _ = session.unpickle(b"\x80\x02" + b"".join(tokens) + b".", 0, legacy_ids=False)
        for storage in session.storages.values():
            if storage.nbytes > 1 << 20:
                return
            storage.data = torch.zeros(storage.nbytes, dtype=torch.uint8)
        session.finish(obj)
    except tv.TorchVaultError:
        pass


@FAST
@given(tokens=st.lists(st.sampled_from(_TOKENS), max_size=40), permissive=st.booleans())
def test_fuzz_allowed_globals_with_random_arguments_give_typed_errors(
    tokens: list[bytes], permissive: bool
) -> None:
    _run_tokens(tokens, permissive)


@pytest.mark.soak
@SOAK
@given(tokens=st.lists(st.sampled_from(_TOKENS), max_size=80), permissive=st.booleans())
def test_soak_fuzz_allowed_globals(tokens: list[bytes], permissive: bool) -> None:
    _run_tokens(tokens, permissive)


def test_scanning_a_run_folder_verifies_its_checkpoints(tmp_path: Path) -> None:
    model = torch.nn.Linear(64, 64)
    with tv.CheckpointManager(tmp_path / "run") as manager:
        for step in range(3):
            manager.save(step, model=model)
    report = tv.scan(tmp_path / "run")
    assert (report.format, report.safe, len(report.files)) == ("run", True, 3)
    blob = next((tmp_path / "run" / "objects").iterdir())
    data = bytearray(blob.read_bytes())
    data[5] ^= 1
    blob.write_bytes(data)
    damaged = tv.scan(tmp_path / "run")
    assert not damaged.safe
    assert "checksum" in damaged.anomalies[0]
