"""Retention policies: what each keeps, how they combine, and what may be deleted."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from torchvault.retention import (
    AnyOf,
    CheckpointRecord,
    KeepAll,
    KeepBest,
    KeepEvery,
    KeepLast,
    Pinned,
    RetentionPolicy,
    best_step,
    from_arguments,
    plan_deletions,
)

NAN = float("nan")


def records(*steps: int) -> list[CheckpointRecord]:
    return [CheckpointRecord(step) for step in steps]


def with_loss(pairs: dict[int, float]) -> list[CheckpointRecord]:
    return [CheckpointRecord(step, {"loss": value}) for step, value in pairs.items()]


def steps_of(checkpoints: Sequence[CheckpointRecord]) -> frozenset[int]:
    return frozenset(c.step for c in checkpoints)


def usable(c: CheckpointRecord) -> bool:
    value = c.metrics.get("loss")
    return value is not None and not math.isnan(value)


# A metric value is missing, NaN, a tie-prone small value, or any finite float.
metric = st.one_of(
    st.none(),
    st.just(NAN),
    st.sampled_from([0.0, 1.0, 2.0]),
    st.floats(allow_nan=False, allow_infinity=False),
)
checkpoint_lists = st.dictionaries(st.integers(0, 10_000), metric, max_size=30).map(
    lambda d: [CheckpointRecord(s, {} if v is None else {"loss": v}) for s, v in d.items()]
)
modes = st.sampled_from(["min", "max"])
leaf_policies = st.one_of(
    st.builds(KeepLast, st.integers(1, 6)),
    st.builds(KeepBest, st.integers(1, 6), st.just("loss"), modes),
    st.builds(KeepEvery, st.integers(1, 50)),
    st.builds(Pinned, st.frozensets(st.integers(0, 10_000), max_size=5)),
    st.just(KeepAll()),
)
policies = st.recursive(leaf_policies, lambda p: st.builds(lambda a, b: a | b, p, p), max_leaves=4)


class KeepOdd:
    """A user-written policy with no ``|`` of its own."""

    def keep(self, checkpoints: Sequence[CheckpointRecord]) -> frozenset[int]:
        return frozenset(c.step for c in checkpoints if c.step % 2)


# --- KeepLast ---------------------------------------------------------------------------


def test_keep_last_keeps_the_highest_steps_whatever_the_order() -> None:
    assert KeepLast(2).keep(records(30, 10, 40, 20)) == {30, 40}


def test_keep_last_keeps_everything_when_there_are_fewer_than_n() -> None:
    assert KeepLast(5).keep(records(1, 2)) == {1, 2}


@pytest.mark.parametrize("n", [0, -1])
def test_keep_last_rejects_n_below_one(n: int) -> None:
    with pytest.raises(ValueError, match=r"KeepLast n must be an int >= 1.*KeepAll\(\)"):
        KeepLast(n)


@given(checkpoint_lists, st.integers(1, 40))
def test_keep_last_keeps_min_n_len_highest_steps(cps: list[CheckpointRecord], n: int) -> None:
    kept = KeepLast(n).keep(cps)
    assert len(kept) == min(n, len(cps))
    assert all(step <= min(kept) for step in steps_of(cps) - kept)


# --- KeepBest and best_step -------------------------------------------------------------


def test_keep_best_min_keeps_the_lowest_values() -> None:
    assert KeepBest(2, "loss").keep(with_loss({1: 3.0, 2: 1.0, 3: 2.0, 4: 5.0})) == {2, 3}


def test_keep_best_max_keeps_the_highest_values() -> None:
    cps = with_loss({1: 3.0, 2: 1.0, 3: 2.0, 4: 5.0})
    assert KeepBest(2, "loss", mode="max").keep(cps) == {1, 4}


def test_keep_best_tie_goes_to_the_earlier_step() -> None:
    cps = with_loss({30: 1.0, 10: 1.0, 20: 1.0})
    assert KeepBest(2, "loss").keep(cps) == {10, 20}
    assert best_step(cps, "loss", "max") == 10


def test_keep_best_ignores_nan_and_missing_metrics() -> None:
    cps = [*with_loss({1: NAN, 2: 4.0}), CheckpointRecord(3, {"acc": 0.0}), CheckpointRecord(4)]
    assert KeepBest(3, "loss").keep(cps) == {2}
    assert KeepBest(3, "loss", mode="max").keep(cps) == {2}


def test_keep_best_keeps_nothing_when_no_record_has_the_metric() -> None:
    assert KeepBest(1, "loss").keep(records(1, 2)) == frozenset()


def test_keep_best_rejects_k_below_one() -> None:
    with pytest.raises(ValueError, match="KeepBest k must be an int >= 1"):
        KeepBest(0, "loss")


def test_keep_best_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match='mode must be "min" or "max", got \'avg\''):
        KeepBest(1, "loss", mode="avg")  # type: ignore[arg-type]


def test_best_step_picks_min_or_max() -> None:
    cps = with_loss({1: 2.0, 2: 1.0, 3: 3.0})
    assert (best_step(cps, "loss"), best_step(cps, "loss", "max")) == (2, 3)


def test_best_step_is_none_without_a_usable_value() -> None:
    assert best_step([*with_loss({1: NAN}), CheckpointRecord(2)], "loss") is None


def test_best_step_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="mode must be"):
        best_step(with_loss({1: 1.0}), "loss", "lowest")


@given(checkpoint_lists, st.integers(1, 40), modes)
def test_keep_best_keeps_the_k_best_usable_records(
    cps: list[CheckpointRecord], k: int, mode: str
) -> None:
    kept = KeepBest(k, "loss", "min" if mode == "min" else "max").keep(cps)
    candidates = [c for c in cps if usable(c)]
    assert len(kept) == min(k, len(candidates))
    sign = 1.0 if mode == "min" else -1.0

    def rank(c: CheckpointRecord) -> tuple[float, int]:
        return (sign * c.metrics["loss"], c.step)

    worst_kept = max((rank(c) for c in candidates if c.step in kept), default=None)
    for c in candidates:
        if c.step not in kept:
            assert worst_kept is None or rank(c) > worst_kept


@given(checkpoint_lists, modes)
def test_best_step_agrees_with_keep_best_one(cps: list[CheckpointRecord], mode: str) -> None:
    best = best_step(cps, "loss", mode)
    kept = KeepBest(1, "loss", "min" if mode == "min" else "max").keep(cps)
    assert kept == (frozenset() if best is None else {best})
    assert (best is None) == (not any(usable(c) for c in cps))


# --- KeepEvery, Pinned, KeepAll ---------------------------------------------------------


def test_keep_every_keeps_multiples_of_n_including_zero() -> None:
    assert KeepEvery(100).keep(records(0, 50, 100, 150, 200)) == {0, 100, 200}


def test_keep_every_rejects_n_below_one() -> None:
    with pytest.raises(ValueError, match="KeepEvery n must be an int >= 1"):
        KeepEvery(0)


def test_pinned_keeps_only_pinned_steps_that_exist() -> None:
    assert Pinned(frozenset({5, 7})).keep(records(5, 6)) == {5}


def test_pinned_accepts_any_iterable_and_compares_by_value() -> None:
    assert Pinned([7, 5, 5]) == Pinned(frozenset({5, 7}))
    assert hash(Pinned(iter([1]))) == hash(Pinned({1}))


def test_keep_all_keeps_every_step() -> None:
    assert KeepAll().keep(records(1, 2, 3)) == {1, 2, 3}


def test_every_policy_keeps_nothing_of_no_checkpoints() -> None:
    for policy in (KeepLast(1), KeepBest(1, "loss"), KeepEvery(1), Pinned([0]), KeepAll()):
        assert policy.keep([]) == frozenset()


# --- Union ------------------------------------------------------------------------------


def test_or_builds_an_any_of() -> None:
    assert KeepLast(1) | KeepEvery(10) == AnyOf((KeepLast(1), KeepEvery(10)))


def test_or_flattens_nested_any_of() -> None:
    a, b, c, d = KeepLast(1), KeepEvery(10), Pinned([3]), KeepAll()
    assert ((a | b) | (c | d)).policies == (a, b, c, d)
    assert AnyOf((AnyOf((a, b)), c)).policies == (a, b, c)


def test_or_accepts_a_user_policy_on_either_side() -> None:
    assert (KeepLast(1) | KeepOdd()).keep(records(1, 2, 4)) == {1, 4}
    assert (KeepOdd() | KeepLast(1)).keep(records(1, 2, 4)) == {1, 4}


def test_or_with_a_non_policy_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        KeepLast(1) | 3  # type: ignore[operator]


def test_any_of_rejects_an_empty_union() -> None:
    with pytest.raises(ValueError, match="at least one policy"):
        AnyOf(())


def test_any_of_rejects_a_member_without_keep() -> None:
    with pytest.raises(TypeError, match="keep\\(\\) method"):
        AnyOf((KeepLast(1), "last"))  # type: ignore[arg-type]


def test_built_in_and_user_policies_satisfy_the_protocol() -> None:
    for policy in (KeepLast(1), KeepBest(1, "m"), KeepEvery(1), Pinned(), KeepAll(), KeepOdd()):
        assert isinstance(policy, RetentionPolicy)
    assert isinstance(KeepLast(1) | KeepAll(), RetentionPolicy)


@given(checkpoint_lists, policies, policies)
def test_union_keeps_exactly_the_union(
    cps: list[CheckpointRecord], a: RetentionPolicy, b: RetentionPolicy
) -> None:
    assert (a | b).keep(cps) == a.keep(cps) | b.keep(cps)  # type: ignore[operator]


# --- Properties of every policy ---------------------------------------------------------


@given(checkpoint_lists, policies)
def test_kept_steps_are_a_subset_of_the_input(
    cps: list[CheckpointRecord], policy: RetentionPolicy
) -> None:
    assert policy.keep(cps) <= steps_of(cps)


@given(checkpoint_lists, policies, st.randoms(use_true_random=False))
def test_keep_is_deterministic_and_ignores_input_order(
    cps: list[CheckpointRecord], policy: RetentionPolicy, rng: random.Random
) -> None:
    shuffled = list(cps)
    rng.shuffle(shuffled)
    assert policy.keep(cps) == policy.keep(cps) == policy.keep(shuffled)
    assert policy.keep(tuple(cps)) == policy.keep(cps)


# --- plan_deletions ---------------------------------------------------------------------


def test_plan_deletions_lists_unkept_steps_ascending() -> None:
    assert plan_deletions(records(4, 1, 3, 2), KeepLast(1)) == [1, 2, 3]


def test_plan_deletions_spares_protected_steps() -> None:
    assert plan_deletions(records(1, 2, 3), KeepLast(1), protect=[1]) == [2]


def test_plan_deletions_ignores_protected_steps_it_was_not_shown() -> None:
    assert plan_deletions(records(1, 2, 3), KeepLast(1), protect=iter([99, 2])) == [1]


def test_plan_deletions_under_keep_all_deletes_nothing() -> None:
    assert plan_deletions(records(1, 2, 3), KeepAll()) == []


def test_plan_deletions_keeps_latest_when_metrics_degrade_and_latest_is_protected() -> None:
    # orbax's pitfall: best-N alone would evict the newest step once the loss gets worse.
    cps = with_loss({1: 0.5, 2: 0.4, 3: 0.9, 4: 1.2})
    assert plan_deletions(cps, KeepBest(1, "loss"), protect=[4]) == [1, 3]


@given(checkpoint_lists, policies, st.frozensets(st.integers(0, 10_000), max_size=5), modes)
def test_plan_deletions_never_returns_protected_latest_or_best(
    cps: list[CheckpointRecord], policy: RetentionPolicy, extra: frozenset[int], mode: str
) -> None:
    best = best_step(cps, "loss", mode)
    protect = (
        set(extra) | {max(steps_of(cps), default=-1)} | ({best} if best is not None else set())
    )
    deleted = plan_deletions(cps, policy, protect=protect)
    assert deleted == sorted(set(deleted))
    assert not set(deleted) & protect
    assert set(deleted) == steps_of(cps) - policy.keep(cps) - protect


# --- from_arguments ---------------------------------------------------------------------


def sugar(
    *,
    keep_last: int | None = None,
    keep_best: int | None = None,
    monitor: str | None = None,
    mode: str = "min",
    keep_every: int | None = None,
) -> RetentionPolicy:
    return from_arguments(
        keep_last=keep_last, keep_best=keep_best, monitor=monitor, mode=mode, keep_every=keep_every
    )


def test_from_arguments_keeps_all_when_nothing_is_given() -> None:
    assert sugar() == KeepAll()


def test_from_arguments_returns_a_single_policy_unwrapped() -> None:
    assert sugar(keep_every=5) == KeepEvery(5)


def test_from_arguments_unions_every_policy_given() -> None:
    custom = KeepOdd()
    policy = from_arguments(
        keep_last=2,
        keep_best=1,
        monitor="val_loss",
        mode="max",
        keep_every=100,
        pinned=[7, 7],
        policy=custom,
    )
    assert policy == AnyOf(
        (KeepLast(2), KeepBest(1, "val_loss", "max"), KeepEvery(100), Pinned([7]), custom)
    )


def test_from_arguments_requires_monitor_for_keep_best() -> None:
    with pytest.raises(ValueError, match='monitor="val_loss"'):
        sugar(keep_best=3)


def test_from_arguments_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match='mode must be "min" or "max"'):
        sugar(mode="minimum")


@pytest.mark.parametrize(
    ("name", "build"),
    [
        ("keep_last", lambda: sugar(keep_last=0)),
        ("keep_best", lambda: sugar(keep_best=0, monitor="loss")),
        ("keep_every", lambda: sugar(keep_every=0)),
    ],
)
def test_from_arguments_names_the_argument_below_one(
    name: str, build: Callable[[], RetentionPolicy]
) -> None:
    with pytest.raises(ValueError, match=f"{name} must be an int >= 1, got 0"):
        build()
