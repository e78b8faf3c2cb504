"""Distribution-free confidence bounds for a quantile of a sample (order statistics; pure).

A p99 measured on a few hundred requests is nearly the maximum: one scheduling stall moves it by
an order of magnitude. What the sample does say, with no assumption about the latency
distribution, is where the true quantile lies: with ``B ~ Binomial(n, q)`` the number of samples
at or below it, the ``l``-th smallest sample exceeds the true quantile with probability
``P(B < l)`` and the ``u``-th smallest falls short of it with probability at most ``P(B >= u)``.
``quantile_ranks`` picks the tightest ``l`` and ``u`` whose miss probabilities stay within
``(1 - confidence) / 2`` each. Callers read the bounds off sorted samples (exact windows) or off
cumulative histogram buckets (Prometheus), conservatively.
"""

from __future__ import annotations

import math
from functools import lru_cache


@lru_cache(maxsize=4096)
def quantile_ranks(n: int, q: float = 0.99, confidence: float = 0.95) -> tuple[int | None, int | None]:
    """1-based ranks ``(l, u)`` of the order statistics bounding the ``q`` quantile of ``n`` samples.

    ``l`` is None when ``n`` is too small to bound the quantile from below (every sample might lie
    above it at this confidence); ``u`` is None when it cannot be bounded from above (for p99 at 95 %,
    fewer than 367 samples: the true p99 may lie beyond the largest one).
    """
    if n < 1:
        return None, None
    if not 0.0 < q < 1.0 or not 0.0 < confidence < 1.0:
        raise ValueError(f"quantile {q} and confidence {confidence} must lie strictly between 0 and 1")
    tail = (1.0 - confidence) / 2.0
    # E = n - B samples lie above the quantile, E ~ Binomial(n, 1 - q); walk its pmf from E = 0 up.
    p = 1.0 - q
    log_p, log_q, log_n = math.log(p), math.log(q), math.lgamma(n + 1)
    cdf = 0.0  # P(E <= e)
    upper: int | None = None  # smallest u with P(B >= u) = P(E <= n - u) <= tail
    lower: int | None = None  # largest l with P(B <= l - 1) = P(E >= n - l + 1) <= tail
    for e in range(n + 1):
        cdf += math.exp(log_n - math.lgamma(e + 1) - math.lgamma(n - e + 1) + e * log_p + (n - e) * log_q)
        if cdf <= tail:
            upper = n - e  # the cdf only grows, so the last e kept gives the smallest u
        if 1.0 - cdf <= tail:
            lower = n - e if n - e >= 1 else None
            break
    return lower, upper
