"""Threshold selection: KL search against known answers and against the reference loop."""

from __future__ import annotations

import numpy as np
import pytest

from builders.histogram import AbsHistogram
from builders.thresholds import (
    choose_amax,
    choose_amaxes,
    entropy_amax,
    entropy_amax_reference,
    minmax_amax,
    percentile_amax,
)
from core.errors import InvalidInputError


def _hist(values: np.ndarray, bins: int = 2048) -> AbsHistogram:
    hist = AbsHistogram(num_bins=bins)
    hist.update(values)
    return hist


# ------------------------------------------------------------------ known answers
def test_gaussian_amax_lies_between_four_sigma_and_the_max() -> None:
    # N(0,1), 1e6 samples: the max is ~4.9 sigma and only 6e-5 of |x| lies beyond 4 sigma.
    # Folding the tail beyond T into one bin costs ~ tail * log(tail / bin count); measured KL
    # is 0.011 at 3 sigma, 0.0025 at 3.5, then flat at 0.0008-0.0009 from 4 sigma to the max,
    # where the resolution gained by clipping no longer pays for the clipped tail. So the
    # choice lies in [~4 sigma, max] (4.1-4.9 over seeds), never below 3.5 sigma.
    x = np.random.default_rng(0).standard_normal(1_000_000).astype(np.float32)
    hist = _hist(x)
    amax = entropy_amax(hist.counts, hist.edges)
    assert 3.8 <= amax <= hist.upper
    assert choose_amax(hist, "entropy").amax == pytest.approx(min(amax, hist.amax))


def test_laplacian_with_far_outliers_is_clipped_well_below_them() -> None:
    rng = np.random.default_rng(1)
    x = rng.laplace(size=200_000)
    x[:5] = [1000.0, -990.0, 995.0, 1000.0, -1000.0]
    hist = _hist(x)
    amax = entropy_amax(hist.counts, hist.edges)
    # the smallest candidate is edge 128 = 62.5: the bulk (|x| < 13) cannot be resolved
    # further by a 2048-bin histogram that must reach 1000, but the outliers are clipped.
    assert amax < 0.1 * hist.amax
    assert amax >= float(np.quantile(np.abs(x), 0.9999))


def test_uniform_distribution_is_not_clipped() -> None:
    x = np.random.default_rng(2).uniform(-3.0, 3.0, size=500_000)
    hist = _hist(x)
    assert entropy_amax(hist.counts, hist.edges) >= 0.99 * hist.amax


def test_mass_in_first_128_bins_gives_the_zero_kl_candidate() -> None:
    # Candidate 128 maps each bin to its own level: Q == P, KL == 0. Candidate 129 merges only
    # bins 0 and 1 into level 0, and those are equal once bin 0 is replaced by bin 1, so its KL
    # is 0 too; ties go to the larger candidate. Wider candidates merge unequal bins: KL > 0.
    rng = np.random.default_rng(3)
    counts = np.zeros(2048, dtype=np.int64)
    counts[:128] = rng.integers(500, 1500, size=128)
    edges = np.linspace(0.0, 20.48, 2049)
    assert entropy_amax(counts, edges) == edges[129]
    assert entropy_amax_reference(counts, edges) == edges[129]


def test_few_distinct_values_are_not_clipped() -> None:
    # e.g. 8x8 digit pixels 0..16: every level holds at most one non-empty bin, so any
    # candidate past the max has KL 0 and the largest wins: no clipping of a discrete input
    x = np.random.default_rng(4).integers(0, 17, size=10_000).astype(np.float32)
    hist = _hist(x)
    assert choose_amax(hist, "entropy").amax == 16.0


def test_zero_bin_is_flattened_like_nvidia_calibrators() -> None:
    # ReLU output: half exact zeros. Counting them would make level 0 dominate.
    rng = np.random.default_rng(5)
    relu = np.maximum(rng.standard_normal(400_000), 0.0)
    hist = _hist(relu)
    flattened = entropy_amax(hist.counts, hist.edges)
    half_normal = _hist(np.abs(rng.standard_normal(200_000)))
    assert flattened > 3.5
    assert entropy_amax(half_normal.counts, half_normal.edges) > 3.5


# ------------------------------------------------------------------ vectorized == reference
def _random_histogram(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    bins = int(rng.choice([160, 256, 384, 512, 700, 1024]))
    shape = rng.integers(0, 5)
    size = int(rng.integers(2_000, 100_000))
    if shape == 0:
        x = rng.standard_normal(size) * rng.uniform(0.1, 5)
    elif shape == 1:
        x = rng.laplace(size=size) ** rng.integers(1, 4)
    elif shape == 2:
        x = rng.exponential(size=size) + (rng.random(size) < 0.3) * 5
    elif shape == 3:
        x = rng.standard_cauchy(size)
    else:
        x = np.maximum(rng.standard_normal(size), 0)
    counts, edges = np.histogram(np.abs(x), bins=bins)
    if rng.random() < 0.3:  # punch holes: empty bins inside the range
        counts[rng.random(bins) < rng.uniform(0.1, 0.6)] = 0
    if rng.random() < 0.3:  # a spike
        counts[int(rng.integers(0, bins))] += int(rng.integers(1, 50_000))
    if counts.sum() == 0:
        counts[-1] = 1
    return counts, edges


def test_vectorized_search_picks_the_same_bin_as_the_reference_loop() -> None:
    rng = np.random.default_rng(6)
    for trial in range(50):
        counts, edges = _random_histogram(rng)
        quantized = int(rng.choice([128, 128, 64, 100]))
        start = int(rng.choice([128, 128, 10, 200]))
        fast = entropy_amax(counts, edges, quantized, start)
        slow = entropy_amax_reference(counts, edges, quantized, start)
        assert fast == slow, f"trial {trial}: bins={counts.size} levels={quantized} start={start}"


def test_vectorized_equals_reference_at_full_2048_bins() -> None:
    rng = np.random.default_rng(7)
    for _ in range(2):
        x = rng.standard_t(df=3, size=100_000)
        hist = _hist(x)
        assert entropy_amax(hist.counts, hist.edges) == entropy_amax_reference(hist.counts, hist.edges)


def test_histogram_smaller_than_start_bin_uses_full_range() -> None:
    counts = np.array([0, 5, 3, 1])
    edges = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    assert entropy_amax(counts, edges) == entropy_amax_reference(counts, edges) == 4.0


def test_only_bin_zero_returns_its_upper_edge() -> None:
    counts = np.zeros(256, dtype=np.int64)
    counts[0] = 10
    edges = np.linspace(0.0, 2.56, 257)
    assert entropy_amax(counts, edges) == entropy_amax_reference(counts, edges) == edges[1]


@pytest.mark.parametrize(
    ("counts", "edges", "message"),
    [
        (np.zeros(4), np.arange(5.0), "empty"),
        (np.array([1, -1, 2]), np.arange(4.0), ">= 0"),
        (np.array([1, 2, 3]), np.arange(3.0), "needs 4 edges"),
        (np.ones((2, 2)), np.arange(5.0), "1-D"),
        (np.array([1.0, np.nan]), np.arange(3.0), "finite"),
        (np.array([1, 2]), np.array([0.0, 2.0, 1.0]), "non-decreasing"),
    ],
)
def test_bad_histograms_are_rejected(counts: np.ndarray, edges: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        entropy_amax(counts, edges)


def test_bad_search_parameters_are_rejected() -> None:
    counts, edges = np.ones(300), np.arange(301.0)
    with pytest.raises(InvalidInputError, match="num_quantized_bins"):
        entropy_amax(counts, edges, num_quantized_bins=0)
    with pytest.raises(InvalidInputError, match="start_bin"):
        entropy_amax_reference(counts, edges, start_bin=-3)


# ------------------------------------------------------------------ minmax, percentile
def test_minmax_and_percentile_amax() -> None:
    counts = np.array([50, 30, 0, 15, 4, 1, 0, 0])
    edges = np.arange(9.0)
    assert minmax_amax(counts, edges) == 6.0
    assert percentile_amax(counts, edges, 100.0) == 6.0
    assert percentile_amax(counts, edges, 95.0) == 4.0  # 95 of 100 values are below edge 4
    assert percentile_amax(counts, edges, 95.5) == 5.0
    assert percentile_amax(counts, edges, 50.0) == 1.0
    for bad in (0.0, -1.0, 100.5, float("nan")):
        with pytest.raises(InvalidInputError, match="percentile"):
            percentile_amax(counts, edges, bad)


def test_choose_amax_by_method_caps_at_the_observed_max() -> None:
    x = np.random.default_rng(8).standard_normal(100_000)
    hist = _hist(x)
    minmax = choose_amax(hist, "minmax").amax
    assert minmax == hist.amax
    percentile = choose_amax(hist, "percentile", percentile=99.0).amax
    assert percentile is not None
    assert percentile == pytest.approx(float(np.quantile(np.abs(x), 0.99)), abs=2 * hist.edges[1])
    full = choose_amax(hist, "percentile", percentile=100.0)
    assert full.amax == hist.amax and not full.skipped
    with pytest.raises(InvalidInputError, match="not one of entropy, minmax, percentile"):
        choose_amax(hist, "kl")


# ------------------------------------------------------------------ skip rules
def test_degenerate_tensors_are_skipped_with_a_reason() -> None:
    empty = AbsHistogram()
    zeros = _hist(np.zeros(100))
    nan_only = _hist(np.array([np.nan, np.inf]))
    masked = _hist(np.array([0.5, -np.inf, 1.0]))
    good = _hist(np.array([0.5, -1.0, 2.0]))
    amaxes, skipped = choose_amaxes(
        {"empty": empty, "zeros": zeros, "nan": nan_only, "mask": masked, "good": good}, "entropy"
    )
    assert amaxes == {"good": 2.0}
    assert skipped["empty"].startswith("empty")
    assert skipped["zeros"].startswith("all-zero: all 100")
    assert skipped["nan"].startswith("non-finite only: all 2")
    assert "1 of 3 values are NaN or inf" in skipped["mask"]
    for method in ("minmax", "percentile"):
        assert choose_amax(zeros, method).skipped


def test_non_finite_values_can_be_ignored_on_request() -> None:
    masked = _hist(np.array([0.5, -np.inf, 1.0]))
    assert choose_amax(masked, "minmax", skip_nonfinite=False).amax == 1.0
    assert choose_amax(masked, "minmax").amax is None
