"""Bounded-memory histogram of |x| for one tensor, the input of threshold selection.

Calibration runs the FP32 model over many batches; storing activations would need memory
proportional to the data set. :class:`AbsHistogram` keeps a fixed number of bins over
``[0, upper]`` instead and widens ``upper`` when a larger ``|x|`` arrives.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from core.errors import InvalidInputError

DEFAULT_NUM_BINS = 2048
# Values are processed in slices of this many elements so that the float64 copy of |x| made for
# binning stays small whatever the size of the tensor handed to update().
_CHUNK = 1 << 20
# Beyond this growth exponent every old bin lands in new bin 0 anyway; capping it keeps the
# integer arithmetic in int64.
_MAX_SHIFT = 62


class AbsHistogram:
    """Accumulates a histogram of ``|x|`` for one tensor with a fixed bin count.

    Bins are ``num_bins`` equal-width intervals of ``[0, upper]`` (the last one closed), the
    layout of TensorRT's and NVIDIA ModelOpt's entropy calibrators. ``upper`` is the largest
    ``|x|`` of the first batch that had a non-zero value (one ulp above it, so all bins are
    half-open). When a later batch reaches ``upper``, the range is widened before binning the
    batch (see :meth:`_widen`).

    Non-finite values (NaN, +inf, -inf) are not binned; they are counted in :attr:`nonfinite`
    so the caller can decide to leave such a tensor in float. The signed minimum and maximum of
    the finite values and their count are tracked exactly.
    """

    def __init__(self, num_bins: int = DEFAULT_NUM_BINS) -> None:
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
            raise InvalidInputError(
                f"histogram bin count must be a positive integer, got {num_bins!r}; use e.g. {DEFAULT_NUM_BINS}"
            )
        self._num_bins = num_bins
        self._counts = np.zeros(num_bins, dtype=np.int64)
        self._upper = 0.0
        self._count = 0
        self._nonfinite = 0
        self._min: float | None = None
        self._max: float | None = None

    # ------------------------------------------------------------------ accumulate
    def update(self, values: np.ndarray) -> None:
        """Add every element of ``values`` (any shape, real dtype) to the histogram."""
        arr = np.asarray(values)
        if arr.dtype.kind not in "biuf":
            raise InvalidInputError(
                f"cannot histogram a tensor of dtype {arr.dtype}; only real numeric tensors "
                "(float, int, bool) can be calibrated"
            )
        flat = arr.reshape(-1)
        for start in range(0, flat.size, _CHUNK):
            self._update_chunk(flat[start : start + _CHUNK])

    def _update_chunk(self, chunk: np.ndarray) -> None:
        if chunk.dtype.kind == "f":
            finite = np.isfinite(chunk)
            num_finite = int(np.count_nonzero(finite))
            if num_finite != chunk.size:
                self._nonfinite += chunk.size - num_finite
                chunk = chunk[finite]
        if chunk.size == 0:
            return
        values = chunk.astype(np.float64, copy=False)
        lo, hi = float(values.min()), float(values.max())
        self._min = lo if self._min is None else min(self._min, lo)
        self._max = hi if self._max is None else max(self._max, hi)
        self._count += int(values.size)
        amax = max(-lo, hi)
        if amax >= self._upper and amax > 0.0:
            self._widen(amax)
        if self._upper == 0.0:  # only zeros so far: they belong to bin 0 whatever its width
            self._counts[0] += values.size
            return
        binned, _ = np.histogram(np.abs(values), bins=self._num_bins, range=(0.0, self._upper))
        self._counts += binned

    def _widen(self, amax: float) -> None:
        """Grow ``upper`` above ``amax`` by merging whole bins, keeping the bin count.

        Invariant: every binned value is strictly below ``upper``, so every bin is half-open
        ``[lo, hi)`` and stays so when merged (the closed last bin of ``np.histogram`` never
        holds a value). The first ``upper`` is the next float above the first non-zero batch's
        largest ``|x|``.

        The new upper edge is ``upper * 2**k`` for the smallest ``k`` that covers ``amax``, so
        new bin ``j`` is exactly old bins ``[j * 2**k, (j + 1) * 2**k)``. Why a power of two and
        not the smallest integer factor: multiplying by ``2**k`` is exact in floating point, so
        every new edge ``j * (upper * 2**k) / n`` equals the old edge ``j * 2**k * upper / n``
        bit for bit. Old bins therefore move whole into new bins, no count is split or
        re-estimated, and the widened histogram is identical to one built over the wider
        range from the start (for the data seen so far). Each widening at least doubles the
        range, so a tensor is re-binned at most ``log2(final/initial range)`` times, each in
        O(num_bins). The price is resolution: the final range can be up to twice the largest
        ``|x|``; the maximum always lands in the upper half of the bins, leaving at least
        ``num_bins / 2`` bins under it. (onnxruntime and ModelOpt instead append bins of the
        old width, so their memory grows with the range; a fixed count keeps it bounded.)
        """
        if self._upper == 0.0:
            # counts so far are all zeros, already in bin 0
            self._upper = _checked_upper(math.nextafter(amax, math.inf), amax)
            return
        shift = max(1, math.ceil(math.log2(amax / self._upper)))
        while math.ldexp(self._upper, shift) <= amax:  # guard against log2 rounding
            shift += 1
        new_upper = _checked_upper(math.ldexp(self._upper, shift), amax)
        if shift >= _MAX_SHIFT:
            merged = np.zeros_like(self._counts)
            merged[0] = self._counts.sum()
        else:
            target = np.arange(self._num_bins, dtype=np.int64) >> shift
            merged = np.zeros_like(self._counts)
            np.add.at(merged, target, self._counts)
        self._counts = merged
        self._upper = new_upper

    # ------------------------------------------------------------------ read
    @property
    def num_bins(self) -> int:
        return self._num_bins

    @property
    def upper(self) -> float:
        """Upper edge of the last bin (0.0 while no non-zero finite value has been seen)."""
        return self._upper

    @property
    def counts(self) -> np.ndarray:
        """Bin counts (int64, read-only view; copy before modifying)."""
        view = self._counts.view()
        view.flags.writeable = False
        return view

    @property
    def edges(self) -> np.ndarray:
        """``num_bins + 1`` bin edges (float64), the same edges ``np.histogram`` used."""
        return np.linspace(0.0, self._upper, self._num_bins + 1)

    @property
    def count(self) -> int:
        """Number of finite values binned."""
        return self._count

    @property
    def nonfinite(self) -> int:
        """Number of NaN/inf values seen and not binned."""
        return self._nonfinite

    @property
    def min(self) -> float | None:
        """Smallest finite value seen (signed), None before any."""
        return self._min

    @property
    def max(self) -> float | None:
        """Largest finite value seen (signed), None before any."""
        return self._max

    @property
    def amax(self) -> float:
        """Largest finite ``|x|`` seen (0.0 before any)."""
        if self._min is None or self._max is None:
            return 0.0
        return max(-self._min, self._max)

    def __repr__(self) -> str:
        return (
            f"AbsHistogram(num_bins={self._num_bins}, upper={self._upper!r}, "
            f"count={self._count}, nonfinite={self._nonfinite})"
        )

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready state; :meth:`from_dict` restores it exactly."""
        return {
            "num_bins": self._num_bins,
            "upper": self._upper,
            "count": self._count,
            "nonfinite": self._nonfinite,
            "min": self._min,
            "max": self._max,
            "counts": [int(c) for c in self._counts],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AbsHistogram:
        """Rebuild a histogram saved by :meth:`to_dict`, checking it is consistent."""
        if not isinstance(data, Mapping):
            raise InvalidInputError(f"histogram state must be a mapping, got {type(data).__name__}")
        missing = {"num_bins", "upper", "count", "nonfinite", "min", "max", "counts"} - set(data)
        if missing:
            raise InvalidInputError(f"histogram state lacks {sorted(missing)}; write it with AbsHistogram.to_dict()")
        hist = cls(_as_int(data["num_bins"], "num_bins"))
        hist._upper = _as_float(data["upper"], "upper")
        hist._count = _as_int(data["count"], "count")
        hist._nonfinite = _as_int(data["nonfinite"], "nonfinite")
        hist._min = None if data["min"] is None else _as_float(data["min"], "min", signed=True)
        hist._max = None if data["max"] is None else _as_float(data["max"], "max", signed=True)
        hist._counts = _as_counts(data["counts"], hist._num_bins)
        _check_consistent(hist)
        return hist


def _checked_upper(upper: float, amax: float) -> float:
    if not math.isfinite(upper):
        raise InvalidInputError(
            f"|x| = {amax!r} is too close to the float64 limit to histogram; the tensor overflows, leave it in float"
        )
    return upper


def _as_int(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(f"histogram field {key!r} must be an integer >= 0, got {value!r}")
    return value


def _as_float(value: object, key: str, *, signed: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInputError(f"histogram field {key!r} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or (not signed and number < 0):
        kind = "a finite number" if signed else "a finite number >= 0"
        raise InvalidInputError(f"histogram field {key!r} must be {kind}, got {value!r}")
    return number


def _as_counts(value: object, num_bins: int) -> np.ndarray:
    if not isinstance(value, list | tuple | np.ndarray) or len(value) != num_bins:
        raise InvalidInputError(
            f"histogram field 'counts' must be a list of {num_bins} integers, "
            f"got {type(value).__name__} of length {len(value) if hasattr(value, '__len__') else '?'}"
        )
    counts = np.asarray(value)
    if counts.dtype.kind not in "iu" or (counts.size and counts.min() < 0):
        raise InvalidInputError("histogram field 'counts' must hold integers >= 0")
    return counts.astype(np.int64)


def _check_consistent(hist: AbsHistogram) -> None:
    total = int(hist._counts.sum())
    if total != hist._count:
        raise InvalidInputError(f"histogram counts sum to {total} but 'count' says {hist._count}; the state is corrupt")
    if (hist._min is None) != (hist._count == 0) or (hist._max is None) != (hist._count == 0):
        raise InvalidInputError("histogram 'min'/'max' must be null exactly when 'count' is 0")
    if hist._min is not None and hist._max is not None:
        if hist._min > hist._max:
            raise InvalidInputError(f"histogram min {hist._min} exceeds max {hist._max}")
        if hist.amax > 0.0 and hist.amax >= hist._upper:
            raise InvalidInputError(f"histogram upper edge {hist._upper} is not above the largest |x| {hist.amax}")
