"""AbsHistogram: binning, widening by whole-bin merges, non-finite handling, persistence."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from builders.histogram import AbsHistogram
from core.errors import InvalidInputError


def _direct(values: np.ndarray, upper: float, bins: int) -> np.ndarray:
    counts, _ = np.histogram(np.abs(values.astype(np.float64)), bins=bins, range=(0.0, upper))
    return counts


def test_one_batch_matches_numpy_histogram_of_abs() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3, 8, 8)).astype(np.float32)
    hist = AbsHistogram()
    hist.update(x)
    assert hist.num_bins == 2048
    # one ulp above the largest |x|, so every bin is half-open and the max is in the last one
    assert hist.upper == math.nextafter(float(np.abs(x).max()), math.inf)
    np.testing.assert_array_equal(hist.counts, _direct(x, hist.upper, 2048))
    np.testing.assert_array_equal(hist.edges, np.histogram_bin_edges([0.0], bins=2048, range=(0.0, hist.upper)))
    assert hist.count == x.size
    assert hist.min == float(x.min()) and hist.max == float(x.max())
    assert hist.amax == float(np.abs(x).max())


def test_widening_keeps_bin_count_and_equals_binning_over_final_range() -> None:
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal(5000) * scale for scale in (0.5, 0.4, 1.7, 3.0, 0.1, 40.0, 41.0)]
    hist = AbsHistogram(num_bins=512)
    uppers = []
    for batch in batches:
        hist.update(batch)
        uppers.append(hist.upper)
    everything = np.concatenate(batches)
    assert hist.counts.shape == (512,)
    assert hist.count == everything.size == int(hist.counts.sum())
    # upper only grows by powers of two of the first batch's max
    ratios = [u / uppers[0] for u in uppers]
    assert all(float(np.log2(r)).is_integer() for r in ratios)
    assert uppers == sorted(uppers) and uppers[-1] >= float(np.abs(everything).max()) > uppers[-1] / 2
    # whole bins merged: identical to binning all the data over the final range at once
    np.testing.assert_array_equal(hist.counts, _direct(everything, hist.upper, 512))


def test_widening_approximately_preserves_the_distribution() -> None:
    rng = np.random.default_rng(2)
    small = np.abs(rng.standard_normal(200_000))
    hist = AbsHistogram()
    hist.update(small)
    before_mean = float((hist.counts * (hist.edges[:-1] + hist.edges[1:]) / 2).sum() / hist.count)
    hist.update(np.array([37.0]))  # range grows 8x, each new bin = 8 old ones
    centers = (hist.edges[:-1] + hist.edges[1:]) / 2
    after_mean = float((hist.counts[:-1] * centers[:-1]).sum() / (hist.count - 1))
    assert hist.count == small.size + 1
    assert abs(after_mean - before_mean) < 3 * (hist.edges[1] - hist.edges[0])
    assert after_mean == pytest.approx(float(small.mean()), abs=0.01)


def test_non_finite_values_are_counted_not_binned() -> None:
    hist = AbsHistogram(num_bins=16)
    hist.update(np.array([1.0, np.nan, -np.inf, -2.0, np.inf, 0.5], dtype=np.float32))
    assert hist.nonfinite == 3
    assert hist.count == 3 and int(hist.counts.sum()) == 3
    assert (hist.min, hist.max, hist.amax) == (-2.0, 1.0, 2.0)
    assert hist.upper == math.nextafter(2.0, math.inf)


def test_only_non_finite_leaves_histogram_empty() -> None:
    hist = AbsHistogram()
    hist.update(np.full(10, np.nan))
    assert (hist.count, hist.nonfinite, hist.upper, hist.min, hist.max) == (0, 10, 0.0, None, None)


def test_zeros_first_then_values_keeps_zeros_in_bin_zero() -> None:
    hist = AbsHistogram(num_bins=8)
    hist.update(np.zeros(5))
    assert hist.upper == 0.0 and int(hist.counts[0]) == 5
    hist.update(np.array([8.0, -4.0]))
    assert hist.upper == math.nextafter(8.0, math.inf)
    assert hist.counts.tolist() == [5, 0, 0, 1, 0, 0, 0, 1]  # 4.0 is just below edge 4


def test_value_equal_to_upper_widens_the_range() -> None:
    hist = AbsHistogram(num_bins=4)
    hist.update(np.array([1.0]))
    hist.update(np.array([hist.upper]))
    assert hist.upper == 2 * math.nextafter(1.0, math.inf)
    assert hist.counts.tolist() == [0, 1, 1, 0]


def test_values_at_the_float64_limit_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="float64 limit"):
        AbsHistogram().update(np.array([np.finfo(np.float64).max]))


def test_extreme_range_growth_merges_everything_into_bin_zero() -> None:
    hist = AbsHistogram(num_bins=64)
    hist.update(np.array([1e-30, 2e-30]))
    hist.update(np.array([1e30]))
    assert hist.upper >= 1e30 and np.isfinite(hist.upper)
    assert int(hist.counts[0]) == 2 and int(hist.counts.sum()) == 3


def test_integer_and_bool_inputs_are_accepted_and_empty_is_a_no_op() -> None:
    hist = AbsHistogram(num_bins=4)
    hist.update(np.array([], dtype=np.float32))
    hist.update(np.array([[-3, 1], [2, 0]], dtype=np.int64))
    hist.update(np.array([True, False]))
    assert hist.count == 6 and hist.amax == 3.0 and hist.counts.tolist() == [2, 2, 1, 1]


def test_rejects_complex_values_and_bad_bin_counts() -> None:
    with pytest.raises(InvalidInputError, match="dtype complex128"):
        AbsHistogram().update(np.array([1 + 2j]))
    for bad in (0, -5, 2.5, True):
        with pytest.raises(InvalidInputError, match="bin count"):
            AbsHistogram(num_bins=bad)  # type: ignore[arg-type]


def test_counts_view_is_read_only() -> None:
    hist = AbsHistogram(num_bins=4)
    hist.update(np.array([1.0]))
    with pytest.raises(ValueError):
        hist.counts[0] = 7


def test_dict_round_trip_through_json() -> None:
    rng = np.random.default_rng(3)
    hist = AbsHistogram(num_bins=128)
    hist.update(rng.laplace(size=1000))
    hist.update(np.array([np.nan, 50.0]))
    restored = AbsHistogram.from_dict(json.loads(json.dumps(hist.to_dict())))
    np.testing.assert_array_equal(restored.counts, hist.counts)
    assert restored.to_dict() == hist.to_dict()
    restored.update(np.array([500.0]))  # still usable
    assert restored.count == hist.count + 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"counts": [1, 2]}, "list of 4 integers"),
        ({"counts": [1, -1, 0, 0]}, "integers >= 0"),
        ({"count": 99}, "sum to"),
        ({"upper": -1.0}, "'upper'"),
        ({"upper": 3.0}, "not above the largest"),
        ({"min": None}, "null exactly"),
        ({"num_bins": "4"}, "'num_bins'"),
    ],
)
def test_from_dict_rejects_inconsistent_state(change: dict[str, object], message: str) -> None:
    hist = AbsHistogram(num_bins=4)
    hist.update(np.array([1.0, -2.0, 3.0]))
    state = {**hist.to_dict(), **change}
    with pytest.raises(InvalidInputError, match=message):
        AbsHistogram.from_dict(state)


def test_from_dict_names_missing_fields() -> None:
    with pytest.raises(InvalidInputError, match=r"lacks \['counts'"):
        AbsHistogram.from_dict({"num_bins": 4, "upper": 1.0, "count": 0, "nonfinite": 0, "min": None, "max": None})
