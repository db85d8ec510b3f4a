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

from ._reader import Stub


def _state(obj: object) -> Mapping[object, object] | None:
    if isinstance(obj, Stub) and isinstance(obj.state, Mapping):
        return obj.state
    return None


def _is_module(obj: object) -> bool:
    state = _state(obj)
    return state is not None and "_parameters" in state and "_modules" in state


def _module_tensors(obj: object, prefix: str, depth: int) -> Iterator[tuple[str, torch.Tensor]]:
    state = _state(obj)
    if state is None or depth > 100:
        return
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        members = state.get(group)
        if isinstance(members, Mapping):
            for name, tensor in members.items():
                if isinstance(tensor, torch.Tensor) and not (group == "_buffers" and name in skip):  # type: ignore[operator]
                    yield f"{prefix}{name}", tensor
    children = state.get("_modules")
    if isinstance(children, Mapping):
        for name, child in children.items():
            yield from _module_tensors(child, f"{prefix}{name}.", depth + 1)


def tensors(obj: object, prefix: str = "", depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor reachable through modules and containers, by dotted name."""
    if depth > 100:
        return
    if isinstance(obj, torch.Tensor):
        yield prefix.rstrip("."), obj
    elif _is_module(obj):
        yield from _module_tensors(obj, prefix, depth)
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from tensors(value, f"{prefix}{key}.", depth + 1)
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from tensors(value, f"{prefix}{index}.", depth + 1)
