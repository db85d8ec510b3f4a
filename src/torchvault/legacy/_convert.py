"""``convert``: any checkpoint torchvault reads, written as a torchvault file, a strict
safetensors file or a Hugging Face folder.

safetensors cannot say that two names share storage, and its readers refuse files that
overlap. Tensors that are the very same view (tied weights) are stored once and the other
names recorded as aliases, in the report and in the file's metadata; views that only
overlap are written as separate copies. Nothing is silently dropped.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch

from .. import _args
from .._file import load, save
from .._report import ConvertReport
from .._tree import flatten
from ..errors import UnsupportedTypeError
from ._hf import metadata, write_folder, write_safetensors

Target = Literal["torchvault", "safetensors", "hf"]
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def convert(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    to: Target = "torchvault",
    max_shard_size: int | str = "5GB",
) -> ConvertReport:
    """Rewrite a checkpoint in another format, reading it without running any code.

    Args:
        source: a torch.save file (.pt/.pth/.bin/.ckpt), a safetensors or torchvault file, or
            a Hugging Face model folder.
        destination: the file (``to="torchvault"`` or ``"safetensors"``) or folder
            (``to="hf"``) to write; files are replaced atomically.
        to: ``"torchvault"`` keeps any nested state exactly; ``"safetensors"`` writes one
            plain safetensors file; ``"hf"`` writes ``model.safetensors`` or shards named
            ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``.
            Both safetensors targets need a flat state dict (a Lightning checkpoint's
            ``state_dict`` is taken from it).
        max_shard_size: the largest shard for ``to="hf"``: bytes, or a string like
            ``"500MB"`` or ``"2GiB"``.

    Returns:
        A :class:`ConvertReport` of tensors, bytes, aliases and files written.

    Example:
        >>> tv.convert("pytorch_model.bin", "model-hf", to="hf", max_shard_size="2GB")
    """
    source, destination = _args.path(source, "source"), _args.path(destination, "destination")
    obj = load(source)
    src, dst = os.fspath(source), Path(destination)
    if to == "torchvault":
        save(obj, dst)
        tensors = {k: v for k, v in flatten(obj) if isinstance(v, torch.Tensor)}
        unique, aliases = _dedup(tensors)
        nbytes = sum(t.numel() * t.element_size() for t in unique.values())
        pairs = tuple(sorted(aliases.items()))
        return ConvertReport(src, str(dst), to, len(unique), nbytes, pairs, (str(dst),))
    if to not in ("safetensors", "hf"):
        raise ValueError(f"to={to!r}: choose 'torchvault', 'safetensors' or 'hf'")
    unique, aliases = _dedup(_state_dict(obj, src))
    if to == "safetensors":
        nbytes = write_safetensors(dst, unique, metadata(unique, aliases))
        files = [dst]
    else:
        files = write_folder(dst, unique, aliases, parse_size(max_shard_size))
        nbytes = sum(t.numel() * t.element_size() for t in unique.values())
    return ConvertReport(
        src,
        str(dst),
        to,
        len(unique),
        nbytes,
        tuple(sorted(aliases.items())),
        tuple(map(str, files)),
    )


def _state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # a Lightning checkpoint
    if isinstance(obj, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        return dict(obj)
    raise UnsupportedTypeError(
        f"{source} is not a flat state dict (names to tensors), which safetensors needs; "
        "convert it with to='torchvault', which keeps any nesting"
    )


def _dedup(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors that are the same view stored once; the other names as aliases."""
    first: dict[tuple[object, ...], str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.device, tensor.dtype,
               tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))  # fmt: skip
        if tensor.numel() and key in first:
            aliases[name] = first[key]
        else:
            first.setdefault(key, name)
            unique[name] = tensor.detach()
    return unique, aliases


def parse_size(size: int | str) -> int:
    """Bytes from ``500MB``, ``2GiB`` or an int."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", size)
    unit = match and _UNITS.get(match.group(2).upper())
    if not match or unit is None:
        raise ValueError(f"max_shard_size={size!r}: use bytes or a size like '500MB' or '2GiB'")
    return int(float(match.group(1)) * unit)
