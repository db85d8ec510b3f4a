"""Fault injection on the writer: every I/O call of a save can fail, and a save can be killed.

The promise under test (anchors-security.md section 4, F2, F6, F8): a failed or interrupted
save raises a typed error (``tv.CheckpointWriteError``, an OSError with the errno kept),
leaves the previous file byte-identical and no temp file behind, and the next save works.
A save killed with SIGKILL leaves the old file or the new one, never a damaged one.

I/O is intercepted by replacing the ``os`` module seen by ``torchvault._commit`` with a
proxy that numbers every call (open, write, seek, flush, fsync, close, rename, on the
buffered handle and on the raw file under it) and fails the k-th one, for every k.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import random
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pytest
import torch

import attack_files as af
import torchvault as tv
from torchvault import _commit, _freeing

TEMP_MARK = ".tvtmp-"


def old_state() -> dict[str, Any]:
    return {"w": torch.zeros(32, 32), "b": torch.arange(100), "step": 0}


def new_state() -> dict[str, Any]:
    return {
        "w": torch.ones(32, 32),
        "b": torch.arange(100) + 1,
        "odd": torch.arange(7, dtype=torch.uint8),
        "h": torch.full((5,), 2.5, dtype=torch.bfloat16),
        "step": 1,
    }


# ----------------------------------------------------------------------------- the fault proxy


class Faults:
    """Numbers I/O operations and fails operation ``fail_at`` (1-based), or with
    ``persist`` every operation from it on (a disk that stays full)."""

    def __init__(
        self,
        fail_at: int | None = None,
        error: Callable[[], BaseException] | None = None,
        *,
        persist: bool = False,
    ) -> None:
        self.fail_at = fail_at
        self.error = error
        self.persist = persist
        self.ops: list[str] = []
        self.injected: list[BaseException] = []

    def hit(self, op: str) -> None:
        self.ops.append(op)
        n = len(self.ops)
        if self.fail_at is None or self.error is None:
            return
        if n == self.fail_at or (self.persist and n > self.fail_at):
            exc = self.error()
            self.injected.append(exc)
            raise exc


class FaultyRaw(io.FileIO):
    """The raw file under the buffered handle: each write(2) and lseek(2) is an operation."""

    def __init__(self, fd: int, faults: Faults) -> None:
        super().__init__(fd, "wb", closefd=True)
        self._faults = faults

    def write(self, data: Any) -> int:
        self._faults.hit("raw-write")
        return super().write(data)

    def seek(self, pos: int, whence: int = 0) -> int:
        self._faults.hit("raw-seek")
        return super().seek(pos, whence)


class FaultyHandle:
    """The buffered handle torchvault writes to: write, seek, flush and close are operations."""

    def __init__(self, inner: io.BufferedWriter, faults: Faults) -> None:
        self._inner = inner
        self._faults = faults

    def write(self, data: Any) -> int:
        self._faults.hit("write")
        return self._inner.write(data)

    def seek(self, pos: int, whence: int = 0) -> int:
        self._faults.hit("seek")
        return self._inner.seek(pos, whence)

    def flush(self) -> None:
        self._faults.hit("flush")
        self._inner.flush()

    def close(self) -> None:
        self._inner.close()  # the descriptor is released even when close then fails
        self._faults.hit("close-file")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __enter__(self) -> FaultyHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FaultyOs:
    """Stands in for the ``os`` module inside ``torchvault._commit``."""

    def __init__(self, faults: Faults) -> None:
        self._faults = faults
        self._dirs: set[int] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def open(self, path: Any, flags: int, mode: int = 0o777) -> int:
        is_dir = bool(flags & getattr(os, "O_DIRECTORY", 0)) or os.path.isdir(path)
        self._faults.hit("open-dir" if is_dir else "open-temp")
        fd = os.open(path, flags, mode)
        if is_dir:
            self._dirs.add(fd)
        return fd

    def fdopen(self, fd: int, mode: str = "rb", buffering: int = -1) -> FaultyHandle:
        assert "w" in mode
        size = buffering if buffering > 1 else io.DEFAULT_BUFFER_SIZE
        return FaultyHandle(io.BufferedWriter(FaultyRaw(fd, self._faults), size), self._faults)

    def write(self, fd: int, data: Any) -> int:
        self._faults.hit("os-write")
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        self._faults.hit("fsync-dir" if fd in self._dirs else "fsync-file")
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)
        self._faults.hit("close-dir" if fd in self._dirs else "close-fd")

    def replace(self, src: Any, dst: Any) -> None:
        self._faults.hit("replace")
        os.replace(src, dst)


def faulty_save(
    monkeypatch: pytest.MonkeyPatch, faults: Faults, obj: object, path: Path
) -> BaseException | None:
    """Save ``obj`` under ``faults``; return what it raised (None when it returned)."""
    with monkeypatch.context() as patch:
        shim = FaultyOs(faults)
        patch.setattr(_commit, "os", shim)
        patch.setattr(_commit, "_writer", lambda fd: shim.fdopen(fd, "wb", 1 << 20))
        try:
            tv.save(obj, path)
        except BaseException as exc:
            return exc
    return None


def temps(folder: Path) -> list[str]:
    return sorted(p for p in os.listdir(folder) if TEMP_MARK in p)


def dry_run(monkeypatch: pytest.MonkeyPatch, folder: Path) -> list[str]:
    """The numbered operations of one save of new_state() over an existing file."""
    path = folder / "dry.tv"
    tv.save(old_state(), path)
    faults = Faults()
    assert faulty_save(monkeypatch, faults, new_state(), path) is None
    af.assert_same(tv.load(path), new_state())
    path.unlink()
    return faults.ops


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ----------------------------------------------------------------------------- the sweep


def test_dry_run_counts_every_kind_of_io_call(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ops = dry_run(monkeypatch, tmp_path)
    for op in ("open-temp", "write", "seek", "flush", "raw-write", "fsync-file", "close-file",
               "replace", "open-dir", "fsync-dir", "close-dir"):  # fmt: skip
        assert op in ops, (op, ops)
    assert ops.index("replace") > ops.index("fsync-file") > ops.index("flush")
    assert ops.index("fsync-dir") > ops.index("replace")


@pytest.mark.parametrize("persist", [False, True], ids=["fail-once", "fail-from-then-on"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
def test_io_error_at_every_call_keeps_old_file_and_leaves_no_temp(
    code: int, persist: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ops = dry_run(monkeypatch, tmp_path)
    commit = ops.index("replace") + 1  # operations after this one run once the rename is done
    path = tmp_path / "model.tv"
    failures: list[str] = []
    for k in range(1, len(ops) + 1):
        tv.save(old_state(), path)
        before = path.read_bytes()
        faults = Faults(k, lambda: OSError(code, os.strerror(code)), persist=persist)
        raised = faulty_save(monkeypatch, faults, new_state(), path)
        where = f"k={k} ({ops[k - 1]})"
        if raised is None:
            # Best-effort only: opening the folder (some systems cannot), and closing it once
            # its fsync succeeded (the rename is durable by then; close loses nothing).
            if ops[k - 1] not in ("open-dir", "close-dir"):
                failures.append(f"{where}: the save returned despite the error")
        elif isinstance(raised, tv.CheckpointWriteError):
            named = str(path) in str(raised) or k > commit  # after it, the folder is named
            if raised.errno != code or not named:
                failures.append(f"{where}: errno {raised.errno}: {raised}")
        elif raised not in faults.injected:
            failures.append(f"{where}: raised {type(raised).__name__}: {raised}")
        if k <= commit and path.read_bytes() != before:
            failures.append(f"{where}: the previous file changed")
        if k > commit:
            try:  # the rename happened: the new file must be complete
                af.assert_same(tv.load(path), new_state())
            except Exception as exc:
                failures.append(f"{where}: committed file is bad: {exc}")
        if temps(tmp_path):
            failures.append(f"{where}: temp files left: {temps(tmp_path)}")
        tv.save(new_state(), path)  # the next save, with a healthy disk, works
        af.assert_same(tv.load(path), new_state())
    assert not failures, "\n".join(failures)


def test_failed_save_leaks_no_file_descriptor(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ops = dry_run(monkeypatch, tmp_path)
    path = tmp_path / "model.tv"
    tv.save(old_state(), path)
    start = open_fds()
    leaks = []
    for k in range(1, len(ops) + 1):
        faulty_save(
            monkeypatch, Faults(k, lambda: OSError(errno.EIO, "I/O error")), new_state(), path
        )
        if open_fds() != start:
            leaks.append((k, ops[k - 1], open_fds() - start))
            start = open_fds()
    assert not leaks


def test_failed_first_save_leaves_no_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ops = dry_run(monkeypatch, tmp_path)
    path = tmp_path / "first.tv"
    for k in range(1, ops.index("replace") + 2):
        raised = faulty_save(
            monkeypatch, Faults(k, lambda: OSError(errno.ENOSPC, "full")), new_state(), path
        )
        assert isinstance(raised, tv.CheckpointWriteError), (k, raised)
        assert raised.errno == errno.ENOSPC
        assert os.listdir(tmp_path) == [], (k, os.listdir(tmp_path))


def test_checkpoint_write_error_is_an_oserror_with_errno_and_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "model.tv"
    raised = faulty_save(
        monkeypatch, Faults(1, lambda: OSError(errno.ENOSPC, "full")), new_state(), path
    )
    assert isinstance(raised, tv.CheckpointWriteError)
    assert isinstance(raised, OSError)
    assert raised.errno == errno.ENOSPC
    assert raised.filename == str(path)
    assert str(path) in str(raised)
    assert isinstance(raised.__cause__, OSError)


def test_error_after_the_rename_does_not_claim_the_old_file_is_intact(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # fsync of the folder fails after the rename: the new file is already in place, so an
    # error saying "nothing was written; the previous file is intact" would be false.
    ops = dry_run(monkeypatch, tmp_path)
    path = tmp_path / "model.tv"
    tv.save(old_state(), path)
    k = ops.index("fsync-dir") + 1
    raised = faulty_save(
        monkeypatch, Faults(k, lambda: OSError(errno.EIO, "I/O error")), new_state(), path
    )
    af.assert_same(tv.load(path), new_state())
    assert isinstance(raised, OSError)
    assert raised.errno == errno.EIO
    assert "Nothing was written" not in str(raised), str(raised)
    assert "previous file at that path is intact" not in str(raised), str(raised)


def test_save_completes_through_short_raw_writes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    class ShortRaw(FaultyRaw):
        def write(self, data: Any) -> int:
            return super().write(bytes(memoryview(data)[:7]))

    class ShortOs(FaultyOs):
        def fdopen(self, fd: int, mode: str = "rb", buffering: int = -1) -> FaultyHandle:
            raw = ShortRaw(fd, self._faults)
            return FaultyHandle(io.BufferedWriter(raw, 4096), self._faults)

    path = tmp_path / "short.tv"
    with monkeypatch.context() as patch:
        patch.setattr(_commit, "os", ShortOs(Faults()))
        tv.save(new_state(), path)
    tv.verify(path)
    af.assert_same(tv.load(path), new_state())


# ----------------------------------------------------------------------------- interrupts


def test_keyboard_interrupt_at_every_call_before_commit_keeps_old_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ops = dry_run(monkeypatch, tmp_path)
    path = tmp_path / "model.tv"
    tv.save(old_state(), path)
    before = path.read_bytes()
    for k in range(1, ops.index("replace") + 2):
        raised = faulty_save(monkeypatch, Faults(k, KeyboardInterrupt), new_state(), path)
        assert isinstance(raised, KeyboardInterrupt), (k, ops[k - 1], raised)
        assert path.read_bytes() == before, (k, ops[k - 1])
        assert temps(tmp_path) == [], (k, ops[k - 1])
    tv.save(new_state(), path)
    af.assert_same(tv.load(path), new_state())


# ----------------------------------------------------------------------------- SIGKILL


def _saving_child(path: Path, run: int, pipe: int, numel: int) -> None:
    """Save forever; report each completed save with one byte on ``pipe``."""
    step = 0
    while True:
        step += 1
        # numpy fills it: torch's OpenMP pool, used by the parent, deadlocks after fork
        w = torch.from_numpy(np.full(numel, float(step), dtype=np.float32))
        state = {"run": run, "step": step, "w": w}
        tv.save(state, path)
        os.write(pipe, b".")


def kill_saves(
    folder: Path, kills: int, seed: int, completed: list[int], numel: int = 64 * 64
) -> Iterator[str]:
    """SIGKILL a saving child ``kills`` times; yield each broken promise.

    Each child is killed a random 0-5 ms after it reports its ``target``-th completed save
    (``target`` random in 0..3; 0 kills it around its first save), so the kill lands at a
    random point of a save whatever the machine's load. ``completed`` receives the number
    of saves each child finished."""
    rng = random.Random(seed)
    path = folder / "ckpt.tv"
    for run in range(kills):
        before = path.read_bytes() if path.exists() else None
        target = rng.randint(0, 3)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            try:
                os.close(read)
                _saving_child(path, run, write, numel)
            finally:
                os._exit(1)
        os.close(write)
        done = 0
        deadline = time.monotonic() + 10
        while done < target and time.monotonic() < deadline:
            if select.select([read], [], [], 0.1)[0]:
                done += len(os.read(read, 1))
        time.sleep(rng.uniform(0.0, 0.005))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        while chunk := os.read(read, 65536):
            done += len(chunk)
        os.close(read)
        completed.append(done)
        if done < target or not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
            yield f"run {run}: the saving child stopped on its own ({done} saves, status {status})"
        yield from _check_after_kill(path, before, run, done)


def _check_after_kill(path: Path, before: bytes | None, run: int, done: int) -> Iterator[str]:
    if not path.exists():
        if before is not None or done:
            yield f"run {run}: the file vanished after {done} completed saves"
        return
    if done == 0 and path.read_bytes() == before:
        return  # killed before its first rename: the old file, untouched
    try:
        tv.verify(path)
        got = tv.load(path)
    except tv.TorchVaultError as exc:
        yield f"run {run}: the file is damaged after {done} saves: {exc}"
        return
    step = got["step"]
    if got["run"] != run or step not in (done, done + 1) or not bool((got["w"] == step).all()):
        yield f"run {run}: found run {got['run']} step {step} after {done} completed saves"


def test_sigkill_during_save_loop_leaves_old_or_new_file(tmp_path: Path) -> None:
    completed: list[int] = []
    broken = list(kill_saves(tmp_path, kills=20, seed=1, completed=completed))
    assert not broken, broken
    assert sum(completed) >= 20, completed  # the children really were saving


@pytest.mark.soak
def test_soak_sigkill_during_save_loop_leaves_old_or_new_file(tmp_path: Path) -> None:
    completed: list[int] = []
    broken = list(kill_saves(tmp_path, kills=200, seed=2, completed=completed))
    assert not broken, broken
    assert sum(completed) >= 200, completed


# ----------------------------------------------------------------------------- saving over a file


def big_state(value: float) -> dict[str, Any]:
    """A state whose file is large enough that replacing it is handed to the background."""
    return {"w": torch.full((1 << 19,), value), "step": int(value)}  # 2 MiB of float32


def inode(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def fds_on(key: tuple[int, int]) -> list[int]:
    """This process's descriptors that refer to the file ``key`` (st_dev, st_ino)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == key:
            found.append(int(name))
    return found


class RecordingOs:
    """``os`` for ``torchvault._commit`` that runs ``check`` just before each rename/unlink."""

    def __init__(self, check: Callable[[str], None]) -> None:
        self._check = check

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def replace(self, src: Any, dst: Any) -> None:
        self._check("replace")
        os.replace(src, dst)

    def unlink(self, path: Any) -> None:
        self._check("unlink")
        os.unlink(path)


def test_saving_over_a_large_file_frees_the_old_one_off_the_callers_thread(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Freeing a large file's blocks takes time in proportion to its size (with online
    # discard the kernel discards them inside the rename); the save must not pay for it.
    path = tmp_path / "last.tv"
    tv.save(big_state(1.0), path)
    old = inode(path)
    held_at_rename: list[list[int]] = []
    with monkeypatch.context() as patch:
        patch.setattr(_commit, "os", RecordingOs(lambda op: held_at_rename.append(fds_on(old))))
        tv.save(big_state(2.0), path)
    assert len(held_at_rename) == 1
    assert held_at_rename[0], "the rename dropped the old file's last reference itself"
    assert _freeing.wait_for_frees(timeout=30)
    assert fds_on(old) == [], "the old file was never freed"
    assert tv.load(path)["step"] == 2
    assert os.listdir(tmp_path) == ["last.tv"]


def test_the_old_file_is_freed_on_a_background_thread(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "last.tv"
    tv.save(big_state(1.0), path)
    old = inode(path)
    closed_on: list[str] = []

    def close(fd: int) -> None:
        if fds_on(old) == [fd]:
            closed_on.append(threading.current_thread().name)
        os.close(fd)

    monkeypatch.setattr(_freeing, "close_quietly", close)
    tv.save(big_state(2.0), path)
    assert _freeing.wait_for_frees(timeout=30)
    assert closed_on == ["torchvault-free"]


def test_many_saves_over_one_file_leak_no_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "last.tv"
    tv.save(big_state(0.0), path)
    assert _freeing.wait_for_frees(timeout=30)
    start = open_fds()
    for step in range(1, 6):
        tv.save(big_state(float(step)), path)
    assert _freeing.wait_for_frees(timeout=30)
    assert open_fds() == start
    assert tv.load(path)["step"] == 5


def test_deleting_a_large_file_frees_it_off_the_callers_thread(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "object"
    path.write_bytes(bytes(2 << 20))
    _commit.fsync_file(path)
    old = inode(path)
    held_at_unlink: list[list[int]] = []
    with monkeypatch.context() as patch:
        patch.setattr(_commit, "os", RecordingOs(lambda op: held_at_unlink.append(fds_on(old))))
        _commit.remove(path)
    assert len(held_at_unlink) == 1
    assert held_at_unlink[0], "the unlink dropped the last reference itself"
    assert not path.exists()
    assert _freeing.wait_for_frees(timeout=30)
    assert fds_on(old) == []


def test_small_files_are_replaced_and_deleted_on_the_callers_thread(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Handing a file to the background costs more than freeing a small one.
    path = tmp_path / "small.tv"
    tv.save(old_state(), path)
    old = inode(path)
    held: list[list[int]] = []
    with monkeypatch.context() as patch:
        patch.setattr(_commit, "os", RecordingOs(lambda op: held.append(fds_on(old))))
        tv.save(new_state(), path)
        _commit.remove(path)
    assert held[0] == []


def test_a_file_that_cannot_be_held_is_still_replaced(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    class NoOpen:
        def __getattr__(self, name: str) -> Any:
            return getattr(os, name)

        def open(self, *args: Any, **kwargs: Any) -> int:
            raise PermissionError(errno.EACCES, "no read permission")

    path = tmp_path / "last.tv"
    tv.save(big_state(1.0), path)
    monkeypatch.setattr(_freeing, "os", NoOpen())
    tv.save(big_state(2.0), path)
    _commit.remove(tmp_path / "missing")
    assert tv.load(path)["step"] == 2
    assert os.listdir(tmp_path) == ["last.tv"]


def test_a_symlink_destination_is_replaced_without_holding_its_target(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    target = tmp_path / "target.tv"
    tv.save(big_state(1.0), target)
    link = tmp_path / "last.tv"
    link.symlink_to(target)
    held: list[list[int]] = []
    with monkeypatch.context() as patch:
        patch.setattr(_commit, "os", RecordingOs(lambda op: held.append(fds_on(inode(target)))))
        tv.save(big_state(2.0), link)
    assert held == [[]]
    assert not link.is_symlink()
    assert tv.load(target)["step"] == 1
    assert tv.load(link)["step"] == 2


class AdviceSpy:
    """Records POSIX_FADV_DONTNEED calls (by inode) and the first write of the new file."""

    def __init__(self) -> None:
        self.events: list[tuple[str, tuple[int, int] | None]] = []
        self._advise = os.posix_fadvise

    def fadvise(self, fd: int, offset: int, length: int, advice: int) -> None:
        st = os.fstat(fd)
        if advice == os.POSIX_FADV_DONTNEED:
            self.events.append(("dontneed", (st.st_dev, st.st_ino)))
        self._advise(fd, offset, length, advice)

    def writer(self, fd: int) -> BinaryIO:
        spy = self

        class Raw(io.FileIO):
            def write(self, data: Any) -> int:
                if not any(kind == "write" for kind, _ in spy.events):
                    spy.events.append(("write", None))
                return super().write(data)

        return io.BufferedWriter(Raw(fd, "wb"), 1 << 20)


def cachestat_works(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.write_bytes(b"x" * 4096)
    fd = os.open(probe, os.O_RDONLY)
    try:
        os.fsync(fd)
        return _freeing.only_clean_pages(fd)
    finally:
        os.close(fd)
        probe.unlink()


def test_the_old_files_clean_cache_is_dropped_before_the_new_file_is_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Its pages are freed anyway once the file is replaced; freed before the new file is
    # written, they are the pages the new file gets (no reclaim, and on this VM no pages
    # that went back to the host and are slow to touch again).
    if not cachestat_works(tmp_path):
        pytest.skip("needs Linux 6.5+ (cachestat) on a file system with a page cache")
    path = tmp_path / "last.tv"
    tv.save(big_state(1.0), path)
    spy = AdviceSpy()
    with monkeypatch.context() as patch:
        patch.setattr(os, "posix_fadvise", spy.fadvise)
        patch.setattr(_commit, "_writer", spy.writer)
        old = inode(path)
        tv.save(big_state(2.0), path)
    assert spy.events[:2] == [("dontneed", old), ("write", None)]
    assert tv.load(path)["step"] == 2


def test_the_old_files_cache_is_kept_when_it_holds_unwritten_data(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Dropping dirty pages would first write them back: disk work for a file being replaced.
    path = tmp_path / "last.tv"
    tv.save(big_state(1.0), path)
    dirty = tmp_path / "dirty.tv"
    dirty.write_bytes(path.read_bytes())  # no fsync: its pages are dirty for ~30 s
    spy = AdviceSpy()
    monkeypatch.setattr(os, "posix_fadvise", spy.fadvise)
    tv.save(big_state(2.0), dirty)
    assert [kind for kind, _ in spy.events] == []
    assert tv.load(dirty)["step"] == 2


def test_a_child_forked_while_an_old_file_waits_to_be_freed_does_not_keep_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A DataLoader worker forked right after a save would otherwise keep the replaced
    # checkpoint's blocks allocated for as long as it lives.
    path = tmp_path / "last.tv"
    tv.save(big_state(1.0), path)
    old = inode(path)
    parent = os.getpid()
    gate = threading.Event()
    blocker = os.open(tmp_path, os.O_RDONLY)  # freed first, slowly: the old file waits

    def close(fd: int) -> None:
        if fd == blocker and os.getpid() == parent:
            gate.wait(30)
        with contextlib.suppress(OSError):
            os.close(fd)

    monkeypatch.setattr(_freeing, "close_quietly", close)
    _freeing.free_later(blocker)
    tv.save(big_state(2.0), path)
    try:
        assert fds_on(old), "the old file should still be waiting to be freed"
        pid = os.fork()
        if pid == 0:
            os._exit(1 if fds_on(old) else 0)
        _, status = os.waitpid(pid, 0)
    finally:
        gate.set()
    assert _freeing.wait_for_frees(timeout=30)
    assert os.WIFEXITED(status)
    assert os.WEXITSTATUS(status) == 0, "the child kept the old file"
    assert fds_on(old) == []


def test_sigkill_while_old_files_are_freed_leaves_only_the_checkpoint(tmp_path: Path) -> None:
    # Files of 2 MiB: each save hands the file it replaces to the background thread, and
    # the kills land while some are being freed. Nothing but the checkpoint (and temp files
    # of the dead children, which the next save removes) may remain.
    completed: list[int] = []
    broken = list(kill_saves(tmp_path, kills=10, seed=3, completed=completed, numel=1 << 19))
    assert not broken, broken
    assert sum(completed) >= 10, completed
    extra = [p for p in os.listdir(tmp_path) if p != "ckpt.tv"]
    assert all(TEMP_MARK in p for p in extra), extra
    tv.save(big_state(1.0), tmp_path / "ckpt.tv")
    assert os.listdir(tmp_path) == ["ckpt.tv"]


def test_a_file_on_a_network_file_system_is_replaced_without_being_held(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # NFS and FUSE hide a file renamed over while open as .nfsXXXX / .fuse_hiddenXXXX until
    # it is closed: a file a killed process would leave behind. Hold only on local ones.
    path = tmp_path / "last.tv"
    tv.save(big_state(1.0), path)
    old = inode(path)
    held: list[list[int]] = []
    monkeypatch.setattr(_freeing, "fs_type", lambda fd: 0x6969)  # NFS_SUPER_MAGIC
    with monkeypatch.context() as patch:
        patch.setattr(_commit, "os", RecordingOs(lambda op: held.append(fds_on(old))))
        tv.save(big_state(2.0), path)
    assert held == [[]]
    assert tv.load(path)["step"] == 2


def test_the_test_folder_is_on_a_file_system_where_replaced_files_are_held(
    tmp_path: Path,
) -> None:
    # The tests above that expect a held file need tmp_path on a local file system.
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        assert _freeing.fs_type(fd) in _freeing.LOCAL_FS
    finally:
        os.close(fd)
