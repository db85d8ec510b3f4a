"""Build hostile checkpoint files in code, for the hostile-input and fault-injection tests.

Two kinds of file:

* :func:`write_raw` writes any safetensors-layout file (u64-LE header length, header bytes,
  data bytes) from a header dict or raw header bytes, with an optional lying length field.
* :func:`reseal` rewrites chosen members of a torchvault file (tree, tensor table,
  checksums, any ``__metadata__`` string, the tensor entries, the data) and recomputes the
  header integrity hash, exactly as an attacker could: the hash is unkeyed, so a file that
  passes the integrity check proves nothing; semantic validation has to catch the rest.

The sealing here is written from the format description, not imported from ``_format``,
so the tests check the specification rather than the implementation against itself.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

META = "__metadata__"
INTEGRITY = "torchvault.integrity"
TREE = "torchvault.tree"
TENSORS = "torchvault.tensors"
CHECKSUMS = "torchvault.checksums"
FORMAT = "torchvault.format"
VERSIONS = "torchvault.versions"
CREATED = "torchvault.created"
PREFIX = b'{"' + META.encode() + b'":{"' + INTEGRITY.encode() + b'":"'
HASH_HEX = 32
ALIGN = 64

DELETE = object()
"""A member value for :func:`reseal`: remove that member."""


@dataclass(frozen=True)
class Layout:
    """A file split into its parts, with absolute offsets."""

    header_len: int
    header_bytes: bytes
    header: dict[str, Any]  # parsed, in file order
    data: bytes

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.header.get(META, {}))

    def member(self, key: str) -> Any:
        """A torchvault metadata member, JSON-decoded."""
        return json.loads(self.metadata[key])

    @property
    def names(self) -> list[str]:
        """The stored tensors (blobs) in header order: a table entry's ``s`` indexes this."""
        return [name for name in self.header if name != META]

    def blob_index(self, name: str) -> int:
        return self.names.index(name)

    def tensor_spans(self) -> dict[str, tuple[int, int]]:
        """Each tensor's absolute [start, end) byte range in the file."""
        return {
            name: (
                self.data_start + spec["data_offsets"][0],
                self.data_start + spec["data_offsets"][1],
            )
            for name, spec in self.header.items()
            if name != META
        }


PEAK_RSS = """
def peak_rss():
    # The peak resident memory of this process in bytes. VmHWM starts afresh at exec;
    # ru_maxrss does not on Linux (a child forked from a large pytest process starts at the
    # parent's peak, which hides any growth below it).
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")
"""
"""Source of ``peak_rss()`` for the child processes that measure a reader's memory."""


def xxh3_hex(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def dumps(value: Any) -> str:
    """Compact JSON, the way torchvault writes every member."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True)


def header_bytes(header: Mapping[str, Any] | bytes | str, *, pad: bool = False) -> bytes:
    """The header as bytes; a dict is dumped compactly. ``pad`` space-pads to 64-byte data."""
    if isinstance(header, bytes):
        raw = header
    elif isinstance(header, str):
        raw = header.encode("utf-8")
    else:
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    if pad:
        raw += b" " * (-(8 + len(raw)) % ALIGN)
    return raw


def raw_file_bytes(
    header: Mapping[str, Any] | bytes | str,
    data: bytes = b"",
    *,
    length: int | None = None,
    pad: bool = False,
) -> bytes:
    """Length prefix + header + data. ``length`` overrides the prefix (a lying length)."""
    raw = header_bytes(header, pad=pad)
    n = len(raw) if length is None else length
    return struct.pack("<Q", n) + raw + data


def write_raw(
    path: str | os.PathLike[str],
    header: Mapping[str, Any] | bytes | str,
    data: bytes = b"",
    *,
    length: int | None = None,
    pad: bool = False,
) -> Path:
    """Write a safetensors-layout file; see :func:`raw_file_bytes`. Returns the path."""
    out = Path(path)
    out.write_bytes(raw_file_bytes(header, data, length=length, pad=pad))
    return out


def tensor_header(specs: Mapping[str, tuple[str, list[int], int, int]]) -> dict[str, Any]:
    """A header dict from ``{name: (dtype, shape, begin, end)}``."""
    return {
        name: {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
        for name, (dtype, shape, begin, end) in specs.items()
    }


def read_layout(path: str | os.PathLike[str]) -> Layout:
    """Split a well-formed file (torchvault or safetensors) into its parts."""
    blob = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    raw = blob[8 : 8 + n]
    return Layout(n, raw, json.loads(raw), blob[8 + n :])


def seal(raw: bytes) -> bytes:
    """Fill in the integrity hash of a torchvault header; return prefix + header.

    ``raw`` must start with PREFIX followed by 32 placeholder characters and a quote. The
    hash is xxh3-128 of the 8-byte length prefix and every header byte after the hash.
    """
    if (
        not raw.startswith(PREFIX)
        or raw[len(PREFIX) + HASH_HEX : len(PREFIX) + HASH_HEX + 1] != b'"'
    ):
        raise ValueError("the header does not start with the integrity member")
    prefix = struct.pack("<Q", len(raw))
    cut = len(PREFIX) + HASH_HEX
    digest = xxh3_hex(prefix + raw[cut:]).encode("ascii")
    return prefix + raw[: len(PREFIX)] + digest + raw[cut:]


def build_sealed(
    metadata: Mapping[str, str],
    entries: Mapping[str, Any],
    data: bytes,
    *,
    extra_metadata: bytes = b"",
    extra_header: bytes = b"",
) -> bytes:
    """A complete, correctly sealed torchvault file from its parts.

    ``metadata`` need not contain the integrity member: it is put first. ``extra_metadata``
    and ``extra_header`` are raw JSON spliced just before the closing brace of
    ``__metadata__`` and of the whole header (to smuggle in what ``json.dumps`` would never
    write, such as duplicate keys); start them with a comma.
    """
    meta = {INTEGRITY: "0" * HASH_HEX}
    meta.update((k, v) for k, v in metadata.items() if k != INTEGRITY)
    raw = b'{"' + META.encode() + b'":' + dumps(meta).encode("ascii")[:-1] + extra_metadata + b"}"
    if entries:
        raw += b"," + dumps(dict(entries)).encode("ascii")[1:-1]
    raw += extra_header + b"}"
    raw += b" " * (-(8 + len(raw)) % ALIGN)
    return seal(raw) + data


def reseal(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None = None,
    *,
    members: Mapping[str, Any] | None = None,
    entries: Mapping[str, Any] | None = None,
    data: bytes | None = None,
    extra_metadata: bytes = b"",
    extra_header: bytes = b"",
) -> Path:
    """Rewrite members of the torchvault file ``src`` and seal the header again.

    Args:
        members: ``{metadata key: value}``. A str is written verbatim (the checksum
            string, the format version, or hand-written JSON), the :data:`DELETE` sentinel
            removes the member, anything else is JSON-encoded first (so
            ``{TREE: {"dict": {}}}`` sets the tree). A new member goes last.
        entries: replaces the safetensors tensor entries (name -> dtype/shape/offsets).
        data: replaces the tensor bytes.
        extra_metadata, extra_header: raw JSON spliced in, see :func:`build_sealed`.

    Returns the written path (``dst``, or ``src`` rewritten in place).
    """
    layout = read_layout(src)
    meta = layout.metadata
    for key, value in (members or {}).items():
        if value is DELETE:
            meta.pop(key, None)
        elif isinstance(value, str):
            meta[key] = value
        else:
            meta[key] = dumps(value)
    tensors = {k: v for k, v in layout.header.items() if k != META}
    out = Path(dst if dst is not None else src)
    out.write_bytes(
        build_sealed(
            meta,
            tensors if entries is None else entries,
            layout.data if data is None else data,
            extra_metadata=extra_metadata,
            extra_header=extra_header,
        )
    )
    return out


def recompute_checksums(
    src: str | os.PathLike[str], dst: str | os.PathLike[str] | None = None
) -> Path:
    """Recompute every tensor checksum from the data bytes and reseal (a full forgery)."""
    layout = read_layout(src)
    sums = "".join(
        xxh3_hex(layout.data[spec["data_offsets"][0] : spec["data_offsets"][1]])
        for name, spec in layout.header.items()
        if name != META
    )
    return reseal(src, dst, members={CHECKSUMS: sums})


def seal_document(document: Mapping[str, Any]) -> bytes:
    """A run folder's sealed JSON (manifest, pointer, marker) from its members: ``{"integrity":
    "<xxh3-128 of every byte after this member>", ...}``, compact, as the writer dumps it."""
    rest = json.dumps(dict(document), separators=(",", ":"), ensure_ascii=True)[1:]
    return (
        b'{"integrity":"' + xxh3_hex(rest.encode("ascii")).encode("ascii") + b'",' + rest.encode()
    )


def flip_bit(blob: bytes, bit: int) -> bytes:
    """``blob`` with bit ``bit`` (0 = least significant bit of byte 0) inverted."""
    out = bytearray(blob)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def small_state() -> dict[str, Any]:
    """A small object exercising every kind of table entry: a plain blob, a view into a
    shared blob, an odd-sized U8 blob, a numpy array, a Parameter, and scalar leaves.
    About 2.4 KB once saved."""
    import numpy as np
    import torch

    w = torch.arange(256, dtype=torch.float32).reshape(16, 16)
    return {
        "w": w,
        "rows": w[2:4],
        "odd": torch.arange(7, dtype=torch.uint8),
        "i": torch.arange(5),
        "arr": np.arange(3, dtype=np.float64),
        "p": torch.nn.Parameter(torch.ones(3)),
        "step": 3,
        "cfg": {"lr": 0.1, "name": "x", "b": b"xy", "k": {1: 2}},
    }


def assert_same(got: Any, want: Any, where: str = "") -> None:
    """Exact structural equality: types, dtypes, shapes and bytes of every leaf."""
    import numpy as np
    import torch

    assert type(got) is type(want), f"{where}: {type(got)} != {type(want)}"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype, where
        assert got.shape == want.shape, where
        assert got.requires_grad == want.requires_grad, where
        assert torch.equal(got.detach(), want.detach()), where
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype, where
        assert got.shape == want.shape, where
        assert np.array_equal(got, want), where
    elif isinstance(want, dict):
        assert list(got) == list(want), where
        for key in want:
            assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_same(a, b, f"{where}.{i}")
    else:
        assert got == want, where
