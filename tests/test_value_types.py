"""The values ordinary checkpoints hold besides tensors: sets, namespaces and generators."""

from __future__ import annotations

import argparse
import io
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchvault as tv
import torchvault._format
from torchvault import _tree

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _no_tensors(_: object, path: str) -> int:
    raise AssertionError(f"unexpected tensor at {path}")


def _rewrite_tree(path: Path, edit: Any) -> None:
    """Replace the file's tree with ``edit(tree)`` and reseal the header, as an attacker who
    knows the format would."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    meta = header["__metadata__"]
    meta["torchvault.tree"] = json.dumps(edit(json.loads(meta["torchvault.tree"])))
    sums = meta["torchvault.checksums"]
    meta["torchvault.checksums"] = torchvault._format.PLACEHOLDER * (len(sums) // 32)
    meta["torchvault.integrity"] = torchvault._format.PLACEHOLDER
    ordered = {"__metadata__": {"torchvault.integrity": meta.pop("torchvault.integrity")}}
    ordered["__metadata__"]["torchvault.checksums"] = meta.pop("torchvault.checksums")
    ordered["__metadata__"].update(meta)
    ordered.update({k: v for k, v in header.items() if k != "__metadata__"})
    raw = json.dumps(ordered, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 64)
    body = data[8 + length :]
    checks = [sums[i : i + 32] for i in range(0, len(sums), 32)]
    path.write_bytes(torchvault._format.seal_header(raw, checks) + body)


# ----------------------------------------------------------------------------- sets


def test_set_and_frozenset_round_trip(tmp_path: Path) -> None:
    state = {
        "tags": {"b", "a", "c"},
        "frozen": frozenset({3, 1, (2, "x")}),
        "empty": set(),
        "nested": [frozenset(), {frozenset({1})}],
    }
    tv.save(state, tmp_path / "s.tv")
    back = tv.load(tmp_path / "s.tv")
    assert back == state
    assert type(back["tags"]) is set
    assert type(back["frozen"]) is frozenset


HASHABLE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.binary(max_size=5),
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None)
@given(st.sets(HASHABLE, max_size=6), st.frozensets(HASHABLE, max_size=6))
def test_sets_of_hashable_values_round_trip(members: set[Any], frozen: frozenset[Any]) -> None:
    buffer = io.BytesIO()
    tv.save({"s": members, "f": frozen, "ns": argparse.Namespace(s=members)}, buffer)
    back = tv.load(buffer.getvalue())
    assert back["s"] == members
    assert back["f"] == frozen
    assert back["ns"].s == members


def test_set_encoding_is_sorted_not_in_hash_order() -> None:
    # string hashes vary between processes, so only a sorted form writes the same bytes
    words = [f"w{i}" for i in range(50)]
    assert _tree.encode(set(words), _no_tensors) == {"set": sorted(words, key=json.dumps)}
    assert _tree.encode({2, "a", (1,)}, _no_tensors) == {"set": ["a", 2, {"tuple": [1]}]}


def test_set_holding_a_tensor_is_refused_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(tv.UnsupportedTypeError, match="`groups`"):
        tv.save({"groups": {torch.zeros(1)}}, tmp_path / "s.tv")


@pytest.mark.parametrize(
    ("payload", "what"),
    [
        ([1, 1], "twice"),
        ([1, True], "twice"),
        ([{"list": [1]}], "unhashable"),
        ([{"tensor": 0}], "tensor"),
        ({"a": 1}, "not an array"),
    ],
)
def test_crafted_set_is_refused(tmp_path: Path, payload: object, what: str) -> None:
    path = tmp_path / "s.tv"
    tv.save({"s": {1}, "t": torch.zeros(2)}, path)
    _rewrite_tree(path, lambda tree: {"dict": {**tree["dict"], "s": {"set": payload}}})
    with pytest.raises(tv.CorruptCheckpointError, match=what):
        tv.load(path)


# ----------------------------------------------------------------------------- Namespace


def test_namespace_round_trips(tmp_path: Path) -> None:
    args = argparse.Namespace(lr=1e-3, epochs=10, data="/data", layers=[1, 2], opt=None)
    tv.save({"args": args, "w": torch.ones(2)}, tmp_path / "n.tv")
    back = tv.load(tmp_path / "n.tv")
    assert type(back["args"]) is argparse.Namespace
    assert back["args"] == args


def test_crafted_namespace_attribute_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "n.tv"
    tv.save({"args": argparse.Namespace(a=1)}, path)
    _rewrite_tree(path, lambda tree: {"dict": {"args": {"namespace": {"__class__": 1}}}})
    with pytest.raises(tv.CorruptCheckpointError, match="args"):
        tv.load(path)


def test_convert_of_a_torch_save_checkpoint_with_namespace_args(tmp_path: Path) -> None:
    args = argparse.Namespace(lr=1e-3, epochs=10, data="/data/imagenet", seed=1)
    torch.save({"args": args, "w": torch.arange(4.0)}, tmp_path / "old.pth")
    tv.convert(tmp_path / "old.pth", tmp_path / "old.tv")
    back = tv.load(tmp_path / "old.tv")
    assert back["args"] == args
    assert torch.equal(back["w"], torch.arange(4.0))


# ----------------------------------------------------------------------------- Generator


def test_cpu_generator_round_trips_with_its_state(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1234)
    torch.rand(5, generator=gen)  # advance it: the state, not the seed, must come back
    tv.save({"loader_gen": gen}, tmp_path / "g.tv")
    expected = torch.rand(8, generator=gen)
    back = tv.load(tmp_path / "g.tv")["loader_gen"]
    assert type(back) is torch.Generator
    assert back is not gen
    assert back.device == torch.device("cpu")
    assert torch.equal(torch.rand(8, generator=back), expected)


def test_generator_is_a_value_in_a_manager_checkpoint(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(7)
    with tv.CheckpointManager(tmp_path / "run") as manager:
        manager.save(1, extra={"gen": gen, "seen": {1, 2}})
    expected = torch.rand(4, generator=gen)
    with tv.CheckpointManager(tmp_path / "run") as manager:
        back = manager.load()["extra"]
    assert back["seen"] == {1, 2}
    assert torch.equal(torch.rand(4, generator=back["gen"]), expected)


def test_crafted_generator_state_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "g.tv"
    tv.save({"g": torch.Generator(), "t": torch.zeros(3, dtype=torch.uint8)}, path)

    def point_at_small_tensor(tree: Any) -> Any:
        device, _ = tree["dict"]["g"]["generator"]
        return {"dict": {**tree["dict"], "g": {"generator": [device, tree["dict"]["t"]]}}}

    _rewrite_tree(path, point_at_small_tensor)
    with pytest.raises(tv.CorruptCheckpointError, match="`g`"):
        tv.load(path)


def test_inspect_and_verify_accept_a_generator(tmp_path: Path) -> None:
    tv.save({"g": torch.Generator().manual_seed(3), "w": torch.ones(2)}, tmp_path / "g.tv")
    assert tv.verify(tmp_path / "g.tv").tensors == 2  # the generator's state is stored as one
    assert [t.key for t in tv.inspect(tmp_path / "g.tv").tensors] == ["g", "w"]


@CUDA
def test_cuda_generator_round_trips_on_its_device(tmp_path: Path) -> None:
    gen = torch.Generator(device="cuda").manual_seed(99)
    torch.rand(5, generator=gen, device="cuda")
    tv.save({"g": gen}, tmp_path / "g.tv")
    expected = torch.rand(8, generator=gen, device="cuda")
    back = tv.load(tmp_path / "g.tv", map_location=None)["g"]
    assert back.device.type == "cuda"
    assert torch.equal(torch.rand(8, generator=back, device="cuda"), expected)
    with pytest.raises(ValueError, match="map_location"):
        tv.load(tmp_path / "g.tv", map_location="cpu")


# ----------------------------------------------------------------------------- the rest


def test_still_unsupported_values_keep_the_clear_message(tmp_path: Path) -> None:
    with pytest.raises(tv.UnsupportedTypeError, match=r"`opt` is a .*pickle-free"):
        tv.save({"opt": object()}, tmp_path / "x.tv")
