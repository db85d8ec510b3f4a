"""Crash simulation for code that writes through ``torchvault._commit`` (fault plan F1).

While a :class:`CrashFS` is active it replaces ``torchvault._commit.os`` and
``torchvault._commit._writer`` with a recording shim. Every file-system operation made
through them is numbered, in the order it would reach the kernel, and the shim keeps a
model of what is durable under ``root``. Told ``crash_at=k``, it raises
:class:`SimulatedCrash` just before operation ``k`` runs; from then on the "process is
dead": every later operation raises again without running (so no cleanup handler of the
library undoes anything), except that descriptors are really closed (a dead process's are).
Afterwards :meth:`CrashFS.materialize` rewrites the tree under ``root`` to one state a
power loss at that moment could leave.

API
---
``SimulatedCrash(BaseException)``
    Raised before the chosen operation; ``.op`` is the :class:`Op` that did not run. A
    BaseException, so no ``except Exception`` in the library swallows it.

``Op(index, kind, path, nbytes, offset)``
    One operation. ``kind`` is one of ``create`` (open with O_CREAT of a new file),
    ``open`` (open of an existing file), ``write`` (one write(2) of ``nbytes`` at
    ``offset``), ``truncate``, ``fsync`` (of a file; fdatasync too), ``close``, ``replace``,
    ``rename``, ``unlink``, ``mkdir``, ``rmdir``, ``open-dir``, ``fsync-dir``, ``close-dir``.
    ``path`` is relative to ``root`` (``"."`` is root; absolute when outside it; for
    replace/rename it is ``"src -> dst"``). ``str(op)`` reads ``"5 write .x.tvtmp-..(262144@64)"``.

``CrashFS(monkeypatch, root, crash_at=None, *, write_size=256 KiB)``
    A context manager. On entry it patches (through ``monkeypatch.context()``, undone on
    exit) and snapshots everything under ``root`` as durable. ``write_size`` splits each
    raw write into write(2) calls of at most that many bytes, so a large tensor spans
    several numbered writes. On exit it swallows the :class:`SimulatedCrash` it raised
    (so ``with CrashFS(...): tv.save(...)`` just stops there) and freezes the real tree.
    Attributes: ``ops`` (the operations that ran), ``crashed``, ``crash_op`` (the one that
    did not run, or None), ``untracked`` (notes on changes the shim did not see, such as
    ``Path.unlink`` in ``remove_orphans`` or a file written with ``open()``).

    ``restart(crash_at=None)`` (while active, after a crash): a new process on the same,
    un-flushed page cache; ``crash_at`` counts operations from the restart. Models a kill
    (no power loss) followed by more work, then ``materialize`` for a later power loss.

    ``durable_tree(mode, seed=0) -> Tree``: the tree a power loss in ``mode`` leaves (pure).
    ``materialize(mode, seed=0)``: write that tree under ``root`` (callable again with other
    modes; each call starts from the frozen crash state).

Modes (``MODES``): ``keep_all`` (everything that ran survives: the state a killed process
leaves); ``drop_unsynced`` (files revert to their content at their last fsync, folders to
their entries at their last folder fsync: un-synced renames are undone and the destination
gets back its durable previous file or disappears, un-synced creates vanish, un-synced
unlinks come back); ``keep_prefix`` (folders as drop_unsynced; each file keeps a random
byte prefix of its un-synced writes, taken in write order, the last one possibly cut);
``garble_tail`` (folders as drop_unsynced; the bytes of each un-synced write are random
garbage of the same length); ``keep_names`` (an extra: every folder operation that ran
survives but no un-synced file data does, as with ext4 ``data=writeback``: catches a rename
published before its data was synced).

Helpers: ``Tree`` is ``dict[str, Entry]`` keyed by posix path relative to root (no ``"."``),
``Entry(data, mode)`` with ``data`` None for a folder. ``read_tree(root)``,
``write_tree(root, tree)`` (replaces everything under root), ``kinds(ops)`` (kinds with runs
of one kind collapsed), ``dry_run(monkeypatch, root, action) -> list[Op]`` (records one
uncrashed run and restores the tree), and ``sweep(monkeypatch, root, action, modes, seed)``:
for every ``k`` in ``0..N`` (``N`` = dry-run length; ``k = N`` is a power loss just after the
action returned) restores the starting tree, runs ``action`` crashing at ``k``, and for each
mode materializes and yields a :class:`Case` (``k``, ``op``, ``mode``, ``seed``, ``fs``)
while ``root`` holds that state. Example::

    for case in crashfs.sweep(monkeypatch, root, lambda: tv.save(new, path)):
        assert outcome(path) in ("old", "new"), case

Model assumptions:

* fsync (or fdatasync) of a file makes its data and size durable, not its name: a name,
  new or renamed, is durable only once its folder is fsynced. An fsync of a folder makes
  its whole set of entries (name -> file or folder) durable as it is at that moment, not
  the contents of those files or of subfolders. A folder made by mkdir is durable in its
  parent only after the parent's fsync; its own entries only after its own fsync. The
  root itself and everything under it at entry are durable.
* Each folder reverts independently (a rename across folders with only the destination
  synced leaves the file under both names). Renames are atomic per folder.
* File identity is the inode: data synced through one name stays with the file after a
  rename. Only regular files and folders are modeled (other entries are dropped by
  materialize); mode bits are kept, owners and times are not.
* Writes through the shim are tracked byte-exactly. Changes made outside it are seen only
  by inode when a folder is fsynced or the harness freezes: a file created outside the shim
  counts as entirely un-synced data. All of these are listed in ``untracked``.
* The page cache is coherent: reads during the run see every write (no torn reads).

Everything is deterministic for a given seed (the random choices are per file, keyed by
seed and the file's creation order). Only paths under ``root`` are ever rewritten.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from torchvault import _commit

MODES = ("keep_all", "drop_unsynced", "keep_prefix", "garble_tail", "keep_names")
WRITE_SIZE = 256 << 10


class SimulatedCrash(BaseException):
    """The process died just before ``op`` (a power loss may follow: see materialize)."""

    def __init__(self, op: Op | None) -> None:
        super().__init__(f"simulated crash before {op}" if op else "simulated crash (dead)")
        self.op = op


@dataclass(frozen=True)
class Op:
    index: int
    kind: str
    path: str
    nbytes: int = 0
    offset: int = 0

    def __str__(self) -> str:
        extra = f"({self.nbytes}@{self.offset})" if self.kind == "write" else ""
        return f"{self.index} {self.kind} {self.path}{extra}"


class Entry(NamedTuple):
    data: bytes | None  # None: a folder
    mode: int


Tree = dict[str, Entry]


@dataclass(eq=False)
class _File:
    id: int
    mode: int
    durable: bytes = b""
    pending: list[tuple[int, bytes | None]] = field(default_factory=list)  # None: truncate


@dataclass(eq=False)
class _Dir:
    id: int
    mode: int
    durable: dict[str, _File | _Dir] = field(default_factory=dict)


_Key = tuple[int, int]  # (st_dev, st_ino)


@dataclass
class _Fd:
    kind: str  # "file" or "dir"
    path: str
    node: _File | _Dir | None


def _apply(data: bytes, writes: Sequence[tuple[int, bytes | None]]) -> bytes:
    buf = bytearray(data)
    for offset, piece in writes:
        if piece is None:
            del buf[offset:]
            buf.extend(bytes(offset - len(buf)))
            continue
        if offset > len(buf):
            buf.extend(bytes(offset - len(buf)))
        buf[offset : offset + len(piece)] = piece
    return bytes(buf)


def _key(st: os.stat_result) -> _Key:
    return (st.st_dev, st.st_ino)


# ----------------------------------------------------------------------------- tree helpers


def read_tree(root: Path) -> Tree:
    """Every regular file and folder under ``root`` with its bytes and mode bits."""
    tree: Tree = {}
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        rel = Path(folder).relative_to(root)
        for name in dirs:
            st = os.lstat(os.path.join(folder, name))
            if stat.S_ISDIR(st.st_mode):
                tree[(rel / name).as_posix()] = Entry(None, stat.S_IMODE(st.st_mode))
        for name in sorted(files):
            full = os.path.join(folder, name)
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode):
                tree[(rel / name).as_posix()] = Entry(
                    Path(full).read_bytes(), stat.S_IMODE(st.st_mode)
                )
    return tree


def write_tree(root: Path, tree: Tree) -> None:
    """Make the contents of ``root`` exactly ``tree`` (root itself is kept)."""
    for child in os.listdir(root):
        full = os.path.join(root, child)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        else:
            os.unlink(full)
    for rel in sorted(tree, key=lambda p: p.count("/")):
        entry = tree[rel]
        full = os.path.join(root, rel)
        if entry.data is None:
            os.makedirs(full, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            Path(full).write_bytes(entry.data)
    for rel in sorted(tree, key=lambda p: -p.count("/")):
        os.chmod(os.path.join(root, rel), tree[rel].mode)


def kinds(ops: Sequence[Op]) -> list[str]:
    """The kinds of ``ops`` with each run of one kind collapsed to one."""
    out: list[str] = []
    for op in ops:
        if not out or out[-1] != op.kind:
            out.append(op.kind)
    return out


# ----------------------------------------------------------------------------- the shim


class _RecordingRaw(io.FileIO):
    """The raw file under the buffered handle: each write(2) is an operation."""

    def __init__(self, fd: int, fs: CrashFS) -> None:
        super().__init__(fd, "wb", closefd=True)
        self._fs = fs

    def write(self, data: Any, /) -> int:
        return self._fs._write(self.fileno(), data, super().write)

    def close(self) -> None:
        if self.closed:
            return
        self._fs._close(self.fileno(), super().close)


class _RecordingOs:
    """Stands in for the ``os`` module inside ``torchvault._commit``."""

    def __init__(self, fs: CrashFS) -> None:
        self._fs = fs

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def open(self, path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        return self._fs._open(path, flags, mode, kw)

    def write(self, fd: int, data: Any) -> int:
        return self._fs._write(fd, data, lambda piece: os.write(fd, piece))

    def fsync(self, fd: int) -> None:
        self._fs._fsync(fd, os.fsync)

    def fdatasync(self, fd: int) -> None:
        self._fs._fsync(fd, os.fdatasync)

    def ftruncate(self, fd: int, length: int) -> None:
        self._fs._ftruncate(fd, length)

    def close(self, fd: int) -> None:
        self._fs._close(fd, lambda: os.close(fd))

    def replace(self, src: Any, dst: Any, **kw: Any) -> None:
        self._fs._move("replace", src, dst, lambda: os.replace(src, dst, **kw))

    def rename(self, src: Any, dst: Any, **kw: Any) -> None:
        self._fs._move("rename", src, dst, lambda: os.rename(src, dst, **kw))

    def unlink(self, path: Any, **kw: Any) -> None:
        self._fs._remove("unlink", path, lambda: os.unlink(path, **kw))

    def remove(self, path: Any, **kw: Any) -> None:
        self._fs._remove("unlink", path, lambda: os.remove(path, **kw))

    def rmdir(self, path: Any, **kw: Any) -> None:
        self._fs._remove("rmdir", path, lambda: os.rmdir(path, **kw))

    def mkdir(self, path: Any, mode: int = 0o777, **kw: Any) -> None:
        self._fs._mkdir(path, lambda: os.mkdir(path, mode, **kw))


# ----------------------------------------------------------------------------- the harness


class CrashFS:
    """Record, crash and power-cut the file-system operations of ``torchvault._commit``.

    See the module docstring for the API and the durability model.
    """

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch | None,
        root: Path,
        crash_at: int | None = None,
        *,
        write_size: int = WRITE_SIZE,
    ) -> None:
        self.root = Path(os.path.realpath(root))
        self.crash_at = crash_at
        self.write_size = write_size
        self.ops: list[Op] = []
        self.crashed = False
        self.crash_op: Op | None = None
        self.untracked: list[str] = []
        self._monkeypatch = monkeypatch or pytest.MonkeyPatch()
        self._stack = contextlib.ExitStack()
        self._active = False
        self._base = 0  # len(ops) at the last (re)start
        self._ids = 0
        self._nodes: dict[_Key, _File | _Dir] = {}
        self._fds: dict[int, _Fd] = {}
        self._top: _Dir | None = None
        self._frozen: dict[str, tuple[Entry, _Key]] | None = None
        self._dirty = False

    # --------------------------------------------------------------- lifecycle

    def __enter__(self) -> CrashFS:
        self._top = self._adopt_dir(self.root)
        patch = self._stack.enter_context(self._monkeypatch.context())
        shim = _RecordingOs(self)
        buffer = getattr(_commit, "_BUFFER", io.DEFAULT_BUFFER_SIZE)
        patch.setattr(_commit, "os", shim)
        patch.setattr(
            _commit, "_writer", lambda fd: io.BufferedWriter(_RecordingRaw(fd, self), buffer)
        )
        self._active = True
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> bool:
        self._active = False
        self._stack.close()
        for fd in list(self._fds):  # descriptors the code never closed
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self._freeze()
        return isinstance(exc, SimulatedCrash) and self.crashed

    def restart(self, crash_at: int | None = None) -> None:
        """A new process on the same page cache; ``crash_at`` counts from now."""
        if not self._active:
            raise RuntimeError("restart() only while the CrashFS is active")
        self.crashed = False
        self.crash_op = None
        self._base = len(self.ops)
        self.crash_at = crash_at

    # --------------------------------------------------------------- the model

    def _new_id(self) -> int:
        self._ids += 1
        return self._ids

    def _rel(self, path: Any) -> tuple[str, bool]:
        """``path`` relative to root (its folder resolved), and whether it is under root."""
        full = os.path.abspath(os.fspath(path))
        if os.path.basename(full) in ("", ".", ".."):
            real = os.path.realpath(full)
        else:
            real = os.path.join(os.path.realpath(os.path.dirname(full)), os.path.basename(full))
        root = str(self.root)
        if real == root:
            return ".", True
        if real.startswith(root + os.sep):
            return os.path.relpath(real, root), True
        return real, False

    def _adopt_dir(self, full: Path) -> _Dir:
        """Snapshot an existing folder and everything in it as durable."""
        st = os.lstat(full)
        node = _Dir(self._new_id(), stat.S_IMODE(st.st_mode))
        self._nodes[_key(st)] = node
        with os.scandir(full) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                child = entry.stat(follow_symlinks=False)
                if entry.is_dir(follow_symlinks=False):
                    node.durable[entry.name] = self._adopt_dir(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    data = Path(entry.path).read_bytes()
                    file = _File(self._new_id(), stat.S_IMODE(child.st_mode), data)
                    self._nodes[_key(child)] = file
                    node.durable[entry.name] = file
        return node

    def _lookup(self, st: os.stat_result, where: str, read: Callable[[], bytes]) -> _File | _Dir:
        """The node of an inode; one the shim never saw is adopted as un-synced."""
        node = self._nodes.get(_key(st))
        is_dir = stat.S_ISDIR(st.st_mode)
        if node is not None and isinstance(node, _Dir) == is_dir:
            return node
        self.untracked.append(f"{where}: made outside the shim")
        if is_dir:
            node = _Dir(self._new_id(), stat.S_IMODE(st.st_mode))
        else:
            node = _File(self._new_id(), stat.S_IMODE(st.st_mode), b"", [(0, read())])
        self._nodes[_key(st)] = node
        return node

    def _sync_dir(self, fd: int, info: _Fd) -> None:
        node = info.node
        if not isinstance(node, _Dir):
            return
        durable: dict[str, _File | _Dir] = {}
        for name in sorted(os.listdir(fd)):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                continue

            def read(name: str = name) -> bytes:
                handle = os.open(name, os.O_RDONLY, dir_fd=fd)
                with open(handle, "rb") as source:
                    return source.read()

            durable[name] = self._lookup(st, f"{info.path}/{name}", read)
        node.durable = durable

    def _freeze(self) -> None:
        """Capture the real tree (the keep_all state) with each path's inode."""
        if self._frozen is not None:
            return
        frozen: dict[str, tuple[Entry, _Key]] = {}
        tree = read_tree(self.root)
        for rel, entry in tree.items():
            st = os.lstat(self.root / rel)
            frozen[rel] = (entry, _key(st))
            known = self._nodes.get(_key(st))
            if isinstance(known, _File):
                modeled = _apply(known.durable, known.pending)
                if entry.data != modeled:
                    self.untracked.append(f"{rel}: written outside the shim")
            elif known is None:
                self.untracked.append(f"{rel}: made outside the shim")
        self._frozen = frozen

    # --------------------------------------------------------------- operations

    def _begin(self, kind: str, path: str, nbytes: int = 0, offset: int = 0) -> Op:
        """Number the next operation; raise SimulatedCrash instead when it is the chosen
        one or the process is already dead."""
        if self.crashed:
            raise SimulatedCrash(None)
        op = Op(len(self.ops), kind, path, nbytes, offset)
        if self.crash_at is not None and len(self.ops) - self._base == self.crash_at:
            self.crashed = True
            self.crash_op = op
            raise SimulatedCrash(op)
        self.ops.append(op)
        return op

    def _open(self, path: Any, flags: int, mode: int, kw: dict[str, Any]) -> int:
        rel, inside = self._rel(path) if not kw.get("dir_fd") else (str(path), False)
        try:
            before = os.lstat(path, **kw)
        except OSError:
            before = None
        is_dir = bool(flags & getattr(os, "O_DIRECTORY", 0)) or (
            before is not None and stat.S_ISDIR(before.st_mode)
        )
        if is_dir:
            kind = "open-dir"
        else:
            kind = "create" if flags & os.O_CREAT and before is None else "open"
        old = b""
        if inside and not is_dir and before is not None and _key(before) not in self._nodes:
            old = Path(path).read_bytes()
        self._begin(kind, rel)
        fd = os.open(path, flags, mode, **kw)
        node: _File | _Dir | None = None
        if inside:
            st = os.fstat(fd)
            if kind == "create":
                node = _File(self._new_id(), stat.S_IMODE(st.st_mode))
                self._nodes[_key(st)] = node
            else:
                node = self._lookup(st, rel, lambda: old)
            if isinstance(node, _File) and flags & os.O_TRUNC:
                node.pending.append((0, None))
        self._fds[fd] = _Fd("dir" if is_dir else "file", rel, node)
        return fd

    def _write(self, fd: int, data: Any, write: Callable[[Any], int | None]) -> int:
        view = memoryview(data).cast("B")
        info = self._fds.get(fd)
        path = info.path if info else f"fd {fd}"
        done = 0
        while done < len(view):
            piece = view[done : done + self.write_size]
            offset = os.lseek(fd, 0, os.SEEK_CUR)
            self._begin("write", path, len(piece), offset)
            written = write(piece)
            if not written:
                break
            if info is not None and isinstance(info.node, _File):
                info.node.pending.append((offset, bytes(piece[:written])))
            done += written
            if written < len(piece):
                break
        return done

    def _ftruncate(self, fd: int, length: int) -> None:
        info = self._fds.get(fd)
        self._begin("truncate", info.path if info else f"fd {fd}", length)
        os.ftruncate(fd, length)
        if info is not None and isinstance(info.node, _File):
            info.node.pending.append((length, None))

    def _fsync(self, fd: int, sync: Callable[[int], None]) -> None:
        info = self._fds.get(fd)
        is_dir = info.kind == "dir" if info else stat.S_ISDIR(os.fstat(fd).st_mode)
        self._begin("fsync-dir" if is_dir else "fsync", info.path if info else f"fd {fd}")
        sync(fd)
        if info is None:
            return
        if isinstance(info.node, _File):
            info.node.durable = _apply(info.node.durable, info.node.pending)
            info.node.pending = []
        else:
            self._sync_dir(fd, info)

    def _close(self, fd: int, close: Callable[[], None]) -> None:
        info = self._fds.pop(fd, None)
        try:
            kind = "close-dir" if info is not None and info.kind == "dir" else "close"
            self._begin(kind, info.path if info else f"fd {fd}")
        finally:
            close()  # a dead process's descriptors are closed too; closing loses nothing

    def _move(self, kind: str, src: Any, dst: Any, move: Callable[[], None]) -> None:
        (a, _), (b, _) = self._rel(src), self._rel(dst)
        self._begin(kind, f"{a} -> {b}")
        try:
            gone = os.lstat(dst)
        except OSError:
            gone = None
        moved = os.lstat(src)
        move()
        if gone is not None and _key(gone) != _key(moved) and gone.st_nlink <= 1:
            self._nodes.pop(_key(gone), None)

    def _remove(self, kind: str, path: Any, remove: Callable[[], None]) -> None:
        self._begin(kind, self._rel(path)[0])
        try:
            gone = os.lstat(path)
        except OSError:
            gone = None
        remove()
        if gone is not None and (stat.S_ISDIR(gone.st_mode) or gone.st_nlink <= 1):
            self._nodes.pop(_key(gone), None)

    def _mkdir(self, path: Any, mkdir: Callable[[], None]) -> None:
        rel, inside = self._rel(path)
        self._begin("mkdir", rel)
        mkdir()
        if inside:
            st = os.lstat(path)
            self._nodes[_key(st)] = _Dir(self._new_id(), stat.S_IMODE(st.st_mode))

    # --------------------------------------------------------------- power loss

    def _content(self, node: _File, mode: str, seed: int) -> bytes:
        if not node.pending or mode in ("drop_unsynced", "keep_names"):
            return node.durable
        rng = random.Random(f"{seed}:{node.id}")
        if mode == "garble_tail":
            garbage = [(o, None if d is None else rng.randbytes(len(d))) for o, d in node.pending]
            return _apply(node.durable, garbage)
        if mode != "keep_prefix":
            raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
        budget = rng.randint(0, sum(len(d) if d is not None else 1 for _, d in node.pending))
        kept: list[tuple[int, bytes | None]] = []
        for offset, data in node.pending:
            size = len(data) if data is not None else 1
            if budget <= 0:
                break
            kept.append((offset, data if data is None or size <= budget else data[:budget]))
            budget -= size
        return _apply(node.durable, kept)

    def durable_tree(self, mode: str, seed: int = 0) -> Tree:
        """The tree under root that a power loss now leaves in ``mode`` (no side effect)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
        self._freeze()
        assert self._frozen is not None
        assert self._top is not None
        if mode == "keep_all":
            return {rel: entry for rel, (entry, _) in self._frozen.items()}
        if mode == "keep_names":
            tree: Tree = {}
            for rel, (entry, key) in self._frozen.items():
                node = self._nodes.get(key)
                data = entry.data
                if data is not None:
                    data = self._content(node, mode, seed) if isinstance(node, _File) else b""
                tree[rel] = Entry(data, entry.mode)
            return tree
        tree = {}

        def walk(folder: _Dir, prefix: str, seen: frozenset[int]) -> None:
            for name, node in sorted(folder.durable.items()):
                rel = f"{prefix}{name}"
                if isinstance(node, _File):
                    tree[rel] = Entry(self._content(node, mode, seed), node.mode)
                elif node.id not in seen:
                    tree[rel] = Entry(None, node.mode)
                    walk(node, f"{rel}/", seen | {node.id})

        walk(self._top, "", frozenset({self._top.id}))
        return tree

    def materialize(self, mode: str, seed: int = 0) -> None:
        """Rewrite the tree under root to what a power loss now could leave, in ``mode``."""
        if self._active:
            raise RuntimeError("materialize() after the with block (the shim is still active)")
        tree = self.durable_tree(mode, seed)
        if mode == "keep_all" and not self._dirty:
            return
        write_tree(self.root, tree)
        self._dirty = True


# ----------------------------------------------------------------------------- sweeps


def dry_run(
    monkeypatch: pytest.MonkeyPatch | None, root: Path, action: Callable[[], object]
) -> list[Op]:
    """The operations of one uncrashed run of ``action``; the tree is restored afterwards."""
    before = read_tree(root)
    with CrashFS(monkeypatch, root) as fs:
        action()
    write_tree(root, before)
    return fs.ops


@dataclass(frozen=True)
class Case:
    k: int
    op: Op | None  # the operation that did not run; None for k = N (after the action)
    mode: str
    seed: int
    fs: CrashFS

    def __str__(self) -> str:
        where = f"before {self.op}" if self.op else "after the action returned"
        return f"k={self.k} {where}, mode={self.mode}, seed={self.seed}"


def sweep(
    monkeypatch: pytest.MonkeyPatch | None,
    root: Path,
    action: Callable[[], object],
    modes: Sequence[str] = MODES,
    seed: int = 0,
) -> Iterator[Case]:
    """Crash ``action`` before each of its operations and after it, in every mode.

    Yields one Case per (k, mode) while ``root`` holds the materialized state; the starting
    tree is restored before each k. Raises AssertionError when a run's operations differ in
    kind from the dry run's (the action must be deterministic).
    """
    start = read_tree(root)
    ops = dry_run(monkeypatch, root, action)
    for k in range(len(ops) + 1):
        write_tree(root, start)
        with CrashFS(monkeypatch, root, crash_at=k) as fs:
            action()
        if k == len(ops):
            assert not fs.crashed, f"the run has more operations than the dry run's {len(ops)}"
        else:
            assert fs.crash_op is not None, f"k={k}: the run ended before operation {ops[k]}"
            assert fs.crash_op.kind == ops[k].kind, f"k={k}: {fs.crash_op} != dry run {ops[k]}"
        for mode in modes:
            fs.materialize(mode, seed + k)
            yield Case(k, fs.crash_op, mode, seed + k, fs)
