"""The single-file container: a valid safetensors file with torchvault metadata.

Layout (all of it safetensors)::

    u64 little-endian N | N bytes of JSON header, space-padded | tensor bytes, no gaps

The header's first member is ``__metadata__``; its first member is ``torchvault.integrity``,
the xxh3-128 of the length prefix and of every header byte after that value, and its second
is ``torchvault.checksums``, the xxh3-128 of each stored tensor's bytes as one string of
32-hex-digit runs in header order. The other ``torchvault.*`` members carry the format
version, the object tree, the tensor table, versions and the creation time; user metadata
sits beside them. Plain safetensors files (without these members) are read too.

The reader trusts nothing: it checks the header length against a cap and the file size,
counts JSON containers before parsing, parses strictly (no duplicate keys, no NaN, no
over-long numbers), and checks every dtype, shape, byte size and offset (contiguous from 0,
no gaps, no overlap, no trailing bytes) before any tensor is touched.
"""

from __future__ import annotations

import collections
import json
import math
import os
import struct
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple

import torch
import xxhash

from ._dtypes import SAFETENSORS_ITEMSIZE
from .errors import CorruptCheckpointError, UnsupportedFormatError

FORMAT_VERSION = 1
MAX_HEADER_BYTES = 100_000_000
# Caps that bound the time and memory of parsing an untrusted header: a header at the caps
# parses in a few seconds and a few hundred MiB; far more than any real checkpoint needs.
MAX_CONTAINERS = 2_000_000  # JSON objects + arrays in one JSON document
MAX_TENSORS = 300_000
MAX_DIMS = 64
INT64_MAX = 2**63 - 1  # torch keeps sizes, strides, element and byte counts in int64
DATA_ALIGNMENT = 64
CHUNK = 16 << 20
_PIPELINE_BYTES = 32 << 20  # from here on hashing runs on worker threads

META = "__metadata__"
INTEGRITY = "torchvault.integrity"
CHECKSUMS = "torchvault.checksums"
PREFIX = b'{"' + META.encode() + b'":{"' + INTEGRITY.encode() + b'":"'
HASH_HEX = 32
PLACEHOLDER = "0" * HASH_HEX
RESERVED = "torchvault."
_ENTRY_KEYS = frozenset(("dtype", "shape", "data_offsets"))
_SUMS_AT = PREFIX + PLACEHOLDER.encode() + b'","' + CHECKSUMS.encode() + b'":"'


class Entry(NamedTuple):
    """One tensor of the safetensors header, with absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    """A validated header: its tensors in header order and its ``__metadata__`` strings."""

    entries: tuple[Entry, ...]
    metadata: dict[str, str]
    file_size: int

    @property
    def is_torchvault(self) -> bool:
        return INTEGRITY in self.metadata


def hash_bytes(data: Any) -> str:
    """The checksum torchvault stores: xxh3-128 as 32 lowercase hex digits."""
    digest: str = xxhash.xxh3_128_hexdigest(data)
    return digest


def hash_all(buffers: Sequence[memoryview]) -> list[str]:
    """:func:`hash_bytes` of each buffer, on two threads when there is much to hash."""
    if sum(buffer.nbytes for buffer in buffers) < _PIPELINE_BYTES:
        return [hash_bytes(buffer) for buffer in buffers]
    with ThreadPoolExecutor(2, "torchvault-hash") as pool:
        return list(pool.map(hash_bytes, buffers))


def hashed_views(
    sources: Sequence[torch.Tensor],
) -> Generator[tuple[memoryview, str], None, None]:
    """Each tensor's bytes (:func:`byte_view`) and their checksum, in order.

    For large inputs two worker threads work up to four tensors ahead (xxhash releases the
    GIL): hashing runs on both cores and overlaps whatever the caller does with the current
    tensor, a save's write of it. Close the generator (or exhaust it) to stop the workers.
    """

    def work(source: torch.Tensor) -> tuple[memoryview, str]:
        view = byte_view(source)
        return view, hash_bytes(view)

    if sum(source.nbytes for source in sources) < _PIPELINE_BYTES:
        yield from map(work, sources)
        return
    with ThreadPoolExecutor(2, "torchvault-hash") as pool:
        pending: collections.deque[Future[tuple[memoryview, str]]] = collections.deque()
        for source in sources:
            pending.append(pool.submit(work, source))
            if len(pending) > 4:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ----------------------------------------------------------------------------- reading


def read_header(handle: BinaryIO, path: str) -> Header:
    """Read and fully validate the header of the open file ``handle``.

    Raises:
        CorruptCheckpointError: anything about the header or the layout is wrong.
        UnsupportedFormatError: a torchvault format version newer than this reader.
    """
    size = os.fstat(handle.fileno()).st_size
    if size < 8:
        raise _corrupt(path, f"the file is {size} bytes, shorter than the 8-byte length prefix")
    prefix = os.pread(handle.fileno(), 8, 0)
    (length,) = struct.unpack("<Q", prefix)
    if length < 2 or length > MAX_HEADER_BYTES:
        raise _corrupt(
            path,
            f"the header length field says {length} bytes (allowed: 2 to "
            f"{MAX_HEADER_BYTES}); this is not a safetensors or torchvault file",
        )
    if 8 + length > size:
        raise _corrupt(
            path,
            f"the header needs {length} bytes but the file has {size - 8} after "
            "the length prefix; the file is truncated",
        )
    raw = os.pread(handle.fileno(), length, 8)
    if len(raw) != length:
        raise _corrupt(path, "the file shrank while it was being read")
    parsed = _parse_json(raw, path)
    metadata = _metadata(parsed.pop(META, {}), path)
    _check_integrity(prefix, raw, metadata, path)
    entries = _entries(parsed, 8 + length, path)
    _check_layout(entries, 8 + length, size, path)
    return Header(entries=entries, metadata=metadata, file_size=size)


def _parse_json(raw: bytes, path: str) -> dict[str, Any]:
    if raw[:1] != b"{":
        raise _corrupt(path, "the header is not a JSON object")
    declared = raw.count(b'"data_offsets"')
    if declared > MAX_TENSORS:
        raise _corrupt(path, f"the header lists {declared} tensors (cap {MAX_TENSORS})")
    parsed = strict_json(raw, path, "the header")
    if not isinstance(parsed, dict):
        raise _corrupt(path, "the header is not a JSON object")
    return parsed


def strict_json(raw: bytes, path: str, what: str) -> Any:
    """Parse untrusted JSON: bounded container count, no duplicate keys, no NaN/Infinity,
    no over-long numbers."""
    containers = raw.count(b"{") + raw.count(b"[")
    if containers > MAX_CONTAINERS:
        raise _corrupt(
            path,
            f"{what} holds {containers} JSON containers (cap "
            f"{MAX_CONTAINERS}); refusing to parse it",
        )
    try:
        return json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_unique_keys,
            parse_constant=_reject_constant,
            parse_int=_bounded_int,
            parse_float=_finite_float,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _corrupt(path, f"{what} is not valid strict JSON ({_short(exc)})") from exc


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate key {dup!r}")
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _bounded_int(text: str) -> int:
    if len(text) > 21:
        raise ValueError(f"an integer literal of {len(text)} digits")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or len(text) > 40:
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _metadata(node: Any, path: str) -> dict[str, str]:
    if not isinstance(node, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in node.items()
    ):
        raise _corrupt(path, f"`{META}` is not a map of strings to strings")
    return node


def _check_integrity(prefix: bytes, raw: bytes, metadata: dict[str, str], path: str) -> None:
    if not raw.startswith(PREFIX):
        stray = [k for k in metadata if k.startswith(RESERVED)]
        if stray:
            raise _corrupt(
                path,
                f"it has torchvault metadata ({stray[0]!r}) but no header "
                "checksum in its place; the header is damaged",
            )
        return
    cut = len(PREFIX) + HASH_HEX
    stored = raw[len(PREFIX) : cut].decode("ascii", "replace")
    if raw[cut : cut + 1] != b'"' or hash_bytes(prefix + raw[cut:]) != stored:
        raise _corrupt(
            path,
            "the header checksum does not match its bytes; the header is "
            "damaged (bit rot, a bad copy or tampering)",
        )
    version = metadata.get("torchvault.format", "")
    if not decimal(version, 6):
        raise _corrupt(path, f"the format version {version!r} is not a number")
    if int(version) > FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"{path} uses torchvault format {version}, newer than this torchvault reads "
            f"({FORMAT_VERSION}); upgrade with `pip install -U torchvault`.",
            path=path,
        )


def _entries(parsed: dict[str, Any], data_start: int, path: str) -> tuple[Entry, ...]:
    if len(parsed) > MAX_TENSORS:
        raise _corrupt(path, f"the header lists {len(parsed)} tensors (cap {MAX_TENSORS})")
    return tuple(_entry(name, spec, data_start, path) for name, spec in parsed.items())


def _entry(name: str, spec: Any, data_start: int, path: str) -> Entry:
    if type(spec) is not dict or spec.keys() != _ENTRY_KEYS:
        raise _corrupt(path, "it needs exactly dtype, shape and data_offsets", key=name)
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    itemsize = SAFETENSORS_ITEMSIZE.get(dtype) if isinstance(dtype, str) else None
    if itemsize is None:
        raise _corrupt(path, f"its dtype {str(dtype)[:20]!r} is not a known dtype", key=name)
    if not int_list(shape, MAX_DIMS):
        raise _corrupt(path, f"its shape is not a list of at most {MAX_DIMS} sizes", key=name)
    if not int_list(offsets, 2) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise _corrupt(path, "its data_offsets are not an ordered [begin, end] pair", key=name)
    if not fits_int64(shape, itemsize):
        raise _corrupt(path, f"its shape {shape} is too large for torch (int64)", key=name)
    if math.prod(shape) * itemsize != offsets[1] - offsets[0]:
        raise _corrupt(
            path,
            f"shape {shape} of {dtype} needs {math.prod(shape) * itemsize} "
            f"bytes but its offsets span {offsets[1] - offsets[0]}",
            key=name,
        )
    return Entry(name, dtype, tuple(shape), offsets[0] + data_start, offsets[1] + data_start)


def int_list(value: Any, cap: int) -> bool:
    return (
        type(value) is list and len(value) <= cap and all(type(v) is int and v >= 0 for v in value)
    )


def fits_int64(
    shape: Sequence[int], itemsize: int = 1, strides: Sequence[int] = (), offset: int = 0
) -> bool:
    """Whether torch can hold a tensor of this shape (non-negative ints) in int64 arithmetic.

    Zero dims count as one: torch derives contiguous strides and byte counts from the other
    dims even when a tensor is empty, so ``[0, 10**20]`` (0 bytes) still overflows there.
    With ``strides``, the farthest element a view reaches must fit too.
    """
    span = itemsize
    for dim in shape:
        span *= max(dim, 1)
        if span > INT64_MAX:  # stop early: a file may list many huge dims
            return False
    if any(step > INT64_MAX for step in strides) or offset > INT64_MAX:
        return False
    reach = offset + sum(max(dim - 1, 0) * step for dim, step in zip(shape, strides, strict=False))
    return (reach + 1) * itemsize <= INT64_MAX


def decimal(text: str, width: int) -> bool:
    """Whether ``text`` is 1 to ``width`` ASCII digits. ``str.isdigit`` alone also accepts
    other scripts' digits and superscripts (``'²'``, ``'٣'``), which ``int`` then refuses or
    reads as another number."""
    return 0 < len(text) <= width and text.isascii() and text.isdigit()


def _check_layout(entries: tuple[Entry, ...], data_start: int, size: int, path: str) -> None:
    cursor = data_start
    for entry in sorted(entries, key=lambda e: (e.start, e.end)):
        if entry.start != cursor:
            what = "overlaps the tensor before it" if entry.start < cursor else "leaves a gap"
            raise _corrupt(
                path,
                f"its bytes start at {entry.start - data_start} and {what} (expected "
                f"{cursor - data_start}); offsets must be contiguous",
                key=entry.name,
            )
        cursor = entry.end
    if cursor != size:
        state = "truncated" if size < cursor else "padded with trailing bytes"
        raise _corrupt(
            path, f"the tensors need {cursor} bytes but the file has {size}; it is {state}"
        )


def _short(exc: BaseException) -> str:
    return str(exc)[:120] or type(exc).__name__


def _corrupt(path: str, what: str, key: str | None = None) -> CorruptCheckpointError:
    where = f" tensor `{key}`:" if key else ""
    return CorruptCheckpointError(
        f"{path}:{where} {what}. The file is damaged or not a checkpoint; restore it from a "
        "good copy (`torchvault verify` checks a file).",
        path=path,
        key=key,
    )


# ----------------------------------------------------------------------------- writing


class Blob(NamedTuple):
    """One tensor to write: its safetensors entry and the tensor its bytes come from.

    ``source`` may be on any device and need not be contiguous: it is made contiguous and
    copied to the CPU only while it is written, so a save holds at most one such copy.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: torch.Tensor
    nbytes: int


def build_header(blobs: list[Blob], metadata: dict[str, str]) -> bytes:
    """Serialize the header, space-padded so that tensor data starts on a 64-byte boundary.

    ``metadata`` must start with the ``torchvault.integrity`` and ``torchvault.checksums``
    placeholders (:func:`placeholders`); :func:`seal_header` fills both in place.
    """
    header: dict[str, Any] = {META: metadata}
    offset = 0
    for blob in blobs:
        header[blob.name] = {
            "dtype": blob.dtype,
            "shape": list(blob.shape),
            "data_offsets": [offset, offset + blob.nbytes],
        }
        offset += blob.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    pad = -(8 + len(raw)) % DATA_ALIGNMENT
    return raw + b" " * pad


def placeholders(count: int) -> dict[str, str]:
    """The first two metadata members, to be filled in by :func:`seal_header`."""
    return {INTEGRITY: PLACEHOLDER, CHECKSUMS: PLACEHOLDER * count}


def seal_header(raw: bytes, checksums: list[str]) -> bytes:
    """Return length prefix + header with the tensor checksums and the header checksum filled
    in. Both are fixed-width hex at fixed places, so the header keeps its length."""
    sums = "".join(checksums).encode("ascii")
    start = len(_SUMS_AT)
    if raw[:start] != _SUMS_AT or raw[start : start + len(sums) + 1] != b"0" * len(sums) + b'"':
        raise AssertionError("seal_header needs a header built with placeholders()")
    body = raw[:start] + sums + raw[start + len(sums) :]
    prefix = struct.pack("<Q", len(body))
    cut = len(PREFIX) + HASH_HEX
    digest = hash_bytes(prefix + body[cut:]).encode("ascii")
    return prefix + body[: len(PREFIX)] + digest + body[cut:]


class Deferred(NamedTuple):
    """A tensor known by its dtype and shape, made by ``read`` only when its bytes are
    written: a file whose tensors do not all fit in memory at once is written from these."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]


def write_blobs(handle: BinaryIO, blobs: Iterable[Blob]) -> list[str]:
    """Stream every blob's bytes to ``handle`` (no whole-file buffer); return their checksums.

    ``blobs`` may be a generator that makes each tensor only as it is asked for: each blob
    is let go once written, so only one such tensor is alive at a time.
    """
    sums = []
    for blob in blobs:
        sums.append(_write_one(handle, flat_bytes(blob.source)))
        del blob  # the generator makes the next tensor before the loop rebinds this name
    return sums


def _write_one(handle: BinaryIO, flat: torch.Tensor) -> str:
    if flat.device.type == "cpu" and flat.numel() <= CHUNK:
        view = byte_view(flat)
        handle.write(view)
        return hash_bytes(view)
    hasher = xxhash.xxh3_128()
    for piece in _chunks(flat):
        hasher.update(piece)
        handle.write(piece)
    return hasher.hexdigest()


def flat_bytes(source: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a 1-D uint8 tensor. ``as_strided`` because torch calls a tensor
    with a size-1 or size-0 dim contiguous whatever its stride, and ``view`` then refuses it."""
    flat = source.contiguous().reshape(-1)
    return flat.as_strided((flat.numel(),), (1,)).view(torch.uint8)


def byte_view(source: torch.Tensor) -> memoryview:
    """A tensor's bytes as a memoryview: no copy for a contiguous CPU tensor; others are made
    contiguous and copied to the CPU first."""
    return memoryview(flat_bytes(source).to("cpu").numpy())  # type: ignore[arg-type]


def _chunks(flat: torch.Tensor) -> Iterator[memoryview]:
    for start in range(0, flat.numel(), CHUNK):
        yield byte_view(flat[start : start + CHUNK])
