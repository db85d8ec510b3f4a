"""One contract, every backend: what a run folder may rely on from its storage."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import torchvault as tv
from torchvault import _commit
from torchvault.storage import LocalStorage, MemoryStorage, Storage

Factory = Callable[[Path], Storage]
BACKENDS: dict[str, Factory] = {
    "local": lambda tmp: LocalStorage(tmp / "run"),
    "memory": lambda tmp: MemoryStorage(),
}


@pytest.fixture(params=sorted(BACKENDS))
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    return BACKENDS[request.param](tmp_path)


def test_backends_implement_the_protocol(storage: Storage) -> None:
    assert isinstance(storage, Storage)


def test_put_then_get_returns_the_bytes(storage: Storage) -> None:
    storage.put("objects/ab/abc", [b"hello ", memoryview(b"world")])
    assert storage.get("objects/ab/abc", limit=100) == b"hello world"


def test_put_replaces_an_existing_object(storage: Storage) -> None:
    storage.put("refs/latest.json", [b"old"])
    storage.put("refs/latest.json", [b"new!"])
    assert storage.get("refs/latest.json", limit=100) == b"new!"


def test_get_refuses_objects_over_the_limit(storage: Storage) -> None:
    storage.put("big", [b"x" * 10])
    with pytest.raises(ValueError, match="larger"):
        storage.get("big", limit=9)


def test_missing_objects(storage: Storage) -> None:
    assert storage.size("nope") is None
    with pytest.raises(FileNotFoundError):
        storage.get("nope", limit=10)
    with pytest.raises(FileNotFoundError):
        storage.map("nope")
    storage.delete("nope")  # deleting a missing object is fine


def test_size_and_delete(storage: Storage) -> None:
    storage.put("a/b", [b"12345"])
    assert storage.size("a/b") == 5
    storage.delete("a/b")
    assert storage.size("a/b") is None


def test_list_returns_the_names_under_a_prefix(storage: Storage) -> None:
    for name in ("checkpoints/step-2.json", "checkpoints/step-1.json", "objects/aa/x", "refs/l"):
        storage.put(name, [b"."])
    assert storage.list("checkpoints/") == ["checkpoints/step-1.json", "checkpoints/step-2.json"]
    assert storage.list("objects/") == ["objects/aa/x"]
    assert storage.list("nothing/") == []


def test_map_is_a_private_writable_view(storage: Storage) -> None:
    storage.put("obj", [b"abcd"])
    view = storage.map("obj")
    view[0] = ord("z")
    assert bytes(view) == b"zbcd"
    assert storage.get("obj", limit=10) == b"abcd"


def test_map_of_an_empty_object(storage: Storage) -> None:
    storage.put("empty", [])
    assert len(storage.map("empty")) == 0


def test_lock_is_exclusive_and_released(storage: Storage) -> None:
    with storage.lock(), pytest.raises(tv.RunLockedError), storage.lock():
        pass
    with storage.lock():
        pass


def test_describe_names_the_object(storage: Storage) -> None:
    assert "objects/ab" in storage.describe("objects/ab/abc")


def test_local_names_cannot_escape_the_root(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "run")
    for name in ("../x", "/etc/passwd", "a//b", "a/./b", ""):
        with pytest.raises(ValueError, match="invalid object name"):
            storage.put(name, [b"."])


def test_local_list_skips_temp_files_and_clean_removes_them(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "run")
    storage.put("objects/aa/x", [b"."])
    leftover = tmp_path / "run" / "objects" / "aa" / f".y{_commit.TEMP_MARK}h-1-2"
    leftover.write_bytes(b"partial")
    assert storage.list("objects/") == ["objects/aa/x"]
    storage.clean()
    assert not leftover.exists()


def test_local_put_leaves_no_temp_file_after_a_failure(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "run")
    storage.put("obj", [b"old"])

    def failing() -> Iterator[bytes]:
        yield b"partial"
        raise RuntimeError("the producer failed")

    with pytest.raises(RuntimeError):
        storage.put("obj", failing())
    assert storage.get("obj", limit=10) == b"old"
    assert not [p for p in (tmp_path / "run").iterdir() if _commit.TEMP_MARK in p.name]


def test_describe_of_the_empty_name_is_the_storage_itself(storage: Storage) -> None:
    # a RunStore over a Storage names its run by it (StorageWriter(LocalStorage(...)) failed)
    from torchvault.run._store import RunStore

    assert str(RunStore(storage).root) == storage.describe("")
