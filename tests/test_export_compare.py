"""The comparison every export's report rests on: samples, differences, latency."""

from __future__ import annotations

import pytest
import torch

from torchvault.export import _compare


def test_samples_start_with_the_example_and_keep_shapes_dtypes_and_integer_ranges() -> None:
    example = (torch.randn(2, 3), torch.randint(5, 9, (2, 4)), torch.zeros(2, dtype=torch.bool))
    drawn = list(_compare.samples(example, 3, batch_sizes=(5,)))
    assert drawn[0] is example
    assert len(drawn) == 5
    for inputs in drawn[1:4]:
        assert [t.shape for t in inputs] == [t.shape for t in example]
        assert [t.dtype for t in inputs] == [t.dtype for t in example]
        assert int(inputs[1].min()) >= 5
        assert int(inputs[1].max()) <= 8
    assert [t.shape[0] for t in drawn[4]] == [5, 5, 5]


def test_differences_use_allclose_semantics_and_record_the_maxima() -> None:
    diffs = _compare.Differences(rtol=1e-3, atol=1e-6)
    diffs.add([torch.tensor([1.0, 100.0])], [torch.tensor([1.0, 100.05])])
    assert diffs.within
    assert abs(diffs.max_abs - 0.05) < 1e-5  # float32 inputs
    diffs.add([torch.tensor([1.0])], [torch.tensor([1.01])])
    assert not diffs.within
    assert diffs.checked == 2


def test_a_nan_in_only_one_output_or_another_shape_is_a_mismatch() -> None:
    nan = _compare.Differences(rtol=1e-3, atol=1e-3)
    nan.add([torch.tensor([float("nan")])], [torch.tensor([0.0])])
    assert not nan.within
    both = _compare.Differences(rtol=1e-3, atol=1e-3)
    both.add([torch.tensor([float("nan")])], [torch.tensor([float("nan")])])
    assert both.within
    shape = _compare.Differences(rtol=1e-3, atol=1e-3)
    shape.add([torch.zeros(2)], [torch.zeros(3)])
    assert not shape.within


def test_outputs_are_flattened_in_order() -> None:
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    assert _compare.outputs_of({"x": a, "y": (b, [c])}) == [a, b, c]


def test_latency_is_the_median_and_interquartile_range_of_the_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a fake clock: the n-th timed call takes n ms (1..8), whatever the machine does
    durations = iter([0.0] * 2 + [float(n) for n in range(1, 9)])
    now = [0.0]
    calls: list[int] = []

    def clock() -> float:
        return now[0]

    def run() -> None:
        calls.append(1)
        now[0] += next(durations) / 1000.0

    monkeypatch.setattr(_compare.time, "perf_counter", clock)
    result = _compare.latency(run, repeats=8, warmup=2)
    assert len(calls) == 10
    assert result.median_ms == pytest.approx(4.5)
    assert result.iqr_ms == pytest.approx(6.25 - 2.75)  # the inclusive quartiles of 1..8
