"""Token timings per route and variant: TTFT and ITL windows (for rollouts) and Prometheus histograms.

Filled by ``server.gateway.streams.StreamMeter`` for every streamed request, and by the greedy
replays of the shadow phase (first divergence per replay). Read like ``GatewayMetrics``: exact
percentiles over a window from kept samples; cumulative Prometheus histograms
(``kiln_gateway_ttft_seconds``, ``kiln_gateway_itl_seconds``) at the admin ``/metrics``.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from server.gateway.metrics import PROM_BOUNDS_S, LatencySummary, _cumulative_buckets, _summary

_PROM_BOUNDS_NS = tuple(int(b * 1e9) for b in PROM_BOUNDS_S)


@dataclass(frozen=True)
class StreamWindow:
    """Token timing of one variant over a window: TTFT and ITL in milliseconds, first divergences."""

    requests: int
    tokens: int
    ttft: LatencySummary
    itl: LatencySummary
    replays: int  # greedy replays compared (shadow phase)
    exact: int  # of those, identical token sequences
    first_divergence: tuple[int, ...]  # positions where replays diverged (most recent last)


@dataclass
class _StreamRecorder:
    max_samples: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    samples: deque[tuple[int, int, int, int]] = field(init=False)  # (at, ttft_ns, itl_ns or -1, tokens)
    replays: deque[tuple[int, int | None]] = field(init=False)  # (at, first divergence or None)
    prom_ttft: list[int] = field(default_factory=lambda: [0] * (len(PROM_BOUNDS_S) + 1))
    prom_itl: list[int] = field(default_factory=lambda: [0] * (len(PROM_BOUNDS_S) + 1))
    sum_ttft_ns: int = 0
    sum_itl_ns: int = 0

    def __post_init__(self) -> None:
        self.samples = deque(maxlen=self.max_samples)
        self.replays = deque(maxlen=self.max_samples)


class StreamMetrics:
    """Per (route, variant) token timings; thread-safe, summaries computed when read."""

    def __init__(self, max_samples: int = 100_000) -> None:
        self._max_samples = max_samples
        self._recorders: dict[tuple[str, str], _StreamRecorder] = {}
        self._create = threading.Lock()

    def _recorder(self, route: str, variant: str) -> _StreamRecorder:
        recorder = self._recorders.get((route, variant))
        if recorder is None:
            with self._create:
                recorder = self._recorders.setdefault((route, variant), _StreamRecorder(self._max_samples))
        return recorder

    def record(self, route: str, variant: str, ttft_ns: int, itl_ns: int | None, tokens: int) -> None:
        recorder = self._recorder(route, variant)
        now = time.perf_counter_ns()
        with recorder.lock:
            recorder.samples.append((now, ttft_ns, -1 if itl_ns is None else itl_ns, tokens))
            recorder.prom_ttft[bisect.bisect_left(_PROM_BOUNDS_NS, ttft_ns)] += 1
            recorder.sum_ttft_ns += ttft_ns
            if itl_ns is not None:
                recorder.prom_itl[bisect.bisect_left(_PROM_BOUNDS_NS, itl_ns)] += 1
                recorder.sum_itl_ns += itl_ns

    def record_replay(self, route: str, variant: str, divergence: int | None) -> None:
        recorder = self._recorder(route, variant)
        with recorder.lock:
            recorder.replays.append((time.perf_counter_ns(), divergence))

    def window(self, route: str, variant: str, window_s: float | None) -> StreamWindow | None:
        """Figures over the last ``window_s`` seconds (None: since start); None when nothing streamed."""
        recorder = self._recorders.get((route, variant))
        if recorder is None:
            return None
        since = 0 if window_s is None else time.perf_counter_ns() - int(window_s * 1e9)
        with recorder.lock:
            rows = [s for s in recorder.samples if s[0] >= since]
            replays = [d for at, d in recorder.replays if at >= since]
        return StreamWindow(
            requests=len(rows),
            tokens=sum(r[3] for r in rows),
            ttft=_summary([r[1] for r in rows]),
            itl=_summary([r[2] for r in rows if r[2] >= 0]),
            replays=len(replays),
            exact=sum(1 for d in replays if d is None),
            first_divergence=tuple(d for d in replays if d is not None),
        )

    def families(self) -> Iterator[Any]:
        """Prometheus histograms of TTFT and ITL per route and variant."""
        ttft = HistogramMetricFamily(
            "kiln_gateway_ttft_seconds", "Time to first token of streamed requests", labels=["route", "variant"]
        )
        itl = HistogramMetricFamily(
            "kiln_gateway_itl_seconds", "Inter-token latency of streamed requests", labels=["route", "variant"]
        )
        for (route, variant), rec in sorted(self._recorders.items()):
            with rec.lock:
                buckets = (list(rec.prom_ttft), list(rec.prom_itl))
                sums = (rec.sum_ttft_ns / 1e9, rec.sum_itl_ns / 1e9)
            ttft.add_metric([route, variant], _cumulative_buckets(buckets[0]), sums[0])
            itl.add_metric([route, variant], _cumulative_buckets(buckets[1]), sums[1])
        yield ttft
        yield itl


class StreamCollector(Collector):
    """The stream histograms for a Prometheus registry (read at scrape time)."""

    def __init__(self, streams: StreamMetrics) -> None:
        self._streams = streams

    def collect(self) -> Iterator[Any]:
        yield from self._streams.families()
