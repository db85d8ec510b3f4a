"""Turn what the unpickler built into the finished object, and bound its shape.

The unpickler leaves placeholders (:class:`~._unpickler.Building`: tensors waiting for their
storage bytes, numpy values, namespaces) inside the containers it built. One walk replaces
each by its value, keeping shared objects shared, and refuses what no torch.save output
holds but an attacker can build cheaply: a container that contains itself, nesting deeper
than :data:`MAX_DEPTH`, or a "billion laughs" graph whose expanded size (every path counted,
as any later walk would count it) exceeds :data:`MAX_NODES`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..errors import CorruptCheckpointError, UnsupportedFormatError
from ._unpickler import Building, Global

MAX_DEPTH = 100  # each level costs up to four Python frames here
MAX_NODES = 20_000_000
_ATOMS = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.dtype,
          torch.device, torch.Size, torch.layout, torch.memory_format)  # fmt: skip
_BUILT = (np.ndarray, np.generic, np.dtype, torch.Tensor)  # only ever made by our own code


class _Walk:
    def __init__(self, keep: Callable[[object], bool]) -> None:
        self.done: dict[int, tuple[object, int]] = {}
        self.active: set[int] = set()
        self.keep = keep

    def visit(self, obj: object, depth: int) -> tuple[object, int]:
        if type(obj) in _ATOMS or isinstance(obj, _BUILT):
            return obj, 1
        key = id(obj)
        hit = self.done.get(key)
        if hit is not None:
            return hit
        if key in self.active:
            raise UnsupportedFormatError(
                "the pickled object contains itself (a recursive structure); torchvault "
                "reads state dicts and plain nested data, which never do"
            )
        if depth > MAX_DEPTH:
            raise CorruptCheckpointError(
                f"the pickled object is nested deeper than {MAX_DEPTH} levels; no state dict "
                "is, and walking it could exhaust the stack"
            )
        self.active.add(key)
        value, weight = self._children(obj, depth + 1)
        if weight > MAX_NODES:
            raise CorruptCheckpointError(
                f"the pickled object expands to more than {MAX_NODES} nodes through shared "
                "references (a 'billion laughs' structure)"
            )
        self.active.discard(key)
        self.done[key] = (value, weight)
        return value, weight

    def _children(self, obj: object, depth: int) -> tuple[object, int]:
        if isinstance(obj, Building):
            total = [1]

            def finish(child: object) -> object:
                value, weight = self.visit(child, depth)
                total[0] += weight
                return value

            return obj.value(finish), total[0]
        if isinstance(obj, dict):
            return self._dict(obj, depth)
        if isinstance(obj, (list, tuple, set, frozenset)):
            return self._sequence(obj, depth)
        if isinstance(obj, Global) and self.keep(obj):
            return obj, 1
        raise UnsupportedFormatError(
            f"the pickled object holds a {type(obj).__name__} "
            f"({getattr(obj, 'name', '')}), which torchvault does not rebuild as a value"
        )

    def _dict(self, obj: dict[Any, Any], depth: int) -> tuple[object, int]:
        weight = 1
        items = []
        rekey = False
        for key, value in obj.items():
            new_key, key_weight = self.visit(key, depth)
            new_value, value_weight = self.visit(value, depth)
            weight += key_weight + value_weight
            rekey = rekey or new_key is not key
            items.append((new_key, new_value))
        attributes = getattr(obj, "__dict__", None)
        if attributes:  # an OrderedDict's _metadata
            new_attributes, attributes_weight = self.visit(dict(attributes), depth)
            attributes.update(new_attributes)
            weight += attributes_weight
        if rekey:
            obj.clear()
        # item by item: Counter.update would count the pairs instead of setting them
        for key, value in items:
            obj[key] = value  # noqa: PERF403
        return obj, weight

    def _sequence(self, obj: Any, depth: int) -> tuple[object, int]:
        weight = 1
        values = []
        for item in obj:
            value, item_weight = self.visit(item, depth)
            weight += item_weight
            values.append(value)
        if isinstance(obj, list):
            obj[:] = values
            return obj, weight
        if isinstance(obj, set):
            obj.clear()
            obj.update(values)
            return obj, weight
        return type(obj)(values), weight


def finish(root: object, *, keep: Callable[[object], bool] = lambda _: False) -> object:
    """``root`` with every placeholder replaced by its value; ``keep`` says which of our
    global objects may stay in the result (inert stubs, for scan and salvage)."""
    value, _ = _Walk(keep).visit(root, 0)
    return value
