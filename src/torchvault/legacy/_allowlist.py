"""The globals a torch checkpoint may name, and torchvault's own code for each of them.

Nothing here imports or calls what the file names. Each allowed name maps to a
:class:`~._unpickler.Global` written in this module, which checks its arguments' types and
values and builds the result itself: containers, ``torch.Size``, devices and dtypes, tensors
(from a storage whose real byte length bounds every size, stride and offset), numpy values
(from their dtype code and raw bytes) and ``argparse.Namespace``. The table is built per
call (:func:`table`), so no process-wide state can be changed by one load and seen by
another.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .. import _dtypes
from .._format import fits_int64
from ..errors import CorruptCheckpointError, UnsafeCheckpointError, UnsupportedFormatError
from ._unpickler import Building, Global, is_key

MAX_DIMS = 64
DEVICE = re.compile(r"(cpu|cuda|mps|meta|xpu|hpu|xla|privateuseone)(:[0-9]{1,4})?")
_NUMPY_CODE = re.compile(
    r"[US][0-9]{1,6}|[biufc?][0-9]{0,2}|bool|float(16|32|64)|u?int(8|16|32|64)|complex(64|128)"
)
_STORABLE = frozenset(_dtypes.STORABLE.values())
_NATIVE = "<" if sys.byteorder == "little" else ">"
_MODULE_ALIASES = {
    "__builtin__": "builtins",
    "copy_reg": "copyreg",
    "numpy.core.multiarray": "numpy._core.multiarray",
    "numpy.core.numeric": "numpy._core.numeric",
}


def canonical(module: str, name: str) -> str:
    """``module.name`` with Python 2 and numpy 1 module names mapped to today's."""
    return f"{_MODULE_ALIASES.get(module, module)}.{name}"


def _is(item: object, *values: object) -> bool:
    """``item in values``, without calling a file's objects' ``__eq__``: a numpy array
    compared with ``==`` answers elementwise, and ``in`` would then raise."""
    return any(_equal(item, value) for value in values)


def _equal(item: object, value: object) -> bool:
    if type(item) is not type(value):
        return False
    if isinstance(item, tuple) and isinstance(value, tuple):
        return len(item) == len(value) and all(map(_equal, item, value))
    return bool(item == value)


def _empty(value: object) -> bool:
    """None or an empty dict: the hooks and state torch writes for plain tensors."""
    return value is None or (type(value) in (dict, OrderedDict) and not value)


def _bad(what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{what}; torch.save never writes this")


# -- storages and tensors ------------------------------------------------------------------


class StorageType(Global):
    """``torch.FloatStorage`` and friends: only a dtype, read by ``persistent_load``."""

    def __init__(self, name: str, dtype: torch.dtype | None) -> None:
        super().__init__(name)
        self.dtype = dtype  # None: untyped bytes, the dtype comes with the tensor


class Storage:
    """A storage named by a persistent id; ``data`` (uint8) is attached once it is read."""

    def __init__(self, key: str, dtype: torch.dtype | None, numel: int, location: str) -> None:
        self.key = key
        self.dtype = dtype
        self.nbytes = numel * (1 if dtype is None else dtype.itemsize)
        self.location = location
        self.data: torch.Tensor | None = None


class TensorSpec(Building):
    """A tensor whose storage, dtype, size, stride and offset were checked; built last."""

    what = "tensor"

    def __init__(
        self,
        storage: Storage,
        dtype: torch.dtype,
        offset: int,
        size: tuple[int, ...],
        stride: tuple[int, ...],
        requires_grad: bool,
        place: Callable[[Storage], torch.Tensor],
    ) -> None:
        self.storage, self.dtype, self.offset = storage, dtype, offset
        self.size, self.stride = size, stride
        self.requires_grad = requires_grad
        self.parameter = False
        self._place = place
        self._built: torch.Tensor | None = None

    def as_parameter(self, requires_grad: bool) -> TensorSpec:
        """A Parameter over the same storage (a new object, as torch would make)."""
        spec = TensorSpec(
            self.storage, self.dtype, self.offset, self.size, self.stride, requires_grad,
            self._place,
        )  # fmt: skip
        spec.parameter = True
        return spec

    def value(self, finish: Callable[[object], object]) -> object:
        if self._built is None:
            base = self._place(self.storage)  # the storage's bytes where map_location puts them
            tensor = torch.empty(0, dtype=self.dtype, device=base.device).set_(
                base.untyped_storage(), self.offset, self.size, self.stride
            )
            if self.parameter:
                tensor = torch.nn.Parameter(tensor, requires_grad=self.requires_grad)
            elif self.requires_grad:
                tensor.requires_grad_(True)
            self._built = tensor
        return self._built


def _ints(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or len(value) > MAX_DIMS:
        raise _bad(f"a tensor {what} is not a tuple of at most {MAX_DIMS} integers")
    if not all(type(v) is int and v >= 0 for v in value):
        raise _bad(f"a tensor {what} {value!r} has a negative or non-integer entry")
    return value


def tensor_spec(ctx: Context, args: tuple[Any, ...], dtype: torch.dtype | None) -> TensorSpec:
    """Check (storage, offset, size, stride, requires_grad, hooks) against the storage."""
    storage, offset, size, stride, requires_grad, hooks = args
    if not isinstance(storage, Storage):
        raise _bad("a tensor is rebuilt from something that is not a storage")
    dtype = dtype or storage.dtype
    if dtype is None:
        raise _bad("a tensor over untyped bytes names no dtype")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(strides) or type(offset) is not int or offset < 0:
        raise _bad("a tensor's size, stride and offset do not fit together")
    if type(requires_grad) is not bool or not _empty(hooks):
        raise _bad("a tensor has a malformed requires_grad flag or backward hooks")
    if storage.nbytes % dtype.itemsize:
        raise _bad(f"storage {storage.key} does not hold whole {dtype} elements")
    if not fits_int64(shape, dtype.itemsize, strides, offset):
        raise _bad(f"a tensor of size {list(shape)[:8]} is too large for torch (int64)")
    extent = offset
    if math.prod(shape):
        extent += sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) + 1
    if extent * dtype.itemsize > storage.nbytes:
        raise CorruptCheckpointError(
            f"a {dtype} tensor of size {list(shape)}, stride {list(strides)} at offset {offset} "
            f"reaches past its {storage.nbytes}-byte storage {storage.key}: the file is "
            "damaged or crafted"
        )
    if requires_grad and not (dtype.is_floating_point or dtype.is_complex):
        raise _bad(f"a {dtype} tensor asks for gradients")
    return TensorSpec(storage, dtype, offset, shape, strides, requires_grad, ctx.place)


class _Rebuild(Global):
    """``torch._utils._rebuild_tensor_v2`` / ``_v3`` / ``_rebuild_tensor``."""

    def __init__(self, name: str, ctx: Context, version: int) -> None:
        super().__init__(name)
        self.ctx, self.version = ctx, version

    def call(self, args: tuple[Any, ...]) -> object:
        if self.version == 1 and len(args) == 4:
            return tensor_spec(self.ctx, (*args, False, None), None)
        if self.version == 2 and len(args) in (6, 7):
            _metadata(args[6:])
            return tensor_spec(self.ctx, args[:6], None)
        if self.version == 3 and len(args) in (7, 8):
            dtype = args[6]
            if not isinstance(dtype, torch.dtype) or dtype not in _STORABLE:
                raise UnsupportedFormatError(
                    f"a tensor of dtype {dtype!r:.40} is saved; quantized and other dtypes "
                    "without plain bytes are not read"
                )
            _metadata(args[7:])
            return tensor_spec(self.ctx, args[:6], dtype)
        raise _bad(f"{self.name} is called with {len(args)} arguments")


def _metadata(rest: tuple[Any, ...]) -> None:
    if rest and not _empty(rest[0]):
        raise UnsupportedFormatError(
            "a tensor carries extra metadata (conjugate/negative bits or a subclass), which "
            "torchvault's legacy reader does not rebuild"
        )


class _Parameter(Global):
    """``torch._utils._rebuild_parameter`` and ``_rebuild_parameter_with_state``."""

    def call(self, args: tuple[Any, ...]) -> object:
        if len(args) not in (3, 4) or not isinstance(args[0], TensorSpec):
            raise _bad(f"{self.name} is called with malformed arguments")
        spec, requires_grad, hooks = args[:3]
        if type(requires_grad) is not bool or not _empty(hooks):
            raise _bad("a parameter has a malformed requires_grad flag or hooks")
        if len(args) == 4 and not _empty(args[3]):
            raise UnsupportedFormatError(
                "a Parameter carries Python attributes, which the legacy reader does not set"
            )
        if requires_grad and not (spec.dtype.is_floating_point or spec.dtype.is_complex):
            raise _bad(f"a {spec.dtype} parameter asks for gradients")
        return spec.as_parameter(requires_grad)


class _FromType(Global):
    """``torch._tensor._rebuild_from_type_v2``: only for plain Tensor and Parameter."""

    def call(self, args: tuple[Any, ...]) -> object:
        if len(args) != 4:
            raise _bad(f"{self.name} is called with {len(args)} arguments")
        func, new_type, inner, state = args
        if not isinstance(func, (_Rebuild, _Parameter)) or not isinstance(inner, tuple):
            raise _bad(f"{self.name} wraps something other than a tensor rebuild")
        if not isinstance(new_type, _Class) or new_type.name not in _TENSOR_TYPES:
            name = getattr(new_type, "name", type(new_type).__name__)
            raise UnsafeCheckpointError(
                f"a tensor of subclass {name} would run the subclass's code; only "
                "torch.Tensor and torch.nn.Parameter are rebuilt",
                global_name=name,
            )
        if not _empty(state):
            raise UnsupportedFormatError("a tensor carries Python attributes (state)")
        spec = func.call(inner)
        if isinstance(spec, TensorSpec) and new_type.name == "torch.nn.parameter.Parameter":
            return spec.as_parameter(spec.requires_grad)
        return spec


_TENSOR_TYPES = ("torch.Tensor", "torch._tensor.Tensor", "torch.nn.parameter.Parameter")


class _Class(Global):
    """A class that may be named as a value but is never instantiated by name alone."""


# -- plain values ---------------------------------------------------------------------------


class _Function(Global):
    """A call whose arguments a checker validates before our own code builds the result."""

    def __init__(self, name: str, build: Callable[[tuple[Any, ...]], object]) -> None:
        super().__init__(name)
        self._build = build

    def call(self, args: tuple[Any, ...]) -> object:
        return self._build(args)


def _ordered_dict(args: tuple[Any, ...]) -> object:
    if args == ():
        return OrderedDict()
    if len(args) == 1 and isinstance(args[0], list):
        pairs = args[0]
        if all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
            return OrderedDict((_key(k), v) for k, v in pairs)
    raise _bad("OrderedDict is rebuilt from something other than key-value pairs")


def _key(key: object) -> object:
    if not is_key(key):
        raise _bad(f"a key or set member is a {type(key).__name__} unhashable or too large")
    return key


def _counter(args: tuple[Any, ...]) -> object:
    if args == ():
        return Counter()
    if len(args) == 1 and type(args[0]) is dict:
        return Counter(args[0])
    raise _bad("Counter is rebuilt from something other than a dict")


_FACTORIES: dict[str, type] = {
    "builtins.list": list,
    "builtins.dict": dict,
    "builtins.int": int,
    "builtins.float": float,
    "builtins.set": set,
    "builtins.str": str,
}


def _defaultdict(args: tuple[Any, ...]) -> object:
    factory = args[0] if args else None
    if len(args) > 1 or not (factory is None or isinstance(factory, Global)):
        raise _bad("defaultdict is rebuilt with a factory that is not a builtin type")
    if factory is None:
        return defaultdict()
    made = _FACTORIES.get(factory.name)
    if made is None:
        raise UnsafeCheckpointError(
            f"defaultdict would call {factory.name} for missing keys; only builtin "
            "container and number types are allowed",
            global_name=factory.name,
        )
    return defaultdict(made)


def _collection(kind: type) -> Callable[[tuple[Any, ...]], object]:
    def build(args: tuple[Any, ...]) -> object:
        if args == ():
            return kind()
        if len(args) == 1 and type(args[0]) in (list, tuple, set, frozenset):
            return (
                kind(_key(item) for item in args[0]) if kind in (set, frozenset) else kind(args[0])
            )
        raise _bad(f"{kind.__name__} is rebuilt from {len(args)} arguments")

    return build


def _bytes_from_text(args: tuple[Any, ...]) -> bytes:
    # protocol 2 writes bytes as _codecs.encode(text, "latin1"), and b"" as bytes()
    if args == ():
        return b""
    if len(args) == 2 and isinstance(args[0], str) and _is(args[1], "latin1", "latin-1"):
        try:
            return args[0].encode("latin-1")
        except UnicodeEncodeError:
            raise _bad("bytes are rebuilt from text outside latin-1") from None
    if len(args) == 1 and isinstance(args[0], str) and args[0].isascii():
        return args[0].encode("ascii")
    raise _bad("_codecs.encode is called with arguments other than (text, 'latin1')")


def _bytearray(args: tuple[Any, ...]) -> bytearray:
    if args == ():
        return bytearray()
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytearray(args[0])
    return bytearray(_bytes_from_text(args))


def _complex(args: tuple[Any, ...]) -> complex:
    if len(args) == 2 and all(type(a) in (int, float) for a in args):
        return complex(args[0], args[1])
    raise _bad("complex is rebuilt from values other than two numbers")


def _slice(args: tuple[Any, ...]) -> slice:
    if len(args) == 3 and all(a is None or type(a) is int for a in args):
        return slice(*args)
    raise _bad("slice is rebuilt from values other than integers")


def _size(args: tuple[Any, ...]) -> torch.Size:
    dims = args[0] if len(args) == 1 and isinstance(args[0], tuple) else None
    if (
        dims is not None
        and len(dims) <= MAX_DIMS
        and all(type(n) is int and 0 <= n < 2**63 for n in dims)
    ):
        return torch.Size(dims)
    raise _bad("torch.Size is rebuilt from values other than sizes")


def _device(args: tuple[Any, ...]) -> torch.device:
    if len(args) == 1 and isinstance(args[0], str) and DEVICE.fullmatch(args[0]):
        return torch.device(args[0])
    if (
        len(args) == 2
        and isinstance(args[0], str)
        and DEVICE.fullmatch(args[0])
        and type(args[1]) is int
        and 0 <= args[1] < 10_000
    ):
        return torch.device(args[0], args[1])
    raise _bad(f"torch.device is rebuilt from {args!r:.80}")


# -- numpy, rebuilt from its dtype code and raw bytes ---------------------------------------


class _NumpyDtype(Building):
    what = "numpy dtype"

    def __init__(self, code: str) -> None:
        self.dtype = np.dtype(code)

    def build(self, state: object) -> None:
        if not (isinstance(state, tuple) and len(state) in (8, 9) and _is(state[0], 3, 4)):
            raise _bad("a numpy dtype has a malformed state")
        order, rest = state[1], state[2:8]
        sized = (None, None, None, self.dtype.itemsize, self.dtype.alignment, self.dtype.flags)
        plain = (None, None, None, -1, -1, 0)
        if not _is(order, "<", ">", "|", "=") or not _is(rest, plain, sized):
            raise UnsupportedFormatError(
                "a numpy structured or object dtype is saved; only numbers, bool and "
                "fixed-width text are read"
            )
        if order in "<>" and order != self.dtype.byteorder.replace("=", _NATIVE):
            self.dtype = self.dtype.newbyteorder(order)

    def value(self, finish: Callable[[object], object]) -> object:
        return self.dtype


def _numpy_dtype(args: tuple[Any, ...]) -> object:
    if len(args) == 3 and isinstance(args[0], str) and _NUMPY_CODE.fullmatch(args[0]):
        return _NumpyDtype(args[0])
    raise UnsupportedFormatError(
        f"a numpy dtype {args[:1]!r:.60} is saved; only numeric and bool dtypes are read"
    )


def _as_dtype(value: object) -> np.dtype[Any]:
    if isinstance(value, _NumpyDtype):
        return value.dtype
    raise _bad("a numpy value names a dtype that is not a numpy dtype")


def _array(raw: object, dtype: np.dtype[Any], shape: tuple[int, ...], fortran: bool) -> object:
    if not isinstance(raw, (bytes, bytearray)):
        raise UnsupportedFormatError("a numpy array of Python objects is saved; it is not read")
    if not fits_int64(shape, dtype.itemsize) or math.prod(shape) * dtype.itemsize != len(raw):
        raise _bad(f"a numpy array of shape {list(shape)} does not match its {len(raw)} bytes")
    flat = np.frombuffer(raw, dtype=dtype)
    # numpy's own unpickling returns native byte order (values converted), and so do we
    flat = flat.astype(dtype.newbyteorder("=")) if not dtype.isnative else flat.copy()
    return flat.reshape(shape, order="F" if fortran else "C")


class _NumpyArray(Building):
    what = "numpy array"

    def __init__(self) -> None:
        self.array: object = None

    def build(self, state: object) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and _is(state[0], 1)):
            raise _bad("a numpy array has a malformed state")
        _, shape, dtype, fortran, raw = state
        self.array = _array(raw, _as_dtype(dtype), _ints(shape, "numpy shape"), fortran is True)

    def value(self, finish: Callable[[object], object]) -> object:
        if self.array is None:
            raise _bad("a numpy array is created but never given its data")
        return self.array


def _reconstruct(args: tuple[Any, ...]) -> object:
    if len(args) == 3 and isinstance(args[0], _Class) and args[0].name == "numpy.ndarray":
        return _NumpyArray()
    raise _bad("numpy's _reconstruct is called for something other than an ndarray")


def _frombuffer(args: tuple[Any, ...]) -> object:
    if len(args) == 4 and _is(args[3], "C", "F"):
        shape = _ints(args[2], "numpy shape")
        return _array(args[0], _as_dtype(args[1]), shape, args[3] == "F")
    raise _bad("numpy's _frombuffer is called with malformed arguments")


class _NumpyScalar(Building):
    what = "numpy scalar"

    def __init__(self, dtype: np.dtype[Any], raw: bytes) -> None:
        self.dtype, self.raw = dtype, raw

    def value(self, finish: Callable[[object], object]) -> object:
        return np.frombuffer(self.raw, dtype=self.dtype, count=1)[0]


def _scalar(args: tuple[Any, ...]) -> object:
    if len(args) == 2 and isinstance(args[1], bytes):
        dtype = _as_dtype(args[0])
        if len(args[1]) == dtype.itemsize:
            return _NumpyScalar(dtype, args[1])
    raise _bad("a numpy scalar is rebuilt from malformed arguments")


# -- plain objects with a __dict__ ----------------------------------------------------------


class _Namespace(Building):
    what = "argparse.Namespace"

    def __init__(self) -> None:
        self.state: dict[str, object] = {}

    def build(self, state: object) -> None:
        if type(state) is not dict or not all(isinstance(k, str) for k in state):
            raise _bad("an argparse.Namespace has a state that is not a dict of names")
        self.state.update(state)

    def value(self, finish: Callable[[object], object]) -> object:
        return argparse.Namespace(**{k: finish(v) for k, v in self.state.items()})


class _NewClass(_Class):
    """A class NEWOBJ may instantiate: an empty object of ours that BUILD then fills."""

    def __init__(self, name: str, make: Callable[[], object]) -> None:
        super().__init__(name)
        self._make = make

    def new(self, args: tuple[Any, ...]) -> object:
        if args != ():
            raise _bad(f"{self.name} is instantiated with arguments")
        return self._make()


def _reconstructor(args: tuple[Any, ...]) -> object:
    # copyreg._reconstructor(cls, object, None): protocols 0 and 1 spell NEWOBJ this way
    cls, base, state = args if len(args) == 3 else (None, None, None)
    is_object = isinstance(base, _Class) and base.name == "builtins.object"
    if isinstance(cls, _NewClass) and is_object and state is None:
        return cls.new(())
    raise _bad("copyreg._reconstructor is called for a class it may not build")


# -- the table ------------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "Double": torch.float64, "Float": torch.float32, "Half": torch.float16,
    "BFloat16": torch.bfloat16, "Long": torch.int64, "Int": torch.int32,
    "Short": torch.int16, "Char": torch.int8, "Byte": torch.uint8, "Bool": torch.bool,
    "ComplexFloat": torch.complex64, "ComplexDouble": torch.complex128,
}  # fmt: skip
_ATTRIBUTE_DICTS = (
    "lightning.fabric.utilities.data.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict",
)


class Context:
    """What one load needs from its caller: where tensors go (a storage's bytes, placed)."""

    def __init__(self, place: Callable[[Storage], torch.Tensor]) -> None:
        self.place = place


def table(ctx: Context) -> dict[str, object]:
    """The allowed globals for one load, by canonical ``module.name``: a :class:`Global`
    of ours, or a constant (a dtype, a layout)."""
    globals_: dict[str, object] = {}

    def add(entry: Global) -> None:
        globals_[entry.name] = entry

    for name, version in (
        ("_rebuild_tensor", 1),
        ("_rebuild_tensor_v2", 2),
        ("_rebuild_tensor_v3", 3),
    ):
        add(_Rebuild(f"torch._utils.{name}", ctx, version))
    add(_Parameter("torch._utils._rebuild_parameter"))
    add(_Parameter("torch._utils._rebuild_parameter_with_state"))
    add(_FromType("torch._tensor._rebuild_from_type_v2"))
    for kind, dtype in _STORAGE_DTYPES.items():
        add(StorageType(f"torch.{kind}Storage", dtype))
        add(_Class(f"torch.{kind}Tensor"))  # named by the tar format's tensor records
    add(StorageType("torch.storage.UntypedStorage", None))
    add(StorageType("torch.UntypedStorage", None))
    for name, dtype in _dtypes.DTYPES.items():
        globals_[f"torch.{name}"] = dtype
    for name in ("strided", "contiguous_format", "channels_last", "preserve_format"):
        globals_[f"torch.{name}"] = getattr(torch, name)
    for name in (
        *_TENSOR_TYPES,
        "numpy.ndarray",
        "builtins.object",
        "builtins.int",
        "builtins.float",
        "builtins.dict",
        "builtins.str",
    ):
        add(_Class(name))
    for name, build in (
        ("collections.OrderedDict", _ordered_dict),
        ("collections.Counter", _counter),
        ("collections.defaultdict", _defaultdict),
        ("builtins.set", _collection(set)),
        ("builtins.frozenset", _collection(frozenset)),
        ("builtins.list", _collection(list)),
        ("builtins.tuple", _collection(tuple)),
        ("builtins.bytearray", _bytearray),
        ("builtins.bytes", _bytes_from_text),
        ("builtins.complex", _complex),
        ("builtins.slice", _slice),
        ("_codecs.encode", _bytes_from_text),
        ("torch.Size", _size),
        ("torch.device", _device),
        ("copyreg._reconstructor", _reconstructor),
        ("numpy.dtype", _numpy_dtype),
        ("numpy._core.multiarray._reconstruct", _reconstruct),
        ("numpy._core.multiarray.scalar", _scalar),
        ("numpy._core.numeric._frombuffer", _frombuffer),
    ):
        add(_Function(name, build))
    add(_NewClass("argparse.Namespace", _Namespace))
    for name in _ATTRIBUTE_DICTS:
        add(_NewClass(name, dict))
    return globals_
