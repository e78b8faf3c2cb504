"""Windows and cumulative figures, and the Prometheus export."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from server.gateway.metrics import GatewayCollector, GatewayMetrics, ShadowResult


def test_window_percentiles_counts_and_error_rate() -> None:
    metrics = GatewayMetrics(window_s=60)
    for ms in range(1, 101):  # 1..100 ms
        metrics.record("r", "a", "OK", ms * 1_000_000 - 100_000, ms * 1_000_000)
    for _ in range(25):
        metrics.record("r", "a", "UNAVAILABLE", 1_000_000, 1_000_000)
    window = metrics.window("r", "a")
    assert (window.requests, window.errors, window.codes["UNAVAILABLE"]) == (125, 25, 25)
    assert window.error_rate == pytest.approx(0.2)
    assert window.total.p99_ms == pytest.approx(99.0)
    assert window.p99_ms == window.total.p99_ms
    assert window.upstream.p99_ms == pytest.approx(98.9)


class FakeClock:
    """Monotonic nanoseconds moved by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000_000

    def __call__(self) -> int:
        return self.now


def test_window_forgets_old_samples_cumulative_keeps_them() -> None:
    clock = FakeClock()
    metrics = GatewayMetrics(window_s=60, clock=clock)
    metrics.record("r", "a", "OK", 1_000_000, 2_000_000)
    clock.now += 50_000_000  # 50 ms later
    assert metrics.window("r", "a", window_s=0.049).requests == 0
    assert metrics.window("r", "a", window_s=0.051).requests == 1
    assert metrics.window("r", "a").requests == 1
    cumulative = metrics.cumulative("r", "a")
    assert cumulative.window_s is None and cumulative.requests == 1
    assert cumulative.total.p50_ms == pytest.approx(2.0, rel=0.09)  # fine buckets: 8 % steps


def test_unknown_variant_gives_an_empty_window() -> None:
    window = GatewayMetrics().window("r", "nothing")
    assert (window.requests, window.error_rate, window.total.p99_ms, window.shadow) == (0, 0.0, 0.0, None)


def test_shadow_window() -> None:
    metrics = GatewayMetrics()
    metrics.record_shadow("r", "s", ShadowResult(4, 4, 0.99, 0.995, 0.01))
    metrics.record_shadow("r", "s", ShadowResult(4, 2, 0.5, 0.8, 3.0))
    metrics.record_shadow("r", "s", None)
    metrics.record_shadow_dropped("r", "s")
    shadow = metrics.window("r", "s").shadow
    assert shadow is not None
    assert (shadow.compared, shadow.agreed, shadow.errors, shadow.dropped) == (2, 1, 1, 1)
    assert shadow.agreement == pytest.approx(6 / 8)
    assert shadow.max_abs_error == 3.0 and shadow.min_cosine == 0.5


def test_prometheus_export() -> None:
    metrics = GatewayMetrics()
    metrics.record("digits", "fp32", "OK", 200_000, 300_000)
    metrics.record("digits", "fp32", "UNAVAILABLE", 1_000, 2_000)
    metrics.record_shadow("digits", "int8", ShadowResult(1, 0, 0.1, 0.1, 5.0))
    registry = CollectorRegistry()
    registry.register(GatewayCollector(metrics))
    text = generate_latest(registry).decode()
    assert 'kiln_gateway_requests_total{code="UNAVAILABLE",route="digits",variant="fp32"} 1.0' in text
    assert 'kiln_gateway_request_seconds_bucket{le="0.0005",route="digits",variant="fp32"} 2.0' in text
    assert 'kiln_gateway_upstream_seconds_count{route="digits",variant="fp32"} 2.0' in text
    assert 'kiln_gateway_shadow_comparisons_total{result="disagree",route="digits",variant="int8"} 1.0' in text
