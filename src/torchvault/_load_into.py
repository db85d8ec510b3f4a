"""``load_into``: match a state dict to a module's keys, report every difference, load in place.

Matching runs in three steps: the caller's ``rename`` rules, then the wrapper prefixes that
DataParallel/DistributedDataParallel (``module.``) and torch.compile (``_orig_mod.``) add,
reconciled in whichever direction makes the keys meet, then a key-by-key comparison of
shapes and dtypes. Nothing is copied until the comparison passes (or ``strict=False``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence

import torch

from ._file import load
from ._report import DtypeCast, LoadReport, RenamedKey, ShapeMismatch
from ._tensors import MapLocation
from .errors import StateDictMismatchError, UnsupportedTypeError

Rule = tuple["str | re.Pattern[str]", str]
Rename = Mapping["str | re.Pattern[str]", str] | Sequence[Rule]
WRAPPERS = ("module.", "_orig_mod.")
_LISTED = 20


def load_into(
    module: torch.nn.Module,
    source: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    rename: Rename | None = None,
    map_location: MapLocation = None,
) -> LoadReport:
    """Load a state dict or checkpoint file into ``module`` in place and report what happened.

    Args:
        module: the model to fill; its parameters and buffers are copied into, so tensors
            keep their identity, device and dtype (values are cast to the model's dtype).
        source: a checkpoint path (mapped, not copied: no second full copy of the weights
            is held) or a state dict.
        strict: raise if any key is missing, unexpected or has another shape. With False,
            load what matches and list the rest in the report.
        rename: rules applied to source keys before matching: a mapping or pairs of
            ``prefix -> new prefix`` (a ``str``) or ``pattern -> replacement``
            (a compiled ``re.Pattern``). The first rule that matches a key applies.
        map_location: where file tensors are staged before the copy; by default they stay
            mapped on the CPU and are copied straight into the module's tensors.

    Returns:
        A :class:`LoadReport` of loaded, missing, unexpected, mismatched, cast and renamed keys.

    Raises:
        StateDictMismatchError: with ``strict=True``, naming every offending key and both
            shapes; the module is left untouched.

    Example:
        >>> report = tv.load_into(model, "ddp-checkpoint.tv", strict=False)
        >>> report.missing, report.renamed
    """
    where = "the state dict"
    if isinstance(source, str | os.PathLike):
        where = os.fspath(source)
        source = _as_state_dict(load(source, map_location=map_location or "cpu"), where)
    target = module.state_dict()
    renamed_source, renamed = _apply_rules(source, rename)
    renamed_source, auto = _reconcile_wrappers(renamed_source, target)
    report = _compare(renamed_source, target, renamed + auto)
    if strict and not report.ok:
        raise StateDictMismatchError(
            _message(report, where, module),
            report=report,
            path=None if where == "the state dict" else where,
        )
    loadable = {key: renamed_source[key] for key in report.loaded}
    module.load_state_dict(loadable, strict=False)
    return report


def _as_state_dict(obj: object, where: str) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # a Lightning checkpoint
    if isinstance(obj, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        return obj
    keys = list(obj)[:8] if isinstance(obj, Mapping) else []
    hint = (
        f" It holds {keys}; pass `tv.load(path)[KEY]` for the part that is a state dict."
        if keys
        else ""
    )
    # the file is fine but holds something else: a torchvault error naming the file, and a
    # TypeError, as before, for callers that catch that
    raise UnsupportedTypeError(
        f"{where} holds {_kind(obj)}, not a state dict (a flat dict of tensors), so "
        f"load_into cannot use it.{hint}",
        path=where,
    )


def _kind(obj: object) -> str:
    name = type(obj).__name__
    if isinstance(obj, Mapping | list | tuple | set | frozenset):
        return f"a {name} of {len(obj)} items"
    return f"a {name}"


def _apply_rules(
    source: Mapping[str, torch.Tensor], rename: Rename | None
) -> tuple[dict[str, torch.Tensor], list[RenamedKey]]:
    rules: list[Rule] = list(rename.items() if isinstance(rename, Mapping) else rename or [])
    out: dict[str, torch.Tensor] = {}
    renamed = []
    origin: dict[str, str] = {}
    for key, value in source.items():
        new = _rename_one(key, rules)
        if new in origin:
            raise ValueError(
                f"rename maps both {origin[new]!r} and {key!r} to {new!r}; "
                "make the rules more specific."
            )
        origin[new] = key
        out[new] = value
        if new != key:
            renamed.append(RenamedKey(key, new, "rename rule"))
    return out, renamed


def _rename_one(key: str, rules: Iterable[Rule]) -> str:
    for pattern, replacement in rules:
        if isinstance(pattern, re.Pattern):
            if pattern.search(key):
                return pattern.sub(replacement, key)
        elif key.startswith(pattern):
            return replacement + key[len(pattern) :]
    return key


def _wrapper_prefix(keys: Iterable[str]) -> str:
    """The chain of wrapper prefixes (``module.``, ``_orig_mod.``) every key starts with."""
    keys = list(keys)
    prefix = ""
    while keys:
        nxt = next((w for w in WRAPPERS if all(k.startswith(prefix + w) for k in keys)), None)
        if nxt is None:
            break
        prefix += nxt
    return prefix


def _reconcile_wrappers(
    source: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[RenamedKey]]:
    have, want = _wrapper_prefix(source), _wrapper_prefix(target)
    if have == want or not source:
        return source, []
    moved = {want + key[len(have) :]: value for key, value in source.items()}
    if len(moved.keys() & target.keys()) <= len(source.keys() & target.keys()):
        return source, []
    reason = _describe(have, want)
    renamed = [RenamedKey(key, want + key[len(have) :], reason) for key in source]
    return moved, renamed


def _describe(have: str, want: str) -> str:
    names = {"module.": "DataParallel/DDP", "_orig_mod.": "torch.compile"}
    parts = [f"removed {names[w]} prefix '{w}'" for w in WRAPPERS if w in have and w not in want]
    parts += [f"added {names[w]} prefix '{w}'" for w in WRAPPERS if w in want and w not in have]
    return "; ".join(parts) or f"wrapper prefix '{have}' -> '{want}'"


def _compare(
    source: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    renamed: list[RenamedKey],
) -> LoadReport:
    loaded, missing, mismatched, casts = [], [], [], []
    for key, tensor in target.items():
        value = source.get(key)
        if value is None:
            missing.append(key)
        elif value.shape != tensor.shape:
            mismatched.append(ShapeMismatch(key, tuple(value.shape), tuple(tensor.shape)))
        else:
            loaded.append(key)
            if value.dtype != tensor.dtype:
                casts.append(DtypeCast(key, _name(value.dtype), _name(tensor.dtype)))
    unexpected = [key for key in source if key not in target]
    return LoadReport(
        loaded=tuple(loaded),
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        mismatched=tuple(mismatched),
        casts=tuple(casts),
        renamed=tuple(renamed),
    )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _message(report: LoadReport, where: str, module: torch.nn.Module) -> str:
    lines = [f"cannot load {where} into {type(module).__name__} with strict=True:"]
    sections: list[tuple[str, list[str]]] = [
        ("missing in the source", list(report.missing)),
        ("unexpected in the source", list(report.unexpected)),
        (
            "shape mismatch (file vs model)",
            [f"{m.key}: {list(m.file_shape)} vs {list(m.model_shape)}" for m in report.mismatched],
        ),
    ]
    for title, items in sections:
        if items:
            shown = ", ".join(items[:_LISTED])
            more = f", ... and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
            lines.append(f"  {title} ({len(items)}): {shown}{more}")
    lines.append(
        "To load what matches and get a report of the rest, pass strict=False; to map renamed "
        "layers, pass rename={'old.prefix.': 'new.prefix.'}."
    )
    return "\n".join(lines)
