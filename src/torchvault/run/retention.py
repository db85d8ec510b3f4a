"""Retention policies: which committed checkpoints to keep, as small composable values.

Policies combine as a union (``|``), so adding one only ever keeps more: unlike orbax's
``best_fn`` + ``max_to_keep``, the newest steps are not evicted when metrics degrade.
:func:`plan_deletions` never returns a protected step, nor a step it was not shown.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable


@dataclass(frozen=True)
class CheckpointRecord:
    """What a policy sees about one committed checkpoint.

    Args:
        step: the training step it was saved at.
        metrics: the metrics saved with it.

    >>> CheckpointRecord(100, {"val_loss": 0.31}).metrics["val_loss"]
    0.31
    """

    step: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@runtime_checkable
class RetentionPolicy(Protocol):
    """Decides which checkpoints to keep: any object with this ``keep`` method is a policy.

    >>> class KeepOdd:
    ...     def keep(self, checkpoints):
    ...         return frozenset(c.step for c in checkpoints if c.step % 2)
    >>> isinstance(KeepOdd(), RetentionPolicy)
    True
    """

    def keep(self, checkpoints: Sequence[CheckpointRecord]) -> frozenset[int]:
        """Return the steps of ``checkpoints`` (in any order) to keep; pure, no I/O."""
        ...


class _Policy(ABC):
    """The built-in policies' ``|``: their union, as an :class:`AnyOf`."""

    @abstractmethod
    def keep(self, checkpoints: Sequence[CheckpointRecord]) -> frozenset[int]: ...

    def __or__(self, other: RetentionPolicy) -> AnyOf:
        return AnyOf((self, other)) if isinstance(other, RetentionPolicy) else NotImplemented

    def __ror__(self, other: RetentionPolicy) -> AnyOf:
        return AnyOf((other, self)) if isinstance(other, RetentionPolicy) else NotImplemented


def _check_positive(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}; to keep all use KeepAll()")


def _check_mode(mode: str) -> None:
    if mode not in ("min", "max"):
        raise ValueError(f'mode must be "min" or "max", got {mode!r}')


def _ranked(checkpoints: Sequence[CheckpointRecord], monitor: str, mode: str) -> list[int]:
    """Distinct steps with a usable ``monitor`` value, best first, the earlier step on ties."""
    sign = 1.0 if mode == "min" else -1.0
    usable = sorted(
        (sign * value, c.step)
        for c in checkpoints
        if (value := c.metrics.get(monitor)) is not None and not math.isnan(value)
    )
    return list(dict.fromkeys(step for _, step in usable))


@dataclass(frozen=True)
class KeepLast(_Policy):
    """Keep the ``n`` highest steps.

    Args:
        n: how many of the most recent checkpoints to keep, at least 1.

    >>> sorted(KeepLast(2).keep([CheckpointRecord(s) for s in (10, 20, 30)]))
    [20, 30]
    """

    n: int

    def __post_init__(self) -> None:
        _check_positive(self.n, "KeepLast n")

    def keep(self, checkpoints: Sequence[CheckpointRecord]) -> frozenset[int]:
        return frozenset(sorted({c.step for c in checkpoints}, reverse=True)[: self.n])


@dataclass(frozen=True)
class KeepBest(_Policy):
    """Keep the ``k`` best steps by metric ``monitor``.

    Missing or NaN values never count; ties go to the earlier step (the best moves only on
    strict improvement).

    Args:
        k: how many of the best checkpoints to keep, at least 1.
        monitor: the metric to rank by, e.g. ``"val_loss"``.
        mode: ``"min"`` if lower is better, ``"max"`` if higher is better.

    >>> records = [CheckpointRecord(s, {"acc": a}) for s, a in [(1, 0.5), (2, 0.9), (3, 0.7)]]
    >>> sorted(KeepBest(2, "acc", mode="max").keep(records))
    [2, 3]
    """

    k: int
    monitor: str
    mode: Literal["min", "max"] = "min"

    def __post_init__(self) -> None:
        _check_positive(self.k, "KeepBest k")
        if not isinstance(self.monitor, str) or not self.monitor:
            raise TypeError(
                f"KeepBest monitor must be a metric name (str); got {self.monitor!r:.40}"
            )
        _check_mode(self.mode)

    def keep(self, checkpoints: Sequence[CheckpointRecord]) -> frozenset[int]:
        return frozenset(_ranked(checkpoints, self.monitor, self.mode)[: self.k])


@dataclass(frozen=True)
class KeepEvery(_Policy):
    """Keep every step that is a multiple of ``n`` (step 0 included).

    Args:
        n: the period in steps, at least 1.

    >>> sorted(KeepEvery(100).keep([CheckpointRecord(s) for s in (50, 100, 150, 200)]))
    [100, 200]
    """

    n: int

    def __post_init__(self) -> None:
        _check_positive(self.n, "KeepEvery n")

    def keep(self, checkpoints: Sequence[CheckpointRecord]) -> frozenset[int]:
        return frozenset(c.step for c in checkpoints if c.step % self.n == 0)


@dataclass(frozen=True, init=False)
class Pinned(_Policy):
    """Keep exactly the given steps, those of them that exist.

    Args:
        steps: any iterable of steps, stored as a frozenset.

    >>> sorted(Pinned([5, 7]).keep([CheckpointRecord(s) for s in (5, 6)]))
    [5]
    """

    steps: frozenset[int]

    def __init__(self, steps: Iterable[int] = ()) -> None:
        listed = list(steps) if isinstance(steps, Iterable) else None
        if listed is None or not all(_is_int(s) for s in listed):
            raise TypeError(f"Pinned steps must be an iterable of int steps; got {steps!r:.60}")
        object.__setattr__(self, "steps", frozenset(listed))

    def keep(self, checkpoints: Sequence[CheckpointRecord]) -> frozenset[int]:
        return frozenset(c.step for c in checkpoints if c.step in self.steps)


@dataclass(frozen=True)
class KeepAll(_Policy):
    """Keep every checkpoint: the policy when none is configured.

    >>> sorted(KeepAll().keep([CheckpointRecord(1), CheckpointRecord(2)]))
    [1, 2]
    """

    def keep(self, checkpoints: Sequence[CheckpointRecord]) -> frozenset[int]:
        return frozenset(c.step for c in checkpoints)


@dataclass(frozen=True)
class AnyOf(_Policy):
    """Keep every step that any of ``policies`` keeps; ``a | b`` builds one, flattened.

    Args:
        policies: at least one policy (ValueError if empty: it would keep nothing).

    >>> KeepLast(1) | KeepEvery(10) | KeepAll()
    AnyOf(policies=(KeepLast(n=1), KeepEvery(n=10), KeepAll()))
    """

    policies: tuple[RetentionPolicy, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.policies, tuple | list):
            raise TypeError(
                f"AnyOf policies must be a tuple of policies; got {self.policies!r:.60}"
            )
        if not self.policies:
            raise ValueError(
                "AnyOf policies is empty; it needs at least one policy (to keep everything "
                "use KeepAll())"
            )
        for policy in self.policies:
            if not isinstance(policy, RetentionPolicy):
                raise TypeError(f"AnyOf policies must have a keep() method, got {policy!r:.60}")
        nested = (p.policies if isinstance(p, AnyOf) else (p,) for p in self.policies)
        object.__setattr__(self, "policies", tuple(q for ps in nested for q in ps))

    def keep(self, checkpoints: Sequence[CheckpointRecord]) -> frozenset[int]:
        return frozenset().union(*(p.keep(checkpoints) for p in self.policies))


def best_step(
    checkpoints: Sequence[CheckpointRecord], monitor: str, mode: str = "min"
) -> int | None:
    """The single best step by ``monitor`` (``mode`` ``"min"`` or ``"max"``), as KeepBest ranks.

    Returns:
        The best step, or ``None`` when no record has a usable (present, non-NaN) value.

    >>> best_step([CheckpointRecord(1, {"loss": 2.0}), CheckpointRecord(2, {"loss": 1.0})], "loss")
    2
    """
    _check_mode(mode)
    ranked = _ranked(checkpoints, monitor, mode)
    return ranked[0] if ranked else None


def ranked_by(policy: RetentionPolicy) -> list[tuple[str, str]]:
    """The ``(monitor, mode)`` of every :class:`KeepBest` in ``policy``, looking inside
    :class:`AnyOf`; distinct, in order. A checkpoint manager's ``best`` is defined by these.

    >>> ranked_by(KeepLast(2) | KeepBest(1, "val_loss") | KeepBest(3, "val_loss"))
    [('val_loss', 'min')]
    """
    if isinstance(policy, KeepBest):
        return [(policy.monitor, policy.mode)]
    if isinstance(policy, AnyOf):
        found = (pair for member in policy.policies for pair in ranked_by(member))
        return list(dict.fromkeys(found))
    return []


def plan_deletions(
    checkpoints: Sequence[CheckpointRecord], policy: RetentionPolicy, *, protect: Iterable[int] = ()
) -> list[int]:
    """The steps to delete: in ``checkpoints``, not kept by ``policy`` and not in ``protect``.

    Returns:
        Ascending steps; never a protected step (the latest, the best) or one not shown.

    >>> plan_deletions([CheckpointRecord(s) for s in (1, 2, 3)], KeepLast(1), protect=[1])
    [2]
    """
    spared = policy.keep(checkpoints) | frozenset(protect)
    return sorted({c.step for c in checkpoints} - spared)


def from_arguments(
    *,
    keep_last: int | None,
    keep_best: int | None,
    monitor: str | None,
    mode: str,
    keep_every: int | None,
    pinned: Iterable[int] = (),
    policy: RetentionPolicy | None = None,
) -> RetentionPolicy:
    """The policy a manager's keyword arguments describe: the union of those given.

    Args:
        keep_last, keep_best, keep_every, pinned: a :class:`KeepLast`, :class:`KeepBest`,
            :class:`KeepEvery`, :class:`Pinned`; ``None`` or empty leaves it out.
        monitor, mode: the metric ``keep_best`` ranks by; ``"min"`` or ``"max"``.
        policy: any further policy to add to the union.

    Returns:
        The one policy given, an :class:`AnyOf` of several, or :class:`KeepAll` for none.

    >>> from_arguments(keep_last=3, keep_best=None, monitor=None, mode="min", keep_every=None)
    KeepLast(n=3)
    """
    _check_mode(mode)
    policies: list[RetentionPolicy] = []
    if keep_last is not None:
        _check_positive(keep_last, "keep_last")
        policies.append(KeepLast(keep_last))
    if keep_best is not None:
        if monitor is None:
            raise ValueError(f'keep_best={keep_best} needs monitor="val_loss" or similar')
        _check_positive(keep_best, "keep_best")
        policies.append(KeepBest(keep_best, monitor, "min" if mode == "min" else "max"))
    if keep_every is not None:
        _check_positive(keep_every, "keep_every")
        policies.append(KeepEvery(keep_every))
    if steps := frozenset(pinned):
        policies.append(Pinned(steps))
    if policy is not None:
        if not isinstance(policy, RetentionPolicy):
            raise TypeError(
                f"policy must be a retention policy (KeepLast(3) | KeepBest(1, 'val_loss'), or "
                f"an object with a keep() method); got {type(policy).__name__}"
            )
        policies.append(policy)
    if not policies:
        return KeepAll()
    return policies[0] if len(policies) == 1 else AnyOf(tuple(policies))


def _is_int(value: object) -> bool:
    """An int or an integer numpy scalar (anything with ``__index__``), not a bool."""
    return hasattr(type(value), "__index__") and not isinstance(value, bool)
