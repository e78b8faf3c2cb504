"""Threshold (amax) selection from |x| histograms: entropy (KL), minmax and percentile.

Pure functions of ``(counts, edges)``; :func:`choose_amax` applies them to an
:class:`~builders.histogram.AbsHistogram` with the skip rules.

Entropy follows TensorRT's EntropyCalibrator2 as published by NVIDIA (GTC 2017, "8-bit
Inference with TensorRT", and its Python re-implementation ``_compute_amax_entropy`` in
pytorch-quantization and ModelOpt, which this module matches):

* ``counts[0]`` is replaced by ``counts[1]`` first. Bin 0 holds the exact zeros (ReLU outputs,
  padding) which int8 represents exactly whatever the scale; left alone they dominate the first
  quantization level and push the search towards clipping.
* for each candidate ``i`` in ``start_bin ..= len(counts)``:
  ``P = counts[:i]`` with the outliers ``sum(counts[i:])`` added to ``P[i-1]``;
  ``Q`` is ``counts[:i]`` (without the outliers) merged into ``num_quantized_bins`` levels, bin
  ``j`` going to level ``floor(j * num_quantized_bins / i)``, each level's sum spread evenly over
  its non-empty bins (empty bins stay 0);
  both normalized; ``KL(P || Q) = sum P log(P / Q)`` with ``0 log 0 = 0``.
* ``Q = 0 < P`` happens in one place only: bin ``i - 1`` when it is empty but outliers were
  folded into it. ModelOpt's scipy ``entropy`` makes that candidate's KL ``+inf``, which forbids
  clipping anywhere the histogram is empty: a few far outliers then force ``amax = max``, the
  opposite of what entropy calibration is for. Kiln gives that bin ``Q = 1e-4`` counts instead
  (the eps of MXNet's and onnxruntime's ``smooth_distribution``) so clipping there costs
  ``~ (t/N) log(t / eps)``. Every other candidate's KL is exactly ModelOpt's. A candidate with
  no counts at all below it stays ``+inf``.
* the candidate with the smallest KL wins, ties going to the largest candidate (ModelOpt takes
  the last argmin); ``amax = edges[i]``, the upper edge of bin ``i - 1``.

Differences from the references, all deliberate: ties are KL values within ``1e-9`` nats
(round-off of float64 sums, far below any meaningful difference) rather than bit-equal ones; a
histogram whose only mass is in bin 0 returns the upper edge of its last non-empty bin instead of
NaN. onnxruntime's ``get_entropy_threshold`` is a different algorithm (MXNet's: signed histogram,
windows symmetric around zero, levels of ``i // 128`` bins with the remainder in the last one,
``1e-4`` smoothing) and is only used as a speed baseline.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from builders.histogram import AbsHistogram
from core.errors import InvalidInputError

METHODS = ("entropy", "minmax", "percentile")
DEFAULT_PERCENTILE = 99.99
DEFAULT_QUANTIZED_BINS = 128
DEFAULT_START_BIN = 128
# Q's value, in counts, where outliers are folded into an empty last bin (see module docstring):
# the eps of MXNet's and onnxruntime's smooth_distribution.
SMOOTHING_EPS = 1e-4
# KL values closer than this to the minimum count as ties (see module docstring).
_TIE_TOLERANCE = 1e-9
# Candidates evaluated per vectorized block: bounds the (block, levels) work arrays to a few MB.
_BLOCK = 1024


@dataclass(frozen=True)
class ThresholdChoice:
    """The amax chosen for one tensor, or why it has none (the tensor then stays in float)."""

    amax: float | None
    skip_reason: str | None = None

    @property
    def skipped(self) -> bool:
        return self.amax is None


# ---------------------------------------------------------------------------- entropy
def entropy_amax(
    counts: np.ndarray,
    edges: np.ndarray,
    num_quantized_bins: int = DEFAULT_QUANTIZED_BINS,
    start_bin: int = DEFAULT_START_BIN,
) -> float:
    """amax minimizing KL(P || Q) over all candidates at once (no Python loop over them).

    With ``N`` the total count, ``c`` the counts, ``t_i`` the outliers beyond ``i`` and
    ``S_i = N - t_i``, the KL of candidate ``i`` splits into sums that prefix sums give in O(1)
    per level::

        KL_i = (H[i-1] + g(c[i-1] + t_i)) / N - log N
               - sum_k W_k log(L_k / (nz_k * S_i)) / N

    where ``g(x) = x log x``, ``H`` is the prefix sum of ``g(c)``, ``L_k`` and ``nz_k`` are the
    sum and non-empty-bin count of level ``k`` (differences of prefix sums at the level
    boundaries ``ceil(k * i / levels)``, one gather per candidate and level), and ``W_k = L_k``
    plus ``t_i`` for the level holding bin ``i - 1`` when that bin is non-empty. When it is
    empty and ``t_i > 0``, the smoothed bin adds ``t_i log(eps / (S_i + eps))`` and ``S_i``
    becomes ``S_i + eps``. Cost: O(candidates x levels) vectorized work, versus
    O(candidates x bins) for building P and Q per candidate; the boundaries are cached per bin
    count.
    """
    c, edges, start = _prepare(counts, edges, num_quantized_bins, start_bin)
    total = float(c.sum())
    if total == 0.0:
        return _last_nonempty_edge(counts, edges)
    n = c.size
    levels = num_quantized_bins
    cum = np.concatenate(([0.0], np.cumsum(c)))
    cum_nonzero = np.concatenate(([0], np.cumsum(c > 0)))
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.where(c > 0, c * np.log(np.where(c > 0, c, 1.0)), 0.0)
    cum_g = np.concatenate(([0.0], np.cumsum(g)))
    candidates = np.arange(start, n + 1, dtype=np.int64)
    bounds = _level_bounds(start, n, levels)
    kl = np.empty(candidates.size, dtype=np.float64)
    for lo in range(0, candidates.size, _BLOCK):
        hi = min(lo + _BLOCK, candidates.size)
        kl[lo:hi] = _kl_block(c, cum, cum_nonzero, cum_g, total, candidates[lo:hi], bounds[lo:hi], levels)
    return float(edges[candidates[_pick(kl)]])


@functools.lru_cache(maxsize=8)
def _level_bounds(start: int, stop: int, levels: int) -> np.ndarray:
    """Level boundaries ``ceil(k * i / levels)``, k = 0..levels, for candidates start..stop.

    Level ``k`` of candidate ``i`` is bins ``[bounds[k], bounds[k + 1])``: exactly the bins
    ``j`` with ``floor(j * levels / i) == k``. Shared by every tensor with that bin count.
    """
    cand = np.arange(start, stop + 1, dtype=np.int64)
    k = np.arange(levels + 1, dtype=np.int64)
    bounds = (k[None, :] * cand[:, None] + levels - 1) // levels
    bounds.flags.writeable = False
    return bounds


def _kl_block(
    c: np.ndarray,
    cum: np.ndarray,
    cum_nonzero: np.ndarray,
    cum_g: np.ndarray,
    total: float,
    cand: np.ndarray,
    bounds: np.ndarray,
    levels: int,
) -> np.ndarray:
    level_sum = np.diff(np.take(cum, bounds), axis=1)  # L_k
    level_nonzero = np.diff(np.take(cum_nonzero, bounds), axis=1)  # nz_k
    kept = cum[cand]  # S_i
    tail = total - kept  # t_i
    last = c[cand - 1]
    folded_into_empty = (tail > 0) & (last == 0)
    kept_q = kept + np.where(folded_into_empty, SMOOTHING_EPS, 0.0)  # sum of unnormalized Q
    tail_on_level = np.where(last > 0, tail, 0.0)  # outliers counted in bin i-1's level
    with np.errstate(divide="ignore", invalid="ignore"):
        # log of Q's (unnormalized) value on each level's non-empty bins
        log_q = np.where(level_sum > 0, np.log(level_sum / np.maximum(level_nonzero, 1)), 0.0)
        last_level = ((cand - 1) * levels) // cand
        cross = (
            np.sum(level_sum * log_q, axis=1)
            + tail_on_level * log_q[np.arange(cand.size), last_level]
            - (kept + tail_on_level) * np.log(kept_q)
            + np.where(folded_into_empty, tail * np.log(SMOOTHING_EPS / kept_q), 0.0)
        )
        folded = last + tail
        self_term = cum_g[cand - 1] + np.where(folded > 0, folded * np.log(folded), 0.0)
    kl = (self_term - cross) / total - math.log(total)
    kl[kept == 0] = np.inf  # nothing left in range: Q is undefined
    return kl


def entropy_amax_reference(
    counts: np.ndarray,
    edges: np.ndarray,
    num_quantized_bins: int = DEFAULT_QUANTIZED_BINS,
    start_bin: int = DEFAULT_START_BIN,
) -> float:
    """Straightforward one-candidate-at-a-time version of :func:`entropy_amax`.

    Builds P and Q explicitly as NVIDIA's ``_compute_amax_entropy`` does (plus the smoothed last
    bin, see the module docstring). Slow; used by tests and the benchmark to check that the
    vectorized search picks the same bin.
    """
    c, edges, start = _prepare(counts, edges, num_quantized_bins, start_bin)
    if c.sum() == 0:
        return _last_nonempty_edge(counts, edges)
    n = c.size
    divergences = []
    for i in range(start, n + 1):
        p = c[:i].copy()
        p[i - 1] += c[i:].sum()
        level = (np.arange(i) * num_quantized_bins) // i
        nonzero = c[:i] > 0
        level_sum = np.bincount(level, weights=c[:i], minlength=num_quantized_bins)
        level_nonzero = np.bincount(level, weights=nonzero, minlength=num_quantized_bins)
        q = np.zeros(i)
        q[nonzero] = level_sum[level[nonzero]] / level_nonzero[level[nonzero]]
        if q.sum() == 0:
            divergences.append(math.inf)
            continue
        if q[i - 1] == 0 and p[i - 1] > 0:
            q[i - 1] = SMOOTHING_EPS
        divergences.append(_kl_divergence(p / p.sum(), q / q.sum()))
    return float(edges[start + _pick(np.asarray(divergences))])


def _kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) for normalized p, q: 0 log 0 = 0, +inf where q = 0 < p (scipy semantics)."""
    if np.any((p > 0) & (q == 0)):
        return math.inf
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def _pick(kl: np.ndarray) -> int:
    """Index of the winning candidate: the last one within the tie tolerance of the minimum."""
    best = float(np.min(kl))
    if not math.isfinite(best):
        return int(kl.size - 1)
    return int(np.flatnonzero(kl <= best + _TIE_TOLERANCE)[-1])


def _prepare(
    counts: np.ndarray, edges: np.ndarray, num_quantized_bins: int, start_bin: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Validate and return float64 counts with bin 0 flattened, edges, first candidate."""
    c, e = _check_histogram(counts, edges)
    for name, value in (("num_quantized_bins", num_quantized_bins), ("start_bin", start_bin)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    c = c.astype(np.float64)
    if c.size > 1:
        c[0] = c[1]
    return c, e, min(start_bin, c.size)


def _check_histogram(counts: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(counts)
    e = np.asarray(edges, dtype=np.float64)
    if c.ndim != 1 or c.size == 0:
        raise InvalidInputError(f"histogram counts must be a non-empty 1-D array, got shape {c.shape}")
    if e.shape != (c.size + 1,):
        raise InvalidInputError(f"histogram has {c.size} bins, so it needs {c.size + 1} edges; got shape {e.shape}")
    if c.dtype.kind not in "iuf" or not np.all(np.isfinite(c)) or np.any(c < 0):
        raise InvalidInputError("histogram counts must be finite numbers >= 0")
    if not np.all(np.isfinite(e)) or np.any(np.diff(e) < 0):
        raise InvalidInputError("histogram edges must be finite and non-decreasing")
    if not np.any(c > 0):
        raise InvalidInputError("histogram is empty (all counts are 0); nothing to calibrate")
    return c, e


def _last_nonempty_edge(counts: np.ndarray, edges: np.ndarray) -> float:
    return float(np.asarray(edges)[np.flatnonzero(np.asarray(counts) > 0)[-1] + 1])


# ---------------------------------------------------------------------------- minmax, percentile
def minmax_amax(counts: np.ndarray, edges: np.ndarray) -> float:
    """Upper edge of the last non-empty bin: the largest |x| to within one bin width.

    :func:`choose_amax` uses the exact maximum the histogram tracked instead.
    """
    c, e = _check_histogram(counts, edges)
    return _last_nonempty_edge(c, e)


def percentile_amax(counts: np.ndarray, edges: np.ndarray, percentile: float = DEFAULT_PERCENTILE) -> float:
    """Smallest bin edge with at least ``percentile`` % of the values at or below it.

    That is the upper edge of the bin where the cumulative count reaches the percentile.
    (ModelOpt and onnxruntime return that bin's lower edge, one bin lower.)
    """
    if (
        isinstance(percentile, bool)
        or not isinstance(percentile, int | float)
        or not (0.0 < float(percentile) <= 100.0)
    ):
        raise InvalidInputError(f"percentile must be in (0, 100], got {percentile!r}; e.g. 99.99")
    c, e = _check_histogram(counts, edges)
    cumulative = np.cumsum(c, dtype=np.float64)
    target = cumulative[-1] * (float(percentile) / 100.0)
    index = min(int(np.searchsorted(cumulative, target, side="left")), c.size - 1)
    return float(e[index + 1])


# ---------------------------------------------------------------------------- per tensor
def choose_amax(
    hist: AbsHistogram,
    method: str,
    *,
    percentile: float = DEFAULT_PERCENTILE,
    num_quantized_bins: int = DEFAULT_QUANTIZED_BINS,
    start_bin: int = DEFAULT_START_BIN,
    skip_nonfinite: bool = True,
) -> ThresholdChoice:
    """Choose one tensor's amax by ``method`` (one of :data:`METHODS`), or say why not.

    Skipped (``amax=None`` with a reason) are tensors with no values, only non-finite values,
    only zeros, and, unless ``skip_nonfinite=False``, any NaN/inf (e.g. ``-inf`` attention
    masks: int8 cannot represent them, so such tensors stay in float). A chosen amax is capped
    at the exact largest ``|x|`` seen, since a bin edge can lie above it.
    """
    if method not in METHODS:
        raise InvalidInputError(f"calibration method {method!r} is not one of {', '.join(METHODS)}")
    reason = _skip_reason(hist, skip_nonfinite)
    if reason is not None:
        return ThresholdChoice(amax=None, skip_reason=reason)
    counts, edges = hist.counts, hist.edges
    if method == "minmax":
        amax = hist.amax
    elif method == "percentile":
        amax = percentile_amax(counts, edges, percentile)
    else:
        amax = entropy_amax(counts, edges, num_quantized_bins, start_bin)
    return ThresholdChoice(amax=min(amax, hist.amax))


def _skip_reason(hist: AbsHistogram, skip_nonfinite: bool) -> str | None:
    if hist.count == 0 and hist.nonfinite == 0:
        return "empty: no values were observed"
    if hist.count == 0:
        return f"non-finite only: all {hist.nonfinite} values are NaN or inf"
    if skip_nonfinite and hist.nonfinite:
        return (
            f"non-finite values: {hist.nonfinite} of {hist.count + hist.nonfinite} values are "
            "NaN or inf, which int8 cannot represent"
        )
    if hist.amax == 0.0:
        return f"all-zero: all {hist.count} finite values are 0"
    return None


def choose_amaxes(
    histograms: dict[str, AbsHistogram],
    method: str,
    *,
    percentile: float = DEFAULT_PERCENTILE,
    num_quantized_bins: int = DEFAULT_QUANTIZED_BINS,
    start_bin: int = DEFAULT_START_BIN,
    skip_nonfinite: bool = True,
) -> tuple[dict[str, float], dict[str, str]]:
    """:func:`choose_amax` for every tensor: ``(amax by name, skip reason by name)``.

    The caller warns about the skipped tensors, naming them (they stay in float).
    """
    chosen: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for name, hist in histograms.items():
        choice = choose_amax(
            hist,
            method,
            percentile=percentile,
            num_quantized_bins=num_quantized_bins,
            start_bin=start_bin,
            skip_nonfinite=skip_nonfinite,
        )
        if choice.amax is None:
            skipped[name] = choice.skip_reason or "skipped"
        else:
            chosen[name] = choice.amax
    return chosen, skipped
