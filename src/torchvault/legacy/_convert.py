"""``convert``: any checkpoint torchvault reads, written as a torchvault file, a strict
safetensors file, a Hugging Face folder or a plain torch.save file; the destination's name
chooses which.

safetensors cannot say that two names share storage, and its readers refuse files that
overlap. Tensors that are the very same view (tied weights) are stored once and the other
names recorded as aliases, in the report and in the file's metadata; views that only
overlap are written as separate copies. Nothing is silently dropped.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from .. import _args
from .._commit import atomic_file
from .._file import save
from .._format import Deferred
from .._report import ConvertReport
from .._tree import flatten
from ..errors import TorchVaultError, UnsupportedTypeError
from ._foreign import deferred, deferred_tree, load_file
from ._hf import metadata, write_folder, write_safetensors

if TYPE_CHECKING:
    from ..run._store import RunStore

Target = Literal["tv", "torchvault", "safetensors", "hf", "torch"]
TARGETS = ("tv", "safetensors", "hf", "torch")
_NAMES = {"tv": "torchvault", "torchvault": "torchvault", "safetensors": "safetensors",
          "hf": "hf", "torch": "torch"}  # fmt: skip
_BY_SUFFIX = {
    ".tv": "torchvault",
    ".safetensors": "safetensors",
    ".pt": "torch",
    ".pth": "torch",
    ".bin": "torch",
}
DEFAULT_SHARD_SIZE = "5GB"
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
    to: Target | None = None,
    max_shard_size: int | str | None = None,
    salvage: bool = False,
    item: str | None = None,
) -> ConvertReport:
    """Rewrite a checkpoint in another format, reading it without running any code.

    The format written follows the destination: ``.tv`` a torchvault file, ``.safetensors``
    a plain safetensors file, ``.pt``/``.pth``/``.bin`` a torch.save file that
    ``torch.load(weights_only=True)`` reads, and a folder (an existing one, or a name with no
    suffix) a Hugging Face model folder. ``to`` overrides it.

    Args:
        source: a torch.save file (.pt/.pth/.bin/.ckpt), a safetensors or torchvault file, a
            Hugging Face model folder, a torch.distributed.checkpoint folder, or one
            checkpoint of a run: ``"RUN@STEP"`` (``STEP`` a number, ``latest`` or ``best``;
            a bare run folder is its latest), what ``tv.load`` of it returns. A sharded
            checkpoint (several ranks) is streamed to a safetensors file or Hugging Face
            folder: each tensor is assembled from its verified chunks only as it is
            written, so memory holds the largest tensor, not the model.
        destination: the file or folder to write; files are replaced atomically.
        to: ``"tv"`` (or ``"torchvault"``) keeps any nested state exactly; ``"safetensors"``
            writes one plain safetensors file; ``"hf"`` writes ``model.safetensors`` or
            shards named ``model-0000k-of-0000n.safetensors`` with
            ``model.safetensors.index.json``; ``"torch"`` writes with ``torch.save``, holding
            only tensors and plain containers, for tools that read nothing else. Both
            safetensors targets need a flat state dict (a Lightning checkpoint's
            ``state_dict`` is taken from it). ``None``: from the destination's suffix.
        max_shard_size: the largest shard of a Hugging Face folder: bytes, or a string like
            ``"500MB"`` or ``"2GiB"`` (default ``"5GB"``). Only for that target.
        salvage: ``source`` is a whole model saved with ``torch.save(model)``: convert the
            state dict :func:`load_legacy` recovers from it with ``salvage=True`` (its
            classes and any global it would call are in the report; a file that calls one
            also warns).
        item: for a ``RUN@STEP`` source, convert only this item of the checkpoint (for
            ``"model"``: its state dict). Without it, a torchvault or torch.save target
            gets every item, and a safetensors target the one flat state dict among them
            (a model's, beside an optimizer's state and other values), or the items
            themselves when they are one (``dcp.save(model.state_dict())``).

    Returns:
        A :class:`ConvertReport` of tensors, bytes, aliases and files written.

    Raises:
        ValueError: an unknown ``to``; a destination whose suffix names no target, without
            ``to``; ``max_shard_size`` for a target that is not a folder.
            ``item`` for a source that is not ``RUN@STEP``; a ``RUN@STEP`` whose ``STEP``
            is not a step; ``item=None`` for a safetensors target when several items of
            the checkpoint are state dicts.
        TypeError: ``item`` is not a str.
        UnsupportedTypeError: the source holds what the target cannot store (nesting for
            safetensors, a value other than tensors and containers for ``"torch"``).
        CheckpointNotFoundError: no such run, step or ``item``.

    Example:
        >>> tv.convert("pytorch_model.bin", "model-hf", max_shard_size="2GB")  # a folder
        >>> tv.convert("model.tv", "model.pt")  # torch.load(..., weights_only=True) reads it
        >>> tv.convert("runs/exp1@best", "model-hf", to="hf")  # its model, streamed
    """
    source, destination = _args.path(source, "source"), _args.path(destination, "destination")
    salvage = _args.flag(salvage, "salvage")
    if item is not None and not isinstance(item, str):
        raise TypeError(f"`item` must be an item name (a str) or None, got {type(item).__name__}")
    target = resolve_target(destination, to=to, max_shard_size=max_shard_size)
    src, dst = os.fspath(source), Path(destination)
    run = None if salvage else _run_checkpoint(src)
    if run is not None:
        return _convert_run(*run, src, dst, target, max_shard_size, item)
    if item is not None:
        raise ValueError(
            f"item={item!r} applies only to a run's checkpoint (source 'RUN@STEP'), and "
            f"{src} is not one; drop it"
        )
    if salvage:
        from . import load_legacy  # the package imports this module

        salvaged = load_legacy(source, salvage=True)
        report = _convert(salvaged.state_dict, src, dst, target, max_shard_size)
        return dataclasses.replace(report, classes=salvaged.classes, unsafe=salvaged.unsafe)
    if target in ("safetensors", "hf"):
        streamed = deferred(source)
        if streamed is not None:  # a DCP folder: one tensor in memory at a time
            return _write_tensors(streamed, {}, src, dst, target, max_shard_size)
    if target == "torchvault":
        tree = deferred_tree(source)
        if tree is not None:  # a DCP folder, nesting and values kept: streamed too
            return _save_streamed(tree, src, dst)
    return _convert(load_file(source), src, dst, target, max_shard_size)


def _save_streamed(tree: object, src: str, dst: Path) -> ConvertReport:
    """A torchvault file written from a tree whose tensors are :class:`Deferred`: each is
    made as it is written and let go, so memory holds one whole tensor at a time."""
    save(tree, dst)
    tensors = [v for _, v in flatten(tree) if isinstance(v, Deferred | torch.Tensor)]
    nbytes = sum(math.prod(t.shape) * t.dtype.itemsize for t in tensors)
    return ConvertReport(src, str(dst), "torchvault", len(tensors), nbytes, (), (str(dst),))


def _run_checkpoint(source: str) -> tuple[RunStore, int] | None:
    """The run and step ``source`` names as ``RUN@STEP`` or a run folder, else None."""
    from ..run import _consolidate  # run/ imports load_into, whose tv.load imports us

    try:
        found = _consolidate.checkpoint_of(source)
    except ValueError as exc:
        if isinstance(exc, TorchVaultError):
            raise
        raise ValueError(f"source {exc}") from None
    return None if found is None else found[:2]


def _convert_run(
    store: RunStore,
    step: int,
    src: str,
    dst: Path,
    target: str,
    max_shard_size: int | str | None,
    item: str | None,
) -> ConvertReport:
    """Checkpoint ``step`` of a run, or one item of it; a sharded one streamed to a
    safetensors or torchvault target."""
    from ..run import _consolidate

    if target in ("safetensors", "hf"):
        item, streamed = _consolidate.flat_tensors(store, step, item)
        if streamed is not None:
            return _write_tensors(streamed, {}, src, dst, target, max_shard_size)
    if target == "torchvault":
        tree = _consolidate.deferred_items(store, step, item)
        if tree is not None:
            return _save_streamed(tree, src, dst)
    state = _consolidate.load(store, step, item=item, map_location="cpu")
    return _convert(state, src, dst, target, max_shard_size)


def _convert(
    obj: object, src: str, dst: Path, target: str, max_shard_size: int | str | None
) -> ConvertReport:
    if target in ("torchvault", "torch"):
        if target == "torchvault":
            save(obj, dst)
        else:
            write_torch(dst, obj)
        tensors = {k: v for k, v in flatten(obj) if isinstance(v, torch.Tensor)}
        unique, aliases = _dedup(tensors)
        nbytes = sum(t.numel() * t.element_size() for t in unique.values())
        pairs = tuple(sorted(aliases.items()))
        return ConvertReport(src, str(dst), target, len(unique), nbytes, pairs, (str(dst),))
    unique, aliases = _dedup(_state_dict(obj, src))
    return _write_tensors(unique, aliases, src, dst, target, max_shard_size)


def _write_tensors(
    unique: Mapping[str, torch.Tensor | Deferred],
    aliases: dict[str, str],
    src: str,
    dst: Path,
    target: str,
    max_shard_size: int | str | None,
) -> ConvertReport:
    """Write a flat state dict as one safetensors file or a Hugging Face folder."""
    if target == "safetensors":
        nbytes = write_safetensors(dst, unique, metadata(unique, aliases))
        files = [dst]
    else:
        shard = parse_size(DEFAULT_SHARD_SIZE if max_shard_size is None else max_shard_size)
        files = write_folder(dst, unique, aliases, shard)
        nbytes = sum(math.prod(t.shape) * t.dtype.itemsize for t in unique.values())
    return ConvertReport(
        src,
        str(dst),
        target,
        len(unique),
        nbytes,
        tuple(sorted(aliases.items())),
        tuple(map(str, files)),
    )


def resolve_target(
    destination: str | os.PathLike[str],
    *,
    to: str | None = None,
    max_shard_size: int | str | None = None,
) -> str:
    """The format :func:`convert` writes to ``destination``: ``"torchvault"``,
    ``"safetensors"``, ``"hf"`` or ``"torch"``; arguments that target would ignore refused.

    Raises:
        ValueError: an unknown ``to``, a suffix that names no format (without ``to``), or a
            ``max_shard_size`` for a single-file target.
    """
    if to is not None and (not isinstance(to, str) or to not in _NAMES):
        raise ValueError(f"to={to!r}: choose one of {', '.join(map(repr, TARGETS))}")
    target = _NAMES[to] if to is not None else _from_destination(Path(destination))
    if max_shard_size is not None:
        if target != "hf":
            raise ValueError(
                f"max_shard_size={max_shard_size!r} applies only to a Hugging Face folder, and "
                f"{os.fspath(destination)} is written as one {target} file; drop it, or pass "
                "to='hf'"
            )
        if parse_size(max_shard_size) < 1:
            raise ValueError(f"max_shard_size={max_shard_size!r}: it must be at least one byte")
    return target


def _from_destination(dst: Path) -> str:
    if dst.is_dir() or (not dst.suffix and not dst.exists()):
        return "hf"
    target = _BY_SUFFIX.get(dst.suffix.lower())
    if target is None:
        known = ", ".join(sorted(_BY_SUFFIX))
        raise ValueError(
            f"destination {os.fspath(dst)}: cannot tell the format from its name (suffixes: "
            f"{known}; a folder for Hugging Face); pass to= one of "
            f"{', '.join(map(repr, TARGETS))}"
        )
    return target


def write_torch(path: Path, obj: object) -> None:
    """Write ``obj`` atomically with ``torch.save``, after checking that it holds only what
    ``torch.load(weights_only=True)`` reads back (tensors, plain containers and scalars)."""
    _check_plain(obj, "")
    with atomic_file(path) as handle:
        torch.save(obj, handle)


_SCALARS = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device)


def _check_plain(obj: object, key: str) -> None:
    # Exact types: torch.load(weights_only=True) refuses subclasses it does not know.
    if type(obj) in _SCALARS or type(obj) in (torch.Tensor, torch.nn.Parameter, torch.Size):
        return
    if type(obj) in (dict, OrderedDict):
        for name, value in obj.items():  # type: ignore[attr-defined]
            if type(name) not in (str, int):
                raise _not_plain(key, name)
            _check_plain(value, f"{key}.{name}" if key else str(name))
        return
    if type(obj) in (list, tuple):
        for index, value in enumerate(obj):  # type: ignore[arg-type]
            _check_plain(value, f"{key}.{index}" if key else str(index))
        return
    raise _not_plain(key, obj)


def _not_plain(key: str, value: object) -> UnsupportedTypeError:
    return UnsupportedTypeError(
        f"{key or 'the checkpoint'}: a {type(value).__module__}.{type(value).__qualname__}, "
        "which torch.load(weights_only=True) does not read; a torch.save target holds only "
        "tensors, dicts, lists, tuples, strings and numbers. Convert to a torchvault file "
        "(.tv, to='tv'), which stores it exactly",
        key=key or None,
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
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    if not isinstance(size, str):
        raise TypeError(f"max_shard_size={size!r}: use bytes or a size like '500MB' or '2GiB'")
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", size)
    unit = match and _UNITS.get(match.group(2).upper())
    if not match or unit is None:
        raise ValueError(f"max_shard_size={size!r}: use bytes or a size like '500MB' or '2GiB'")
    return int(float(match.group(1)) * unit)
