"""Per route and variant measurement: counts by status code, latency (upstream and total), shadow.

Recording is cheap (one lock, a deque append, two bisects); summaries are computed when read.
Two views of the same data:

* **windows** (``GatewayMetrics.window``): exact percentiles over the last ``window_s`` seconds
  from the kept samples; this is what the rollout controller decides on.
* **cumulative**: since start, quantiles from fine log-spaced buckets (within ~4%), and the
  Prometheus families (coarse buckets) exported by ``GatewayCollector`` at the admin ``/metrics``.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from core.quantiles import quantile_ranks

QUANTILES = (0.5, 0.9, 0.99, 0.999)
PROM_BOUNDS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_FINE_BOUNDS_NS = tuple(int(10_000 * 1.08**k) for k in range(215))  # 10 µs .. ~150 s, 8 % steps


@dataclass(frozen=True)
class LatencySummary:
    """Latency figures in milliseconds over ``count`` requests (zeros when count is 0)."""

    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float
    # 95 % distribution-free bounds of the true p99 (``core.quantiles``), windows only. Low is None
    # where too few requests bound it from below; high is the largest sample where too few (< 367)
    # bound it from above (a stand-in, not a 95 % bound: the true p99 may lie beyond it)
    p99_low_ms: float | None = None
    p99_high_ms: float | None = None


@dataclass(frozen=True)
class ShadowWindow:
    """Shadow comparisons against one shadow variant (served answer vs shadow answer)."""

    compared: int  # requests whose shadow answer was compared
    agreed: int  # of those, requests whose top-1 agreed on every row of every output
    agreement: float  # row-level top-1 agreement, 0..1 (1.0 when nothing compared)
    mean_cosine: float
    min_cosine: float
    max_abs_error: float
    errors: int  # shadow calls that failed (never visible to clients)
    dropped: int  # shadow copies skipped because the in-flight cap was reached (cumulative)


@dataclass(frozen=True)
class VariantWindow:
    """What one variant of one route measured over a window (or cumulatively)."""

    route: str
    variant: str
    window_s: float | None  # None = cumulative since start
    requests: int
    errors: int
    error_rate: float
    codes: Mapping[str, int]
    total: LatencySummary  # client-facing time inside the gateway
    upstream: LatencySummary  # time waiting for the upstream
    shadow: ShadowWindow | None  # set when this variant is a shadow target

    @property
    def p99_ms(self) -> float:
        return self.total.p99_ms

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ShadowResult:
    """One comparison, as ``shadow.compare_responses`` computes it."""

    rows: int
    agreed_rows: int
    min_cosine: float
    mean_cosine: float
    max_abs_error: float

    @property
    def agreed(self) -> bool:
        return self.agreed_rows == self.rows


def _summary(values: list[int]) -> LatencySummary:
    if not values:
        return LatencySummary(0, 0.0, 0.0, 0.0, 0.0, 0.0)
    values.sort()
    n = len(values)
    picks = [values[min(n - 1, max(0, int(q * n + 0.999999) - 1))] / 1e6 for q in QUANTILES]
    lower, upper = quantile_ranks(n, 0.99)
    return LatencySummary(
        n, picks[0], picks[1], picks[2], picks[3], sum(values) / n / 1e6,
        values[lower - 1] / 1e6 if lower is not None else None,
        values[upper - 1 if upper is not None else n - 1] / 1e6,
    )  # fmt: skip


def _fine_summary(buckets: list[int], count: int, total_ns: int) -> LatencySummary:
    if count == 0:
        return LatencySummary(0, 0.0, 0.0, 0.0, 0.0, 0.0)
    picks = []
    for q in QUANTILES:
        rank, running = q * count, 0
        for index, n in enumerate(buckets):
            running += n
            if running >= rank and n:
                upper = _FINE_BOUNDS_NS[min(index, len(_FINE_BOUNDS_NS) - 1)]
                lower = _FINE_BOUNDS_NS[index - 1] if index else 0
                picks.append((lower + (upper - lower) * (1 - (running - rank) / n)) / 1e6)
                break
    return LatencySummary(count, picks[0], picks[1], picks[2], picks[3], total_ns / count / 1e6)


@dataclass
class _Recorder:
    max_samples: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    samples: deque[tuple[int, int, int, str]] = field(init=False)
    codes: dict[str, int] = field(default_factory=dict)
    fine_total: list[int] = field(default_factory=lambda: [0] * (len(_FINE_BOUNDS_NS) + 1))
    fine_upstream: list[int] = field(default_factory=lambda: [0] * (len(_FINE_BOUNDS_NS) + 1))
    prom_total: list[int] = field(default_factory=lambda: [0] * (len(PROM_BOUNDS_S) + 1))
    prom_upstream: list[int] = field(default_factory=lambda: [0] * (len(PROM_BOUNDS_S) + 1))
    sum_total_ns: int = 0
    sum_upstream_ns: int = 0

    def __post_init__(self) -> None:
        self.samples = deque(maxlen=self.max_samples)


@dataclass
class _ShadowRecorder:
    max_samples: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    samples: deque[tuple[int, ShadowResult | None]] = field(init=False)
    compared: int = 0
    agreed: int = 0
    errors: int = 0
    dropped: int = 0

    def __post_init__(self) -> None:
        self.samples = deque(maxlen=self.max_samples)


_PROM_BOUNDS_NS = tuple(int(b * 1e9) for b in PROM_BOUNDS_S)


class GatewayMetrics:
    """Thread-safe per (route, variant) recorders; read with ``window`` / ``cumulative``."""

    def __init__(
        self, window_s: float = 60.0, max_samples: int = 100_000, clock: Callable[[], int] = time.perf_counter_ns
    ) -> None:
        """``clock`` returns monotonic nanoseconds (tests pass a fake one to move time by hand)."""
        self.window_s = window_s
        self._clock = clock
        self._max_samples = max_samples
        self._recorders: dict[tuple[str, str], _Recorder] = {}
        self._shadows: dict[tuple[str, str], _ShadowRecorder] = {}
        self._create = threading.Lock()

    def _recorder(self, route: str, variant: str) -> _Recorder:
        recorder = self._recorders.get((route, variant))
        if recorder is None:
            with self._create:
                recorder = self._recorders.setdefault((route, variant), _Recorder(self._max_samples))
        return recorder

    def _shadow(self, route: str, variant: str) -> _ShadowRecorder:
        recorder = self._shadows.get((route, variant))
        if recorder is None:
            with self._create:
                recorder = self._shadows.setdefault((route, variant), _ShadowRecorder(self._max_samples))
        return recorder

    def record(self, route: str, variant: str, code: str, upstream_ns: int, total_ns: int) -> None:
        """One served request (hot path)."""
        recorder = self._recorders.get((route, variant)) or self._recorder(route, variant)
        now = self._clock()
        fine_t = bisect.bisect_left(_FINE_BOUNDS_NS, total_ns)
        fine_u = bisect.bisect_left(_FINE_BOUNDS_NS, upstream_ns)
        prom_t = bisect.bisect_left(_PROM_BOUNDS_NS, total_ns)
        prom_u = bisect.bisect_left(_PROM_BOUNDS_NS, upstream_ns)
        with recorder.lock:
            recorder.samples.append((now, total_ns, upstream_ns, code))
            recorder.codes[code] = recorder.codes.get(code, 0) + 1
            recorder.fine_total[fine_t] += 1
            recorder.fine_upstream[fine_u] += 1
            recorder.prom_total[prom_t] += 1
            recorder.prom_upstream[prom_u] += 1
            recorder.sum_total_ns += total_ns
            recorder.sum_upstream_ns += upstream_ns

    def record_shadow(self, route: str, variant: str, result: ShadowResult | None) -> None:
        """One shadow comparison; ``None`` = the shadow call failed."""
        recorder = self._shadow(route, variant)
        with recorder.lock:
            recorder.samples.append((self._clock(), result))
            if result is None:
                recorder.errors += 1
            else:
                recorder.compared += 1
                recorder.agreed += result.agreed

    def record_shadow_dropped(self, route: str, variant: str) -> None:
        recorder = self._shadow(route, variant)
        with recorder.lock:
            recorder.dropped += 1

    def keys(self) -> list[tuple[str, str]]:
        """Every (route, variant) that has recorded something, sorted."""
        return sorted(set(self._recorders) | set(self._shadows))

    def window(self, route: str, variant: str, window_s: float | None = None) -> VariantWindow:
        """Figures over the last ``window_s`` seconds (default: the configured window)."""
        span = self.window_s if window_s is None else window_s
        since = self._clock() - int(span * 1e9)
        recorder = self._recorders.get((route, variant))
        rows: list[tuple[int, int, int, str]] = []
        if recorder is not None:
            with recorder.lock:
                rows = list(_recent(recorder.samples, since))
        codes: dict[str, int] = {}
        for _, _, _, code in rows:
            codes[code] = codes.get(code, 0) + 1
        errors = len(rows) - codes.get("OK", 0)
        return VariantWindow(
            route, variant, span, len(rows), errors, errors / len(rows) if rows else 0.0, codes,
            _summary([r[1] for r in rows]), _summary([r[2] for r in rows]),
            self._shadow_window(route, variant, since),
        )  # fmt: skip

    def cumulative(self, route: str, variant: str) -> VariantWindow:
        """Figures since the gateway started."""
        recorder = self._recorders.get((route, variant)) or _Recorder(1)
        with recorder.lock:
            codes = dict(recorder.codes)
            count = sum(codes.values())
            total = _fine_summary(list(recorder.fine_total), count, recorder.sum_total_ns)
            upstream = _fine_summary(list(recorder.fine_upstream), count, recorder.sum_upstream_ns)
        errors = count - codes.get("OK", 0)
        return VariantWindow(
            route, variant, None, count, errors, errors / count if count else 0.0, codes, total, upstream,
            self._shadow_window(route, variant, None),
        )  # fmt: skip

    def _shadow_window(self, route: str, variant: str, since: int | None) -> ShadowWindow | None:
        recorder = self._shadows.get((route, variant))
        if recorder is None:
            return None
        with recorder.lock:
            rows = list(recorder.samples if since is None else _recent(recorder.samples, since))
            dropped = recorder.dropped
        results = [r for _, r in rows if r is not None]
        total_rows = sum(r.rows for r in results)
        return ShadowWindow(
            compared=len(results),
            agreed=sum(1 for r in results if r.agreed),
            agreement=sum(r.agreed_rows for r in results) / total_rows if total_rows else 1.0,
            mean_cosine=sum(r.mean_cosine for r in results) / len(results) if results else 1.0,
            min_cosine=min((r.min_cosine for r in results), default=1.0),
            max_abs_error=max((r.max_abs_error for r in results), default=0.0),
            errors=len(rows) - len(results),
            dropped=dropped,
        )

    def prometheus_state(self) -> Iterator[tuple[tuple[str, str], _Recorder, _ShadowRecorder | None]]:
        for key in sorted(self._recorders):
            yield key, self._recorders[key], self._shadows.get(key)


def _recent(samples: Iterable[Any], since: int) -> Iterator[Any]:
    kept = []
    for sample in reversed(samples):  # type: ignore[call-overload]
        if sample[0] < since:
            break
        kept.append(sample)
    return reversed(kept)


class GatewayCollector(Collector):
    """Prometheus families from a ``GatewayMetrics`` (read at scrape time, nothing on the hot path)."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Any]:
        requests = CounterMetricFamily(
            "kiln_gateway_requests", "Requests by route, variant and gRPC status code",
            labels=["route", "variant", "code"],
        )  # fmt: skip
        total = HistogramMetricFamily(
            "kiln_gateway_request_seconds", "Time inside the gateway per request", labels=["route", "variant"]
        )
        upstream = HistogramMetricFamily(
            "kiln_gateway_upstream_seconds", "Time waiting for the upstream", labels=["route", "variant"]
        )
        for (route, variant), rec, _ in self._metrics.prometheus_state():
            with rec.lock:
                codes = dict(rec.codes)
                prom_total, prom_up = list(rec.prom_total), list(rec.prom_upstream)
                sums = (rec.sum_total_ns / 1e9, rec.sum_upstream_ns / 1e9)
            for code, n in sorted(codes.items()):
                requests.add_metric([route, variant, code], n)
            total.add_metric([route, variant], _cumulative_buckets(prom_total), sums[0])
            upstream.add_metric([route, variant], _cumulative_buckets(prom_up), sums[1])
        yield requests
        yield total
        yield upstream
        yield from self._shadow_families()

    def _shadow_families(self) -> Iterator[Any]:
        compared = CounterMetricFamily(
            "kiln_gateway_shadow_comparisons", "Shadow comparisons by result (agree, disagree, error)",
            labels=["route", "variant", "result"],
        )  # fmt: skip
        dropped = CounterMetricFamily(
            "kiln_gateway_shadow_dropped", "Shadow copies dropped at the in-flight cap", labels=["route", "variant"]
        )
        for route, variant in self._metrics.keys():
            recorder = self._metrics._shadows.get((route, variant))
            if recorder is None:
                continue
            with recorder.lock:
                figures = (recorder.agreed, recorder.compared - recorder.agreed, recorder.errors, recorder.dropped)
            for result, n in zip(("agree", "disagree", "error"), figures[:3], strict=True):
                compared.add_metric([route, variant, result], n)
            dropped.add_metric([route, variant], figures[3])
        yield compared
        yield dropped


def _cumulative_buckets(counts: list[int]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    running = 0
    for bound, n in zip((*PROM_BOUNDS_S, float("inf")), counts, strict=True):
        running += n
        out.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return out
