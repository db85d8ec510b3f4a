"""Hostile input: truncated, bit-flipped, malformed and malicious files.

The promise under test: every such file makes ``tv.load``, ``tv.verify`` and ``tv.inspect``
raise a typed torchvault error whose message names the file; never another exception, a
hang, a huge allocation or wrong data. The attacks follow the security anchors' corpus
(S1-S5: safetensors-header attacks) and fault plan (F3 truncation, F4 bit flips). Semantic
attacks re-seal the header integrity hash, as any attacker can, so the checks past the hash
are exercised too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import attack_files as af
import torchvault as tv
from torchvault import _tree
from torchvault.errors import CorruptCheckpointError, TorchVaultError, UnsupportedFormatError

READERS: dict[str, Callable[[Path], object]] = {
    "load": tv.load,
    "verify": tv.verify,
    "inspect": tv.inspect,
}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def tv_file(tmp_path: Path) -> Path:
    path = tmp_path / "good.tv"
    tv.save(af.small_state(), path)
    return path


@pytest.fixture
def st_file(tmp_path: Path) -> Path:
    path = tmp_path / "good.safetensors"
    save_file(
        {
            "a": torch.arange(20, dtype=torch.float32).reshape(4, 5),
            "odd": torch.arange(7, dtype=torch.uint8),
            "c": torch.arange(3, dtype=torch.int64),
        },
        str(path),
    )
    return path


def wrongly_handled(reader: Callable[[Path], object], path: Path) -> str | None:
    """None when ``reader`` rejects ``path`` with a TorchVaultError, else what it did."""
    try:
        reader(path)
    except TorchVaultError:
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return "accepted the file"


def problems(path: Path, readers: tuple[str, ...] = ("load", "verify", "inspect")) -> list[str]:
    """What each reader did wrong on ``path``, which must be rejected: empty when every
    reader raised a TorchVaultError."""
    found = ((name, wrongly_handled(READERS[name], path)) for name in readers)
    return [f"{name}: {what}" for name, what in found if what is not None]


def write_fresh(path: Path, blob: bytes) -> Path:
    """Write ``blob`` as a new inode, so maps of earlier contents stay valid."""
    path.unlink(missing_ok=True)
    path.write_bytes(blob)
    return path


# ----------------------------------------------------------------------------- F3 truncation


def truncation_lengths(path: Path) -> list[int]:
    layout = af.read_layout(path)
    size = path.stat().st_size
    points = {8, layout.data_start}
    for start, end in layout.tensor_spans().values():
        points |= {start, end}
    lengths = {0, 1, 7, 8, 9, 15, 16}
    lengths |= {p + d for p in points for d in (-1, 0, 1)}
    lengths |= {size * i // 64 for i in range(64)}
    return sorted(n for n in lengths if 0 <= n < size)


@pytest.mark.parametrize("kind", ["torchvault", "safetensors"])
def test_every_truncation_is_rejected_by_every_reader(
    kind: str, tv_file: Path, st_file: Path, tmp_path: Path
) -> None:
    source = tv_file if kind == "torchvault" else st_file
    blob = source.read_bytes()
    lengths = truncation_lengths(source)
    assert len(lengths) >= 70
    failures = {}
    for n in lengths:
        found = problems(write_fresh(tmp_path / "cut.bin", blob[:n]))
        if found:
            failures[n] = found
    assert not failures, f"{len(failures)} of {len(lengths)} truncations not rejected: {failures}"


def test_truncation_error_is_corrupt_and_names_the_file(tv_file: Path, tmp_path: Path) -> None:
    blob = tv_file.read_bytes()
    path = write_fresh(tmp_path / "cut.tv", blob[:-1])
    with pytest.raises(CorruptCheckpointError, match="truncated") as info:
        tv.load(path)
    assert str(path) in str(info.value)
    assert info.value.path == str(path)


# ----------------------------------------------------------------------------- F4 bit flips


def flip_positions(path: Path) -> dict[str, list[int]]:
    layout = af.read_layout(path)
    size = path.stat().st_size
    rng = random.Random(20240611)
    return {
        "first-64-bytes": list(range(64 * 8)),
        "header": [rng.randrange(8 * 8, layout.data_start * 8) for _ in range(256)],
        "data": [rng.randrange(layout.data_start * 8, size * 8) for _ in range(256)],
    }


@pytest.mark.parametrize("region", ["first-64-bytes", "header", "data"])
def test_every_single_bit_flip_is_detected_by_load(
    region: str, tv_file: Path, tmp_path: Path
) -> None:
    blob = tv_file.read_bytes()
    bits = flip_positions(tv_file)[region]
    assert len(bits) in (256, 512)
    undetected, wrong_type = [], []
    for bit in bits:
        path = write_fresh(tmp_path / "flip.tv", af.flip_bit(blob, bit))
        try:
            tv.load(path)
        except TorchVaultError:
            continue
        except Exception as exc:
            wrong_type.append((bit, f"{type(exc).__name__}: {str(exc)[:120]}"))
        else:
            undetected.append(bit)
    assert not undetected, f"{len(undetected)}/{len(bits)} flips loaded silently: {undetected}"
    assert not wrong_type, f"{len(wrong_type)}/{len(bits)} flips raised untyped: {wrong_type}"


def test_verify_names_the_tensor_whose_data_bit_flipped(tv_file: Path, tmp_path: Path) -> None:
    blob = tv_file.read_bytes()
    spans = af.read_layout(tv_file).tensor_spans()
    misnamed = []
    for bit in flip_positions(tv_file)["data"]:
        path = write_fresh(tmp_path / "flip.tv", af.flip_bit(blob, bit))
        owner = next(name for name, (lo, hi) in spans.items() if lo <= bit // 8 < hi)
        with pytest.raises(CorruptCheckpointError) as info:
            tv.verify(path)
        if info.value.key != owner or str(path) not in str(info.value):
            misnamed.append((bit, owner, info.value.key, str(info.value)[:100]))
    assert not misnamed


def test_data_flip_is_invisible_to_lazy_load_but_caught_by_verify(
    tv_file: Path, tmp_path: Path
) -> None:
    blob = tv_file.read_bytes()
    start, _ = af.read_layout(tv_file).tensor_spans()["w"]
    path = write_fresh(tmp_path / "flip.tv", af.flip_bit(blob, start * 8))
    tv.load(path, lazy=True)  # documented: lazy loads skip data checksums
    with pytest.raises(CorruptCheckpointError):
        tv.verify(path)


# ----------------------------------------------------------------------------- S1-S5 corpus


def entry(dtype: str, shape: list[Any], begin: Any, end: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _valid_header(n: int = 8) -> bytes:
    return af.header_bytes({"a": entry("U8", [n], 0, n)})


# Each case: (header bytes or dict, data bytes, length field override or None).
Case = tuple[Any, bytes, int | None]

S1_HEADER_FRAMING: dict[str, Case] = {
    "length-0-empty": (b"", b"", 0),
    "length-0-with-bytes": (_valid_header(), b"\0" * 8, 0),
    "length-1": (b"{", b"", 1),
    "length-7-cuts-the-json": (_valid_header(), b"\0" * 8, 7),
    "length-u64-max": (_valid_header(), b"\0" * 8, 2**64 - 1),
    "length-2**63": (_valid_header(), b"\0" * 8, 2**63),
    "length-over-100MB-cap": (_valid_header(), b"\0" * 8, 100_000_001),
    "length-past-eof": (_valid_header(), b"\0" * 8, len(_valid_header()) + 9),
    "not-utf8": (b'{"\xff\xfe":{}}', b"", None),
    "not-utf8-overlong-slash": (b'{"\xc0\xaf":{}}', b"", None),
    "utf8-bom": (b"\xef\xbb\xbf{}", b"", None),
    "leading-space": (b" {}", b"", None),
    "json-array": (b'[{"a":1}]', b"", None),
    "json-empty-array": (b"[]", b"", None),
    "json-string": (b'"{}"', b"", None),
    "json-number": (b"12", b"", None),
    "json-null": (b"null", b"", None),
    "two-objects": (b"{}{}", b"", None),
    "trailing-garbage": (b"{} x", b"", None),
    "nul-padding": (b"{}\0\0", b"", None),
    "unterminated": (b'{"a":', b"", None),
}

S2_DUPLICATE_KEYS: dict[str, Case] = {
    "tensor-twice": (
        b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},'
        b'"a":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}',
        b"\0" * 8,
        None,
    ),
    "escape-spelled-twin": (
        b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},'
        b'"\\u0061":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}',
        b"\0" * 8,
        None,
    ),
    "metadata-twice": (b'{"__metadata__":{},"__metadata__":{}}', b"", None),
    "metadata-escape-twin": (b'{"__metadata__":{},"\\u005f_metadata__":{}}', b"", None),
    "key-twice-inside-metadata": (b'{"__metadata__":{"k":"v","k":"w"}}', b"", None),
    "escape-twin-inside-metadata": (b'{"__metadata__":{"k":"v","\\u006b":"w"}}', b"", None),
    "field-twice-in-entry": (
        b'{"a":{"dtype":"U8","dtype":"U8","shape":[4],"data_offsets":[0,4]}}',
        b"\0" * 4,
        None,
    ),
}

S3_OFFSETS: dict[str, Case] = {
    "overlapping": ({"a": entry("U8", [8], 0, 8), "b": entry("U8", [8], 4, 12)}, bytes(12), None),
    "gap": ({"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 8, 12)}, bytes(12), None),
    "not-from-zero": ({"a": entry("U8", [4], 4, 8)}, bytes(8), None),
    "reversed": ({"a": entry("U8", [0], 8, 0)}, bytes(8), None),
    "past-eof": ({"a": entry("U8", [8], 0, 8)}, bytes(4), None),
    "far-past-eof": ({"a": entry("U8", [2**40], 0, 2**40)}, bytes(4), None),
    "trailing-bytes": ({"a": entry("U8", [4], 0, 4)}, bytes(8), None),
    "duplicate-range": ({"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 0, 4)}, bytes(8), None),
    "negative": ({"a": entry("U8", [4], -4, 0)}, bytes(4), None),
    "floats": ({"a": entry("U8", [4], 0.0, 4.0)}, bytes(4), None),
    "bools": ({"a": entry("U8", [1], False, True)}, bytes(1), None),
    "strings": ({"a": entry("U8", [4], "0", "4")}, bytes(4), None),
    "three-offsets": (
        {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4, 8]}},
        bytes(8),
        None,
    ),
    "one-offset": ({"a": {"dtype": "U8", "shape": [4], "data_offsets": [4]}}, bytes(4), None),
    "offsets-object": (
        {"a": {"dtype": "U8", "shape": [4], "data_offsets": {"0": 4}}},
        bytes(4),
        None,
    ),
}

S4_SHAPES: dict[str, Case] = {
    "product-wraps-u64-to-zero": ({"a": entry("U8", [2**32, 2**32], 0, 0)}, b"", None),
    "product-overflows-u64": ({"a": entry("F32", [2**32, 2**32, 4], 0, 16)}, bytes(16), None),
    "product-times-itemsize-wraps": ({"a": entry("F64", [2**61], 0, 0)}, b"", None),
    "huge-shape-tiny-range": ({"a": entry("F32", [10**9, 10**9], 0, 4)}, bytes(4), None),
    "zero-size-inside-another": (
        {"a": entry("F32", [2], 0, 8), "z": entry("F32", [0], 4, 4)},
        bytes(8),
        None,
    ),
    "negative-dim": ({"a": entry("U8", [-1, -4], 0, 4)}, bytes(4), None),
    "float-dim": ({"a": entry("U8", [4.0], 0, 4)}, bytes(4), None),
    "bool-dim": ({"a": entry("U8", [True], 0, 1)}, bytes(1), None),
    "65-dims": ({"a": entry("U8", [1] * 65, 0, 1)}, bytes(1), None),
    "shape-string": ({"a": entry("U8", "4", 0, 4)}, bytes(4), None),  # type: ignore[arg-type]
    "shape-null": ({"a": entry("U8", None, 0, 4)}, bytes(4), None),  # type: ignore[arg-type]
}

S5_ENTRIES_AND_LITERALS: dict[str, Case] = {
    "metadata-int-value": ({"__metadata__": {"k": 1}}, b"", None),
    "metadata-null-value": ({"__metadata__": {"k": None}}, b"", None),
    "metadata-object-value": ({"__metadata__": {"k": {"x": "y"}}}, b"", None),
    "metadata-is-list": ({"__metadata__": ["k"]}, b"", None),
    "metadata-is-string": ({"__metadata__": "k"}, b"", None),
    "metadata-as-tensor-entry": ({"__metadata__": entry("U8", [4], 0, 4)}, bytes(4), None),
    "unknown-dtype": ({"a": entry("F128", [1], 0, 16)}, bytes(16), None),
    "lowercase-dtype": ({"a": entry("f32", [1], 0, 4)}, bytes(4), None),
    "dtype-os.system": ({"a": entry("os.system", [1], 0, 1)}, bytes(1), None),
    "dtype-int": ({"a": entry(4, [1], 0, 4)}, bytes(4), None),  # type: ignore[arg-type]
    "dtype-list": ({"a": entry(["F32"], [1], 0, 4)}, bytes(4), None),  # type: ignore[arg-type]
    "extra-key": ({"a": {**entry("U8", [4], 0, 4), "x": 1}}, bytes(4), None),
    "missing-key": ({"a": {"dtype": "U8", "shape": [4]}}, bytes(4), None),
    "entry-is-list": ({"a": ["U8", [4], [0, 4]]}, bytes(4), None),
    "entry-is-null": ({"a": None}, b"", None),
    "nan-literal": (b'{"a":{"dtype":"U8","shape":[NaN],"data_offsets":[0,0]}}', b"", None),
    "infinity-literal": (
        b'{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,Infinity]}}',
        b"",
        None,
    ),
    "minus-infinity-literal": (
        b'{"a":{"dtype":"U8","shape":[-Infinity],"data_offsets":[0,0]}}',
        b"",
        None,
    ),
    "float-overflow-1e999": (
        b'{"a":{"dtype":"U8","shape":[1e999],"data_offsets":[0,0]}}',
        b"",
        None,
    ),
    "int-1000-digits": (
        b'{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,' + b"9" * 1000 + b"]}}",
        b"",
        None,
    ),
    "int-100000-digits": (
        b'{"a":{"dtype":"U8","shape":[' + b"1" * 100_000 + b'],"data_offsets":[0,0]}}',
        b"",
        None,
    ),
    "float-1000-digits": (
        b'{"a":{"dtype":"U8","shape":[0.' + b"1" * 1000 + b'],"data_offsets":[0,0]}}',
        b"",
        None,
    ),
    "nesting-100000-arrays": (b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", None),
    "nesting-100000-objects": (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, b"", None),
    "nesting-unclosed": (b'{"a":' + b"[" * 100_000, b"", None),
    "too-many-containers": (b'{"a":"' + b"{" * 4_000_001 + b'"}', b"", None),
}

CORPUS = {
    **{f"S1-{k}": v for k, v in S1_HEADER_FRAMING.items()},
    **{f"S2-{k}": v for k, v in S2_DUPLICATE_KEYS.items()},
    **{f"S3-{k}": v for k, v in S3_OFFSETS.items()},
    **{f"S4-{k}": v for k, v in S4_SHAPES.items()},
    **{f"S5-{k}": v for k, v in S5_ENTRIES_AND_LITERALS.items()},
}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_safetensors_header_attack_is_corrupt_checkpoint_error(case: str, tmp_path: Path) -> None:
    header, data, length = CORPUS[case]
    path = af.write_raw(tmp_path / "attack.safetensors", header, data, length=length)
    for name, reader in READERS.items():
        with pytest.raises(CorruptCheckpointError) as info:
            reader(path)
        assert str(path) in str(info.value), name


def test_file_shorter_than_the_length_prefix_is_corrupt(tmp_path: Path) -> None:
    for n in range(8):
        path = write_fresh(tmp_path / "short.tv", b"\x10" * n)
        with pytest.raises(CorruptCheckpointError, match="8-byte length prefix"):
            tv.load(path)


def test_empty_safetensors_header_is_a_valid_empty_file(tmp_path: Path) -> None:
    path = af.write_raw(tmp_path / "empty.safetensors", b"{}")
    assert tv.load(path) == {}
    assert tv.verify(path).tensors == 0


def test_offsets_listed_out_of_order_in_the_header_are_valid(tmp_path: Path) -> None:
    header = {"b": entry("U8", [2], 2, 4), "a": entry("U8", [2], 0, 2)}
    path = af.write_raw(tmp_path / "order.safetensors", header, b"\x01\x02\x03\x04")
    got = tv.load(path)
    assert got["a"].tolist() == [1, 2]
    assert got["b"].tolist() == [3, 4]


def test_zero_size_tensor_at_another_tensors_start_loads_both(tmp_path: Path) -> None:
    header = {"z": entry("F32", [0], 0, 0), "a": entry("F32", [1], 0, 4)}
    path = af.write_raw(tmp_path / "alias.safetensors", header, b"\0\0\x80\x3f")
    got = tv.load(path)
    assert got["z"].shape == (0,)
    assert got["a"].tolist() == [1.0]


def test_zero_sized_shape_with_huge_dims_loads_an_empty_tensor_or_is_rejected(
    tmp_path: Path,
) -> None:
    header = {"a": entry("F32", [0, 2**61, 2**61, 2**61], 0, 0)}
    path = af.write_raw(tmp_path / "zero.safetensors", header)
    try:
        got = tv.load(path)
    except TorchVaultError:
        return
    assert got["a"].numel() == 0


# ----------------------------------------------------------------------------- S5 many entries

_MANY_ENTRIES_CHILD = af.PEAK_RSS + textwrap.dedent(
    """
    import sys, time
    import torchvault as tv
    base = peak_rss()
    start = time.perf_counter()
    try:
        tv.load(sys.argv[1])
        outcome = "loaded"
    except tv.TorchVaultError:
        outcome = "rejected"
    seconds = time.perf_counter() - start
    grown = peak_rss() - base
    print(outcome, seconds, grown)
    """
)


@pytest.mark.parametrize("count", [10**5, 10**6])
def test_many_tiny_entries_are_handled_in_bounded_time_and_memory(
    count: int, tmp_path: Path
) -> None:
    # One-byte tensors, contiguous: a structurally valid file, as large as the caps allow.
    path = tmp_path / "many.safetensors"
    parts = (
        b'"t%d":{"dtype":"U8","shape":[1],"data_offsets":[%d,%d]}' % (i, i, i + 1)
        for i in range(count)
    )
    af.write_raw(path, b"{" + b",".join(parts) + b"}", bytes(count))
    # A fresh interpreter, so the peak RSS is this load's alone (VmHWM never goes down).
    try:
        done = subprocess.run(
            [sys.executable, "-c", _MANY_ENTRIES_CHILD, str(path)],
            capture_output=True,
            text=True,
            timeout=90,
            check=True,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading {count} tiny entries took over 90 s")
    outcome, seconds, grown = done.stdout.split()
    assert outcome in ("loaded", "rejected")
    # A guard against a hang or quadratic work (hours at this count), not a speed target:
    # a loaded shared machine can stretch the ~2 s this takes several times.
    assert float(seconds) < 30, f"{outcome} {count} entries in {float(seconds):.1f} s"
    assert int(grown) < 512 << 20, f"{outcome} {count} entries with {int(grown) >> 20} MiB"


# ----------------------------------------------------------------------------- semantic attacks
#
# Each case maps the good file's layout to reseal() arguments. The header integrity hash is
# recomputed, so only the semantic checks stand between the file and the caller.

TREE, TENSORS, CHECKSUMS, FORMAT = af.TREE, af.TENSORS, af.CHECKSUMS, af.FORMAT
Edit = Callable[[af.Layout], dict[str, Any]]


def tree_case(node: Any) -> Edit:
    """Replace the tree's ``cfg`` subtree with ``node``."""

    def edit(layout: af.Layout) -> dict[str, Any]:
        tree = layout.member(TREE)
        tree["dict"]["cfg"] = node
        return {"members": {TREE: tree}}

    return edit


def tree_text(text: str) -> Edit:
    return lambda layout: {"members": {TREE: text}}


def table_entry(index: int, **fields: Any) -> Edit:
    """Replace table entry ``index`` with an explicit object entry, updated by ``fields``
    (a field set to ``None`` is removed)."""

    def edit(layout: af.Layout) -> dict[str, Any]:
        table = layout.member(TENSORS)
        current = table[index]
        if isinstance(current, int):
            spec = layout.header[layout.names[current]]
            dtype = {"F32": "float32", "I64": "int64", "U8": "uint8", "F64": "float64"}
            current = {"s": current, "dtype": dtype[spec["dtype"]], "shape": spec["shape"]}
        current = {**current, **fields}
        table[index] = {k: v for k, v in current.items() if v is not None}
        return {"members": {TENSORS: table}}

    return edit


def table_raw(index: int, value: Any) -> Edit:
    def edit(layout: af.Layout) -> dict[str, Any]:
        table = layout.member(TENSORS)
        table[index] = value
        return {"members": {TENSORS: table}}

    return edit


def members(**values: Any) -> Edit:
    renamed = {f"torchvault.{k}": v for k, v in values.items()}
    return lambda layout: {"members": renamed}


def checksums(change: Callable[[str], str]) -> Edit:
    return lambda layout: {"members": {CHECKSUMS: change(layout.metadata[CHECKSUMS])}}


def nested(depth: int, leaf: Any = 1, tag: str = "list") -> Any:
    node = leaf
    for _ in range(depth):
        node = {tag: [node]} if tag == "list" else {tag: {"x": node}}
    return node


# Tree paths in the good file: table entries 0 w, 1 rows (a view of w), 2 odd, 3 i,
# 4 arr (numpy), 5 p (Parameter).
W, ROWS, ODD, I64, ARR, PARAM = range(6)

SEMANTIC: dict[str, tuple[Edit, type[TorchVaultError]]] = {
    # --- the object tree
    "tree-unknown-tag": (tree_case({"pickle": "cos\nsystem\n"}), CorruptCheckpointError),
    "tree-two-tags": (tree_case({"dict": {}, "list": []}), CorruptCheckpointError),
    "tree-empty-object": (tree_case({}), CorruptCheckpointError),
    "tree-ref-out-of-range": (tree_case({"tensor": 99}), CorruptCheckpointError),
    "tree-ref-negative": (tree_case({"tensor": -1}), CorruptCheckpointError),
    "tree-ref-bool": (tree_case({"tensor": True}), CorruptCheckpointError),
    "tree-ref-float": (tree_case({"tensor": 0.0}), CorruptCheckpointError),
    "tree-ref-string": (tree_case({"tensor": "0"}), CorruptCheckpointError),
    "tree-ref-huge": (tree_case({"tensor": 10**20}), CorruptCheckpointError),
    "tree-pair-unhashable-list-key": (
        tree_case({"dict": [[{"list": [1]}, 1]]}),
        CorruptCheckpointError,
    ),
    "tree-pair-unhashable-dict-key": (
        tree_case({"dict": [[{"dict": {}}, 1]]}),
        CorruptCheckpointError,
    ),
    "tree-pair-ndarray-key": (tree_case({"dict": [[{"tensor": ARR}, 1]]}), CorruptCheckpointError),
    "tree-pair-duplicate-keys": (tree_case({"dict": [[1, "a"], [1, "b"]]}), CorruptCheckpointError),
    "tree-pair-true-and-1": (tree_case({"odict": [[True, "a"], [1, "b"]]}), CorruptCheckpointError),
    "tree-pair-1-and-1.0": (tree_case({"dict": [[1, "a"], [1.0, "b"]]}), CorruptCheckpointError),
    "tree-pair-not-a-pair": (tree_case({"dict": [[1]]}), CorruptCheckpointError),
    "tree-pair-triple": (tree_case({"dict": [[1, 2, 3]]}), CorruptCheckpointError),
    "tree-dict-payload-string": (tree_case({"dict": "x"}), CorruptCheckpointError),
    "tree-list-payload-object": (tree_case({"list": {}}), CorruptCheckpointError),
    "tree-deeper-than-max-depth-lists": (
        tree_case(nested(_tree.MAX_DEPTH + 1)),
        CorruptCheckpointError,
    ),
    "tree-deeper-than-max-depth-dicts": (
        tree_case(nested(_tree.MAX_DEPTH + 1, tag="dict")),
        CorruptCheckpointError,
    ),
    "tree-100000-nested-arrays": (tree_text("[" * 100_000 + "]" * 100_000), CorruptCheckpointError),
    "tree-float-tag-finite": (tree_case({"float": "1.5"}), CorruptCheckpointError),
    "tree-float-tag-number": (tree_case({"float": 1.5}), CorruptCheckpointError),
    "tree-float-tag-garbage": (tree_case({"float": "nan(0x1)"}), CorruptCheckpointError),
    "tree-bytes-bad-base64": (tree_case({"bytes": "!!!!"}), CorruptCheckpointError),
    "tree-bytes-bad-padding": (tree_case({"bytes": "abc"}), CorruptCheckpointError),
    "tree-bytes-non-ascii": (
        tree_case({"bytes": "\u00e9\u00e9\u00e9\u00e9"}),
        CorruptCheckpointError,
    ),
    "tree-bytes-number": (tree_case({"bytes": 5}), CorruptCheckpointError),
    "tree-bytearray-bad-base64": (tree_case({"bytearray": "a=b="}), CorruptCheckpointError),
    "tree-device-unknown-type": (tree_case({"device": "abc"}), CorruptCheckpointError),
    "tree-device-uppercase": (tree_case({"device": "CUDA"}), CorruptCheckpointError),
    "tree-device-empty": (tree_case({"device": ""}), CorruptCheckpointError),
    "tree-device-number": (tree_case({"device": 0}), CorruptCheckpointError),
    "tree-device-list": (tree_case({"device": ["cpu"]}), CorruptCheckpointError),
    "tree-dtype-os.system": (tree_case({"dtype": "os.system"}), CorruptCheckpointError),
    "tree-dtype-unknown": (tree_case({"dtype": "float128"}), CorruptCheckpointError),
    "tree-dtype-number": (tree_case({"dtype": 5}), CorruptCheckpointError),
    "tree-dtype-list": (tree_case({"dtype": ["float32"]}), CorruptCheckpointError),
    "tree-npscalar-wrong-byte-count": (
        tree_case({"npscalar": ["<f4", "0000"]}),
        CorruptCheckpointError,
    ),
    "tree-npscalar-object-dtype": (
        tree_case({"npscalar": ["|O", "0000000000000000"]}),
        CorruptCheckpointError,
    ),
    "tree-npscalar-big-endian": (
        tree_case({"npscalar": [">f4", "00000000"]}),
        CorruptCheckpointError,
    ),
    "tree-npscalar-bad-hex": (tree_case({"npscalar": ["<f4", "zzzzzzzz"]}), CorruptCheckpointError),
    "tree-npscalar-one-part": (tree_case({"npscalar": ["<f4"]}), CorruptCheckpointError),
    "tree-npscalar-unhashable-dtype": (
        tree_case({"npscalar": [["<f4"], "00000000"]}),
        CorruptCheckpointError,
    ),
    "tree-bigint-decimal": (tree_case({"int": "12"}), CorruptCheckpointError),
    "tree-bigint-bad-hex": (tree_case({"int": "0xZZ"}), CorruptCheckpointError),
    "tree-bigint-number": (tree_case({"int": 5}), CorruptCheckpointError),
    "tree-int-2**64": (tree_case(2**64), CorruptCheckpointError),
    "tree-int-below-int64": (tree_case(-(2**63) - 1), CorruptCheckpointError),
    "tree-complex-garbage": (tree_case({"complex": ["1", "x"]}), CorruptCheckpointError),
    "tree-complex-one-part": (tree_case({"complex": ["1"]}), CorruptCheckpointError),
    "tree-size-strings": (tree_case({"size": ["a"]}), CorruptCheckpointError),
    "tree-size-floats": (tree_case({"size": [1.5]}), CorruptCheckpointError),
    "tree-not-json": (tree_text("{"), CorruptCheckpointError),
    "tree-nan": (tree_text("NaN"), CorruptCheckpointError),
    "tree-duplicate-key": (tree_text('{"dict":{"a":1,"a":2}}'), CorruptCheckpointError),
    "tree-escape-twin-key": (tree_text('{"dict":{"a":1,"\\u0061":2}}'), CorruptCheckpointError),
    "tree-lone-surrogate": (tree_text('"\ud800"'), CorruptCheckpointError),
    "tree-missing": (members(tree=af.DELETE), CorruptCheckpointError),
    # --- the tensor table
    "table-not-an-array": (members(tensors={"0": 0}), CorruptCheckpointError),
    "table-missing": (members(tensors=af.DELETE), CorruptCheckpointError),
    "table-shorter-than-tree": (
        lambda layout: {"members": {TENSORS: layout.member(TENSORS)[:2]}},
        CorruptCheckpointError,
    ),
    "table-blob-index-out-of-range": (table_raw(W, 99), CorruptCheckpointError),
    "table-blob-index-negative": (table_raw(W, -1), CorruptCheckpointError),
    "table-blob-index-bool": (table_raw(W, True), CorruptCheckpointError),
    "table-blob-index-float": (table_raw(W, 0.0), CorruptCheckpointError),
    "table-entry-string": (table_raw(W, "w"), CorruptCheckpointError),
    "table-entry-null": (table_raw(W, None), CorruptCheckpointError),
    "table-entry-list": (table_raw(W, [0]), CorruptCheckpointError),
    "table-s-missing-blob": (table_entry(ODD, s=99), CorruptCheckpointError),
    "table-s-negative": (table_entry(ODD, s=-1), CorruptCheckpointError),
    "table-s-name": (table_entry(ODD, s="odd"), CorruptCheckpointError),
    "table-s-list": (table_entry(ODD, s=[0]), CorruptCheckpointError),
    "table-s-absent": (table_entry(ODD, s=None), CorruptCheckpointError),
    "table-extra-key": (table_entry(ODD, evil=1), CorruptCheckpointError),
    "table-view-past-blob": (table_entry(ROWS, offset=1024 - 64), CorruptCheckpointError),
    "table-view-huge-stride": (table_entry(ROWS, stride=[2**61, 1]), CorruptCheckpointError),
    "table-view-negative-stride": (table_entry(ROWS, stride=[-16, 1]), CorruptCheckpointError),
    "table-view-negative-offset": (table_entry(ROWS, offset=-4), CorruptCheckpointError),
    "table-view-offset-not-itemsize-multiple": (
        table_entry(ROWS, offset=130),
        CorruptCheckpointError,
    ),
    "table-view-offset-float": (table_entry(ROWS, offset=128.0), CorruptCheckpointError),
    "table-view-offset-string": (table_entry(ROWS, offset="128"), CorruptCheckpointError),
    "table-view-stride-rank-mismatch": (table_entry(ROWS, stride=[1]), CorruptCheckpointError),
    "table-view-stride-without-offset": (table_entry(ROWS, offset=None), CorruptCheckpointError),
    "table-view-offset-without-stride": (table_entry(ROWS, stride=None), CorruptCheckpointError),
    "table-shape-underfills-blob": (table_entry(W, shape=[2, 2]), CorruptCheckpointError),
    "table-shape-overfills-blob": (table_entry(W, shape=[16, 17]), CorruptCheckpointError),
    "table-shape-negative": (table_entry(W, shape=[-16, -16]), CorruptCheckpointError),
    "table-shape-huge": (table_entry(W, shape=[2**62]), CorruptCheckpointError),
    "table-shape-65-dims": (table_entry(W, shape=[1] * 65), CorruptCheckpointError),
    "table-dtype-itemsize-mismatch": (table_entry(W, dtype="float64"), CorruptCheckpointError),
    "table-dtype-os.system": (table_entry(W, dtype="os.system"), CorruptCheckpointError),
    "table-dtype-quantized": (table_entry(ODD, dtype="qint8"), CorruptCheckpointError),
    "table-dtype-unknown": (table_entry(W, dtype="float128"), CorruptCheckpointError),
    "table-dtype-number": (table_entry(W, dtype=5), CorruptCheckpointError),
    "table-dtype-list": (table_entry(W, dtype=["float32"]), CorruptCheckpointError),
    "table-grad-on-int-tensor": (table_entry(I64, grad=True), CorruptCheckpointError),
    "table-param-grad-on-int-tensor": (
        table_entry(I64, param=True, grad=True),
        CorruptCheckpointError,
    ),
    "table-np-object-O": (table_entry(ARR, np="O"), CorruptCheckpointError),
    "table-np-object-|O": (table_entry(ARR, np="|O"), CorruptCheckpointError),
    "table-np-unknown-f3": (table_entry(ARR, np="<f3"), CorruptCheckpointError),
    "table-np-timedelta": (table_entry(ARR, np="<m8"), CorruptCheckpointError),
    "table-np-itemsize-mismatch": (table_entry(ARR, np="<f4"), CorruptCheckpointError),
    "table-np-number": (table_entry(ARR, np=8), CorruptCheckpointError),
    "table-device-uppercase": (table_entry(W, device="CUDA"), CorruptCheckpointError),
    "table-device-number": (table_entry(W, device=0), CorruptCheckpointError),
    "table-device-list": (table_entry(W, device=["cpu"]), CorruptCheckpointError),
    # --- the checksums
    "checksums-missing-a-blob": (checksums(lambda s: s[:-32]), CorruptCheckpointError),
    "checksums-run-one-short": (checksums(lambda s: s[:-1]), CorruptCheckpointError),
    "checksums-extra-run": (checksums(lambda s: s + "0" * 32), CorruptCheckpointError),
    "checksums-uppercase": (checksums(str.upper), CorruptCheckpointError),
    "checksums-not-hex": (checksums(lambda s: "z" * len(s)), CorruptCheckpointError),
    "checksums-swapped": (checksums(lambda s: s[32:64] + s[:32] + s[64:]), CorruptCheckpointError),
    "checksums-as-json-object": (members(checksums={"w": "0" * 32}), CorruptCheckpointError),
    "checksums-deleted": (members(checksums=af.DELETE), CorruptCheckpointError),
    # --- versions, format, integrity
    "versions-not-an-object": (members(versions=["1"]), CorruptCheckpointError),
    "versions-non-string-value": (members(versions={"torch": 2}), CorruptCheckpointError),
    "versions-missing": (members(versions=af.DELETE), CorruptCheckpointError),
    "format-2": (members(format="2"), UnsupportedFormatError),
    "format-999999": (members(format="999999"), UnsupportedFormatError),
    "format-not-a-number": (members(format="x"), CorruptCheckpointError),
    "format-empty": (members(format=""), CorruptCheckpointError),
    "format-decimal": (members(format="1.0"), CorruptCheckpointError),
    "format-negative": (members(format="-1"), CorruptCheckpointError),
    "format-7-digits": (members(format="1000000"), CorruptCheckpointError),
    "format-missing": (members(format=af.DELETE), CorruptCheckpointError),
    "header-overlapping-entries": (
        lambda layout: {
            "entries": {
                **{k: v for k, v in layout.header.items() if k != af.META},
                "i": entry("I64", [5], 8, 48),
            }
        },
        CorruptCheckpointError,
    ),
    "header-duplicate-tensor": (
        lambda layout: {"extra_header": b',"odd":' + af.dumps(layout.header["odd"]).encode()},
        CorruptCheckpointError,
    ),
    "metadata-duplicate-member": (
        lambda layout: {"extra_metadata": b',"torchvault.format":"1"'},
        CorruptCheckpointError,
    ),
    "metadata-escape-twin-member": (
        lambda layout: {"extra_metadata": b',"torchvault.\\u0066ormat":"1"'},
        CorruptCheckpointError,
    ),
}


@pytest.mark.parametrize("case", sorted(SEMANTIC))
def test_resealed_semantic_attack_raises_typed_error(
    case: str, tv_file: Path, tmp_path: Path
) -> None:
    edit, expected = SEMANTIC[case]
    path = af.reseal(tv_file, tmp_path / "attack.tv", **edit(af.read_layout(tv_file)))
    for name in ("load", "verify"):
        with pytest.raises(expected):
            READERS[name](path)
    with contextlib.suppress(TorchVaultError):  # inspect reads no tensor data, so it
        tv.inspect(path)  # may accept table-level damage; any other exception fails


def test_reseal_without_changes_reproduces_the_file(tv_file: Path, tmp_path: Path) -> None:
    copy = af.reseal(tv_file, tmp_path / "copy.tv")
    assert copy.read_bytes() == tv_file.read_bytes()
    af.assert_same(tv.load(copy), af.small_state())


def test_malformed_saved_device_with_map_location_none_is_corrupt(
    tv_file: Path, tmp_path: Path
) -> None:
    edit = table_entry(W, device="abc")
    path = af.reseal(tv_file, tmp_path / "attack.tv", **edit(af.read_layout(tv_file)))
    with pytest.raises(CorruptCheckpointError):
        tv.load(path, map_location=None)


def test_torchvault_members_without_integrity_prefix_are_corrupt(
    tv_file: Path, tmp_path: Path
) -> None:
    layout = af.read_layout(tv_file)
    meta = {k: v for k, v in layout.metadata.items() if k != af.INTEGRITY}
    header = {af.META: meta, **{k: v for k, v in layout.header.items() if k != af.META}}
    path = af.write_raw(tmp_path / "stripped.tv", header, layout.data, pad=True)
    for reader in READERS.values():
        with pytest.raises(CorruptCheckpointError, match="checksum"):
            reader(path)


def test_integrity_member_not_first_is_corrupt(tv_file: Path, tmp_path: Path) -> None:
    layout = af.read_layout(tv_file)
    meta = layout.metadata
    moved = {k: v for k, v in meta.items() if k != af.INTEGRITY} | {
        af.INTEGRITY: meta[af.INTEGRITY]
    }
    header = {af.META: moved, **{k: v for k, v in layout.header.items() if k != af.META}}
    path = af.write_raw(tmp_path / "moved.tv", header, layout.data, pad=True)
    with pytest.raises(CorruptCheckpointError):
        tv.load(path)


def test_metadata_after_the_tensor_entries_is_corrupt(tv_file: Path, tmp_path: Path) -> None:
    layout = af.read_layout(tv_file)
    header = {**{k: v for k, v in layout.header.items() if k != af.META}, af.META: layout.metadata}
    path = af.write_raw(tmp_path / "late.tv", header, layout.data, pad=True)
    with pytest.raises(CorruptCheckpointError):
        tv.load(path)


def test_stale_integrity_hash_after_a_member_edit_is_corrupt(tv_file: Path, tmp_path: Path) -> None:
    blob = tv_file.read_bytes()
    layout = af.read_layout(tv_file)
    old = layout.metadata[af.CREATED].encode()
    new = old.replace(b"20", b"19", 1)
    assert len(new) == len(old)
    path = write_fresh(tmp_path / "edited.tv", blob.replace(old, new, 1))
    with pytest.raises(CorruptCheckpointError, match="header checksum"):
        tv.load(path)


def test_uppercase_integrity_hash_is_corrupt(tv_file: Path, tmp_path: Path) -> None:
    blob = tv_file.read_bytes()
    digest = af.read_layout(tv_file).metadata[af.INTEGRITY].encode()
    path = write_fresh(tmp_path / "upper.tv", blob.replace(digest, digest.upper(), 1))
    assert path.read_bytes() != blob
    with pytest.raises(CorruptCheckpointError):
        tv.load(path)


def test_forged_data_with_recomputed_checksums_loads_the_forgery(
    tv_file: Path, tmp_path: Path
) -> None:
    # The hashes detect damage, not tampering: an attacker who recomputes them is not
    # stopped, and the loaded tensor is exactly the forged bytes (never anything else).
    layout = af.read_layout(tv_file)
    start, end = layout.tensor_spans()["odd"]
    data = bytearray(layout.data)
    data[start - layout.data_start : end - layout.data_start] = b"\xff" * (end - start)
    forged = af.reseal(tv_file, tmp_path / "forged.tv", data=bytes(data))
    af.recompute_checksums(forged)
    assert tv.load(forged)["odd"].tolist() == [255] * 7


# ----------------------------------------------------------------------------- messages

MESSAGE_CASES = [
    "tree-unknown-tag",
    "tree-ref-out-of-range",
    "tree-bytes-bad-base64",
    "tree-deeper-than-max-depth-lists",
    "tree-pair-duplicate-keys",
    "table-view-past-blob",
    "table-s-missing-blob",
    "checksums-missing-a-blob",
    "format-2",
    "format-not-a-number",
]


@pytest.mark.parametrize("case", MESSAGE_CASES)
def test_error_message_names_the_file(case: str, tv_file: Path, tmp_path: Path) -> None:
    edit, expected = SEMANTIC[case]
    path = af.reseal(tv_file, tmp_path / "named.tv", **edit(af.read_layout(tv_file)))
    for name in ("load", "verify"):
        with pytest.raises(expected) as info:
            READERS[name](path)
        assert str(path) in str(info.value), f"{name}: {info.value}"
        assert info.value.path == str(path), name


# ----------------------------------------------------------------------------- fuzzing


def mutations() -> st.SearchStrategy[list[tuple[Any, ...]]]:
    pos = st.integers(0, 4096)
    chunk = st.binary(min_size=1, max_size=16)
    op = st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(0, 7)),
        st.tuples(st.just("overwrite"), pos, chunk),
        st.tuples(st.just("insert"), pos, chunk),
        st.tuples(st.just("delete"), pos, st.integers(1, 64)),
        st.tuples(st.just("truncate"), pos),
        st.tuples(st.just("append"), chunk),
        st.tuples(st.just("splice-hex"), pos, st.text("0123456789abcdef", min_size=1, max_size=8)),
    )
    return st.lists(op, min_size=1, max_size=3)


def mutate(blob: bytes, ops: list[tuple[Any, ...]]) -> bytes:
    out = bytearray(blob)
    for kind, *args in ops:
        at = args[0] % (len(out) + 1) if args and isinstance(args[0], int) else 0
        if kind == "flip" and out:
            out[at % len(out)] ^= 1 << args[1]
        elif kind == "overwrite":
            out[at : at + len(args[1])] = args[1]
        elif kind == "insert":
            out[at:at] = args[1]
        elif kind == "delete":
            del out[at : at + args[1]]
        elif kind == "truncate":
            del out[at:]
        elif kind == "append":
            out += args[0]
        elif kind == "splice-hex":  # lands hex digits, as in the hashes, anywhere
            out[at : at + len(args[1])] = args[1].encode()
    return bytes(out)


def check_mutated_file(path: Path, blob: bytes, mutated: bytes) -> None:
    """A mutated torchvault file loads only when unchanged; otherwise it is a typed error."""
    write_fresh(path, mutated)
    try:
        got = tv.load(path)
    except TorchVaultError:
        assert mutated != blob, "the unchanged file was rejected"
        return
    assert mutated == blob, "a changed file loaded without an error"
    af.assert_same(got, af.small_state())


ITEMSIZE = {"F32": 4, "U8": 1, "I16": 2, "F64": 8, "BOOL": 1, "BF16": 2, "F8_E4M3": 1, "C64": 8}


@st.composite
def random_header(draw: st.DrawFn) -> tuple[Any, bytes]:
    """A safetensors header that is valid, then perturbed 0-2 times (so about half load):
    junk values, shifted offsets, a wrong dtype, extra keys, a wrong data size."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=8),
        st.sampled_from(["F32", "U8", "x", "F8_E8M0", "Q4"]),
    )
    junk = draw(
        st.recursive(
            scalars,
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=4), inner, max_size=3)
            ),
            max_leaves=8,
        )
    )
    names = draw(st.lists(st.text(min_size=1, max_size=4), unique=True, max_size=4))
    specs = {}
    for name in names:
        dtype = draw(st.sampled_from(sorted(ITEMSIZE)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        specs[name] = {"dtype": dtype, "shape": shape, "data_offsets": [0, 0]}
    cursor = 0
    for name in draw(st.permutations(names)):
        size = ITEMSIZE[specs[name]["dtype"]] * math.prod(specs[name]["shape"])
        specs[name]["data_offsets"] = [cursor, cursor + size]
        cursor += size
    data = draw(st.binary(min_size=cursor, max_size=cursor))
    header: dict[str, Any] = {}
    if draw(st.booleans()):
        header["__metadata__"] = draw(
            st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3)
        )
    header.update(specs)
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(
            st.sampled_from(["junk", "shift", "dtype", "extra", "data", "metadata", "entry"])
        )
        spec = header.get(draw(st.sampled_from(names))) if names else None
        offsets = spec.get("data_offsets") if isinstance(spec, dict) else None
        if kind == "metadata":
            header["__metadata__"] = junk
        elif kind == "data":
            data = draw(st.binary(max_size=len(data) + 9))
        elif kind == "entry" or not isinstance(spec, dict):
            header[draw(st.text(max_size=4))] = junk
        elif kind == "junk":
            spec[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = junk
        elif kind == "shift" and isinstance(offsets, list) and len(offsets) == 2:
            offsets[draw(st.integers(0, 1))] = draw(st.integers(-9, 90))
        elif kind == "dtype":
            spec["dtype"] = draw(st.sampled_from([*sorted(ITEMSIZE), "F8_E8M0", "U4"]))
        else:
            spec[draw(st.text(max_size=4))] = junk
    return header, data


def check_random_header(path: Path, header: Any, data: bytes) -> None:
    """A random header loads only as exactly the tensors its entries describe."""
    af.write_raw(path, header, data)
    try:
        got = tv.load(path)
    except TorchVaultError:
        return
    names = [k for k in header if k != "__metadata__"]
    assert isinstance(got, dict)
    assert list(got) == names
    start = 8 + len(af.header_bytes(header))
    blob = path.read_bytes()
    for name in names:
        begin, end = header[name]["data_offsets"]
        tensor = got[name]
        assert list(tensor.shape) == header[name]["shape"]
        assert (
            tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
            == blob[start + begin : start + end]
        )


def resealed_members() -> st.SearchStrategy[dict[str, Any]]:
    """Random tree and table JSON, biased towards the tags and fields the reader knows."""
    tags = st.sampled_from(
        ["dict", "odict", "list", "tuple", "tensor", "int", "float", "complex", "bytes",
         "bytearray", "dtype", "device", "size", "npscalar", "x"]
    )  # fmt: skip
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**65), 2**65),
        st.integers(-2, 8),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=6),
        st.sampled_from(["float32", "<f8", "cpu", "cuda:0", "nan", "0x1f", "eHk=", "abc", "|O"]),
    )
    node = st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3),
            st.dictionaries(tags, inner, min_size=1, max_size=1),
            st.dictionaries(st.text(max_size=3), inner, max_size=3),
        ),
        max_leaves=10,
    )
    field = st.sampled_from(
        ["s", "dtype", "shape", "stride", "offset", "param", "grad", "device", "np", "z"]
    )
    entry = st.one_of(st.integers(-1, 6), st.dictionaries(field, node, max_size=5))
    return st.fixed_dictionaries(
        {},
        optional={
            TREE: st.dictionaries(
                st.just("dict"), st.dictionaries(st.text(max_size=3), node, max_size=4), min_size=1
            )
            | node,
            TENSORS: st.lists(entry, max_size=7),
        },
    )


def check_resealed(path: Path, source: Path, values: dict[str, Any]) -> None:
    """A file with random resealed members loads or raises a typed error, from every reader."""
    af.reseal(source, path, members=values)
    for name in ("load", "verify", "inspect"):
        with contextlib.suppress(TorchVaultError):
            READERS[name](path)


FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SOAK = settings(FUZZ, max_examples=20_000)


@FUZZ
@given(ops=mutations())
def test_fuzz_mutated_torchvault_file_loads_only_if_unchanged(
    ops: list[tuple[Any, ...]], tv_file: Path, tmp_path: Path
) -> None:
    blob = tv_file.read_bytes()
    check_mutated_file(tmp_path / "fuzz.tv", blob, mutate(blob, ops))


@FUZZ
@given(case=random_header())
def test_fuzz_random_header_loads_exactly_or_raises_typed_error(
    case: tuple[Any, bytes], tmp_path: Path
) -> None:
    check_random_header(tmp_path / "fuzz.safetensors", *case)


@FUZZ
@given(values=resealed_members())
def test_fuzz_resealed_tree_and_table_only_raise_typed_errors(
    values: dict[str, Any], tv_file: Path, tmp_path: Path
) -> None:
    check_resealed(tmp_path / "fuzz.tv", tv_file, values)


@pytest.mark.soak
@SOAK
@given(ops=mutations())
def test_soak_mutated_torchvault_file_loads_only_if_unchanged(
    ops: list[tuple[Any, ...]], tv_file: Path, tmp_path: Path
) -> None:
    blob = tv_file.read_bytes()
    check_mutated_file(tmp_path / "fuzz.tv", blob, mutate(blob, ops))


@pytest.mark.soak
@SOAK
@given(case=random_header())
def test_soak_random_header_loads_exactly_or_raises_typed_error(
    case: tuple[Any, bytes], tmp_path: Path
) -> None:
    check_random_header(tmp_path / "fuzz.safetensors", *case)


@pytest.mark.soak
@SOAK
@given(values=resealed_members())
def test_soak_resealed_tree_and_table_only_raise_typed_errors(
    values: dict[str, Any], tv_file: Path, tmp_path: Path
) -> None:
    check_resealed(tmp_path / "fuzz.tv", tv_file, values)


def test_attack_files_seal_matches_the_writer(tv_file: Path) -> None:
    layout = af.read_layout(tv_file)
    assert af.seal(layout.header_bytes)[8:] == layout.header_bytes
    assert json.loads(layout.header_bytes)[af.META][af.INTEGRITY] == layout.metadata[af.INTEGRITY]
    assert os.path.getsize(tv_file) < 4096
