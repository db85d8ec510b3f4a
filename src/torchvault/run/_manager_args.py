"""What a CheckpointManager is given, checked before anything is written: the one metric that
defines the best checkpoint, each save's step, metrics and metadata, and the kind and state of
each item. A bad argument raises TypeError or ValueError naming it."""

from __future__ import annotations

import operator
import os
from collections.abc import Collection, Mapping

import torch

from . import _rng, retention
from ._readers import GENERATOR, STATE, VALUE, is_stateful

STEP_LIMIT = 10**12  # manifests are named with 12 digits: a longer step no reader would list


def best_metric(
    monitor: str | None, mode: str, policy: retention.RetentionPolicy
) -> tuple[str, str] | None:
    """The one ``(metric, mode)`` that defines the best checkpoint: ``monitor``, or the
    metric of every KeepBest in ``policy``; None when there is none.

    Raises:
        TypeError: ``monitor`` is not a str.
        ValueError: ``monitor`` and the KeepBest policies name different metrics or modes.
    """
    if monitor is not None and not isinstance(monitor, str):
        raise TypeError(f"monitor must be a metric name (str) or None, got {monitor!r}")
    given = [(monitor, mode)] if monitor else []
    found = list(dict.fromkeys([*given, *retention.ranked_by(policy)]))
    if len(found) > 1:
        named = " and ".join(f"{metric!r} ({how})" for metric, how in found)
        raise ValueError(
            f"CheckpointManager got two definitions of the best checkpoint: {named}. The "
            "best must be one checkpoint: give monitor= and mode= the metric and mode of the "
            "KeepBest policy, or leave monitor= out."
        )
    return found[0] if found else None


def next_step(step: object, committed: Collection[int], run: str | os.PathLike[str]) -> int:
    """``step`` as an int that readers will list, above every ``committed`` step.

    Raises:
        TypeError: not an int.
        ValueError: outside 0 to 10**12 - 1, or at or below the latest committed step (the
            message gives the two ways out).
    """
    if isinstance(step, bool) or not hasattr(type(step), "__index__"):
        raise TypeError(f"step must be an int, got {type(step).__name__} {step!r}")
    number = operator.index(step)  # type: ignore[arg-type]
    if not 0 <= number < STEP_LIMIT:
        raise ValueError(f"step must be from 0 to {STEP_LIMIT - 1}, got {number}")
    latest = max(committed, default=None)
    if latest is None or number > latest:
        return number
    where = (
        f"step {number} is already committed in {run}"
        if number in committed
        else f"step {number} is below the latest step {latest} of {run}"
    )
    raise ValueError(
        f"{where}: a step at or below the latest would replace a checkpoint or be pruned as "
        "the oldest, so nothing was saved. To continue this run, call restore() first and "
        f"save from report.step + 1 (step {latest + 1}); to start over from scratch, use a "
        "new run folder."
    )


def check_metrics(metrics: object) -> dict[str, float]:
    """``metrics`` checked: names to numbers, converted with ``float``."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a dict of names to numbers, got {type(metrics).__name__}")
    numbers = {}
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise TypeError(f"metrics keys must be names (str), got {name!r}")
        if isinstance(value, str | bytes) or value is None:
            raise TypeError(f"metrics[{name!r}] must be a number, got {value!r}")
        try:
            numbers[name] = float(value)
        except TypeError:
            raise TypeError(
                f"metrics[{name!r}] must be a number (int, float, numpy scalar or one-element "
                f"tensor), got {type(value).__name__}"
            ) from None
        except (ValueError, RuntimeError) as exc:
            raise ValueError(f"metrics[{name!r}] is not one number: {exc}") from None
    return numbers


def kind_of(item: object) -> str:
    """How a manifest lists an item: a generator, a stateful object or a plain value."""
    if isinstance(item, torch.Generator):
        return GENERATOR
    return STATE if is_stateful(item) else VALUE


def state_of(item: object) -> object:
    """What a checkpoint holds of one item."""
    if isinstance(item, torch.Generator):
        return _rng.generator_state(item)
    return item.state_dict() if is_stateful(item) else item  # type: ignore[attr-defined]
