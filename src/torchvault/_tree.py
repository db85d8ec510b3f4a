"""Nested Python state <-> a typed JSON tree whose leaves refer to tensors by index.

The encoding is the compatibility contract, so it is spelled out here:

* ``null``, ``true``/``false``, strings, integers of at most 64 bits and finite floats are
  themselves (JSON numbers with a fraction or exponent are floats, the rest ints).
* Every other value is an object with exactly one key, its tag::

    {"dict": {...}} or {"dict": [[k, v], ...]}     dict (the pair form for non-str keys)
    {"odict": ...}                                 collections.OrderedDict, same payload
    {"list": [...]}  {"tuple": [...]}
    {"int": "-0x1f..."}                            an int wider than 64 bits
    {"float": "nan" | "inf" | "-inf"}
    {"complex": ["1.5", "-0.0"]}
    {"bytes": "<base64>"}  {"bytearray": "<base64>"}
    {"dtype": "bfloat16"}  {"device": "cuda:1"}  {"size": [2, 3]}
    {"npscalar": ["<f4", "<hex of the bytes>"]}
    {"tensor": 3}                                  entry 3 of the tensor table
    {"set": [...]}  {"frozenset": [...]}           members sorted by their compact JSON
    {"namespace": {"lr": 0.1, ...}}                argparse.Namespace, its attributes
    {"generator": ["cuda:0", {"tensor": 4}]}       torch.Generator: its device and its
                                                   ``get_state()`` bytes (a uint8 tensor
                                                   stored from that device)

Set members hold no tensors (a tensor hashes by identity, so it has no stable place in a
set); decoding checks that every member is hashable and that none repeats. A generator's
state is a table entry so that ``map_location`` moves it as it moves tensors (``cuda:1`` to
``cuda:0``); its device type cannot change, since CPU and CUDA states differ in form.

Decoding never imports, evaluates or constructs anything outside this list.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, Union, cast

import numpy as np
import torch

from . import _dtypes
from ._format import Deferred
from .errors import CorruptCheckpointError, UnsupportedTypeError

Json = Union[None, bool, int, float, str, list["Json"], dict[str, "Json"]]  # noqa: UP007

MAX_DEPTH = 200
_INT64_MIN, _UINT64_END = -(2**63), 2**64
_DEVICE_RE = re.compile(r"[a-z_]{1,32}(:[0-9]{1,6})?")
_FLOAT_RE = re.compile(r"-?(nan|inf|[0-9]+(\.[0-9]*)?(e[-+]?[0-9]+)?)")

TensorSink = Callable[[Union[torch.Tensor, "np.ndarray[Any, Any]"], str], int]
TensorSource = Callable[[int], object]


def join(path: str, key: object) -> str:
    """The dotted path of ``key`` under ``path`` (``optimizer.state.3.exp_avg``)."""
    part = key if isinstance(key, str) else str(key) if type(key) is int else repr(key)
    return f"{path}.{part}" if path else part


# ----------------------------------------------------------------------------- encoding


def encode(obj: object, sink: TensorSink, path: str = "", depth: int = 0) -> Json:
    """Encode ``obj``; tensors and arrays are handed to ``sink``, which returns their index.

    Raises:
        UnsupportedTypeError: a value (or dict key) the format cannot hold, naming its path.
    """
    if depth > MAX_DEPTH:
        raise UnsupportedTypeError(
            f"`{path}` is nested more than {MAX_DEPTH} levels deep; flatten the structure.",
            key=path,
        )
    kind = type(obj)
    if obj is None or kind is bool or kind is str:
        return obj  # type: ignore[return-value]
    if kind is int:
        value: int = obj  # type: ignore[assignment]
        return value if _INT64_MIN <= value < _UINT64_END else {"int": hex(value)}
    if kind is float:
        number: float = obj  # type: ignore[assignment]
        return number if math.isfinite(number) else {"float": repr(number)}
    if kind is dict or kind is OrderedDict:
        return _encode_dict(cast("dict[object, object]", obj), sink, path, depth)
    if kind is list or kind is tuple:
        seq = cast("list[object] | tuple[object, ...]", obj)
        return {
            kind.__name__: [encode(v, sink, join(path, i), depth + 1) for i, v in enumerate(seq)]
        }
    if kind is torch.Tensor or kind is torch.nn.Parameter or kind is np.ndarray:
        return {"tensor": sink(cast("torch.Tensor", obj), path)}
    if kind is Deferred:  # made only as it is written (convert streams): TensorPlan takes it
        return {"tensor": sink(cast("torch.Tensor", obj), path)}
    if kind is set or kind is frozenset:
        return {kind.__name__: _encode_members(cast("set[object]", obj), path, depth)}
    if kind is argparse.Namespace:
        names: dict[str, object] = vars(obj)
        return {
            "namespace": {k: encode(v, sink, join(path, k), depth + 1) for k, v in names.items()}
        }
    if kind is torch.Generator:
        gen = cast(torch.Generator, obj)
        state = gen.get_state().to(gen.device)  # stored "from" its device: map_location applies
        return {"generator": [str(gen.device), {"tensor": sink(state, path)}]}
    return _encode_scalar(obj, path)


def _encode_members(members: set[object], path: str, depth: int) -> list[Json]:
    def refuse(_: object, where: str) -> int:
        raise UnsupportedTypeError(
            f"`{where}` is a tensor or array inside a set, whose order torchvault cannot "
            "keep stable (tensors hash by identity); store them in a list instead.",
            key=where,
        )

    nodes = [encode(member, refuse, path, depth + 1) for member in members]
    # Sets iterate in hash order, which varies between processes for strings: sorting by
    # the encoded form makes the same set always write the same bytes.
    return sorted(nodes, key=_canonical)


def _canonical(node: Json) -> str:
    return json.dumps(node, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _encode_dict(obj: dict[object, object], sink: TensorSink, path: str, depth: int) -> Json:
    tag = "dict" if type(obj) is dict else "odict"
    if all(type(k) is str for k in obj):
        return {tag: {k: encode(v, sink, join(path, k), depth + 1) for k, v in obj.items()}}  # type: ignore[misc]
    pairs: list[Json] = []
    for k, v in obj.items():
        if isinstance(k, torch.Tensor):
            raise UnsupportedTypeError(
                f"`{path}` has a tensor as a dict key; use its index or name instead.", key=path
            )
        sub = join(path, k)
        pairs.append([encode(k, sink, sub, depth + 1), encode(v, sink, sub, depth + 1)])
    return {tag: pairs}


def _encode_scalar(obj: object, path: str) -> Json:
    if type(obj) is complex:
        return {"complex": [repr(obj.real), repr(obj.imag)]}
    if isinstance(obj, bytes | bytearray) and type(obj) in (bytes, bytearray):
        return {type(obj).__name__: base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, torch.dtype):
        return {"dtype": _dtypes.DTYPE_NAMES[obj]}
    if type(obj) is torch.device:
        return {"device": str(obj)}
    if type(obj) is torch.Size:
        return {"size": list(obj)}
    if isinstance(obj, np.generic) and obj.dtype.newbyteorder("<").str in _dtypes.NUMPY_DTYPES:
        little = obj.astype(obj.dtype.newbyteorder("<"))
        return {"npscalar": [little.dtype.str, little.tobytes().hex()]}
    raise UnsupportedTypeError(_unsupported_message(obj, path), key=path)


def _unsupported_message(obj: object, path: str) -> str:
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    where = f"`{path}`" if path else "the object"
    if isinstance(obj, torch.nn.Module):
        hint = "save its `.state_dict()` instead (tv.save(module, path) does this at the top level)"
    elif hasattr(obj, "state_dict") and callable(obj.state_dict):
        hint = "save its `.state_dict()` instead"
    elif isinstance(obj, torch.Tensor) and obj.is_nested:
        hint = "save its components (`list(t.unbind())`) instead"
    elif isinstance(obj, torch.Tensor):
        hint = (
            "convert it to a plain tensor first (for example `.full_tensor()` or `.dequantize()`)"
        )
    elif isinstance(obj, tuple) and hasattr(obj, "_asdict"):
        hint = "convert the namedtuple with `._asdict()` or `tuple(...)`"
    elif isinstance(obj, dict | list | tuple | int | float | str):
        hint = f"convert it to a plain {type(obj).__mro__[-2].__name__} first"
    else:
        hint = (
            "convert it to a dict, list, tuple, set, number, string, bytes, tensor, "
            "argparse.Namespace or torch.Generator"
        )
    return (
        f"{where} is a {name}, which torchvault does not store: the format is pickle-free "
        f"and only holds plain data. To fix: {hint}."
    )


# ----------------------------------------------------------------------------- decoding


def decode(node: Json, source: TensorSource, path: str = "", depth: int = 0) -> object:
    """Rebuild the value ``node`` encodes; tensor leaves come from ``source(index)``.

    Raises:
        CorruptCheckpointError: the node is not one ``encode`` could have written.
    """
    if depth > MAX_DEPTH:
        raise _corrupt(path, f"nesting deeper than {MAX_DEPTH} levels")
    if node is None or isinstance(node, bool | str | float):
        return node
    if isinstance(node, int):
        if not _INT64_MIN <= node < _UINT64_END:
            raise _corrupt(path, "an integer literal wider than 64 bits")
        return node
    if not isinstance(node, dict) or len(node) != 1:
        raise _corrupt(path, "a value that is not a tagged object")
    ((tag, payload),) = node.items()
    if tag in ("dict", "odict"):
        return _decode_dict(tag, payload, source, path, depth)
    if tag in ("list", "tuple"):
        if not isinstance(payload, list):
            raise _corrupt(path, f"a {tag} whose payload is not an array")
        items = [decode(v, source, join(path, i), depth + 1) for i, v in enumerate(payload)]
        return items if tag == "list" else tuple(items)
    if tag == "tensor":
        if not isinstance(payload, int) or isinstance(payload, bool):
            raise _corrupt(path, "a tensor reference that is not an integer")
        return source(payload)
    if tag in ("set", "frozenset"):
        return _decode_set(tag, payload, path, depth)
    if tag == "namespace":
        return _decode_namespace(payload, source, path, depth)
    if tag == "generator":
        return _decode_generator(payload, source, path)
    decoder = _SCALARS.get(tag)
    if decoder is None:
        raise _corrupt(path, f"an unknown tag {tag!r}")
    try:
        return decoder(payload)
    except (ValueError, TypeError, KeyError, OverflowError, binascii.Error, RuntimeError) as exc:
        raise _corrupt(path, f"a malformed {tag!r} value ({exc})") from exc


def _decode_dict(tag: str, payload: Json, source: TensorSource, path: str, depth: int) -> object:
    out: dict[object, object] = {} if tag == "dict" else OrderedDict()
    if isinstance(payload, dict):
        for k, v in payload.items():
            out[k] = decode(v, source, join(path, k), depth + 1)
        return out
    if not isinstance(payload, list):
        raise _corrupt(path, f"a {tag} whose payload is neither an object nor an array")
    for pair in payload:
        if not isinstance(pair, list) or len(pair) != 2:
            raise _corrupt(path, f"a {tag} entry that is not a [key, value] pair")
        key = decode(pair[0], source, path, depth + 1)
        try:
            duplicate = key in out
        except TypeError as exc:
            raise _corrupt(path, f"an unhashable dict key {type(key).__name__}") from exc
        if duplicate:
            raise _corrupt(path, f"the dict key {key!r} twice")
        out[key] = decode(pair[1], source, join(path, key), depth + 1)
    return out


def _decode_set(tag: str, payload: Json, path: str, depth: int) -> object:
    if not isinstance(payload, list):
        raise _corrupt(path, f"a {tag} whose payload is not an array")

    def no_tensors(_: int) -> object:
        raise _corrupt(path, f"a tensor inside a {tag}")

    members = [decode(node, no_tensors, path, depth + 1) for node in payload]
    try:
        out = set(members) if tag == "set" else frozenset(members)
    except TypeError as exc:
        raise _corrupt(path, f"an unhashable {tag} member ({exc})") from exc
    if len(out) != len(members):
        raise _corrupt(path, f"a {tag} that holds a member twice")
    return out


def _decode_namespace(payload: Json, source: TensorSource, path: str, depth: int) -> object:
    if not isinstance(payload, dict):
        raise _corrupt(path, "a namespace whose payload is not an object")
    attributes = {k: decode(v, source, join(path, k), depth + 1) for k, v in payload.items()}
    try:
        return argparse.Namespace(**attributes)
    except (TypeError, AttributeError) as exc:  # setattr refuses __class__, __dict__, ...
        raise _corrupt(path, f"a namespace attribute argparse refuses ({exc})") from exc


def _decode_generator(payload: Json, source: TensorSource, path: str) -> object:
    if (
        not isinstance(payload, list)
        or len(payload) != 2
        or not isinstance(payload[0], str)
        or not _DEVICE_RE.fullmatch(payload[0])
        or not isinstance(payload[1], dict)
        or payload[1].keys() != {"tensor"}
    ):
        raise _corrupt(path, "a generator that is not a [device, tensor] pair")
    state = decode(payload[1], source, path)
    if not isinstance(state, torch.Tensor):
        if isinstance(state, np.ndarray):
            raise _corrupt(path, "a generator whose state is a numpy array")
        return state  # a caller that only describes tensors (inspect) gets its reference back
    saved = torch.device(payload[0])
    if state.device.type != saved.type:
        raise ValueError(
            f"`map_location` puts the {saved.type} generator at `{path}` on {state.device}; "
            f"a {saved.type} generator's state has no {state.device.type} form. Map "
            f"{saved.type} devices to {saved.type} devices (map_location=None keeps each "
            "where it was saved)."
        )
    if state.dtype != torch.uint8 or state.dim() != 1:
        raise _corrupt(path, "a generator whose state is not a 1-D uint8 tensor")
    try:
        generator = torch.Generator(device=state.device)
        generator.set_state(state.cpu())
    except RuntimeError as exc:
        raise _corrupt(path, f"a generator state that torch refuses ({_first_line(exc)})") from exc
    return generator


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__


def _corrupt(path: str, what: str) -> CorruptCheckpointError:
    where = f" at `{path}`" if path else ""
    return CorruptCheckpointError(
        f"the saved object tree has {what}{where}, which torchvault never writes; "
        "the file is damaged or was not written by torchvault.",
        key=path or None,
    )


def _float(text: Json) -> float:
    if not isinstance(text, str) or not _FLOAT_RE.fullmatch(text.lower()):
        raise ValueError(f"{text!r} is not a float literal")
    return float(text)


def _non_finite(text: Json) -> float:
    value = _float(text)
    if math.isfinite(value):
        raise ValueError("finite floats are stored as JSON numbers")
    return value


def _big_int(text: Json) -> int:
    if not isinstance(text, str) or not re.fullmatch(r"-?0x[0-9a-f]+", text):
        raise ValueError(f"{text!r} is not a hexadecimal integer")
    return int(text, 16)


def _complex(parts: Json) -> complex:
    if not isinstance(parts, list) or len(parts) != 2:
        raise ValueError("a complex number is a [real, imag] pair")
    return complex(_float(parts[0]), _float(parts[1]))


def _base64(text: Json) -> bytes:
    if not isinstance(text, str):
        raise TypeError("bytes are a base64 string")
    return base64.b64decode(text.encode("ascii"), validate=True)


def _device(text: Json) -> torch.device:
    if not isinstance(text, str) or not _DEVICE_RE.fullmatch(text):
        raise ValueError(f"{text!r} is not a device name")
    return torch.device(text)


def _size(dims: Json) -> torch.Size:
    if not isinstance(dims, list) or not all(
        type(d) is int and _INT64_MIN <= d < _UINT64_END for d in dims
    ):
        raise ValueError("a size is an array of integers")
    return torch.Size(dims)  # type: ignore[arg-type]


def _npscalar(parts: Json) -> object:
    if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) for p in parts):
        raise ValueError("a numpy scalar is a [dtype, hex] pair")
    dtype = _dtypes.NUMPY_DTYPES[parts[0]]  # type: ignore[index]
    raw = bytes.fromhex(parts[1])  # type: ignore[arg-type]
    if len(raw) != dtype.itemsize:
        raise ValueError(f"{len(raw)} bytes for a {dtype} scalar")
    return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))[0]


_SCALARS: dict[str, Callable[[Json], object]] = {
    "int": _big_int,
    "float": _non_finite,
    "complex": _complex,
    "bytes": _base64,
    "bytearray": lambda text: bytearray(_base64(text)),
    "dtype": lambda name: _dtypes.DTYPES[name],  # type: ignore[index]
    "device": _device,
    "size": _size,
    "npscalar": _npscalar,
}


def flatten(obj: object, path: str = "") -> Iterator[tuple[str, object]]:
    """Every leaf of a decoded tree with its dotted path, in order."""
    if type(obj) is dict or type(obj) is OrderedDict:
        for key, value in cast("dict[object, object]", obj).items():
            yield from flatten(value, join(path, key))
    elif type(obj) is list or type(obj) is tuple:
        for i, value in enumerate(cast("list[object]", obj)):
            yield from flatten(value, join(path, i))
    else:
        yield path, obj
