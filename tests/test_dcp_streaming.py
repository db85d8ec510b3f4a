"""Converting a torch.distributed.checkpoint folder to a safetensors file or a Hugging Face
folder streams: one tensor is assembled from its chunks, written and let go before the next,
so the extra memory is about the largest tensor, never the whole state; the destination
still appears atomically, whole or not at all."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)

import torchvault as tv

# dcp.save in one process says it assumes a single process: that is the setup here
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

MiB = 1 << 20
PIECES = 4  # chunks per tensor, as FSDP on 4 ranks would cut it along dim 0


def chunked_folder(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A FileSystemWriter folder in which every tensor is stored as PIECES row chunks, as a
    sharded save leaves it: dcp.save writes the chunks as keys of their own, then the
    metadata is rewritten to make them the chunks of one global tensor."""
    pieces = {
        f"{key}/{i}": part.clone()
        for key, tensor in tensors.items()
        for i, part in enumerate(tensor.chunk(PIECES))
    }
    dcp.save(pieces, storage_writer=FileSystemWriter(folder))
    meta = pickle.loads((folder / ".metadata").read_bytes())  # our own file, just written
    entries, storage = {}, {}
    for key, tensor in tensors.items():
        chunks, row = [], 0
        for i, part in enumerate(tensor.chunk(PIECES)):
            offsets = torch.Size([row] + [0] * (tensor.dim() - 1))
            chunks.append(ChunkStorageMetadata(offsets, part.shape))
            zero = torch.Size([0] * tensor.dim())
            storage[MetadataIndex(key, offsets)] = meta.storage_data[
                MetadataIndex(f"{key}/{i}", zero)
            ]
            row += part.shape[0]
        properties = meta.state_dict_metadata[f"{key}/0"].properties
        entries[key] = TensorStorageMetadata(properties, tensor.shape, chunks)
    new: Metadata = dataclasses.replace(
        meta,
        state_dict_metadata=entries,
        storage_data=storage,
        planner_data={key: (key,) for key in tensors},
    )
    (folder / ".metadata").write_bytes(pickle.dumps(new))
    return folder


def chunked_hf_folder(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A HuggingFaceStorageWriter(save_distributed=True) folder as PIECES ranks leave it: one
    shard per rank, holding that rank's row chunk of every tensor at the offsets its
    DCP_SHARDING_INFO metadata gives."""
    folder.mkdir(parents=True)
    for rank in range(PIECES):
        parts, info = {}, {}
        for key, tensor in tensors.items():
            part = tensor.chunk(PIECES)[rank]
            row = sum(p.shape[0] for p in tensor.chunk(PIECES)[:rank])
            parts[key] = part.clone()
            info[key] = {"saved_offsets": [row] + [0] * (tensor.dim() - 1)}
        name = f"shard-{rank + 1:05d}-model-00001-of-00001.safetensors"
        save_file(parts, folder / name, metadata={"DCP_SHARDING_INFO": json.dumps(info)})
    return folder


FOLDERS = {"fs": chunked_folder, "hf": chunked_hf_folder}


def weights(count: int, rows: int) -> dict[str, torch.Tensor]:
    """``count`` float32 tensors of ``rows`` x 1024 (4 KiB a row), not all alike."""
    gen = torch.Generator().manual_seed(0)
    return {f"layers.{i}.weight": torch.randn(rows, 1024, generator=gen) for i in range(count)}


@pytest.fixture(scope="module", params=sorted(FOLDERS))
def layout(request: pytest.FixtureRequest) -> str:
    """FileSystemWriter's ``.metadata`` + ``.distcp`` files, or distributed HF shards."""
    return str(request.param)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory, layout: str) -> Path:
    """8 tensors of 16 MiB, each in 4 chunks: 128 MiB of state."""
    return FOLDERS[layout](tmp_path_factory.mktemp("dcp") / "big", weights(8, 4096))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, layout: str) -> Path:
    return FOLDERS[layout](tmp_path_factory.mktemp("dcp") / "small", weights(3, 8))


# The peak of RssAnon (anonymous memory: what assembling tensors allocates; the mapped
# chunk files are file pages and come back under pressure) sampled by a thread while the
# conversion runs. A warm-up conversion first, so imports are not counted.
_CONVERT_CHILD = textwrap.dedent(
    """
    import sys, threading
    import torchvault as tv

    def anon():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no RssAnon in /proc/self/status")

    warm, source, destination, spare = sys.argv[1:]
    tv.convert(warm, spare)
    base = peak = anon()
    done = threading.Event()

    def sample():
        global peak
        while not done.wait(0.0005):
            peak = max(peak, anon())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        tv.convert(source, destination)
    finally:
        done.set()
        sampler.join()
    print(max(peak, anon()) - base)
    """
)


# glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB), after
# which freed tensors stay in the heap and in RssAnon: a fixed threshold (its default start)
# returns every freed tensor to the system, so RssAnon follows the memory actually in use.
_STATIC_MMAP = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}


@pytest.mark.parametrize("name", ["model.safetensors", "model-hf"])
def test_converting_a_dcp_folder_holds_about_one_tensor_in_memory(
    big: Path, small: Path, tmp_path: Path, name: str
) -> None:
    spare = tmp_path / ("warm.safetensors" if name.endswith(".safetensors") else "warm-hf")
    done = subprocess.run(
        [sys.executable, "-c", _CONVERT_CHILD, str(small), str(big), str(tmp_path / name),
         str(spare)],
        capture_output=True, text=True, timeout=300, check=False, env=_STATIC_MMAP,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    grown = int(done.stdout.split()[-1])
    largest = 16 * MiB
    # the whole state is 128 MiB: loading it all first would be far over this
    assert grown < largest + 32 * MiB, f"{grown / MiB:.1f} MiB of anonymous memory"


@pytest.mark.parametrize("name", ["model.safetensors", "model-hf"])
def test_a_streamed_conversion_holds_the_same_tensors_as_load(
    small: Path, tmp_path: Path, name: str
) -> None:
    out = tmp_path / name
    report = tv.convert(small, out)
    expected = tv.load(small)
    got = load_file(out) if name.endswith(".safetensors") else tv.load(out)
    assert list(expected) == list(weights(3, 8))
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype
        assert torch.equal(got[key], tensor)
        assert torch.equal(tensor, weights(3, 8)[key])
    assert (report.tensors, report.bytes) == (3, 3 * 8 * 1024 * 4)


def test_a_streamed_hugging_face_folder_is_sharded_by_size(small: Path, tmp_path: Path) -> None:
    report = tv.convert(small, tmp_path / "hf", max_shard_size=8 * 1024 * 4)
    assert sorted(Path(f).name for f in report.files) == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
    ]
    loaded = tv.load(tmp_path / "hf")
    for key, tensor in weights(3, 8).items():
        assert torch.equal(loaded[key], tensor)


@pytest.mark.parametrize("name", ["model.safetensors", "model-hf"])
def test_a_corrupt_chunk_of_the_last_tensor_leaves_no_destination(
    tmp_path: Path, name: str
) -> None:
    folder = tmp_path / "src"
    chunked_folder(folder, weights(3, 8))
    meta = pickle.loads((folder / ".metadata").read_bytes())  # our own file, just written
    last = max(meta.storage_data.values(), key=lambda where: where.offset)
    data = folder / last.relative_path
    raw = bytearray(data.read_bytes())
    # a byte of tensor data in the last item of the file (the last chunk of the last
    # tensor): its zip CRC fails only when that tensor is read, after the others are written
    raw[raw.index(b"data/0", last.offset) + 200] ^= 0xFF
    data.write_bytes(bytes(raw))
    out = tmp_path / name
    with pytest.raises(tv.CorruptCheckpointError, match=r"layers\.2\.weight"):
        tv.convert(folder, out)
    assert not out.is_file()
    assert not out.is_dir() or not list(out.iterdir())  # the folder may exist, but empty
    assert {p.name for p in tmp_path.iterdir()} <= {"src", name}  # no temporary file left


def test_nested_dcp_state_still_converts_to_a_torchvault_file(tmp_path: Path) -> None:
    # nesting, and values that are not tensors, have no place in safetensors: such a folder
    # takes the whole-state path, and its error is the one any nested source gives
    folder = tmp_path / "nested"
    dcp.save({"model": weights(2, 8), "step": 3}, storage_writer=FileSystemWriter(folder))
    with pytest.raises(tv.UnsupportedTypeError, match="not a flat state dict"):
        tv.convert(folder, tmp_path / "out.safetensors")
    tv.convert(folder, tmp_path / "out.tv")
    assert tv.load(tmp_path / "out.tv")["step"] == 3
