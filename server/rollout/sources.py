"""Metrics sources for the rollout controller.

* ``LocalMetricsSource``: the gateway's own exact sliding windows (one gateway process).
* ``PrometheusSource``: the same figures as PromQL over the metrics every gateway replica exports,
  summed across replicas (several gateways behind a Service): requests, errors, latency, shadow
  agreement, and TTFT/ITL for token streams, each tail with its bounds. The queries are pure functions
  (``promql_*``) and the response parsing too (``parse_vector``), so both are unit-tested.

A window starts at ``mark(route)``; a read covers the time since. With Prometheus the window is a
PromQL range ``[Ns]`` ending now; keep steps at least ~4 scrape intervals long, or ``increase``
sees too few samples and the controller (rightly) waits for more traffic.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Protocol

from core.errors import UnavailableError
from core.quantiles import quantile_ranks
from server.rollout.analysis import Measurements, VariantWindow


class _Summary(Protocol):
    p99_ms: float
    p99_low_ms: float | None
    p99_high_ms: float | None


class _Window(Protocol):
    requests: int
    errors: int

    @property
    def total(self) -> _Summary: ...

    @property
    def shadow(self) -> Any: ...


class GatewayWindows(Protocol):
    """The part of ``server.gateway.metrics.GatewayMetrics`` the local source reads."""

    def window(self, route: str, variant: str, window_s: float | None = None) -> Any: ...


class LocalMetricsSource:
    """Windows since ``mark`` read from the gateway's in-process metrics."""

    def __init__(
        self,
        metrics: GatewayWindows,
        clock_ns: Callable[[], int] = time.perf_counter_ns,
        streams: StreamWindows | None = None,
    ) -> None:
        self._metrics = metrics
        self._clock_ns = clock_ns
        self._streams = streams  # token timings of streamed requests (TTFT, ITL, greedy replays)
        self._marks: dict[str, int] = {}

    def mark(self, route: str) -> None:
        self._marks[route] = self._clock_ns()

    def read(self, route: str, baseline: str, candidate: str) -> Measurements:
        started = self._marks.setdefault(route, self._clock_ns())
        span = max(1e-6, (self._clock_ns() - started) / 1e9)
        base = self._metrics.window(route, baseline, span)
        cand = self._metrics.window(route, candidate, span)
        compared = agreed = shadow_errors = 0
        for window in (base, cand):  # shadow figures are recorded under the shadow target's name
            if window.shadow is not None:
                compared += window.shadow.compared
                agreed += window.shadow.agreed
                shadow_errors += window.shadow.errors
        if self._streams is None:
            return Measurements(_variant(base), _variant(cand), compared, agreed, shadow_errors)
        streamed = [self._streams.window(route, name, span) for name in (baseline, candidate)]
        divergences = tuple(p for w in streamed if w is not None for p in w.first_divergence)
        windows = [_with_stream(_variant(w), s) for w, s in zip((base, cand), streamed, strict=True)]
        return Measurements(windows[0], windows[1], compared, agreed, shadow_errors, divergences)


def _bounds(summary: _Summary) -> tuple[float, float]:
    """The summary's 95 % p99 bounds with the analysis' convention (0 / inf where unbounded)."""
    low, high = summary.p99_low_ms, summary.p99_high_ms
    return (0.0 if low is None else low, math.inf if high is None else high)


def _variant(window: _Window) -> VariantWindow:
    if not window.requests:
        return VariantWindow(0, window.errors)
    return VariantWindow(window.requests, window.errors, window.total.p99_ms, p99_bounds_ms=_bounds(window.total))


class StreamWindows(Protocol):
    """The part of ``server.gateway.stream_metrics.StreamMetrics`` the local source reads."""

    def window(self, route: str, variant: str, window_s: float | None) -> Any: ...


def _with_stream(window: VariantWindow, stream: Any) -> VariantWindow:
    """Add TTFT/ITL p99 when the variant streamed in the window."""
    if stream is None or not stream.requests:
        return window
    has_itl = stream.itl.count > 0  # single-token streams have no inter-token gaps
    return replace(
        window,
        ttft_p99_ms=stream.ttft.p99_ms,
        ttft_p99_bounds_ms=_bounds(stream.ttft),
        itl_p99_ms=stream.itl.p99_ms if has_itl else None,
        itl_p99_bounds_ms=_bounds(stream.itl) if has_itl else None,
    )


# -- Prometheus -------------------------------------------------------------------------------

REQUESTS = "kiln_gateway_requests_total"
LATENCY_BUCKETS = "kiln_gateway_request_seconds_bucket"
TTFT_BUCKETS = "kiln_gateway_ttft_seconds_bucket"  # token streams (server/gateway/stream_metrics.py)
ITL_BUCKETS = "kiln_gateway_itl_seconds_bucket"
SHADOW = "kiln_gateway_shadow_comparisons_total"


def _label(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _variants_matcher(variants: tuple[str, ...]) -> str:
    return _label("|".join(re.escape(v) for v in variants))


def range_of(window_s: float) -> str:
    """A PromQL range covering ``window_s`` seconds (whole seconds, at least 1)."""
    return f"{max(1, math.ceil(window_s))}s"


def promql_requests(route: str, variants: tuple[str, ...], window_s: float) -> str:
    """Requests per variant and status code over the window, summed across gateway replicas."""
    return (
        f"sum by (variant, code) (increase({REQUESTS}{{route={_label(route)},"
        f"variant=~{_variants_matcher(variants)}}}[{range_of(window_s)}]))"
    )


def promql_buckets(route: str, variants: tuple[str, ...], window_s: float, metric: str = LATENCY_BUCKETS) -> str:
    """A latency histogram per variant over the window (cumulative count by ``le``), every replica merged.

    ``metric``: request latency by default; ``TTFT_BUCKETS`` / ``ITL_BUCKETS`` for token streams.

    The p99 and its bounds are computed here from the buckets (``tail_from_buckets``), the way
    ``histogram_quantile`` interpolates, since the bounds need the request count as well.
    """
    return (
        f"sum by (variant, le) (increase({metric}{{route={_label(route)},"
        f"variant=~{_variants_matcher(variants)}}}[{range_of(window_s)}]))"
    )


def _at_rank(buckets: list[tuple[float, float]], rank: float) -> float:
    """The value at ``rank`` (1-based, may be fractional) by linear interpolation in its bucket.

    Like PromQL's ``histogram_quantile``: the first bucket starts at 0, and a rank in the +Inf bucket
    reads as the largest finite bound, except that a bound read here (``math.inf``) stays unbounded.
    """
    previous_le, previous_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank and count > previous_count:
            if math.isinf(le):
                return math.inf
            return previous_le + (le - previous_le) * (rank - previous_count) / (count - previous_count)
        previous_le, previous_count = le, count
    return previous_le


def tail_from_buckets(buckets: list[tuple[float, float]]) -> tuple[float, tuple[float, float]] | None:
    """``(p99, (low, high))`` in the buckets' unit from cumulative ``(le, count)`` rows; None if empty.

    The bounds are the order statistics ``core.quantiles`` picks for the window's request count,
    read off the buckets the same way as the p99 itself; where the count is too small to bound the
    p99 from above, the largest request stands in (as in the exact windows); ``math.inf`` when it
    lies in the +Inf bucket.
    """
    rows = sorted(buckets)
    total = rows[-1][1] if rows else 0.0
    n = round(total)
    if n < 1:
        return None
    finite_top = max((le for le, _ in rows if math.isfinite(le)), default=0.0)
    point = _at_rank(rows, 0.99 * total)
    lower, upper = quantile_ranks(n, 0.99)
    low = _at_rank(rows, lower * total / n) if lower is not None else 0.0
    high = _at_rank(rows, upper * total / n if upper is not None else total)  # too few: the largest stands in
    return (finite_top if math.isinf(point) else point), (min(low, finite_top), high)


def promql_shadow(route: str, variants: tuple[str, ...], window_s: float) -> str:
    """Shadow comparisons by result (agree, disagree, error) against either variant."""
    return (
        f"sum by (result) (increase({SHADOW}{{route={_label(route)},"
        f"variant=~{_variants_matcher(variants)}}}[{range_of(window_s)}]))"
    )


def parse_vector(payload: Mapping[str, Any]) -> list[tuple[dict[str, str], float | None]]:
    """``/api/v1/query`` JSON -> [(labels, value)]; NaN/Inf values become None."""
    if payload.get("status") != "success":
        raise UnavailableError(
            f"Prometheus query failed: {payload.get('errorType', 'error')}: {payload.get('error', payload)}; "
            "check the query and that the gateway is scraped"
        )
    data = payload.get("data") or {}
    if data.get("resultType") != "vector":
        raise UnavailableError(f"Prometheus returned a {data.get('resultType')!r} result, expected a vector")
    rows = []
    for item in data.get("result", []):
        value = float(item["value"][1])
        rows.append((dict(item.get("metric", {})), value if math.isfinite(value) else None))
    return rows


def _histograms(rows: list[tuple[dict[str, str], float | None]]) -> dict[str, list[tuple[float, float]]]:
    """Bucket rows (``variant`` and ``le`` labels) -> {variant: [(le, cumulative count)]}."""
    histograms: dict[str, list[tuple[float, float]]] = {}
    for labels, value in rows:
        if value is not None and "le" in labels:
            histograms.setdefault(labels.get("variant", ""), []).append((float(labels["le"]), value))
    return histograms


def _tail_ms(histogram: list[tuple[float, float]]) -> tuple[float | None, tuple[float, float] | None]:
    """p99 and its bounds in milliseconds from a histogram in seconds; (None, None) when empty."""
    tail = tail_from_buckets(histogram)
    if tail is None:
        return None, None
    point, (low, high) = tail
    return point * 1000.0, (low * 1000.0, high * 1000.0)


def measurements_from(
    requests: list[tuple[dict[str, str], float | None]],
    buckets: list[tuple[dict[str, str], float | None]],
    shadow: list[tuple[dict[str, str], float | None]],
    baseline: str,
    candidate: str,
    ttft: list[tuple[dict[str, str], float | None]] | None = None,
    itl: list[tuple[dict[str, str], float | None]] | None = None,
) -> Measurements:
    """Assemble Measurements from the three query results (counts rounded to whole requests).

    ``buckets`` rows carry ``variant`` and ``le`` labels and cumulative counts (seconds); ``ttft``
    and ``itl`` are the same for token streams (a variant that streamed nothing has none).
    """
    counts: dict[str, list[float]] = {baseline: [0.0, 0.0], candidate: [0.0, 0.0]}
    for labels, value in requests:
        slot = counts.get(labels.get("variant", ""))
        if slot is None or value is None:
            continue
        slot[0] += value
        if labels.get("code") != "OK":
            slot[1] += value
    histograms, ttfts, itls = _histograms(buckets), _histograms(ttft or []), _histograms(itl or [])
    results = {labels.get("result"): round(value or 0.0) for labels, value in shadow}
    agree, disagree, errors = results.get("agree", 0), results.get("disagree", 0), results.get("error", 0)

    def window(name: str) -> VariantWindow:
        total, bad = round(counts[name][0]), round(counts[name][1])
        p99_ms, p99_bounds = _tail_ms(histograms.get(name, []))
        if not total or p99_ms is None:
            return VariantWindow(total, bad)
        ttft_ms, ttft_bounds = _tail_ms(ttfts.get(name, []))
        itl_ms, itl_bounds = _tail_ms(itls.get(name, []))
        return VariantWindow(total, bad, p99_ms, ttft_ms, itl_ms, p99_bounds, ttft_bounds, itl_bounds)

    return Measurements(window(baseline), window(candidate), agree + disagree, agree, errors)


class PrometheusSource:
    """Reads windows from a Prometheus server's HTTP API (``GET /api/v1/query``)."""

    def __init__(self, url: str, timeout_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url  # e.g. http://prometheus:9090
        self.timeout_s = timeout_s
        self._clock = clock
        self._marks: dict[str, float] = {}

    def mark(self, route: str) -> None:
        self._marks[route] = self._clock()

    def read(self, route: str, baseline: str, candidate: str) -> Measurements:
        window_s = self._clock() - self._marks.setdefault(route, self._clock())
        variants = (baseline, candidate)
        return measurements_from(
            parse_vector(self.query(promql_requests(route, variants, window_s))),
            parse_vector(self.query(promql_buckets(route, variants, window_s))),
            parse_vector(self.query(promql_shadow(route, variants, window_s))),
            baseline,
            candidate,
            parse_vector(self.query(promql_buckets(route, variants, window_s, TTFT_BUCKETS))),
            parse_vector(self.query(promql_buckets(route, variants, window_s, ITL_BUCKETS))),
        )

    def query(self, promql: str) -> dict[str, Any]:
        address = self.url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(address, timeout=self.timeout_s) as response:
                return dict(json.loads(response.read()))
        except urllib.error.HTTPError as err:  # Prometheus answers 400/422 with a JSON error body
            try:
                return dict(json.loads(err.read()))
            except ValueError:
                raise UnavailableError(f"Prometheus at {self.url} answered HTTP {err.code} to {promql!r}") from err
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise UnavailableError(
                f"cannot query Prometheus at {self.url}: {err}; check --prometheus URL and that it is up"
            ) from err
