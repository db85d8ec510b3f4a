"""A strict reader for the zip container torch.save writes.

Python's ``zipfile`` and torch's own reader are lenient where attackers live: they accept
junk before the first entry, ignore CRCs, trust the central directory over the local headers
and take any entry name. This reader accepts only what ``torch.save`` produces:

* the file is fully indexed: local header, data, optional data descriptor, next local
  header, ..., central directory, optional ZIP64 records, end record, comment, end of file;
  nothing before, between or after (no polyglots, no hidden payloads);
* entries are stored, not compressed (no zip bombs), unencrypted, not symlinks; there is
  no archive comment;
* the local header agrees with the central directory on name, flags, method and sizes;
* names are unique, relative, use ``/``, contain no ``..``, drive letters or control
  characters, and all sit under one top-level folder;
* every entry's CRC-32 is checked before its bytes are used (torch never checks it).
"""

from __future__ import annotations

import mmap
import re
import struct
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..errors import CorruptCheckpointError, UnsupportedFormatError

LOCAL, CENTRAL, END = b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06"
END64, LOCATOR, DESCRIPTOR = b"PK\x06\x06", b"PK\x06\x07", b"PK\x07\x08"
MAX_ENTRIES = 1_000_000
_PARALLEL_BYTES = 1 << 20
_ALLOWED_FLAGS = 0x0008 | 0x0800  # data descriptor, UTF-8 names
_U32, _U16 = 0xFFFFFFFF, 0xFFFF
_BAD_NAME = re.compile(r"[\x00-\x1f\\:]|(^|/)\.\.?(/|$)|^/|//|/$")


@dataclass(frozen=True)
class Entry:
    """One stored member: where its bytes are and what their CRC-32 must be."""

    name: str
    start: int
    size: int
    crc: int
    flags: int = 0


class ZipArchive:
    """The entries of a torch zip archive, validated; bytes are read from ``data``."""

    def __init__(self, data: mmap.mmap | bytes, path: str) -> None:
        self.data = data
        self.path = path
        self.entries: dict[str, Entry] = {}
        self.prefix = ""
        self._checked: set[str] = set()
        self._parse()

    def _fail(self, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{self.path}: not a valid torch zip archive: {what}. torch.save never writes "
            "such a file; it was damaged or crafted. Re-download or re-save it.",
            path=self.path,
        )

    def _unpack(self, fmt: str, offset: int) -> tuple[Any, ...]:
        size = struct.calcsize(fmt)
        if offset < 0 or offset + size > len(self.data):
            raise self._fail(f"a record at byte {offset} runs past the end of the file")
        return struct.unpack_from(fmt, self.data, offset)

    def _parse(self) -> None:
        end = self._find_end()
        _, disk, cd_disk, n_disk, count, cd_size, cd_offset, _ = self._unpack("<4s4H2IH", end)
        if disk or cd_disk or n_disk != count:
            raise UnsupportedFormatError(
                f"{self.path}: a multi-volume zip archive; torch.save writes one file.",
                path=self.path,
            )
        cd_end = end
        if end >= 20 and self.data[end - 20 : end - 16] == LOCATOR:
            count64, size64, offset64, cd_end = self._zip64(end)
            if (
                (count, cd_size, cd_offset)
                not in (
                    (count64, size64, offset64),
                    (min(count64, _U16), min(size64, _U32), min(offset64, _U32)),
                )
                and _U32 not in (cd_size, cd_offset)
                and count != _U16
            ):
                raise self._fail("the end record and the ZIP64 end record disagree")
            count, cd_size, cd_offset = count64, size64, offset64
        elif _U32 in (cd_size, cd_offset) or count == _U16:
            raise self._fail("the end record asks for ZIP64 fields that are missing")
        if count > MAX_ENTRIES:
            raise self._fail(f"{count} entries (the limit is {MAX_ENTRIES})")
        if cd_offset + cd_size != cd_end:
            raise self._fail("the central directory does not end where the end record starts")
        entries = list(self._central(cd_offset, count, cd_end))
        self._check_layout(entries, cd_offset)
        # torch.serialization.set_crc32_options(False) writes every CRC as 0: such a file has
        # no CRCs to check (one zero among real CRCs is still a mismatch)
        self.has_crcs = any(entry.crc for entry in self.entries.values())

    def _find_end(self) -> int:
        # torch.save writes no archive comment, so the end record is the file's last 22 bytes
        at = len(self.data) - 22
        if at < 0 or self.data[at : at + 4] != END or self._unpack("<H", at + 20) != (0,):
            raise self._fail(
                "the file does not end with an end-of-central-directory record and no comment "
                "(truncated, or bytes appended)"
            )
        return at

    def _zip64(self, end: int) -> tuple[int, int, int, int]:
        locator = end - 20
        sig, _, record, _ = self._unpack("<4sIQI", locator)
        if sig != LOCATOR or record + 56 > locator:
            raise self._fail("the ZIP64 locator is missing or points past itself")
        sig, rec_size, _, _, disk, cd_disk, n_disk, count, cd_size, cd_offset = self._unpack(
            "<4sQ2H2I4Q", record
        )
        if sig != END64 or record + 12 + rec_size != locator or disk or cd_disk:
            raise self._fail("the ZIP64 end record is malformed")
        if n_disk != count:
            raise self._fail("the ZIP64 end record disagrees with itself on the entry count")
        return count, cd_size, cd_offset, record

    def _central(self, offset: int, count: int, cd_end: int) -> Iterator[tuple[int, Entry]]:
        at = offset
        for _ in range(count):
            fields = self._unpack("<4s6H3I5H2I", at)
            sig, _, _, flags, method, _, _, crc, csize, usize, nlen, xlen, clen = fields[:13]
            attributes, local = fields[15], fields[16]
            if sig != CENTRAL:
                raise self._fail(f"central directory entry at byte {at} has a bad signature")
            name = self._name(at + 46, nlen, flags)
            usize, csize, local = self._zip64_extra(at + 46 + nlen, xlen, usize, csize, local)
            self._check_entry(name, flags, method, csize, usize, attributes)
            yield local, Entry(name, -1, usize, crc, flags)
            at += 46 + nlen + xlen + clen
        if at != cd_end:
            raise self._fail("the central directory has bytes after its last entry")

    def _name(self, at: int, length: int, flags: int) -> str:
        raw = bytes(self.data[at : at + length])
        try:
            name = raw.decode("utf-8" if flags & 0x0800 else "ascii")
        except UnicodeDecodeError:
            raise self._fail(f"entry name {raw!r} is not valid text") from None
        if not name or _BAD_NAME.search(name):
            raise self._fail(
                f"entry name {name!r} is not a plain relative path (absolute, '..', "
                "backslash, drive letter or control character)"
            )
        return name

    def _zip64_extra(
        self, at: int, length: int, usize: int, csize: int, local: int
    ) -> tuple[int, int, int]:
        end = at + length
        while at + 4 <= end:
            tag, size = self._unpack("<2H", at)
            if at + 4 + size > end:
                raise self._fail("an extra field runs past its entry")
            if tag == 1:
                values = list(struct.unpack_from(f"<{size // 8}Q", self.data, at + 4))
                wanted = [usize == _U32, csize == _U32, local == _U32]
                if len(values) < sum(wanted):
                    raise self._fail("a ZIP64 extra field is shorter than the sizes it replaces")
                if wanted[0]:
                    usize = values.pop(0)
                if wanted[1]:
                    csize = values.pop(0)
                if wanted[2]:
                    local = values.pop(0)
            at += 4 + size
        return usize, csize, local

    def _check_entry(
        self, name: str, flags: int, method: int, csize: int, usize: int, attributes: int
    ) -> None:
        if flags & ~_ALLOWED_FLAGS:
            raise self._fail(
                f"entry {name!r} has flag bits {flags:#06x} (encrypted or patched data)"
            )
        if method != 0 or csize != usize:
            raise UnsupportedFormatError(
                f"{self.path}: entry {name!r} is compressed (method {method}); torch.save "
                "stores entries uncompressed, and compressed entries are refused so that no "
                "zip bomb can expand. Re-save the file with torch.save.",
                path=self.path,
            )
        if (attributes >> 16) & 0o170000 == 0o120000:
            raise self._fail(f"entry {name!r} is a symbolic link")
        if usize > len(self.data):
            raise self._fail(f"entry {name!r} declares {usize} bytes, more than the file holds")

    def _check_layout(self, entries: list[tuple[int, Entry]], cd_offset: int) -> None:
        entries.sort(key=lambda item: item[0])
        expected = 0
        prefixes = set()
        for index, (local, entry) in enumerate(entries):
            if local != expected:
                raise self._fail(
                    f"entry {entry.name!r} starts at byte {local}, not {expected} where the "
                    "previous one ends (junk, a gap or overlapping entries)"
                )
            start = self._local(local, entry)
            after = start + entry.size
            following = entries[index + 1][0] if index + 1 < len(entries) else cd_offset
            expected = self._descriptor(after, following, entry)
            if entry.name in self.entries:
                raise self._fail(f"entry {entry.name!r} appears twice")
            self.entries[entry.name] = Entry(entry.name, start, entry.size, entry.crc, entry.flags)
            prefixes.add(entry.name.split("/", 1)[0])
        if expected != cd_offset:
            raise self._fail("the central directory does not follow the last entry")
        if len(prefixes) != 1 or any("/" not in name for name in self.entries):
            raise self._fail("entries do not all sit under one top-level folder")
        self.prefix = prefixes.pop() + "/"

    def _local(self, at: int, entry: Entry) -> int:
        sig, _, flags, method, _, _, crc, _csize, usize, nlen, xlen = self._unpack("<4s5H3I2H", at)
        if sig != LOCAL:
            raise self._fail(f"entry {entry.name!r} has no local header at byte {at}")
        name = self._name(at + 30, nlen, flags)
        if name != entry.name:
            raise self._fail(
                f"the local header names {name!r} but the central directory {entry.name!r}"
            )
        if flags != entry.flags or method != 0:
            raise self._fail(
                f"entry {entry.name!r}: the local header's flags ({flags:#06x}) or compression "
                f"method ({method}) differ from the central directory's"
            )
        if not flags & 0x0008 and (crc, usize) != (entry.crc, min(entry.size, _U32)):
            raise self._fail(f"entry {entry.name!r}: local header and central directory disagree")
        start: int = at + 30 + nlen + xlen
        if start + entry.size > len(self.data):
            raise self._fail(f"entry {entry.name!r} runs past the end of the file (truncated?)")
        return start

    def _descriptor(self, at: int, following: int, entry: Entry) -> int:
        if at == following:
            return at
        gap = bytes(self.data[at:following])
        body = gap[4:] if gap[:4] == DESCRIPTOR else gap
        if len(body) == 12:
            crc, csize, usize = struct.unpack("<3I", body)
        elif len(body) == 20:
            crc, csize, usize = struct.unpack("<I2Q", body)
        else:
            raise self._fail(f"{len(gap)} unexplained bytes after entry {entry.name!r}")
        if (crc, csize, usize) != (entry.crc, entry.size, entry.size):
            raise self._fail(
                f"entry {entry.name!r}: data descriptor and central directory disagree"
            )
        return following

    def find(self, name: str) -> Entry | None:
        """The entry ``<prefix><name>``, or None."""
        return self.entries.get(self.prefix + name)

    def read(self, entry: Entry) -> memoryview:
        """The bytes of ``entry``, CRC-checked on first use."""
        view = memoryview(self.data)[entry.start : entry.start + entry.size]
        if entry.name not in self._checked:
            self._check(entry, view)
        return view

    def check_all(self) -> None:
        """Check every entry's CRC not checked yet; large ones on two threads (zlib releases
        the GIL, and this pass is most of a load's time)."""
        pending = [e for e in self.entries.values() if e.name not in self._checked]
        large = [e for e in pending if e.size >= _PARALLEL_BYTES]
        if len(large) > 1:
            with ThreadPoolExecutor(2, "torchvault-crc") as pool:
                list(pool.map(self.read, large))
        for entry in pending:
            self.read(entry)

    def _check(self, entry: Entry, view: memoryview) -> None:
        if self.has_crcs and zlib.crc32(view) != entry.crc:
            raise CorruptCheckpointError(
                f"{self.path}: entry {entry.name!r} fails its CRC-32 check: the file is "
                "damaged (bit rot, a truncated copy) or was altered. torch.load does not "
                "check this; re-download or re-save the file.",
                path=self.path,
                key=entry.name,
            )
        self._checked.add(entry.name)
