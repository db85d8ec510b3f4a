"""torchvault.legacy against files the real tools write: torch.save, Lightning, transformers.

The restricted reader is only worth having if it reads what people actually have, gives back
exactly what ``torch.load(weights_only=False)`` would, and never cries wolf. So every file of
the benign corpus (``legacy_fixtures``: every torch.save switch and dtype, views and shared
storages, optimizer and scheduler state, numpy values, a real ``Trainer.fit`` checkpoint,
real ``save_pretrained`` folders) is read both ways and compared structurally: same types,
keys, dtypes, shapes, strides, storage offsets and bytes, the same Parameters, the same
tensors sharing one storage. The same corpus drives ``load``, ``load_into``, ``inspect``,
``scan``, ``convert`` and the salvage path for a whole pickled model.

No network: transformers models come from tiny configs and ``HF_HUB_OFFLINE=1`` is set
before transformers is imported. Lightning and transformers are optional imports
(``importorskip``), but installed by the ``dev`` extra, so these tests run in CI. The costly
fixtures (the Trainer fit, the transformers models) are built once per module.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import legacy_fixtures as lf
import torchvault as tv

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"


# --------------------------------------------------------------------------------------------
# Fixtures: built once per module, under tmp_path_factory


@pytest.fixture(scope="module")
def torch_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, lf.Benign]:
    return {b.name: b for b in lf.build_torch_files(tmp_path_factory.mktemp("torch-files"))}


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory: pytest.TempPathFactory) -> lf.LightningRun:
    pytest.importorskip("lightning")
    return lf.build_lightning_checkpoint(tmp_path_factory.mktemp("lightning"))


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> lf.HFCorpus:
    pytest.importorskip("transformers")
    return lf.build_hf_folders(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def whole_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, lf.SalvageNet]:
    return lf.build_whole_model(tmp_path_factory.mktemp("whole-model"))


# --------------------------------------------------------------------------------------------
# Structural comparison with torch.load's result


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as raw bytes (NaN payloads, -0.0 and bool bytes included)."""
    return tensor.detach().reshape(-1).contiguous().view(torch.uint8)


def storage_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """Every byte of the tensor's storage, including bytes no view of it covers."""
    return torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage())


def same_float(a: float, b: float) -> bool:
    if math.isnan(b):
        return math.isnan(a)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


class Compare:
    """Walks our result and torch's side by side; collects every tensor pair for sharing.

    ``exact`` also requires the same strides, storage offset and whole-storage bytes (what a
    faithful reader of a torch.save file gives); without it only values, dtypes, shapes and
    sharing are compared (what a format conversion promises).
    """

    def __init__(self, *, exact: bool = True) -> None:
        self.exact = exact
        self.tensors: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self.objects: list[tuple[str, object, object]] = []
        self._pairs: dict[int, tuple[str, int]] = {}

    def run(self, ours: object, ref: object) -> None:
        self.value(ours, ref, "root")
        self.check_sharing()

    def value(self, ours: object, ref: object, where: str) -> None:
        if isinstance(ref, (torch.Tensor, dict, list, set, bytearray, argparse.Namespace)):
            # A mutable object torch.load gave back once: ours is one object there too.
            seen = self._pairs.get(id(ref))
            if seen is not None:
                assert id(ours) == seen[1], (
                    f"{where}: torch.load returns the object at {seen[0]} here again; ours "
                    "is another object"
                )
                return
            self._pairs[id(ref)] = (where, id(ours))
            self.objects.append((where, ours, ref))
        assert type(ours) is type(ref), (
            f"{where}: type {type(ours).__qualname__}, torch.load gives {type(ref).__qualname__}"
        )
        if isinstance(ref, torch.Tensor):
            self.tensor(ours, ref, where)  # type: ignore[arg-type]
        elif isinstance(ref, np.ndarray):
            self.array(ours, ref, where)  # type: ignore[arg-type]
        elif isinstance(ref, np.generic):
            assert ours.dtype == ref.dtype, where  # type: ignore[attr-defined]
            assert ours.tobytes() == ref.tobytes(), f"{where}: {ours!r} != {ref!r}"  # type: ignore[attr-defined]
        elif isinstance(ref, float):
            assert same_float(ours, ref), f"{where}: {ours!r} != {ref!r}"  # type: ignore[arg-type]
        elif isinstance(ref, argparse.Namespace):
            self.value(vars(ours), vars(ref), f"{where}.__dict__")
        elif isinstance(ref, dict):
            self.mapping(ours, ref, where)  # type: ignore[arg-type]
        elif isinstance(ref, (list, tuple)):
            assert len(ours) == len(ref), f"{where}: length {len(ours)} != {len(ref)}"  # type: ignore[arg-type]
            for index, (a, b) in enumerate(zip(ours, ref, strict=True)):  # type: ignore[call-overload]
                self.value(a, b, f"{where}[{index}]")
        else:  # str, bytes, int, bool, None, set, frozenset, complex, dtype, device
            assert ours == ref, f"{where}: {ours!r} != {ref!r}"

    def mapping(self, ours: Mapping[Any, Any], ref: Mapping[Any, Any], where: str) -> None:
        assert list(ours) == list(ref), f"{where}: keys {list(ours)} != {list(ref)}"
        for key in ref:
            self.value(ours[key], ref[key], f"{where}[{key!r}]")
        # nn.Module.state_dict() attaches _metadata (per-module versions); a torch.save reader
        # keeps it, a conversion to a pickle-free format need not.
        ref_meta = getattr(ref, "_metadata", None)
        if ref_meta is not None and self.exact:
            assert hasattr(ours, "_metadata"), f"{where}: state-dict _metadata lost"
            self.value(ours._metadata, ref_meta, f"{where}._metadata")  # type: ignore[attr-defined]

    def tensor(self, ours: torch.Tensor, ref: torch.Tensor, where: str) -> None:
        assert ours.dtype == ref.dtype, f"{where}: dtype {ours.dtype} != {ref.dtype}"
        assert ours.shape == ref.shape, f"{where}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
        assert ours.device == ref.device, f"{where}: device {ours.device} != {ref.device}"
        assert ours.requires_grad == ref.requires_grad, f"{where}: requires_grad differs"
        assert torch.equal(bits(ours), bits(ref)), f"{where}: values differ"
        if self.exact:
            assert ours.stride() == ref.stride(), (
                f"{where}: stride {ours.stride()} != {ref.stride()}"
            )
            assert ours.storage_offset() == ref.storage_offset(), f"{where}: storage offset differs"
            ours_n, ref_n = ours.untyped_storage().nbytes(), ref.untyped_storage().nbytes()
            assert ours_n == ref_n, f"{where}: storage of {ours_n} bytes, torch.load's {ref_n}"
            assert torch.equal(storage_bytes(ours), storage_bytes(ref)), (
                f"{where}: storage bytes outside the view differ"
            )
        self.tensors.append((where, ours, ref))

    def array(self, ours: np.ndarray[Any, Any], ref: np.ndarray[Any, Any], where: str) -> None:
        assert ours.dtype == ref.dtype, f"{where}: dtype {ours.dtype} != {ref.dtype}"
        assert ours.shape == ref.shape, f"{where}: shape {ours.shape} != {ref.shape}"
        assert ours.flags.f_contiguous == ref.flags.f_contiguous, f"{where}: memory order"
        assert ours.tobytes(order="A") == ref.tobytes(order="A"), f"{where}: values differ"

    def check_sharing(self) -> None:
        def groups(side: int) -> set[frozenset[str]]:
            by_storage: dict[int, set[str]] = {}
            for entry in self.tensors:
                tensor: torch.Tensor = entry[side]  # type: ignore[assignment]
                if tensor.untyped_storage().nbytes():
                    ptr = tensor.untyped_storage().data_ptr()
                    by_storage.setdefault(ptr, set()).add(entry[0])
            return {frozenset(g) for g in by_storage.values() if len(g) > 1}

        ours, ref = groups(1), groups(2)
        assert ours == ref, (
            f"storage sharing differs: torch.load shares {sorted(map(sorted, ref))}, "
            f"ours {sorted(map(sorted, ours))}"
        )


def assert_same(ours: object, ref: object, *, exact: bool = True) -> None:
    Compare(exact=exact).run(ours, ref)


def assert_state_dicts_equal(
    ours: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], where: str = ""
) -> None:
    """Same keys, dtypes, shapes and bytes; container type and layout are not compared."""
    assert sorted(ours) == sorted(ref), f"{where}: keys differ: {sorted(set(ours) ^ set(ref))}"
    for key, tensor in ref.items():
        got = ours[key]
        assert isinstance(got, torch.Tensor), f"{where}{key}: {type(got)}"
        assert got.dtype == tensor.dtype, f"{where}{key}: dtype {got.dtype} != {tensor.dtype}"
        assert got.shape == tensor.shape, f"{where}{key}: shape {got.shape} != {tensor.shape}"
        assert torch.equal(bits(got), bits(tensor)), f"{where}{key}: values differ"


def tied_keys(state: Mapping[str, torch.Tensor]) -> set[str]:
    """Keys whose tensor shares its storage with an earlier key (tied weights)."""
    first: dict[tuple[int, int], str] = {}
    tied = set()
    for key, tensor in state.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if ident in first:
            tied.add(key)
        else:
            first[ident] = key
    return tied


def _leaves(obj: object) -> Iterator[object]:
    if isinstance(obj, Mapping):
        for value in obj.values():
            yield from _leaves(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _leaves(value)
    else:
        yield obj


def all_benign(
    torch_corpus: dict[str, lf.Benign], lightning_run: lf.LightningRun, hf: lf.HFCorpus
) -> Iterator[lf.Benign]:
    yield from torch_corpus.values()
    yield from lightning_run.entries()
    yield from hf.entries()


# --------------------------------------------------------------------------------------------
# The corpus itself


def test_corpus_is_large_and_loads_with_torch(
    torch_corpus: dict[str, lf.Benign], lightning_run: lf.LightningRun, hf: lf.HFCorpus
) -> None:
    entries = list(all_benign(torch_corpus, lightning_run, hf))
    files = [b for b in entries if not b.is_folder]
    assert len(files) >= 35
    assert {p.path.suffix for p in files} >= {".pt", ".pth", ".bin", ".ckpt"}
    assert any(b.legacy for b in files)
    for benign in entries:
        benign.reference()  # each loads with torch: the corpus is valid


# --------------------------------------------------------------------------------------------
# load_legacy == torch.load, for every benign file


@pytest.mark.parametrize("name", lf.TORCH_FILE_NAMES)
def test_load_legacy_matches_torch_load(torch_corpus: dict[str, lf.Benign], name: str) -> None:
    benign = torch_corpus[name]
    assert_same(tv.load_legacy(benign.path), benign.reference())


@pytest.mark.parametrize("name", lf.TORCH_FILE_NAMES)
def test_load_reads_legacy_files_like_load_legacy(
    torch_corpus: dict[str, lf.Benign], name: str
) -> None:
    benign = torch_corpus[name]
    assert_same(tv.load(benign.path), benign.reference())


@pytest.mark.parametrize("name", lf.LIGHTNING_NAMES)
def test_lightning_checkpoint_matches_torch_load(lightning_run: lf.LightningRun, name: str) -> None:
    (benign,) = (b for b in lightning_run.entries() if b.name == name)
    ours = tv.load_legacy(benign.path)
    assert isinstance(ours, dict)
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "hyper_parameters"):
        assert key in ours, f"{key} missing from {sorted(ours)}"
    assert ours["hyper_parameters"] == {
        "hidden": 8,
        "lr": 0.01,
        "name": "tiny",
        "betas": (0.9, 0.99),
    }
    assert ours["lr_schedulers"][0]["_last_lr"] == [0.0025]
    assert ours["global_step"] == 2
    assert_same(ours, benign.reference())
    assert_same(tv.load(benign.path), benign.reference())


@pytest.mark.parametrize("name", ["hf_gpt2_bin", "hf_bert_bin_sharded"])
def test_transformers_bin_files_match_torch_load(hf: lf.HFCorpus, name: str) -> None:
    bins = [b for b in hf.entries() if b.name.startswith(f"{name}/")]
    assert bins
    for benign in bins:
        assert_same(tv.load_legacy(benign.path), benign.reference())


# --------------------------------------------------------------------------------------------
# load_into


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("cnn_state_dict", lf.SmallCNN),
        ("cnn_state_dict_legacy", lf.SmallCNN),
        ("cnn_state_dict_p5", lf.SmallCNN),
        ("lm_state_dict", lf.TinyTransformer),
        ("lm_state_dict_legacy_p2", lf.TinyTransformer),
    ],
)
def test_load_into_from_a_torch_state_dict(
    torch_corpus: dict[str, lf.Benign], name: str, make: type[nn.Module]
) -> None:
    benign = torch_corpus[name]
    torch.manual_seed(99)
    model = make()
    report = tv.load_into(model, benign.path)
    assert isinstance(report, tv.LoadReport)
    assert report.ok, str(report)
    assert not report.missing
    assert not report.unexpected
    assert_state_dicts_equal(model.state_dict(), benign.reference())


def test_load_into_from_a_lightning_checkpoint(lightning_run: lf.LightningRun) -> None:
    network = lightning_run.network()
    report = tv.load_into(network, lightning_run.checkpoint, rename={lightning_run.prefix: ""})
    assert isinstance(report, tv.LoadReport)
    assert report.ok, str(report)
    assert not report.missing
    assert not report.unexpected
    saved = torch.load(lightning_run.checkpoint, weights_only=False)["state_dict"]
    expected = {key.removeprefix(lightning_run.prefix): value for key, value in saved.items()}
    assert_state_dicts_equal(network.state_dict(), expected)
    trained = lightning_run.module.model.state_dict()  # type: ignore[operator]
    assert_state_dicts_equal(network.state_dict(), trained)


# --------------------------------------------------------------------------------------------
# Salvage: a whole model saved with torch.save(model)


def test_whole_model_is_refused_naming_its_class(whole_model: tuple[Path, lf.SalvageNet]) -> None:
    path, _ = whole_model
    with pytest.raises(tv.UnsafeCheckpointError) as caught:
        tv.load_legacy(path)
    assert caught.value.global_name == f"{lf.__name__}.SalvageNet"
    assert "SalvageNet" in str(caught.value)


def test_whole_model_salvage_recovers_the_state_dict(
    whole_model: tuple[Path, lf.SalvageNet],
) -> None:
    path, model = whole_model
    report = tv.load_legacy(path, salvage=True)
    assert isinstance(report, tv.SalvageReport)
    assert_state_dicts_equal(report.state_dict, model.state_dict())  # type: ignore[arg-type]
    assert set(lf.SALVAGE_CLASSES) <= set(report.classes), report.classes
    salvaged = lf.SalvageNet()
    tv.load_into(salvaged, report.state_dict)  # type: ignore[arg-type]
    x = torch.randn(3, 6, generator=lf.seeded(0))
    assert torch.equal(salvaged(x), model(x))


def test_whole_model_scan_names_the_classes(whole_model: tuple[Path, lf.SalvageNet]) -> None:
    path, _ = whole_model
    report = tv.scan(path)
    assert not report.safe
    assert f"{lf.__name__}.SalvageNet" in report.unsafe_globals


# --------------------------------------------------------------------------------------------
# Hugging Face folders


def _expected_hf_state(folder: lf.HFFolder) -> dict[str, torch.Tensor]:
    """What the folder's files hold; checked against the model: tied copies may be left out."""
    stored = folder.reference()
    model_state = folder.model.state_dict()
    assert set(stored) <= set(model_state)
    assert set(model_state) - set(stored) <= tied_keys(model_state), "the fixture dropped weights"
    assert_state_dicts_equal(stored, {k: model_state[k] for k in stored}, f"{folder.name}: ")
    return stored


@pytest.mark.parametrize("name", lf.HF_FOLDER_NAMES)
def test_load_hf_folder(hf: lf.HFCorpus, name: str) -> None:
    folder = hf.folder(name)
    ours = tv.load(folder.path)
    assert isinstance(ours, Mapping)
    assert_state_dicts_equal(ours, _expected_hf_state(folder), f"{name}: ")


@pytest.mark.parametrize("name", lf.HF_FOLDER_NAMES)
def test_load_into_from_hf_folder(hf: lf.HFCorpus, name: str) -> None:
    folder = hf.folder(name)
    fresh = folder.fresh_model()
    model_state = folder.model.state_dict()
    stored = set(_expected_hf_state(folder))
    dropped = set(model_state) - stored  # tied copies transformers did not save
    report = tv.load_into(fresh, folder.path, strict=not dropped)
    assert isinstance(report, tv.LoadReport)
    assert not report.unexpected, str(report)
    assert not report.mismatched, str(report)
    assert set(report.missing) == dropped, str(report)
    assert_state_dicts_equal(fresh.state_dict(), model_state, f"{name}: ")


@pytest.mark.parametrize("name", lf.HF_FOLDER_NAMES)
def test_inspect_hf_folder(hf: lf.HFCorpus, name: str) -> None:
    folder = hf.folder(name)
    expected = _expected_hf_state(folder)
    info = tv.inspect(folder.path)
    assert sorted(info.keys) == sorted(expected)
    for entry in info.tensors:
        tensor = expected[entry.key]
        assert entry.shape == tuple(tensor.shape), entry
        assert entry.dtype == str(tensor.dtype).removeprefix("torch."), entry
        assert entry.nbytes == tensor.numel() * tensor.element_size(), entry


# --------------------------------------------------------------------------------------------
# convert


_SHARD = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")


def _source_state(source: Path) -> dict[str, torch.Tensor]:
    if source.is_dir():
        return lf.read_hf_folder(source)
    return dict(torch.load(source, map_location="cpu", weights_only=False))


def _assert_nothing_dropped(
    written: Mapping[str, torch.Tensor],
    source: Mapping[str, torch.Tensor],
    aliases: tuple[tuple[str, str], ...],
) -> None:
    """Every source key is written, or is an alias of a written key with the same values."""
    alias_of = dict(aliases)
    assert set(alias_of) <= set(source), f"aliases name keys the source lacks: {aliases}"
    for key, tensor in source.items():
        stored_as = key if key in written else alias_of.get(key)
        assert stored_as in written, f"{key} was dropped (aliases: {aliases})"
        got = written[stored_as]
        assert got.dtype == tensor.dtype, key
        assert got.shape == tensor.shape, key
        assert torch.equal(bits(got), bits(tensor)), f"{key} (stored as {stored_as}) differs"


@pytest.mark.parametrize(
    ("source_name", "model_name", "shard_size"),
    [
        ("pytorch_model.bin", "hf_gpt2_bin", "200KB"),
        ("", "hf_gpt2_bin", "200KB"),
        ("", "hf_bert_bin_sharded", "100KB"),
        ("", "hf_bert_safetensors", "100KB"),
    ],
)
def test_convert_to_hf_folder_loads_in_transformers(
    hf: lf.HFCorpus, tmp_path: Path, source_name: str, model_name: str, shard_size: str
) -> None:
    folder = hf.folder(model_name)
    source = folder.path / source_name if source_name else folder.path
    destination = tmp_path / "converted"
    report = tv.convert(source, destination, to="hf", max_shard_size=shard_size)

    assert isinstance(report, tv.ConvertReport)
    assert report.source == str(source)
    assert report.destination == str(destination)
    shards = sorted(p.name for p in destination.glob("*.safetensors"))
    matches = [_SHARD.fullmatch(name) for name in shards]
    assert all(matches), shards
    count = int(matches[0][2])  # type: ignore[index]
    assert count >= 2, shards
    assert [int(m[1]) for m in matches] == list(range(1, count + 1))  # type: ignore[index]
    assert {int(m[2]) for m in matches} == {count}  # type: ignore[index]
    index = json.loads((destination / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert {Path(f).name for f in report.files} >= {*shards, "model.safetensors.index.json"}

    from safetensors import safe_open

    written: dict[str, torch.Tensor] = {}
    for shard in shards:
        with safe_open(destination / shard, framework="pt") as handle:
            keys = list(handle.keys())
            shard_bytes = 0
            for key in keys:
                assert index["weight_map"][key] == shard, key
                written[key] = handle.get_tensor(key)
                shard_bytes += written[key].numel() * written[key].element_size()
        # "200KB" is 200,000 bytes to transformers; a lone tensor may exceed the limit
        assert len(keys) == 1 or shard_bytes <= 1024 * int(shard_size.removesuffix("KB")), shard
    assert set(written) == set(index["weight_map"])
    total = sum(t.numel() * t.element_size() for t in written.values())
    assert index["metadata"]["total_size"] == total
    assert report.tensors == len(written)
    assert report.bytes == total
    source_state = _source_state(source)
    _assert_nothing_dropped(written, source_state, report.aliases)
    assert_state_dicts_equal(tv.load(destination), source_state, "tv.load(converted): ")  # type: ignore[arg-type]

    shutil.copy(folder.path / "config.json", destination / "config.json")
    reloaded = type(folder.model).from_pretrained(destination).eval()  # type: ignore[attr-defined]
    ids = torch.randint(0, 1000, (2, 10), generator=lf.seeded(1))
    with torch.no_grad():
        expected = folder.model(ids)[0]
        got = reloaded(ids)[0]
    assert torch.equal(got, expected)


_FLAT_TENSOR_FILES = (
    "cnn_state_dict",
    "cnn_state_dict_legacy",
    "lm_state_dict",  # tied embedding: one storage, two keys
    "views",  # many views (transposed, strided, overlapping, stride-0) of one storage
    "edge_tensors",  # empty and 0-dim tensors
    "bare_tensor_legacy",
)


@pytest.mark.parametrize("name", [n for n in _FLAT_TENSOR_FILES if n != "bare_tensor_legacy"])
def test_convert_to_safetensors(
    torch_corpus: dict[str, lf.Benign], tmp_path: Path, name: str
) -> None:
    from safetensors.torch import load_file

    benign = torch_corpus[name]
    destination = tmp_path / "converted.safetensors"
    report = tv.convert(benign.path, destination, to="safetensors")
    assert isinstance(report, tv.ConvertReport)
    assert report.destination == str(destination)
    source = benign.reference()
    written = load_file(destination)
    _assert_nothing_dropped(written, source, report.aliases)
    assert report.tensors == len(written)
    assert report.bytes == sum(t.numel() * t.element_size() for t in written.values())
    ours = tv.load(destination)
    assert isinstance(ours, Mapping)
    assert_state_dicts_equal(ours, source, "tv.load(converted): ")


_TORCHVAULT_SOURCES = (
    *(n for n in _FLAT_TENSOR_FILES if n != "bare_tensor_legacy"),
    "shared_storage",
    "shared_storage_legacy",
    "dtypes",
    "adamw_state",
    "sgd_momentum_state",
    "grad_scaler",
    "parameters",
)


@pytest.mark.parametrize("name", _TORCHVAULT_SOURCES)
def test_convert_to_torchvault(
    torch_corpus: dict[str, lf.Benign], tmp_path: Path, name: str
) -> None:
    benign = torch_corpus[name]
    destination = tmp_path / "converted.tv"
    report = tv.convert(benign.path, destination)
    assert isinstance(report, tv.ConvertReport)
    assert report.destination == str(destination)
    holds_tensors = any(isinstance(leaf, torch.Tensor) for leaf in _leaves(benign.reference()))
    assert (report.tensors > 0) == holds_tensors, report
    assert (report.bytes > 0) == holds_tensors, report
    # Values, types and sharing survive; strides and spare storage bytes need not.
    assert_same(tv.load(destination), benign.reference(), exact=False)


def test_convert_lightning_checkpoint_to_torchvault(
    lightning_run: lf.LightningRun, tmp_path: Path
) -> None:
    destination = tmp_path / "lightning.tv"
    tv.convert(lightning_run.checkpoint, destination)
    reference = torch.load(lightning_run.checkpoint, weights_only=False)
    assert_same(tv.load(destination), reference, exact=False)


@pytest.mark.parametrize("destination_name", ["lm.tv", "lm.safetensors"])
def test_convert_stores_tied_weights_once(
    torch_corpus: dict[str, lf.Benign], tmp_path: Path, destination_name: str
) -> None:
    source = torch_corpus["lm_state_dict"].reference()
    destination = tmp_path / destination_name
    to = "safetensors" if destination.suffix == ".safetensors" else "torchvault"
    report = tv.convert(torch_corpus["lm_state_dict"].path, destination, to=to)
    assert report.tensors == len(source) - 1, report  # head.weight is embed.weight
    stored = sum(t.numel() * t.element_size() for k, t in source.items() if k != "head.weight")
    assert report.bytes == stored, report
    if to == "safetensors":
        pairs = {frozenset(pair) for pair in report.aliases}
        assert frozenset({"head.weight", "embed.weight"}) in pairs, report.aliases
    loaded = tv.load(destination)
    assert isinstance(loaded, Mapping)
    assert loaded["head.weight"].data_ptr() == loaded["embed.weight"].data_ptr()


# --------------------------------------------------------------------------------------------
# scan: benign files are safe, with no anomalies and only allowed globals

_STORAGE_NAMES = (
    "Float", "Double", "Half", "BFloat16", "Char", "Short", "Int", "Long", "Byte", "Bool",
    "ComplexFloat", "ComplexDouble",
)  # fmt: skip
BENIGN_GLOBALS = frozenset(
    {
        "collections.OrderedDict",
        "collections.Counter",
        "argparse.Namespace",
        "torch.Size",
        "torch.device",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
        "torch._utils._rebuild_parameter",
        "torch.storage.UntypedStorage",
        "numpy.dtype",
        "numpy.ndarray",
        "numpy._core.multiarray._reconstruct",
        "numpy._core.multiarray.scalar",
        "numpy._core.numeric._frombuffer",
        "numpy.core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy.core.numeric._frombuffer",
        "_codecs.encode",
        *(
            f"{module}.{name}"
            for module in ("builtins", "__builtin__")
            for name in ("set", "frozenset", "bytes", "bytearray")
        ),
        *(f"torch.{name}Storage" for name in _STORAGE_NAMES),
        *(str(dtype) for dtype in (*lf.CLASSIC_DTYPES, *lf.FLOAT8_DTYPES, *lf.EXTRA_DTYPES)),
    }
)


def _assert_benign_scan(benign: lf.Benign) -> None:
    report = tv.scan(benign.path)
    assert not report.anomalies, report.anomalies
    refused = [ref.name for ref in report.globals if not ref.allowed]
    assert not refused, refused
    assert report.safe
    names = {ref.name for ref in report.globals}
    assert names <= BENIGN_GLOBALS, sorted(names - BENIGN_GLOBALS)
    if benign.is_folder:
        assert report.format == "hf-folder"
    else:
        assert report.format == ("torch-legacy" if benign.legacy else "torch-zip")


@pytest.mark.parametrize("name", lf.TORCH_FILE_NAMES)
def test_scan_benign_torch_file(torch_corpus: dict[str, lf.Benign], name: str) -> None:
    _assert_benign_scan(torch_corpus[name])


@pytest.mark.parametrize("name", lf.LIGHTNING_NAMES)
def test_scan_benign_lightning_checkpoint(lightning_run: lf.LightningRun, name: str) -> None:
    (benign,) = (b for b in lightning_run.entries() if b.name == name)
    _assert_benign_scan(benign)


@pytest.mark.parametrize("name", lf.HF_FOLDER_NAMES)
def test_scan_benign_hf_folder(hf: lf.HFCorpus, name: str) -> None:
    folder = hf.folder(name)
    _assert_benign_scan(folder.benign())
    report = tv.scan(folder.path)
    weights = {p for p in folder.path.iterdir() if p.suffix in (".bin", ".safetensors")}
    assert {Path(f) for f in report.files} >= weights
    for benign in hf.entries():  # the torch.save files inside, one by one
        if benign.name.startswith(f"{name}/"):
            _assert_benign_scan(benign)


# --------------------------------------------------------------------------------------------
# Import cost


def test_importing_torchvault_imports_neither_lightning_nor_transformers() -> None:
    code = (
        "import sys, torchvault, torchvault.legacy\n"
        "heavy = ('lightning', 'pytorch_lightning', 'lightning_fabric', 'transformers',"
        " 'huggingface_hub')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
