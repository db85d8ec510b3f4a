"""Hugging Face model folders: read them (single or sharded, safetensors or
``pytorch_model.bin``) and write them (sharded safetensors with an index).

The index is untrusted like every other byte: shard names must be plain file names inside
the folder, and each shard must hold exactly the tensors the index assigns to it.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from .. import _dtypes, _format
from .._commit import atomic_file, make_dirs, remove
from .._contents import ALIASES, open_file
from .._placement import Where
from ..errors import CorruptCheckpointError, UnsupportedFormatError, UnsupportedTypeError

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
MAX_INDEX_BYTES = 64 << 20
_WEIGHT_FILE = re.compile(
    r"(model|pytorch_model)(-[0-9]+-of-[0-9]+)?\.(safetensors|bin)(\.index\.json)?"
)
_SHARD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,200}")


def is_model_folder(folder: str) -> bool:
    return any(
        os.path.isfile(os.path.join(folder, n))
        for n in (SAFETENSORS, SAFETENSORS_INDEX, BIN, BIN_INDEX)
    )


def load_folder(folder: str, *, map_location: Where = "cpu") -> dict[str, torch.Tensor]:
    """The flat state dict of a Hugging Face model folder, tensors mapped lazily.

    Tensors that torchvault's ``convert`` stored once under another name (tied weights)
    come back under both names, as the same tensor.
    """
    for single, index_name in ((SAFETENSORS, SAFETENSORS_INDEX), (BIN, BIN_INDEX)):
        # the order transformers' from_pretrained looks in, so both read the same weights
        if os.path.isfile(os.path.join(folder, single)):
            return _load_shard(os.path.join(folder, single), map_location)[0]
        if os.path.isfile(os.path.join(folder, index_name)):
            return _load_sharded(folder, index_name, map_location)
    raise UnsupportedFormatError(
        f"{folder}: a folder without {SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN} or "
        f"{BIN_INDEX}; pass the path of a checkpoint file inside it",
        path=folder,
    )


def _load_shard(path: str, map_location: Where) -> tuple[dict[str, torch.Tensor], set[str]]:
    """A shard's tensors (aliases included) and the names that are aliases."""
    from ._foreign import load_file  # the native reader, or this package for .bin shards

    state = load_file(path, map_location=map_location)
    aliases: set[str] = set()
    header = open_file(path)[0].header if path.endswith(".safetensors") else None
    if header is not None and not header.is_torchvault:  # load checked convert's aliases
        aliases = set(json.loads(header.metadata.get(ALIASES, "{}")))
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UnsupportedFormatError(
            f"{path}: a model shard that is not a flat state dict", path=path
        )
    return dict(state), aliases


def _load_sharded(folder: str, index_name: str, map_location: Where) -> dict[str, torch.Tensor]:
    index_path = os.path.join(folder, index_name)
    weight_map = _weight_map(index_path)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        expected = {k for k, v in weight_map.items() if v == shard}
        tensors, aliases = _load_shard(os.path.join(folder, shard), map_location)
        missing = sorted(expected - set(tensors))[:5]
        extra = sorted(set(tensors) - expected - aliases)[:5]
        if missing or extra:
            raise CorruptCheckpointError(
                f"{index_path}: shard {shard} does not hold what the index says (missing "
                f"{missing}, unlisted {extra}); the folder is incomplete or mixed up",
                path=index_path,
            )
        state.update(tensors)
    return state


def _weight_map(index_path: str) -> dict[str, str]:
    if os.path.getsize(index_path) > MAX_INDEX_BYTES:
        raise CorruptCheckpointError(f"{index_path}: the index is over 64 MiB", path=index_path)
    with open(index_path, "rb") as file:
        index = _format.strict_json(file.read(), index_path, "the shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and _SHARD.fullmatch(v) and ".." not in v
        for k, v in weight_map.items()
    ):
        raise CorruptCheckpointError(
            f"{index_path}: weight_map is not a map from tensor names to shard file names in "
            "this folder",
            path=index_path,
        )
    return weight_map


# -- writing --------------------------------------------------------------------------------


def write_safetensors(
    path: Path, tensors: Mapping[str, torch.Tensor | _format.Deferred], metadata: dict[str, str]
) -> int:
    """Write a strict, plain safetensors file atomically; return its tensor bytes.

    A :class:`~torchvault._format.Deferred` tensor is read only when its bytes are written
    and dropped right after, so the file never needs all its tensors in memory at once.
    """
    blobs = []
    for name, tensor in tensors.items():
        st_name = _dtypes.SAFETENSORS_NAME.get(tensor.dtype)
        if st_name is None:
            raise UnsupportedTypeError(
                f"{name}: {tensor.dtype} has no safetensors dtype; convert to a torchvault "
                "file instead (to='torchvault'), which stores it exactly",
                key=name,
            )
        shape = tuple(tensor.shape)
        nbytes = math.prod(shape) * tensor.dtype.itemsize
        # a deferred tensor stands in as a meta tensor: the header needs its dtype and shape
        source = tensor if isinstance(tensor, torch.Tensor) else _meta(tensor)
        blobs.append(_format.Blob(name, st_name, shape, source, nbytes))
    raw = _format.build_header(blobs, metadata)
    with atomic_file(path) as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        _format.write_blobs(handle, _read(path, blobs, tensors))
    return sum(blob.nbytes for blob in blobs)


def _meta(tensor: _format.Deferred) -> torch.Tensor:
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")


def _read(
    path: Path, blobs: list[_format.Blob], tensors: Mapping[str, torch.Tensor | _format.Deferred]
) -> Iterator[_format.Blob]:
    """The blobs with each deferred tensor read as its turn comes; the header already
    written is the promise each must keep."""
    for blob in blobs:
        tensor = tensors[blob.name]
        if isinstance(tensor, torch.Tensor):
            yield blob
            continue
        source = tensor.read()
        if source.dtype != tensor.dtype or tuple(source.shape) != blob.shape:
            raise CorruptCheckpointError(
                f"{blob.name}: read as {source.dtype} {list(source.shape)}; the source's "
                f"index promised {tensor.dtype} {list(blob.shape)}",
                path=os.fspath(path),
            )
        yield blob._replace(source=source)
        del source  # written: let it go before the next one is read


def metadata(
    tensors: Mapping[str, torch.Tensor | _format.Deferred], aliases: Mapping[str, str]
) -> dict[str, str]:
    """A plain file's metadata: the format marker transformers checks, and the aliases of
    the tensors this file stores."""
    mine = {alias: stored for alias, stored in aliases.items() if stored in tensors}
    return {"format": "pt", **({ALIASES: json.dumps(mine, sort_keys=True)} if mine else {})}


def write_folder(
    folder: Path,
    tensors: Mapping[str, torch.Tensor | _format.Deferred],
    aliases: dict[str, str],
    max_shard_bytes: int,
) -> list[Path]:
    """Write ``tensors`` as ``model.safetensors`` or shards with an index; return the files.
    Deferred tensors are read one at a time, as :func:`write_safetensors` writes them."""
    make_dirs(folder)
    shards: list[dict[str, torch.Tensor | _format.Deferred]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = math.prod(tensor.shape) * tensor.dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        write_safetensors(folder / SAFETENSORS, shards[0], metadata(shards[0], aliases))
        files = [folder / SAFETENSORS]
    else:
        files, weight_map, total = [], {}, 0
        for number, shard in enumerate(shards, 1):
            name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            total += write_safetensors(folder / name, shard, metadata(shard, aliases))
            weight_map.update(dict.fromkeys(shard, name))
            files.append(folder / name)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with atomic_file(folder / SAFETENSORS_INDEX) as handle:
            handle.write(json.dumps(index, indent=2, sort_keys=True).encode())
        files.append(folder / SAFETENSORS_INDEX)
    _remove_stale_weights(folder, files)
    return files


def _remove_stale_weights(folder: Path, keep: list[Path]) -> None:
    """Weight files of an earlier model in ``folder``: a loader could pick them over ours."""
    for path in folder.iterdir():
        if path not in keep and _WEIGHT_FILE.fullmatch(path.name) and path.is_file():
            remove(path)
