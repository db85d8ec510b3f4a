"""Checkpoints in memory and in open files: bytes, bytearray, memoryview and file objects."""

from __future__ import annotations

import gzip
import io
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch

import torchvault as tv

STATE = {"w": torch.arange(12.0).reshape(3, 4), "step": 7, "tied": None}
STATE["tied"] = STATE["w"][1]  # a view: sharing must survive as it does through a path


def _saved(obj: object = STATE) -> bytes:
    buffer = io.BytesIO()
    tv.save(obj, buffer)
    return buffer.getvalue()


def _check_state(back: object) -> None:
    assert isinstance(back, dict)
    assert torch.equal(back["w"], STATE["w"])
    assert back["step"] == 7
    assert back["tied"].untyped_storage().data_ptr() == back["w"].untyped_storage().data_ptr()


MEMORY: dict[str, Callable[[bytes], object]] = {
    "bytes": bytes,
    "bytearray": bytearray,
    "memoryview": memoryview,
    "BytesIO": io.BytesIO,
}


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", MEMORY)
def test_load_from_memory(kind: str) -> None:
    _check_state(tv.load(MEMORY[kind](_saved())))


def test_save_to_bytesio_is_the_same_file_as_to_a_path(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    report = tv.save({"w": torch.ones(5)}, buffer)
    tv.save({"w": torch.ones(5)}, tmp_path / "w.tv")
    data = buffer.getvalue()
    assert report.path == "<BytesIO>"
    assert report.file_bytes == len(data) == (tmp_path / "w.tv").stat().st_size
    # the same layout: only the creation time may differ, and it is inside the header
    assert tv.load(data)["w"].tolist() == [1.0] * 5
    assert safetensors.torch.load(data)["w"].tolist() == [1.0] * 5


def test_save_writes_from_the_current_position_and_leaves_it_after(tmp_path: Path) -> None:
    path = tmp_path / "stream.bin"
    with open(path, "wb") as handle:
        handle.write(b"PREFIX")
        tv.save({"a": torch.zeros(3)}, handle)
        first_end = handle.tell()
        tv.save({"b": torch.ones(2)}, handle)
        second_end = handle.tell()
    data = path.read_bytes()
    assert data.startswith(b"PREFIX")
    assert len(data) == second_end
    assert torch.equal(tv.load(data[6:first_end])["a"], torch.zeros(3))
    with open(path, "rb") as handle:
        handle.seek(first_end)
        assert torch.equal(tv.load(handle)["b"], torch.ones(2))
        assert handle.tell() == second_end  # read to its end


def test_load_from_an_open_file_at_its_start(tmp_path: Path) -> None:
    tv.save(STATE, tmp_path / "s.tv")
    with open(tmp_path / "s.tv", "rb") as handle:
        _check_state(tv.load(handle))
        assert handle.tell() == (tmp_path / "s.tv").stat().st_size


def test_load_from_a_gzip_file_object_reads_its_decompressed_bytes(tmp_path: Path) -> None:
    # GzipFile.fileno() is the compressed file's: it must be read, not mapped
    with gzip.open(tmp_path / "s.tv.gz", "wb") as packed:
        packed.write(_saved())
    with gzip.open(tmp_path / "s.tv.gz", "rb") as stream:
        _check_state(tv.load(stream))


class Trickle(io.RawIOBase):
    """A raw stream whose write() takes at most 1000 bytes, as raw writes may."""

    def __init__(self) -> None:
        self.data = io.BytesIO()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, b: object) -> int:
        return self.data.write(memoryview(b).cast("B")[:1000])  # type: ignore[arg-type]

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.data.seek(offset, whence)

    def tell(self) -> int:
        return self.data.tell()


def test_save_to_a_raw_stream_writes_every_byte() -> None:
    raw = Trickle()
    big = {"w": torch.arange(10_000.0), "meta": "x" * 3000}
    tv.save(big, raw)
    back = tv.load(raw.data.getvalue())
    assert torch.equal(back["w"], big["w"])
    assert back["meta"] == big["meta"]


def test_save_to_a_file_in_append_mode_is_a_value_error(tmp_path: Path) -> None:
    with (
        open(tmp_path / "a.tv", "ab") as appending,
        pytest.raises(ValueError, match="`path` is open in append mode"),
    ):
        tv.save(STATE, appending)


def test_load_reads_from_the_position_of_a_bytesio() -> None:
    buffer = io.BytesIO(b"junk" + _saved())
    buffer.seek(4)
    _check_state(tv.load(buffer))


def test_load_from_a_pipe_reads_to_its_end() -> None:
    data = _saved()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child writes; a pipe's buffer is smaller than the file
        os.close(read_fd)
        with open(write_fd, "wb") as out:
            out.write(data)
        os._exit(0)
    os.close(write_fd)
    with open(read_fd, "rb") as stream:
        back = tv.load(stream)
    os.waitpid(pid, 0)
    _check_state(back)


def test_lazy_and_map_location_apply_to_bytes() -> None:
    _check_state(tv.load(_saved(), lazy=True, map_location=None))


def test_plain_safetensors_bytes_load() -> None:
    data = safetensors.torch.save({"x": torch.arange(3)})
    assert torch.equal(tv.load(data)["x"], torch.arange(3))


# ----------------------------------------------------------------------------- memory safety


def test_loaded_tensors_do_not_alias_the_callers_buffer() -> None:
    buffer = bytearray(_saved({"w": torch.zeros(256)}))
    back = tv.load(buffer)
    buffer[-1024:] = b"\xff" * 1024  # the caller reuses its buffer
    assert torch.equal(back["w"], torch.zeros(256))


def test_changing_a_loaded_tensor_leaves_the_callers_buffer() -> None:
    buffer = bytearray(_saved({"w": torch.zeros(256)}))
    before = bytes(buffer)
    tv.load(io.BytesIO(buffer))["w"].add_(1)
    tv.load(buffer)["w"].add_(1)
    assert buffer == before


def test_loaded_tensors_do_not_write_through_to_immutable_bytes() -> None:
    data = _saved({"w": torch.zeros(4)})
    copy = bytes(data)
    tv.load(data)["w"].fill_(5)
    assert data == copy


# ----------------------------------------------------------------------------- untrusted bytes


def test_flipped_bit_in_bytes_is_found_and_names_the_source() -> None:
    data = bytearray(_saved())
    data[-3] ^= 0x01
    with pytest.raises(tv.CorruptCheckpointError, match=r"^<bytearray>: tensor `w`") as info:
        tv.load(data)
    assert info.value.path == "<bytearray>"
    assert "/proc" not in str(info.value)
    with pytest.raises(tv.CorruptCheckpointError, match="<bytearray>"):
        tv.verify(data)


def test_truncated_file_object_is_corrupt_and_named(tmp_path: Path) -> None:
    (tmp_path / "cut.tv").write_bytes(_saved()[:-10])
    with (
        open(tmp_path / "cut.tv", "rb") as handle,
        pytest.raises(tv.CorruptCheckpointError, match="truncated") as info,
    ):
        tv.load(handle)
    assert info.value.path == str(tmp_path / "cut.tv")


def test_a_file_object_left_at_its_end_is_a_value_error_saying_seek() -> None:
    buffer = io.BytesIO()
    tv.save(STATE, buffer)  # the position is now after the file
    with pytest.raises(ValueError, match=r"`path` is a file object at its end.*seek\(0\)"):
        tv.load(buffer)
    buffer.seek(0)
    _check_state(tv.load(buffer))


def test_empty_bytes_are_corrupt() -> None:
    with pytest.raises(tv.CorruptCheckpointError, match="<bytes>"):
        tv.load(b"")


# ----------------------------------------------------------------------------- inspect, verify, load_into


@pytest.mark.parametrize("kind", MEMORY)
def test_inspect_and_verify_from_memory(kind: str) -> None:
    data = _saved()
    info = tv.inspect(MEMORY[kind](data))
    assert info.format == "torchvault"
    assert info.file_bytes == len(data)
    assert info.path == f"<{kind}>"
    report = tv.verify(MEMORY[kind](data))
    assert report.checksummed
    assert report.path == f"<{kind}>"


@pytest.mark.parametrize("kind", ["bytes", "BytesIO"])
def test_load_into_from_memory(kind: str) -> None:
    model = torch.nn.Linear(4, 2)
    data = _saved(model)
    fresh = torch.nn.Linear(4, 2)
    report = tv.load_into(fresh, MEMORY[kind](data))
    assert report.ok
    assert torch.equal(fresh.weight, model.weight)


# ----------------------------------------------------------------------------- torch.save in memory


def test_torch_save_bytes_load_through_the_restricted_reader() -> None:
    buffer = io.BytesIO()
    torch.save({"w": torch.arange(4.0), "epoch": 3}, buffer)
    buffer.seek(0)
    back = tv.load(buffer)
    assert torch.equal(back["w"], torch.arange(4.0))
    assert back["epoch"] == 3
    assert tv.inspect(buffer.getvalue()).format == "torch-zip"


def test_unsafe_pickle_bytes_are_refused_and_named() -> None:
    data = pickle.dumps(os.system, protocol=2)
    with pytest.raises(tv.UnsafeCheckpointError) as info:
        tv.load(data)
    assert info.value.path == "<bytes>"


# ----------------------------------------------------------------------------- wrong arguments


def test_text_mode_file_is_a_type_error(tmp_path: Path) -> None:
    (tmp_path / "s.tv").write_bytes(_saved())
    with (
        open(tmp_path / "s.tv", encoding="latin-1") as text,
        pytest.raises(TypeError, match="`path` is a text-mode file"),
    ):
        tv.load(text)
    with (
        open(tmp_path / "t.tv", "w") as text,
        pytest.raises(TypeError, match="`path` is a text-mode file"),
    ):
        tv.save(STATE, text)


def test_closed_or_wrong_direction_file_objects_are_value_errors(tmp_path: Path) -> None:
    closed = io.BytesIO(_saved())
    closed.close()
    with pytest.raises(ValueError, match="`path` is a closed file object"):
        tv.load(closed)
    with open(tmp_path / "w.bin", "wb") as write_only, pytest.raises(ValueError, match="reading"):
        tv.load(write_only)
    (tmp_path / "r.bin").write_bytes(b"")
    with open(tmp_path / "r.bin", "rb") as read_only, pytest.raises(ValueError, match="writing"):
        tv.save(STATE, read_only)


def test_save_to_a_stream_that_cannot_seek_is_a_value_error() -> None:
    read_fd, write_fd = os.pipe()
    with (
        open(read_fd, "rb"),
        open(write_fd, "wb") as pipe,
        pytest.raises(ValueError, match="`path` is a file object that cannot seek"),
    ):
        tv.save(STATE, pipe)


@pytest.mark.parametrize("bad", [3, None, [b"x"], object()])
def test_wrong_kinds_of_source_are_type_errors_naming_path(bad: object) -> None:
    with pytest.raises(TypeError, match="`path` must be a path"):
        tv.load(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`path` must be a path"):
        tv.inspect(bad)  # type: ignore[arg-type]


def test_bytes_are_not_a_save_destination() -> None:
    with pytest.raises(TypeError, match=r"`path` must be .*io.BytesIO\(\)"):
        tv.save(STATE, b"model.tv")  # type: ignore[arg-type]


def test_non_contiguous_memoryview_is_a_type_error() -> None:
    view = memoryview(bytearray(_saved()))[::2]
    with pytest.raises(TypeError, match="`path` is a memoryview that is not C-contiguous"):
        tv.load(view)
