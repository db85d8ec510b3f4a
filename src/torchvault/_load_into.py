"""``load_into``: match a state dict to a module's keys, report every difference, load in place.

Matching runs in three steps: the caller's ``rename`` rules and the wrapper prefixes that
DataParallel/DistributedDataParallel (``module.``) and torch.compile (``_orig_mod.``) add,
reconciled in whichever direction makes the keys meet (the rules are tried on the keys as
saved, in the module's wrapper form and on the bare layer names, and the form that matches
the most module keys wins, so a rule written for the layer names works whatever wraps the
file and the model), then a key-by-key comparison of shapes and dtypes. Nothing is copied
until the comparison passes (or ``strict=False``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from . import _args, _placement, _source
from ._open import load
from ._report import DtypeCast, LoadReport, RenamedKey, ShapeMismatch
from ._tensors import MapLocation
from .errors import StateDictMismatchError, UnsupportedTypeError

Rule = tuple["str | re.Pattern[str]", str]
Rename = Mapping["str | re.Pattern[str]", str] | Sequence[Rule] | Callable[[str], str]
Rules = list[Rule] | Callable[[str], str]
WRAPPERS = ("module.", "_orig_mod.")
_LISTED = 20


def load_into(
    module: torch.nn.Module,
    source: _source.Readable | Mapping[str, torch.Tensor] | torch.nn.Module,
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
            is held), its contents as bytes or a binary file object (as :func:`load`
            reads them), a state dict (a mapping of str to tensors), or another module (its
            ``state_dict()``: copy one model's weights into another).
        strict: raise if any key is missing, unexpected or has another shape. With False,
            load what matches and list the rest in the report.
        rename: rules applied to source keys before matching: a mapping or pairs of
            ``prefix -> new prefix`` (a ``str``) or ``pattern -> replacement``
            (a compiled ``re.Pattern``), where the first rule that matches a key applies;
            or a callable ``key -> new key``. Write them for the module's own names: on a
            DataParallel/DDP or torch.compile file they also apply after the wrapper prefix
            (``module.``, ``_orig_mod.``) is reconciled, whichever form matches the module.
        map_location: where file tensors are staged before the copy (as :func:`load` takes
            it); by default they stay mapped on the CPU and are copied straight into the
            module's tensors, whatever device the file was saved from.

    Returns:
        A :class:`LoadReport` of loaded, missing, unexpected, mismatched, cast and renamed keys.

    Raises:
        TypeError, ValueError: a wrong argument, naming it: ``module`` not a module, a state
            dict value that is not a tensor (naming its key), a malformed ``rename`` or
            ``map_location``, a URL path.
        StateDictMismatchError: with ``strict=True``, naming every offending key and both
            shapes; the module is left untouched.

    Example:
        >>> report = tv.load_into(model, "ddp-checkpoint.tv", strict=False)
        >>> report.missing, report.renamed
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(
            f"module must be the torch.nn.Module to load into; got {type(module).__name__}. "
            "To read a checkpoint into a dict, use tv.load(path)."
        )
    strict = _args.flag(strict, "strict")
    rules = _rules(rename)
    staging = "cpu" if map_location is None else map_location
    _placement.check(staging)  # before any file is read
    where, file = "the state dict", None
    state: Mapping[str, torch.Tensor]
    if isinstance(source, torch.nn.Module):
        where, state = f"the {type(source).__name__} passed as source", source.state_dict()
    elif isinstance(source, Mapping):
        _check_state_dict(source)
        state = source
    elif _source.is_source(source):
        from .export import _quantized_file as _quantized  # the export package imports us

        if _source.is_path(source):
            source = _args.path(source, "source")
        where = file = _source.display_name(source)
        loaded = load(source, map_location=staging)
        if _quantized.is_quantized_file(loaded):
            _check_whole(strict, rename)
            return _quantized.load_into_model(module, loaded, where)
        state = _as_state_dict(loaded, where)
    else:
        raise TypeError(
            "source must be a checkpoint path, bytes, a binary file object, a state dict or a "
            f"module; got {type(source).__name__}"
        )
    target = module.state_dict()
    # a copy from or into a meta tensor (no data) is a no-op or fails deep in torch
    _check_not_meta(state, "map_location" if file is not None else "source", where)
    _check_not_meta(target, "module", f"the {type(module).__name__}")
    renamed_source, renamed = _match(state, target, rules)
    report = _compare(renamed_source, target, renamed)
    if strict and not report.ok:
        raise StateDictMismatchError(_message(report, where, module), report=report, path=file)
    loadable = {key: renamed_source[key] for key in report.loaded}
    module.load_state_dict(loadable, strict=False)
    return report


def _check_not_meta(state: Mapping[str, torch.Tensor], name: str, where: str) -> None:
    meta = next((key for key, tensor in state.items() if tensor.is_meta), None)
    if meta is None:
        return
    fix = {
        "module": "materialize it first (module.to_empty(device='cpu'), then initialize or "
        "load it)",
        "map_location": "stage it on a device with data (map_location=None or 'cpu')",
    }.get(name, "pass a source whose tensors hold data")
    raise ValueError(
        f"{name}: {where} has meta tensors ({meta!r:.60}), which hold no data to copy; {fix}"
    )


def _check_whole(strict: bool, rename: object) -> None:
    for name, given in (("strict=False", strict is False), ("rename", rename is not None)):
        if given:
            raise ValueError(
                f"`{name}` does not apply to a quantized model file: it loads whole into a "
                "model of the saved architecture (its weights are re-quantized the same way). "
                f"Drop `{name.partition('=')[0]}`."
            )


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


def _check_state_dict(source: Mapping[Any, object]) -> None:
    for key, value in source.items():
        if not isinstance(key, str):
            raise TypeError(
                f"source (a state dict) must have str keys; key {key!r:.40} is {type(key).__name__}"
            )
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"source[{key!r:.60}] is a {type(value).__name__}; load_into copies tensors, so "
                "every value of a state dict must be a torch.Tensor (convert it with "
                "torch.tensor(...), or pass the part of the checkpoint that is a state dict)"
            )


def _rules(rename: object) -> Rules:
    """``rename`` checked: a callable, or a list of (prefix or pattern, replacement)."""
    if rename is None:
        return []
    if callable(rename) and not isinstance(rename, Mapping):
        return rename
    pairs = rename.items() if isinstance(rename, Mapping) else rename
    if isinstance(pairs, str | bytes) or not isinstance(pairs, Iterable):
        raise TypeError(_RENAME + f"; got {type(rename).__name__}")
    rules: list[Rule] = []
    for pair in pairs:
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise TypeError(_RENAME + f"; got the item {pair!r:.60}")
        pattern, replacement = pair
        if not isinstance(pattern, str | re.Pattern) or not isinstance(replacement, str):
            raise TypeError(_RENAME + f"; got the rule {pattern!r:.40} -> {replacement!r:.40}")
        rules.append((pattern, replacement))
    return rules


_RENAME = (
    "rename must be a dict (or pairs) of old prefix (str) or re.Pattern -> str, or a "
    "callable key -> key"
)


def _match(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], rules: Rules
) -> tuple[dict[str, torch.Tensor], list[RenamedKey]]:
    """The source keys renamed to meet the target's.

    Without rules, the wrapper prefixes are reconciled when that matches more keys. With
    rules, they are tried on the keys as saved, on the keys in the module's wrapper form and
    on the bare names (no wrapper prefix), each result then put in the module's form; the
    form that matches the most module keys wins (ties: the keys as saved). So a rule written
    for the bare layer names, or for the names as saved, works whatever wraps the file and
    the module (DataParallel/DDP, torch.compile).
    """
    renamed_source, renamed = _apply_rules(source, rules)
    renamed_source, auto = _reconcile_wrappers(renamed_source, target)
    have, want = _wrapper_prefix(source), _wrapper_prefix(target)
    if not rules or not source or not (have or want):
        return renamed_source, _compose(renamed, auto)
    best, best_renamed = renamed_source, _compose(renamed, auto)
    for form in dict.fromkeys((have, want, "")):
        try:
            candidate, moves = _in_form(source, rules, have, form, want)
        except ValueError:  # two keys meet in this form only: another form may fit
            continue
        if len(candidate.keys() & target.keys()) > len(best.keys() & target.keys()):
            best, best_renamed = candidate, moves
    return best, best_renamed


def _in_form(
    source: Mapping[str, torch.Tensor], rules: Rules, have: str, form: str, want: str
) -> tuple[dict[str, torch.Tensor], list[RenamedKey]]:
    """``rules`` applied to the source keys with their wrapper prefix ``have`` replaced by
    ``form``, each result then given the module's prefix ``want``: a key the rule left in
    ``form`` gets ``want`` in its place, one it moved out of any wrapper gets ``want`` added."""
    out: dict[str, torch.Tensor] = {}
    renamed: list[RenamedKey] = []
    wrapper = _describe(have, want) if have != want else ""
    for key, value in source.items():
        ruled = _rename_one(form + key[len(have) :], rules)
        if ruled.startswith(form) and (form or not want or not ruled.startswith(want)):
            new = want + ruled[len(form) :]
        elif want and ruled.startswith(want):
            new = ruled
        else:
            new = want + ruled
        if new in out:
            raise ValueError(f"rename maps two keys to {new!r}")
        out[new] = value
        if new != key:
            by_rule = ruled != form + key[len(have) :]
            reason = "; ".join(r for r in ("rename rule" if by_rule else "", wrapper) if r)
            renamed.append(RenamedKey(key, new, reason or f"wrapper prefix '{have}' -> '{want}'"))
    return out, renamed


def _compose(first: list[RenamedKey], then: list[RenamedKey]) -> list[RenamedKey]:
    """Two renaming steps as one: each key from its name in the source to its final name."""
    by_target = {r.target: r for r in first}
    moved_again = {r.source for r in then}
    out = [r for r in first if r.target not in moved_again]
    for step in then:
        before = by_target.get(step.source)
        if before is None:
            out.append(step)
        else:
            out.append(RenamedKey(before.source, step.target, f"{before.reason}; {step.reason}"))
    return out


def _apply_rules(
    source: Mapping[str, torch.Tensor], rules: Rules
) -> tuple[dict[str, torch.Tensor], list[RenamedKey]]:
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


def _rename_one(key: str, rules: Rules) -> str:
    if callable(rules):
        new = rules(key)
        if not isinstance(new, str):
            raise TypeError(
                f"rename (a callable) returned {type(new).__name__} for {key!r:.60}; it must "
                "return the new key, a str"
            )
        return new
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
