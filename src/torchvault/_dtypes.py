"""Names for torch and numpy dtypes, and the safetensors dtype each one is stored as.

Every table here is an allowlist: a name read from a file is looked up, never evaluated.
"""

from __future__ import annotations

import numpy as np
import torch

# Torch dtypes that hold plain bytes (no quantizer): the ones a checkpoint can store.
# Names missing from older torch releases are skipped, so the table is what this torch has.
_STORABLE_NAMES = (
    "bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2", "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2",
)  # fmt: skip

# Dtypes that are values only: they may appear in a tree (a dtype field) but no tensor
# of them can be written as raw bytes.
_VALUE_ONLY_NAMES = (
    "qint8", "quint8", "qint32", "quint4x2", "quint2x4",
    "uint1", "uint2", "uint3", "uint4", "uint5", "uint6", "uint7",
    "int1", "int2", "int3", "int4", "int5", "int6", "int7",
)  # fmt: skip


def _present(names: tuple[str, ...]) -> dict[str, torch.dtype]:
    found = {name: getattr(torch, name, None) for name in names}
    return {name: dtype for name, dtype in found.items() if isinstance(dtype, torch.dtype)}


STORABLE: dict[str, torch.dtype] = _present(_STORABLE_NAMES)
DTYPES: dict[str, torch.dtype] = {**STORABLE, **_present(_VALUE_ONLY_NAMES)}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

# The safetensors name of each torch dtype that safetensors' own readers understand; any
# other storable dtype is written as U8 bytes and restored from the torchvault tensor table.
_SAFETENSORS_NAMES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16",
    "int32": "I32", "uint32": "U32", "int64": "I64", "uint64": "U64", "float16": "F16",
    "bfloat16": "BF16", "float32": "F32", "float64": "F64", "complex64": "C64",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}  # fmt: skip
SAFETENSORS_NAME: dict[torch.dtype, str] = {
    STORABLE[name]: st for name, st in _SAFETENSORS_NAMES.items() if name in STORABLE
}
# What a safetensors header may say, and its element size in bytes. F8_E8M0 and the like
# are readable even where this torch cannot hold them; such a tensor is refused on use.
SAFETENSORS_ITEMSIZE: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
SAFETENSORS_DTYPE: dict[str, torch.dtype] = {st: dtype for dtype, st in SAFETENSORS_NAME.items()}
if "float8_e8m0fnu" in STORABLE:
    SAFETENSORS_DTYPE["F8_E8M0"] = STORABLE["float8_e8m0fnu"]

# numpy dtypes an ndarray or numpy scalar may have, keyed by the little-endian dtype string.
NUMPY_DTYPES: dict[str, np.dtype[np.generic]] = {
    np.dtype(name).newbyteorder("<").str: np.dtype(name).newbyteorder("<")
    for name in (
        "bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
        "float16", "float32", "float64", "complex64", "complex128",
    )
}  # fmt: skip
