"""Bench results: one ``LoadPoint`` per load level, percentiles, JSON and CSV forms."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 50.0),
    ("p90", 90.0),
    ("p95", 95.0),
    ("p99", 99.0),
    ("p99.9", 99.9),
)


@dataclass(frozen=True)
class LoadPoint:
    """What one load level measured (warm-up excluded)."""

    mode: str  # "concurrency" (closed loop) or "rate" (open loop, Poisson arrivals)
    load: float  # requests in flight, or offered requests per second
    ok: int
    errors: dict[str, int]  # gRPC status code name -> count
    duration_s: float
    throughput_rps: float  # successful requests per second
    latency_us: dict[str, float]  # p50 ... p99.9, max, mean of successful requests
    send_lag_us_p50: float = 0.0  # open loop: lateness of sends vs their schedule (client timers)
    send_lag_us_max: float = 0.0
    send_lag_us_p99: float = 0.0
    sent_rps: float = 0.0  # open loop: the rate the client kept (offered rate x schedule covered / time it took)
    loop_lag_us_p50: float = 0.0  # closed loop: how late the client's event loop woke up (its own load)
    loop_lag_us_p99: float = 0.0
    stopped_early: str = ""  # why the level stopped before its time (a StopRule fired), "" if it ran out
    variants: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> ok count and latencies
    error_examples: dict[str, str] = field(default_factory=dict)  # status code -> first message seen

    @property
    def total(self) -> int:
        return self.ok + sum(self.errors.values())


@dataclass(frozen=True)
class StopRule:
    """Stop a level once it has certainly broken the SLO: more than ``max_slow`` requests slower than
    ``slow_ns`` (answered, or still waiting that long), or more than ``max_errors`` errors."""

    slow_ns: int
    max_slow: int
    max_errors: int


@dataclass(frozen=True)
class BenchResult:
    url: str
    model: str
    version: str
    batch: int
    points: tuple[LoadPoint, ...]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def first(self) -> LoadPoint:
        return self.points[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "model": self.model,
            "version": self.version,
            "batch": self.batch,
            "settings": self.settings,
            "points": [asdict(p) for p in self.points],
        }

    def to_csv(self) -> str:
        out = io.StringIO()
        names = [name for name, _ in PERCENTILES] + ["max", "mean"]
        writer = csv.writer(out)
        writer.writerow(["mode", "load", "ok", "errors", "duration_s", "throughput_rps", *[f"{n}_us" for n in names]])
        for p in self.points:
            errors = ";".join(f"{k}={v}" for k, v in sorted(p.errors.items()))
            writer.writerow(
                [p.mode, p.load, p.ok, errors, f"{p.duration_s:.3f}", f"{p.throughput_rps:.1f}"]
                + [f"{p.latency_us.get(n, float('nan')):.1f}" for n in names]
            )
        return out.getvalue()


def summarize(latencies_ns: list[int]) -> dict[str, float]:
    """Percentiles, max and mean in microseconds (NaN when nothing succeeded)."""
    if not latencies_ns:
        return {name: float("nan") for name in [n for n, _ in PERCENTILES] + ["max", "mean"]}
    values = np.asarray(latencies_ns, dtype=np.float64) / 1e3
    result = {name: float(np.percentile(values, q)) for name, q in PERCENTILES}
    result["max"] = float(values.max())
    result["mean"] = float(values.mean())
    return result


def make_point(
    mode: str,
    load: float,
    latencies_ns: list[int],
    errors: dict[str, int],
    duration_ns: int,
    send_lags_ns: list[int] | None = None,
    by_variant: dict[str, list[int]] | None = None,
    *,
    sent_rps: float = 0.0,
    loop_lags_ns: list[int] | None = None,
    stopped_early: str = "",
) -> LoadPoint:
    duration_s = max(duration_ns, 1) / 1e9
    return LoadPoint(
        mode=mode,
        load=load,
        ok=len(latencies_ns),
        errors=dict(sorted(errors.items())),
        duration_s=duration_s,
        throughput_rps=len(latencies_ns) / duration_s,
        latency_us=summarize(latencies_ns),
        send_lag_us_p50=float(np.percentile(send_lags_ns, 50)) / 1e3 if send_lags_ns else 0.0,
        send_lag_us_max=max(send_lags_ns) / 1e3 if send_lags_ns else 0.0,
        send_lag_us_p99=float(np.percentile(send_lags_ns, 99)) / 1e3 if send_lags_ns else 0.0,
        sent_rps=sent_rps,
        loop_lag_us_p50=float(np.percentile(loop_lags_ns, 50)) / 1e3 if loop_lags_ns else 0.0,
        loop_lag_us_p99=float(np.percentile(loop_lags_ns, 99)) / 1e3 if loop_lags_ns else 0.0,
        stopped_early=stopped_early,
        variants={
            name: {"ok": float(len(values)), **summarize(values)} for name, values in sorted((by_variant or {}).items())
        },
    )
