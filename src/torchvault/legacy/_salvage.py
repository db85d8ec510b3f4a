"""Recover the weights of a whole pickled model (``torch.save(model)``) without its code.

The model's classes are refused, so the reader runs in permissive mode and each instance
becomes an inert :class:`~._reader.Stub` holding the state pickle gave it. An
``nn.Module``'s state is a dict with ``_parameters``, ``_buffers`` and ``_modules``; walking
those gives every tensor its dotted state-dict name, exactly as ``module.state_dict()``
would (non-persistent buffers excluded). Nothing is imported or called.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from ..errors import CorruptCheckpointError
from ._reader import Stub

MAX_VISITS = (
    100_000  # paths walked (a large model has a few thousand); shared containers count per path
)
MAX_DEPTH = 100


def _state(obj: object) -> Mapping[object, object] | None:
    if isinstance(obj, Stub) and isinstance(obj.state, Mapping):
        return obj.state
    return None


def _is_module(obj: object) -> bool:
    state = _state(obj)
    return state is not None and "_parameters" in state and "_modules" in state


class _Walk:
    """Names every tensor by its path; the budget stops a small file whose shared
    references fan out into millions of paths."""

    def __init__(self) -> None:
        self.budget = MAX_VISITS

    def _spend(self, depth: int) -> None:
        self.budget -= 1
        if self.budget < 0 or depth > MAX_DEPTH:
            raise CorruptCheckpointError(
                f"salvage stopped: the pickled object has more than {MAX_VISITS} paths or is "
                f"nested deeper than {MAX_DEPTH} levels (shared references fanning out)"
            )

    def module(self, obj: object, prefix: str, depth: int) -> Iterator[tuple[str, torch.Tensor]]:
        state = _state(obj)
        if state is None:
            return
        skip = state.get("_non_persistent_buffers_set")
        skip = skip if isinstance(skip, (set, frozenset)) else set()
        for group in ("_parameters", "_buffers"):
            members = state.get(group)
            if isinstance(members, Mapping):
                for name, tensor in members.items():
                    self._spend(depth)
                    if isinstance(tensor, torch.Tensor) and not (
                        group == "_buffers" and name in skip
                    ):
                        yield f"{prefix}{name}", tensor
        children = state.get("_modules")
        if isinstance(children, Mapping):
            for name, child in children.items():
                self._spend(depth)
                yield from self.module(child, f"{prefix}{name}.", depth + 1)

    def any(self, obj: object, prefix: str, depth: int) -> Iterator[tuple[str, torch.Tensor]]:
        self._spend(depth)
        if isinstance(obj, torch.Tensor):
            yield prefix.rstrip("."), obj
        elif _is_module(obj):
            yield from self.module(obj, prefix, depth)
        elif isinstance(obj, Mapping):
            for key, value in obj.items():
                yield from self.any(value, f"{prefix}{key}.", depth + 1)
        elif isinstance(obj, (list, tuple)):
            for index, value in enumerate(obj):
                yield from self.any(value, f"{prefix}{index}.", depth + 1)


def tensors(obj: object) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor reachable through modules and containers, by dotted name."""
    return _Walk().any(obj, "", 0)
