"""Freeing replaced and deleted files off the caller's thread.

Freeing a file's blocks takes time in proportion to its size: on a disk mounted with online
``discard`` the kernel discards them synchronously inside the rename or unlink that drops the
file's last name (0.17-0.25 s/GiB measured on the reference VM). ``_commit`` therefore calls
:func:`hold` before it renames over or unlinks a large file: the old file is opened read-only,
so the rename or unlink only drops a name, and :func:`free_later` closes that last reference on
a daemon thread, where the kernel frees the blocks.

Nothing is ever left behind: a killed process's descriptors are closed by the kernel, a power
loss leaves the nameless inode to the file system's orphan recovery (as for any file deleted
while open), and a forked child closes its copies of the descriptors still waiting. Only local
file systems qualify: NFS and FUSE keep a file renamed over while open visible under a hidden
name until it is closed, a file a killed process would leave.

The descriptor is read-only and changes nothing durable, so this module uses ``os`` directly,
not ``_commit``'s fault-injection seam: a test's shim never sees a descriptor that another
thread closes later.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import queue
import stat
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

HOLD_BYTES = 1 << 20  # smaller files cost less to free than to hand to the background


def hold(path: Path, *, drop_cache: bool) -> int | None:
    """Open the file at ``path`` read-only when replacing or deleting it would free a lot.

    While the descriptor is open, a rename over ``path`` or an unlink only drops a name; the
    file's blocks are freed when :func:`free_later` closes it. With ``drop_cache``, the
    file's cached pages are also dropped now when all of them are clean (the file is
    unchanged and on the disk: nothing is lost), so that the file written next gets pages
    the kernel just freed. Otherwise they would be freed only at the rename, after the new
    file took fresh pages: an allocation that costs reclaim on a machine whose memory is
    full of cache, and costs several times more on a VM that hands free memory back to its
    host (measured here: 256 MiB saved over an old file took 0.15-0.9 s with the old pages
    kept, 0.12-0.14 s with them dropped first).

    Returns:
        The descriptor, or None when ``path`` is not a regular file of at least
        ``HOLD_BYTES`` with one name on a local file system, or cannot be opened (nothing
        is held then; the caller's rename or unlink frees the file as before). Never raises.
    """
    if os.name != "posix":  # Windows cannot rename over an open file
        return None
    try:
        found = os.lstat(path)
        if not _worth_holding(found):
            return None  # never open a FIFO or a device; a symlink's target is not freed
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        info: os.stat_result | None = os.fstat(fd)
    except OSError:
        info = None
    if info is None or not _worth_holding(info) or fs_type(fd) not in LOCAL_FS:
        close_quietly(fd)
        return None
    if drop_cache and only_clean_pages(fd):
        with contextlib.suppress(OSError):  # only a hint
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return fd


def _worth_holding(info: os.stat_result) -> bool:
    return (
        stat.S_ISREG(info.st_mode)
        and info.st_nlink == 1  # another name keeps it anyway
        and info.st_size >= HOLD_BYTES  # smaller: cheap to free
    )


# Local file systems, where a file renamed over or unlinked while open just loses its name.
# Network and FUSE file systems hide it under another name instead (.nfsXXXX,
# .fuse_hiddenXXXX) until it is closed, a file a killed process would leave behind.
LOCAL_FS = frozenset(
    {
        0xEF53,  # ext2/3/4
        0x58465342,  # xfs
        0x9123683E,  # btrfs
        0x01021994,  # tmpfs
        0xF2F52010,  # f2fs
        0x2FC12FC1,  # zfs
        0xCA451A4E,  # bcachefs
        0x794C7630,  # overlayfs (containers)
    }
)


def fs_type(fd: int) -> int:
    """The ``f_type`` of the file system holding ``fd`` (Linux), or -1 when unknown."""
    if _syscall() is None:  # same platforms: there f_type is the first field, a long
        return -1
    found = (ctypes.c_long * 32)()  # struct statfs is 120 bytes on these platforms
    if _libc().fstatfs(ctypes.c_int(fd), ctypes.byref(found)) != 0:
        return -1
    return int(found[0])


@functools.cache
def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


class _CacheStat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")
    ]


class _CacheRange(ctypes.Structure):
    _fields_ = [("offset", ctypes.c_uint64), ("length", ctypes.c_uint64)]


_CACHESTAT = 451  # the same number on every architecture below (new syscalls since 5.1)


@functools.cache
def _syscall() -> Callable[..., int] | None:
    if sys.platform != "linux" or platform.machine() not in (
        "x86_64",
        "aarch64",
        "riscv64",
        "ppc64le",
    ):
        return None
    try:
        function: Callable[..., int] = _libc().syscall
    except (OSError, AttributeError):
        return None
    return function


def only_clean_pages(fd: int) -> bool:
    """Whether ``fd``'s file has cached pages and none that is dirty or being written.

    Uses ``cachestat`` (Linux 6.5+). Dropping dirty pages would first write them back (the
    kernel's ``POSIX_FADV_DONTNEED`` starts that), extra disk work for data about to be
    deleted, so anything unknown counts as not clean.
    """
    function = _syscall()
    if function is None or not hasattr(os, "posix_fadvise"):
        return False
    found = _CacheStat()
    span = _CacheRange(0, 0)  # length 0: to the end of the file
    done = function(
        ctypes.c_long(_CACHESTAT),
        ctypes.c_int(fd),
        ctypes.byref(span),
        ctypes.byref(found),
        ctypes.c_uint(0),
    )
    return done == 0 and found.cache > 0 and found.dirty == 0 and found.writeback == 0


_Release = int | threading.Event


class _Releases:
    """Closes the descriptors :func:`hold` opened, in order, on one daemon thread."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[_Release] = queue.SimpleQueue()
        self.pending: set[int] = set()  # queued or about to be closed
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def put(self, fd: int) -> None:
        with self.lock:
            if self.thread is None or not self.thread.is_alive():
                thread = threading.Thread(target=self._run, name="torchvault-free", daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # the interpreter is exiting: free it here
                    close_quietly(fd)
                    return
                self.thread = thread
            self.pending.add(fd)
        self.queue.put(fd)

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if isinstance(item, threading.Event):
                item.set()
                continue
            with self.lock:  # forget it first: once closed, its number may be reused
                self.pending.discard(item)
            close_quietly(item)

    def wait(self, timeout: float | None) -> bool:
        with self.lock:
            if self.thread is None or not self.thread.is_alive():
                return True
        done = threading.Event()
        self.queue.put(done)
        return done.wait(timeout)


def close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


_releases = _Releases()


def free_later(fd: int | None) -> None:
    """Close a descriptor from :func:`hold` off the caller's thread (None: nothing held)."""
    if fd is not None:
        _releases.put(fd)


def wait_for_frees(timeout: float | None = None) -> bool:
    """Wait until every file replaced or deleted so far is freed (benchmarks and tests).

    Returns:
        False when ``timeout`` seconds passed first.
    """
    return _releases.wait(timeout)


def _forget_releases_in_child() -> None:
    """After fork: the child closes its copies of pending descriptors, or a long-lived child
    (a DataLoader worker) would keep a replaced checkpoint's blocks allocated."""
    global _releases
    for fd in _releases.pending:
        close_quietly(fd)
    _releases = _Releases()  # the parent's thread and lock state do not carry over


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_releases_in_child)
