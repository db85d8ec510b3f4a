"""The single file: safetensors compatibility, metadata, errors, atomic writes, inspect, verify."""

from __future__ import annotations

import collections
import datetime
import errno
import os
import platform
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import torchvault as tv
import torchvault._format

NATIVE = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
]  # fmt: skip


def state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "encoder.weight": torch.randn(4, 3),
        "encoder.bias": torch.zeros(4, dtype=torch.float16),
        "scale": torch.tensor(0.5, dtype=torch.bfloat16),
        "steps": torch.arange(5),
        "mask": torch.tensor([True, False]),
    }


def data_start(path: Path) -> int:
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
    return 8 + length


def flip_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def temp_files(folder: Path) -> list[str]:
    return [name for name in os.listdir(folder) if ".tvtmp-" in name]


# ----------------------------------------------------------------------------- safetensors


def test_safe_open_reads_every_tensor_of_a_flat_state_dict(tmp_path: Path) -> None:
    path, saved = tmp_path / "model.tv", state_dict()
    tv.save(saved, path)
    with safe_open(path, "pt") as f:
        assert set(f.keys()) == set(saved)
        for key, tensor in saved.items():
            read = f.get_tensor(key)
            assert read.dtype == tensor.dtype
            assert torch.equal(read, tensor)


@settings(
    max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    shapes=st.dictionaries(
        st.text(min_size=1).filter(lambda k: k != "__metadata__"),
        st.tuples(st.sampled_from(NATIVE), st.lists(st.integers(0, 4), max_size=3)),
        max_size=6,
    ),
    transpose=st.booleans(),
)
def test_safe_open_reads_any_flat_state_dict_under_its_own_keys(
    shapes: dict[str, tuple[torch.dtype, list[int]]],
    transpose: bool,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    saved = {}
    for key, (dtype, shape) in shapes.items():
        tensor = torch.randint(0, 2, shape).to(dtype)
        saved[key] = tensor.t() if transpose and tensor.dim() == 2 else tensor
    path = tmp_path_factory.getbasetemp() / "flat.tv"
    tv.save(saved, path)
    with safe_open(path, "pt") as f:
        assert set(f.keys()) == set(saved)
        for key, tensor in saved.items():
            assert torch.equal(f.get_tensor(key), tensor)


def test_user_metadata_is_visible_to_safe_open(tmp_path: Path) -> None:
    path = tmp_path / "model.tv"
    tv.save(state_dict(), path, metadata={"run": "exp1", "epoch": "3"})
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    assert metadata["run"] == "exp1"
    assert metadata["epoch"] == "3"


def test_dtype_safetensors_lacks_is_stored_as_its_bytes(tmp_path: Path) -> None:
    path, tensor = tmp_path / "c.tv", torch.randn(3, dtype=torch.complex128)
    tv.save({"c": tensor}, path)
    with safe_open(path, "pt") as f:
        raw = f.get_tensor("c")
    assert raw.dtype == torch.uint8
    assert torch.equal(raw, tensor.view(torch.uint8))


def test_tensor_named_like_the_metadata_member_stays_readable(tmp_path: Path) -> None:
    path, tensor = tmp_path / "m.tv", torch.ones(2)
    tv.save({"__metadata__": tensor, "w": torch.zeros(1)}, path)
    with safe_open(path, "pt") as f:
        assert torch.equal(f.get_tensor("w"), torch.zeros(1))
    assert torch.equal(tv.load(path)["__metadata__"], tensor)


def test_plain_safetensors_file_loads_as_a_dict_of_tensors(tmp_path: Path) -> None:
    path, saved = tmp_path / "plain.safetensors", state_dict()
    save_file(saved, path)
    loaded = tv.load(path)
    assert type(loaded) is dict
    assert set(loaded) == set(saved)
    for key, tensor in saved.items():
        assert loaded[key].dtype == tensor.dtype
        assert torch.equal(loaded[key], tensor)


def test_inspect_describes_a_plain_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2, 3), "b": torch.zeros(3, dtype=torch.int64)}, path, {"k": "v"})
    info = tv.inspect(path)
    assert info.format == "safetensors"
    assert info.format_version is None
    assert info.metadata == {"k": "v"}
    assert {(t.key, t.dtype, t.shape, t.nbytes) for t in info.tensors} == {
        ("w", "float32", (2, 3), 24),
        ("b", "int64", (3,), 24),
    }


def test_verify_checks_a_plain_safetensors_file_without_checksums(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2, 3), "b": torch.zeros(3, dtype=torch.int64)}, path)
    report = tv.verify(path)
    assert report.checksummed is False
    assert report.tensors == 2
    assert report.checked_bytes == 48


# ----------------------------------------------------------------------------- metadata


def test_metadata_round_trips_through_inspect(tmp_path: Path) -> None:
    path = tmp_path / "m.tv"
    tv.save({"x": 1}, path, metadata={"run": "exp1", "note": "ünïcode"})
    assert tv.inspect(path).metadata == {"run": "exp1", "note": "ünïcode"}


def test_metadata_value_that_is_not_a_string_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"metadata.*str"):
        tv.save({"x": 1}, tmp_path / "m.tv", metadata={"epoch": 3})  # type: ignore[dict-item]


def test_metadata_key_that_is_not_a_string_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="metadata"):
        tv.save({"x": 1}, tmp_path / "m.tv", metadata={3: "three"})  # type: ignore[dict-item]


@pytest.mark.parametrize("key", ["torchvault.tree", "torchvault.mine", "__metadata__"])
def test_reserved_metadata_key_is_rejected(key: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        tv.save({"x": 1}, tmp_path / "m.tv", metadata={key: "v"})
    assert not (tmp_path / "m.tv").exists()


# ----------------------------------------------------------------------------- unsupported types


PlainPoint = collections.namedtuple("PlainPoint", "x y")


def unsupported_error(obj: object, tmp_path: Path) -> tv.UnsupportedTypeError:
    with pytest.raises(tv.UnsupportedTypeError) as info:
        tv.save(obj, tmp_path / "bad.tv")
    return info.value


def test_lambda_error_names_its_dotted_path(tmp_path: Path) -> None:
    obj = {"optimizer": {"state": {3: {"momentum_fn": lambda x: x}}}}
    error = unsupported_error(obj, tmp_path)
    assert error.key == "optimizer.state.3.momentum_fn"
    assert "`optimizer.state.3.momentum_fn`" in str(error)
    assert "function" in str(error)


def test_nested_module_error_says_to_save_its_state_dict(tmp_path: Path) -> None:
    error = unsupported_error({"model": torch.nn.Linear(2, 2)}, tmp_path)
    assert error.key == "model"
    assert "state_dict" in str(error)


def test_set_of_tensors_is_unsupported(tmp_path: Path) -> None:
    error = unsupported_error({"tags": [{torch.zeros(1)}]}, tmp_path)
    assert error.key == "tags.0"
    assert "set" in str(error)


def test_namedtuple_error_suggests_asdict(tmp_path: Path) -> None:
    error = unsupported_error({"point": PlainPoint(1, 2)}, tmp_path)
    assert error.key == "point"
    assert "_asdict" in str(error)


def test_sparse_tensor_error_suggests_to_dense(tmp_path: Path) -> None:
    error = unsupported_error({"s": torch.eye(3).to_sparse()}, tmp_path)
    assert error.key == "s"
    assert "to_dense" in str(error)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_quantized_tensor_error_suggests_dequantize(tmp_path: Path) -> None:
    quantized = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    error = unsupported_error({"q": quantized}, tmp_path)
    assert error.key == "q"
    assert "dequantize" in str(error)


def test_meta_tensor_error_says_it_has_no_data(tmp_path: Path) -> None:
    error = unsupported_error({"m": torch.empty(3, device="meta")}, tmp_path)
    assert error.key == "m"
    assert "meta" in str(error)


def test_object_numpy_array_is_unsupported(tmp_path: Path) -> None:
    error = unsupported_error({"a": np.array([1, "x"], dtype=object)}, tmp_path)
    assert error.key == "a"
    assert "object" in str(error)


def test_tensor_as_dict_key_is_unsupported(tmp_path: Path) -> None:
    error = unsupported_error({"by_tensor": {torch.tensor(1): "one"}}, tmp_path)
    assert error.key == "by_tensor"
    assert "dict key" in str(error)


def test_dict_subclass_is_unsupported(tmp_path: Path) -> None:
    error = unsupported_error({"d": collections.defaultdict(list)}, tmp_path)
    assert error.key == "d"


def test_nesting_deeper_than_the_limit_is_unsupported(tmp_path: Path) -> None:
    deep: list[object] = []
    for _ in range(250):
        deep = [deep]
    assert "nested" in str(unsupported_error(deep, tmp_path))


def test_unsupported_type_error_is_a_type_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        tv.save({"s": range(3)}, tmp_path / "bad.tv")


# ----------------------------------------------------------------------------- loading


def test_save_and_load_accept_str_paths(tmp_path: Path) -> None:
    path = str(tmp_path / "model.tv")
    tv.save({"w": torch.ones(2)}, path)
    assert torch.equal(tv.load(path)["w"], torch.ones(2))


def test_load_of_a_missing_path_raises_checkpoint_not_found(tmp_path: Path) -> None:
    with pytest.raises(tv.CheckpointNotFoundError, match=r"missing\.tv") as info:
        tv.load(tmp_path / "missing.tv")
    assert isinstance(info.value, FileNotFoundError)


def test_load_of_a_folder_raises_checkpoint_not_found(tmp_path: Path) -> None:
    with pytest.raises(tv.CheckpointNotFoundError):
        tv.load(tmp_path)


def test_load_of_a_truncated_file_raises_corrupt_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "model.tv"
    tv.save(state_dict(), path)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(tv.CorruptCheckpointError, match="truncated"):
        tv.load(path)


def test_load_of_a_changed_tensor_byte_names_the_tensor(tmp_path: Path) -> None:
    path = tmp_path / "model.tv"
    tv.save({"weight": torch.randn(8)}, path)
    flip_byte(path, data_start(path))
    with pytest.raises(tv.CorruptCheckpointError, match="weight"):
        tv.load(path)


def test_lazy_load_returns_the_same_values(tmp_path: Path) -> None:
    path, saved = tmp_path / "model.tv", state_dict()
    tv.save(saved, path)
    loaded = tv.load(path, lazy=True)
    for key, tensor in saved.items():
        assert torch.equal(loaded[key], tensor)


def test_lazy_load_skips_data_checksums(tmp_path: Path) -> None:
    path = tmp_path / "model.tv"
    tv.save({"weight": torch.zeros(8, dtype=torch.uint8)}, path)
    flip_byte(path, data_start(path))
    assert tv.load(path, lazy=True)["weight"][0] == 0xFF


def test_load_without_verify_skips_data_checksums(tmp_path: Path) -> None:
    path = tmp_path / "model.tv"
    tv.save({"weight": torch.zeros(8, dtype=torch.uint8)}, path)
    flip_byte(path, data_start(path))
    assert tv.load(path, verify=False)["weight"][0] == 0xFF


def test_changing_a_loaded_tensor_never_changes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "model.tv"
    tv.save({"w": torch.zeros(4)}, path)
    before = path.read_bytes()
    tv.load(path)["w"].add_(1.0)
    assert path.read_bytes() == before
    assert torch.equal(tv.load(path)["w"], torch.zeros(4))


def test_loaded_tensors_keep_their_values_when_the_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "model.tv"
    tv.save({"w": torch.zeros(4)}, path)
    loaded = tv.load(path, lazy=True)
    tv.save({"w": torch.ones(4)}, path)
    assert torch.equal(loaded["w"], torch.zeros(4))


@pytest.mark.parametrize("where", ["cpu", torch.device("cpu"), None, {"cuda:0": "cpu"}])
def test_map_location_to_the_cpu_loads_tensors_on_the_cpu(where: Any, tmp_path: Path) -> None:
    path, saved = tmp_path / "model.tv", state_dict()
    tv.save(saved, path)
    loaded = tv.load(path, map_location=where)
    for key, tensor in saved.items():
        assert loaded[key].device == torch.device("cpu")
        assert torch.equal(loaded[key], tensor)


@pytest.mark.parametrize("where", ["meta", {"cpu": "meta"}], ids=["device", "dict"])
def test_map_location_moves_tensors_to_the_target_device(where: Any, tmp_path: Path) -> None:
    path = tmp_path / "model.tv"
    tv.save({"w": torch.zeros(2, 3), "v": torch.zeros(6)[1:]}, path)
    loaded = tv.load(path, map_location=where)
    assert loaded["w"].device.type == "meta"
    assert loaded["w"].shape == (2, 3)
    assert loaded["v"].device.type == "meta"


def test_map_location_leaves_numpy_arrays_on_the_cpu(tmp_path: Path) -> None:
    path, array = tmp_path / "model.tv", np.arange(3)
    tv.save({"w": torch.zeros(2), "rng": array}, path)
    loaded = tv.load(path, map_location="meta")
    np.testing.assert_array_equal(loaded["rng"], array)


# ----------------------------------------------------------------------------- atomic writes


@pytest.fixture
def old_file(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "model.tv"
    tv.save({"old": torch.arange(4)}, path)
    return path, path.read_bytes()


def failing(exc: BaseException) -> Any:
    def fail(*args: object, **kwargs: object) -> Any:
        raise exc

    return fail


def test_disk_error_while_writing_leaves_the_old_file_and_no_temp(
    old_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, before = old_file
    monkeypatch.setattr(torchvault._format, "write_blobs", failing(OSError(errno.ENOSPC, "full")))
    with pytest.raises(tv.CheckpointWriteError, match="disk is full") as info:
        tv.save({"new": torch.ones(4)}, path)
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert temp_files(path.parent) == []


def test_non_os_error_while_writing_propagates_and_leaves_the_old_file(
    old_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, before = old_file
    monkeypatch.setattr(torchvault._format, "write_blobs", failing(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        tv.save({"new": torch.ones(4)}, path)
    assert path.read_bytes() == before
    assert temp_files(path.parent) == []


def test_interrupt_while_writing_leaves_the_old_file_and_no_temp(
    old_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, before = old_file
    monkeypatch.setattr(torchvault._format, "write_blobs", failing(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        tv.save({"new": torch.ones(4)}, path)
    assert path.read_bytes() == before
    assert temp_files(path.parent) == []


def test_failed_fsync_leaves_the_old_file_and_no_temp(
    old_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, before = old_file
    monkeypatch.setattr(os, "fsync", failing(OSError(errno.EIO, "I/O error")))
    with pytest.raises(tv.CheckpointWriteError):
        tv.save({"new": torch.ones(4)}, path)
    assert path.read_bytes() == before
    assert temp_files(path.parent) == []


def test_unsupported_value_leaves_the_old_file_and_no_temp(old_file: tuple[Path, bytes]) -> None:
    path, before = old_file
    with pytest.raises(tv.UnsupportedTypeError):
        tv.save({"new": torch.ones(4), "bad": object()}, path)
    assert path.read_bytes() == before
    assert temp_files(path.parent) == []


def test_failed_first_save_creates_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torchvault._format, "write_blobs", failing(OSError(errno.EIO, "I/O")))
    with pytest.raises(tv.CheckpointWriteError):
        tv.save({"w": torch.ones(4)}, tmp_path / "new.tv")
    assert os.listdir(tmp_path) == []


def test_save_writes_through_a_temp_file_beside_the_destination(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[str]] = []
    write_blobs = torchvault._format.write_blobs

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(temp_files(tmp_path))
        return write_blobs(*args, **kwargs)

    monkeypatch.setattr(torchvault._format, "write_blobs", spy)
    tv.save({"w": torch.ones(4)}, tmp_path / "model.tv")
    assert len(seen) == 1
    assert len(seen[0]) == 1
    assert temp_files(tmp_path) == []


def test_save_replaces_an_existing_file(old_file: tuple[Path, bytes]) -> None:
    path, _ = old_file
    tv.save({"new": torch.ones(2)}, path)
    assert list(tv.load(path)) == ["new"]


def test_save_into_a_missing_folder_raises_a_write_error(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "model.tv"
    with pytest.raises(tv.CheckpointWriteError, match="does not exist") as info:
        tv.save({"w": torch.ones(2)}, path)
    assert isinstance(info.value, OSError)
    assert info.value.errno == errno.ENOENT
    assert not path.parent.exists()


def test_save_onto_a_folder_raises_a_write_error(tmp_path: Path) -> None:
    with pytest.raises(tv.CheckpointWriteError, match="folder"):
        tv.save({"w": torch.ones(2)}, tmp_path)


@pytest.fixture
def umask() -> Iterator[Any]:
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_file_gets_the_usual_mode_under_the_umask(
    mask: int, mode: int, umask: Any, tmp_path: Path
) -> None:
    umask(mask)
    path = tmp_path / "model.tv"
    tv.save({"w": torch.ones(2)}, path)
    assert path.stat().st_mode & 0o777 == mode


# ----------------------------------------------------------------------------- inspect and verify


def test_inspect_lists_every_tensor_with_dtype_shape_and_size(tmp_path: Path) -> None:
    path = tmp_path / "model.tv"
    tv.save({"enc": {"w": torch.zeros(2, 3), "h": torch.zeros(4, dtype=torch.float16)}}, path)
    info = tv.inspect(path)
    assert [(t.key, t.dtype, t.shape, t.nbytes) for t in info.tensors] == [
        ("enc.w", "float32", (2, 3), 24),
        ("enc.h", "float16", (4,), 8),
    ]


def test_inspect_reports_format_versions_and_creation_time(tmp_path: Path) -> None:
    path = tmp_path / "model.tv"
    tv.save({"w": torch.zeros(2)}, path, metadata={"run": "a"})
    info = tv.inspect(path)
    assert info.format == "torchvault"
    assert info.format_version == 1
    assert info.metadata == {"run": "a"}
    assert info.file_bytes == path.stat().st_size
    assert info.versions["torch"] == torch.__version__
    assert info.versions["torchvault"] == tv.__version__
    assert info.versions["python"] == platform.python_version()
    assert info.created is not None
    created = datetime.datetime.fromisoformat(info.created)
    assert created.utcoffset() == datetime.timedelta(0)


def test_inspect_describes_views_and_numpy_arrays(tmp_path: Path) -> None:
    path, buf = tmp_path / "model.tv", torch.zeros(6, dtype=torch.complex128)
    tv.save({"buf": buf, "view": buf[2:], "np": np.zeros(3, dtype=">i4")}, path)
    info = tv.inspect(path)
    assert [(t.key, t.dtype, t.shape) for t in info.tensors] == [
        ("buf", "complex128", (6,)),
        ("view", "complex128", (4,)),
        ("np", "int32", (3,)),
    ]


def test_verify_reports_a_good_file_as_checksummed(tmp_path: Path) -> None:
    path, saved = tmp_path / "model.tv", state_dict()
    tv.save(saved, path)
    report = tv.verify(path)
    assert report.checksummed is True
    assert report.tensors == len(saved)
    assert report.checked_bytes == sum(t.numel() * t.element_size() for t in saved.values())


def test_verify_names_the_tensor_whose_bytes_changed(tmp_path: Path) -> None:
    path = tmp_path / "model.tv"
    tv.save({"weight": torch.randn(8)}, path)
    flip_byte(path, data_start(path))
    with pytest.raises(tv.CorruptCheckpointError, match="weight"):
        tv.verify(path)


def test_verify_rejects_a_changed_header_byte(tmp_path: Path) -> None:
    path = tmp_path / "model.tv"
    tv.save({"weight": torch.randn(8)}, path, metadata={"run": "marker-x"})
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b"marker-x", b"marker-y"))
    with pytest.raises(tv.CorruptCheckpointError, match="header"):
        tv.verify(path)
