"""The pickle-free file of a quantized model: ``save_quantized`` and ``load_quantized``.

Neither kind of quantized weight is a plain tensor: torchao's are tensor subclasses, torch.ao's
dynamic Linear keeps packed parameters. ``save_quantized`` therefore writes a tree that
:func:`torchvault.save` holds (format 1 of this layout)::

    {"format": 1, "method": "int8-dynamic", "backend": "torchao", "torchao": "0.18.0" | None,
     "state":  {key: tensor                          a float entry, as in the state dict
                key: {part: tensor, ...}},           a quantized weight as plain tensors
     "layout": {key: {"kind": class, "shape": [...], "dtype": "float32",
                      "attributes": "its configuration, as text"}}}

For torchao a part is an inner tensor that ``__tensor_flatten__`` names (``qdata``, ``scale``,
``zero_point``; nested subclasses are joined with dots). For torch.ao the key is
``<module>._packed_params`` with parts ``qdata`` (the int8 values), ``scale``, ``zero_point``
and ``bias``. ``load_quantized`` re-applies the same method and backend to a float skeleton and
copies these tensors into its quantized weights: the outputs are bit-identical to the saved
model's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, NoReturn

import torch

from .. import _args, _file, _open, _source
from .._file import PathLike, Source
from .._report import LoadReport, SaveReport, ShapeMismatch
from ..errors import (
    CorruptCheckpointError,
    StateDictMismatchError,
    UnsupportedFormatError,
    UnsupportedTypeError,
)
from ._quantize_backends import (
    METHODS,
    _apply,
    _check_float,
    _dtype_name,
    _dynamic_linears,
    _is_plain,
    _join,
    _quiet_torch_ao,
    _torchao_version,
    _torchao_weights,
)

BACKENDS = ("torchao", "torch.ao")
FORMAT = 1
_TREE_KEYS = frozenset(("format", "method", "backend", "torchao", "state", "layout"))
METADATA_KEY = "quantization"
_LISTED = 10
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")

Spec = tuple[tuple[int, ...], str | None]  # a float tensor's shape and dtype name


# ----------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class _Packed:
    """A quantized weight as plain tensors (``parts``) and what they make.

    Attributes:
        kind: the class holding them (a torchao subclass, or torch.ao's dynamic Linear).
        shape: the weight's logical shape.
        dtype: the weight's dtype (for torchao, the float dtype it computes in).
        attributes: the rest of its configuration as text; compared exactly on load.
        parts: the plain tensors, by name.
    """

    kind: str
    shape: tuple[int, ...]
    dtype: str
    attributes: str
    parts: dict[str, torch.Tensor]

    def layout(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "attributes": self.attributes,
        }


_Entry = torch.Tensor | _Packed


def _entries(model: torch.nn.Module, backend: str) -> dict[str, _Entry]:
    """Every tensor of the quantized model's state, in state-dict order: float tensors as
    they are (views of the model's own), quantized weights as :class:`_Packed` (torchao's
    parts are views too; torch.ao's dynamic Linear is one ``<module>._packed_params`` entry).
    """
    modules = _dynamic_linears(model) if backend == "torch.ao" else {}
    entries: dict[str, _Entry] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        owner = _owner(key, modules)
        if owner is not None:
            packed = _join(owner, "_packed_params")
            if packed not in entries:
                entries[packed] = _pack_dynamic(owner, modules[owner])
        elif not isinstance(value, torch.Tensor):
            raise UnsupportedTypeError(
                f"state-dict entry `{key}` is a {type(value).__name__}, not a tensor; "
                "save_quantized saves tensor state only.",
                key=key,
            )
        else:
            entries[key] = value.detach() if _is_plain(value) else _flatten(value, key)
    return entries


def _owner(key: str, modules: Mapping[str, torch.nn.Module]) -> str | None:
    """The quantized module ``key`` belongs to, if any."""
    if not modules:
        return None
    parts = key.split(".")
    return next(
        (name for name in (".".join(parts[:i]) for i in range(len(parts))) if name in modules),
        None,
    )


def _flatten(weight: torch.Tensor, key: str) -> _Packed:
    parts: dict[str, torch.Tensor] = {}
    attributes: list[str] = []
    _unwrap(weight, "", key, parts, attributes)
    return _Packed(
        kind=_qualname(type(weight)),
        shape=tuple(weight.shape),
        dtype=_dtype_name(weight.dtype),
        attributes="; ".join(attributes),
        parts=parts,
    )


def _unwrap(
    t: torch.Tensor, path: str, key: str, parts: dict[str, torch.Tensor], attributes: list[str]
) -> None:
    """Collect the plain tensors inside a (possibly nested) tensor subclass."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None:
        raise UnsupportedTypeError(
            f"`{key}` holds a {_qualname(type(t))}, which has no __tensor_flatten__ to reach "
            "its data; quantize the model with tv.quantize.",
            key=key,
        )
    names, context = flatten()
    # Context reprs may name functions; their addresses change from process to process.
    attributes.append(f"{path or '.'}: {_qualname(type(t))} {_ADDRESS.sub('', repr(context))}")
    for name in names:
        inner = getattr(t, name)
        where = _join(path, name)
        if _is_plain(inner):
            parts[where] = inner.detach()
        else:
            _unwrap(inner, where, key, parts, attributes)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _pack_dynamic(name: str, module: Any) -> _Packed:
    """torch.ao's dynamic Linear ``name`` as its int8 values, scale, zero point and bias."""
    weight: torch.Tensor = module.weight()
    bias: torch.Tensor | None = module.bias()
    if weight.qscheme() != torch.per_tensor_affine:
        raise ValueError(
            f"module `{name}` has a {weight.qscheme()} weight; save_quantized saves torch.ao "
            "models as tv.quantize makes them (per-tensor affine)."
        )
    parts = {
        "qdata": weight.int_repr(),
        "scale": torch.tensor(weight.q_scale(), dtype=torch.float64),
        "zero_point": torch.tensor(weight.q_zero_point(), dtype=torch.int64),
    }
    if bias is not None:
        parts["bias"] = bias.detach()
    return _Packed(
        kind=_qualname(type(module)),
        shape=tuple(weight.shape),
        dtype=_dtype_name(weight.dtype),
        attributes=f"qscheme={weight.qscheme()}",
        parts=parts,
    )


def _restore_dynamic(module: Any, parts: Mapping[str, torch.Tensor]) -> None:
    """Give torch.ao's dynamic Linear (``module``) the saved weight and bias (repacked)."""
    scale, zero_point = float(parts["scale"]), int(parts["zero_point"])
    weight = torch._make_per_tensor_quantized_tensor(parts["qdata"], scale, zero_point)
    bias = parts.get("bias")
    module.set_weight_bias(weight, None if bias is None else bias.clone())


# ----------------------------------------------------------------------------- save


def save_quantized(
    model: torch.nn.Module,
    path: PathLike | BinaryIO,
    *,
    metadata: Mapping[str, str] | None = None,
) -> SaveReport:
    """Save a model quantized by :func:`quantize` as a torchvault file (no pickle).

    Float tensors are saved as they are; each quantized weight as its plain int8 values and
    scales, with a description. The method and backend are read from the model and recorded
    in the file and in its metadata (``quantization``, ``quantization.backend`` and, for
    torchao, ``quantization.torchao``, the version), so ``tv.inspect`` shows them.
    ``tv.save(model, path)`` does the same for a quantized model.

    Args:
        model: a model returned by :func:`quantize` or :func:`load_quantized`.
        path: the destination file, replaced atomically, or a binary file object (as
            :func:`torchvault.save` takes).
        metadata: more strings to store; keys must not start with ``torchvault.`` nor be
            ``quantization`` or start with ``quantization.``.

    Returns:
        The :class:`SaveReport` of :func:`torchvault.save`.

    Raises:
        ValueError: the model has no quantized layer, or mixes backends or methods, or a
            metadata key is reserved.
        UnsupportedTypeError: a state entry the format cannot hold.
        CheckpointWriteError: the disk refused the write; an old file is intact.

    Example:
        >>> qmodel, _ = tv.quantize(model)
        >>> tv.save_quantized(qmodel, "model-int8.tv", metadata={"run": "exp1"})
    """
    _args.module(model)
    _file.checked_target(path)
    metadata = _args.metadata(metadata)
    method, backend = _detect(model)
    return _save(model, path, method, backend, metadata)


def is_quantized(model: torch.nn.Module) -> bool:
    """True for a model with torchao weights or torch.ao dynamic Linear layers."""
    return bool(_dynamic_linears(model) or _torchao_weights(model))


def _detect(model: torch.nn.Module) -> tuple[str, str]:
    dynamic, torchao = _dynamic_linears(model), _torchao_weights(model)
    if dynamic and torchao:
        raise ValueError("`model` mixes torch.ao and torchao quantized layers; save one kind.")
    if dynamic:
        return _dynamic_method(dynamic), "torch.ao"
    if not torchao:
        raise ValueError(
            f"`model` ({type(model).__name__}) has no quantized layer; quantize it with "
            "tv.quantize first, or save a float model with tv.save."
        )
    methods = {key: _torchao_method(key, weight) for key, weight in torchao.items()}
    if len(set(methods.values())) > 1:
        raise ValueError(f"`model` mixes quantization methods: {methods}; save one method.")
    return next(iter(methods.values())), "torchao"


def _dynamic_method(modules: Mapping[str, Any]) -> str:
    for name, module in modules.items():
        dtype = module._packed_params.dtype
        if dtype != torch.qint8:
            raise ValueError(
                f"module `{name}` is dynamically quantized to {dtype}; save_quantized "
                f"supports {list(METHODS)}."
            )
    return "int8-dynamic"


def _torchao_method(key: str, weight: torch.Tensor) -> str:
    parts = _flatten(weight, key).parts
    if not any(part.dtype == torch.int8 for part in parts.values()):
        raise ValueError(
            f"`{key}` is a {_qualname(type(weight))} without int8 data; save_quantized "
            f"supports {list(METHODS)}, as applied by tv.quantize."
        )
    # Recent torchao keeps the activation quantization in the weight's act_quant_kwargs;
    # older releases wrap the weight in a LinearActivationQuantizedTensor.
    dynamic = getattr(weight, "act_quant_kwargs", None) is not None
    if dynamic or type(weight).__name__ == "LinearActivationQuantizedTensor":
        return "int8-dynamic"
    return "int8-weight-only"


def _save(
    model: torch.nn.Module,
    path: PathLike | BinaryIO,
    method: str,
    backend: str,
    metadata: Mapping[str, str] | None,
) -> SaveReport:
    entries = _entries(model, backend)
    version = _torchao_version() if backend == "torchao" else None
    tree = {
        "format": FORMAT,
        "method": method,
        "backend": backend,
        "torchao": version,
        "state": {k: dict(e.parts) if isinstance(e, _Packed) else e for k, e in entries.items()},
        "layout": {k: e.layout() for k, e in entries.items() if isinstance(e, _Packed)},
    }
    return _file.save(tree, path, metadata=_metadata(method, backend, version, metadata))


def _metadata(
    method: str, backend: str, version: str | None, user: Mapping[str, str] | None
) -> dict[str, str]:
    user = dict(user or {})
    ours = {METADATA_KEY: method, f"{METADATA_KEY}.backend": backend}
    if version is not None:
        ours[f"{METADATA_KEY}.torchao"] = version
    taken = sorted(k for k in user if k == METADATA_KEY or k.startswith(f"{METADATA_KEY}."))
    if taken:
        raise ValueError(
            f"metadata keys {taken} are written by save_quantized itself; rename them."
        )
    return {**user, **ours}


# ----------------------------------------------------------------------------- load


def load_quantized(model: torch.nn.Module, path: Source) -> torch.nn.Module:
    """Load a file written by :func:`save_quantized` into a float model of the same
    architecture.

    The method and backend recorded in the file are applied to ``model`` in place, then the
    saved tensors are copied into it: it computes exactly what the saved model computed.

    Args:
        model: a float skeleton of the saved model's architecture (its own weights do not
            matter). It is quantized in place and left in eval mode.
        path: a file written by :func:`save_quantized` (or ``tv.save``), or its contents
            as bytes or a binary file object.

    Returns:
        ``model``, quantized, holding the saved weights.

    Raises:
        TypeError: ``model`` is not a module.
        CheckpointNotFoundError: no file at ``path``.
        CorruptCheckpointError: the file is damaged, or its layout is malformed.
        UnsupportedFormatError: the file holds no quantized model, or was written by a newer
            torchvault (a newer layout or an unknown method).
        StateDictMismatchError: ``model`` does not have the saved architecture (missing,
            unexpected or differently shaped tensors), or re-quantizing it gives weights of
            another configuration (another torchao version); the report lists the keys.
            Architecture differences are found before ``model`` is changed.
        ValueError: ``model`` is already quantized.
        ImportError: the file was quantized with torchao and it is not installed.

    Example:
        >>> model = tv.load_quantized(MyModel(), "model-int8.tv")
    """
    _args.module(model)
    saved = _Saved.read(_open.load(path), _source.display_name(path))
    _check_float(model)
    _fill(model, saved)
    return model


def is_quantized_file(tree: object) -> bool:
    """True for what :func:`torchvault.load` returns for a file written by save_quantized."""
    return isinstance(tree, dict) and tree.keys() == _TREE_KEYS


def load_into_model(model: torch.nn.Module, tree: object, path: str) -> LoadReport:
    """``tv.load_into`` of a save_quantized file: quantize a float ``model`` as the file
    says (or check that an already quantized one matches it) and copy the saved tensors in.

    Raises:
        CorruptCheckpointError, UnsupportedFormatError: as :func:`load_quantized`.
        StateDictMismatchError: another architecture or quantization; a float model is
            left unchanged.
    """
    saved = _Saved.read(tree, path)
    if is_quantized(model):
        method, backend = _detect(model)
        if (method, backend) != (saved.method, saved.backend):
            _raise_mismatch(
                {},
                {},
                [
                    f"{saved.method} with {saved.backend} in the file, {method} with {backend} "
                    "in the model"
                ],
                path,
                "the model is quantized another way",
            )
        fresh = _entries(model, backend)
        _check_same(fresh, saved)
        _copy(model, fresh, saved)
    else:
        _fill(model, saved)
    return LoadReport(loaded=tuple(model.state_dict()))


def _fill(model: torch.nn.Module, saved: _Saved) -> None:
    """Quantize the float ``model`` as ``saved`` was, then copy its tensors in."""
    _check_fit(_float_specs(model), saved.float_specs(), saved.path)
    model.eval()
    _apply(model, saved.method, saved.backend)
    expected = _entries(model, saved.backend)
    _check_same(expected, saved)
    _copy(model, expected, saved)


def _copy(model: torch.nn.Module, expected: Mapping[str, _Entry], saved: _Saved) -> None:
    with torch.no_grad(), _quiet_torch_ao():
        for key, want in expected.items():
            _assign(model, key, want, saved.entries[key])


def _assign(model: torch.nn.Module, key: str, want: _Entry, got: _Entry) -> None:
    if isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor):
        want.copy_(got)
    elif isinstance(want, _Packed) and isinstance(got, _Packed):
        if want.kind.startswith("torch.ao."):
            _restore_dynamic(model.get_submodule(key.rpartition(".")[0]), got.parts)
        else:  # torchao: the parts are views of the weight's own inner tensors
            for name, part in got.parts.items():
                want.parts[name].copy_(part)


@dataclass(frozen=True)
class _Saved:
    """A quantized-model file, validated."""

    path: str
    method: str
    backend: str
    torchao: str | None
    entries: dict[str, _Entry]

    @classmethod
    def read(cls, tree: object, path: str) -> _Saved:
        if not isinstance(tree, dict) or not {"method", "layout", "state"} <= tree.keys():
            raise UnsupportedFormatError(
                f"{path} holds no quantized model (no method, state and layout); write one "
                "with save_quantized, or load a float checkpoint with tv.load_into.",
                path=path,
            )
        fmt, method, backend = tree.get("format"), tree["method"], tree.get("backend")
        if type(fmt) is not int or fmt > FORMAT or fmt < 1:
            raise UnsupportedFormatError(
                f"{path} has quantized layout format {fmt!r}; this torchvault reads format "
                f"{FORMAT}. Upgrade torchvault.",
                path=path,
            )
        if method not in METHODS:
            raise UnsupportedFormatError(
                f"{path} was quantized with method {method!r}, unknown to this torchvault "
                f"(it knows {list(METHODS)}). Upgrade torchvault.",
                path=path,
            )
        if backend not in BACKENDS or (backend == "torch.ao" and method != "int8-dynamic"):
            _corrupt(path, "", f"backend {backend!r} for method {method!r}")
        torchao = tree.get("torchao")
        if torchao is not None and not isinstance(torchao, str):
            _corrupt(path, "torchao", f"version {torchao!r}")
        entries = _read_entries(tree["state"], tree["layout"], path)
        return cls(path, method, backend, torchao, entries)

    def float_specs(self) -> dict[str, Spec]:
        """The shape and dtype of every tensor of the float model that was quantized."""
        specs: dict[str, Spec] = {}
        for key, entry in self.entries.items():
            if isinstance(entry, torch.Tensor):
                specs[key] = (tuple(entry.shape), _dtype_name(entry.dtype))
            elif self.backend == "torchao":
                specs[key] = (entry.shape, entry.dtype)
            else:  # torch.ao packs a Linear's weight and bias: its float dtype is not kept
                module = key.rpartition(".")[0]
                specs[_join(module, "weight")] = (entry.shape, None)
                if "bias" in entry.parts:
                    specs[_join(module, "bias")] = (tuple(entry.parts["bias"].shape), None)
        return specs


def _corrupt(path: str, key: str, what: str) -> NoReturn:
    where = f"`{key}` of " if key else ""
    raise CorruptCheckpointError(
        f"{where}the quantized layout of {path} is malformed: unexpected {what}. The file was "
        "not written by save_quantized or was altered; write it again.",
        path=path,
        key=key or None,
    )


def _read_entries(state: object, layout: object, path: str) -> dict[str, _Entry]:
    if not isinstance(state, dict) or not isinstance(layout, dict):
        _corrupt(path, "", "state or layout that is not a dict")
    entries: dict[str, _Entry] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            _corrupt(path, repr(key), "key that is not a string")
        if isinstance(value, torch.Tensor) and key not in layout:
            entries[key] = value
        elif isinstance(value, dict) and key in layout:
            entries[key] = _read_packed(key, value, layout[key], path)
        else:
            _corrupt(path, key, f"{type(value).__name__} entry (with layout: {key in layout})")
    for key in layout:
        if key not in state:
            _corrupt(path, key, "layout entry without tensors")
    return entries


def _read_packed(key: str, parts: dict[Any, Any], layout: object, path: str) -> _Packed:
    if (
        isinstance(layout, dict)
        and isinstance(layout.get("kind"), str)
        and isinstance(layout.get("dtype"), str)
        and isinstance(layout.get("attributes"), str)
        and isinstance(layout.get("shape"), list)
        and all(type(n) is int and n >= 0 for n in layout["shape"])
        and parts
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in parts.items())
    ):
        shape = tuple(layout["shape"])
        return _Packed(layout["kind"], shape, layout["dtype"], layout["attributes"], parts)
    _corrupt(path, key, f"quantized entry {layout!r}")


def _float_specs(model: torch.nn.Module) -> dict[str, Spec]:
    return {
        key: (tuple(value.shape), _dtype_name(value.dtype))
        for key, value in model.state_dict().items()
        if isinstance(value, torch.Tensor)
    }


def _check_fit(model: Mapping[str, Spec], file: Mapping[str, Spec], path: str) -> None:
    """Compare the float skeleton with the float model the file came from, before changing
    the skeleton."""
    problems: list[ShapeMismatch | str] = []
    for key in (k for k in model if k in file):
        (model_shape, model_dtype), (file_shape, file_dtype) = model[key], file[key]
        if model_shape != file_shape:
            problems.append(ShapeMismatch(key, file_shape, model_shape))
        elif None not in (model_dtype, file_dtype) and model_dtype != file_dtype:
            problems.append(f"{key}: dtype {file_dtype} in the file, {model_dtype} in the model")
    _raise_mismatch(model, file, problems, path, "")


def _check_same(expected: Mapping[str, _Entry], saved: _Saved) -> None:
    """Compare the re-quantized skeleton with the file, part by part."""
    problems: list[ShapeMismatch | str] = []
    for key in (k for k in expected if k in saved.entries):
        problems += _differences(key, expected[key], saved.entries[key])
    versions = ""
    if saved.backend == "torchao":
        versions = f" (saved with torchao {saved.torchao}; this is torchao {_torchao_version()})"
    hint = f"re-quantizing the model gave another configuration{versions}"
    _raise_mismatch(expected, saved.entries, problems, saved.path, hint)


def _differences(key: str, want: _Entry, got: _Entry) -> list[ShapeMismatch | str]:
    if isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor):
        return _tensor_differences(key, want, got)
    if isinstance(want, _Packed) and isinstance(got, _Packed):
        found: list[ShapeMismatch | str] = []
        if want.shape != got.shape:
            found.append(ShapeMismatch(key, got.shape, want.shape))
        for field in ("kind", "dtype", "attributes"):
            mine, theirs = getattr(want, field), getattr(got, field)
            if mine != theirs:
                found.append(f"{key}: {field} {theirs!r} in the file, {mine!r} in the model")
        if want.parts.keys() != got.parts.keys():
            found.append(
                f"{key}: parts {sorted(got.parts)} in the file, {sorted(want.parts)} in the model"
            )
            return found
        for name, part in want.parts.items():
            found += _tensor_differences(f"{key}[{name}]", part, got.parts[name])
        return found
    return [f"{key}: quantized in only one of the file and the model"]


def _tensor_differences(
    key: str, want: torch.Tensor, got: torch.Tensor
) -> list[ShapeMismatch | str]:
    if want.shape != got.shape:
        return [ShapeMismatch(key, tuple(got.shape), tuple(want.shape))]
    if want.dtype != got.dtype:
        theirs, mine = _dtype_name(got.dtype), _dtype_name(want.dtype)
        return [f"{key}: dtype {theirs} in the file, {mine} in the model"]
    return []


def _raise_mismatch(
    model: Mapping[str, object],
    file: Mapping[str, object],
    problems: Sequence[ShapeMismatch | str],
    path: str,
    hint: str,
) -> None:
    missing = tuple(k for k in model if k not in file)
    unexpected = tuple(k for k in file if k not in model)
    if not (missing or unexpected or problems):
        return
    mismatched = tuple(p for p in problems if isinstance(p, ShapeMismatch))
    report = LoadReport(missing=missing, unexpected=unexpected, mismatched=mismatched)
    lines = [f"missing in the file: {k}" for k in missing[:_LISTED]]
    lines += [f"unexpected in the file: {k}" for k in unexpected[:_LISTED]]
    lines += [
        f"{p.key}: shape {list(p.file_shape)} in the file, {list(p.model_shape)} in the model"
        if isinstance(p, ShapeMismatch)
        else p
        for p in problems[:_LISTED]
    ]
    more = len(missing) + len(unexpected) + len(problems) - len(lines)
    tail = f"\n  ... and {more} more" if more > 0 else ""
    cause = hint or "the model is not the architecture that was saved"
    raise StateDictMismatchError(
        f"{path} does not fit the model: {cause}. Pass a float model of the saved "
        f"architecture and dtype.\n  " + "\n  ".join(lines) + tail,
        report=report,
        path=path,
    )
