"""Tail latency is judged with its confidence bounds: a few stalls never fail a step, a real
regression does, and in between the step keeps collecting traffic (then ``on_insufficient``)."""

from __future__ import annotations

import math
import random

import pytest
from rich.console import Console

from core.quantiles import quantile_ranks
from server.cli.rollout_cmd import render_status
from server.gateway.metrics import GatewayMetrics
from server.rollout.analysis import Measurements, VariantWindow
from server.rollout.controller import _slo_rows
from server.rollout.machine import Phase, decide, start
from server.rollout.plan import RolloutPlan, plan_from_mapping
from server.rollout.sources import LocalMetricsSource, tail_from_buckets

MS = 1_000_000


class Clock:
    def __init__(self) -> None:
        self.ns = 1_000_000_000

    def __call__(self) -> int:
        return self.ns


def plan(**changes: object) -> RolloutPlan:
    data: dict[str, object] = {
        "route": "r",
        "baseline": "base",
        "candidate": {"name": "cand", "upstream": "u", "model": "m"},
        "steps": [10, 100],
        "interval_s": 10,
        "min_requests": 100,
        "max_wait_s": 30,
        "shadow": None,
        "sample_percent": 0,
        "slos": {"max_error_rate": 0.01, "max_p99_ratio": 1.5},
    }
    data.update(changes)
    return plan_from_mapping(data)


def window(base_ms: list[float], cand_ms: list[float]) -> Measurements:
    """Record the latencies into real gateway metrics and read them as the controller does."""
    clock = Clock()
    metrics = GatewayMetrics(clock=clock)
    for variant, values in (("base", base_ms), ("cand", cand_ms)):
        for value in values:
            metrics.record("r", variant, "OK", int(value * MS), int(value * MS))
    source = LocalMetricsSource(metrics, clock_ns=clock)
    source.mark("r")
    clock.ns += 1_000_000_000
    return source.read("r", "base", "cand")


def in_step(p: RolloutPlan) -> object:
    d = decide(start(p, 0.0).state, p, Measurements(), 0.0)
    assert d.state.phase is Phase.STEPPING
    return d.state


@pytest.mark.parametrize(
    ("n", "q", "expected"),
    [(100, 0.99, (97, None)), (367, 0.99, (359, None)), (1000, 0.99, (983, 997)), (0, 0.99, (None, None))],
)
def test_ranks_of_the_order_statistics(n: int, q: float, expected: tuple[int | None, int | None]) -> None:
    assert quantile_ranks(n, q) == expected


def test_bounds_cover_the_true_p99_as_often_as_promised() -> None:
    rng = random.Random(7)
    true_p99 = -math.log(0.01)  # exponential(1)
    misses = 0
    for _ in range(400):
        values = sorted(rng.expovariate(1.0) for _ in range(1000))
        low, high = quantile_ranks(1000)
        assert low is not None and high is not None
        misses += not values[low - 1] <= true_p99 <= values[high - 1]
    assert misses / 400 <= 0.05


def test_a_few_stalls_leave_the_step_undecided_not_failed() -> None:
    p = plan()
    base = [1.0 + 0.001 * i for i in range(1000)]
    cand = [1.0] * 97 + [50.0] * 3  # p99 = 50 ms = 50x the baseline, from three requests
    m = window(base, cand)
    assert m.candidate.p99_ms == pytest.approx(50.0)
    d = decide(in_step(p), p, m, 10.0)  # type: ignore[arg-type]
    assert d.state.phase is Phase.STEPPING and d.events[0].kind == "waiting"
    assert "p99_ratio" in d.events[0].message and "needs more requests" in d.events[0].message


def test_a_real_regression_fails_on_the_same_traffic() -> None:
    p = plan()
    base = [1.0 + 0.001 * i for i in range(1000)]
    cand = [1.0] * 90 + [50.0] * 10  # one request in ten is slow: the lower bound itself is 50 ms
    d = decide(in_step(p), p, window(base, cand), 10.0)  # type: ignore[arg-type]
    assert d.state.phase is Phase.ROLLED_BACK and "p99_ratio 25.1" in d.state.reason


def test_undecided_until_the_wait_limit_then_on_insufficient_applies() -> None:
    p = plan(on_insufficient="pause")
    m = window([1.0] * 1000, [1.0] * 97 + [50.0] * 3)
    state = in_step(p)
    assert decide(state, p, m, 20.0).state.phase is Phase.STEPPING  # type: ignore[arg-type]
    d = decide(state, p, m, 31.0)  # type: ignore[arg-type]
    assert d.state.phase is Phase.PAUSED and "p99_ratio" in d.state.reason


def test_a_small_baseline_reads_its_largest_request_as_the_upper_bound() -> None:
    # 200 baseline requests cannot bound its p99 from above: its largest (1.2 ms) stands in
    p = plan()
    base = [1.0] * 199 + [1.2]
    assert window(base, []).baseline.p99_bounds_ms == (1.0, 1.2)
    assert decide(in_step(p), p, window(base, [10.0] * 100), 10.0).state.phase is Phase.ROLLED_BACK  # type: ignore[arg-type]
    d = decide(in_step(p), p, window([*base[:-1], 8.0], [10.0] * 100), 10.0)  # type: ignore[arg-type]
    assert d.state.phase is Phase.STEPPING and "baseline p99 <= 8 ms" in d.events[0].message


def test_hand_built_windows_without_bounds_are_taken_as_exact() -> None:
    p = plan()
    m = Measurements(VariantWindow(1000, 0, 10.0), VariantWindow(100, 0, 16.0))
    assert decide(in_step(p), p, m, 10.0).state.phase is Phase.ROLLED_BACK  # type: ignore[arg-type]


def test_absolute_ceiling_and_streams_use_the_bounds_too() -> None:
    p = plan(slos={"max_p99_ratio": 100, "max_p99_ms": 20, "max_ttft_p99_ms": 20})
    stall = window([1.0] * 1000, [1.0] * 97 + [50.0] * 3)
    d = decide(in_step(p), p, stall, 10.0)  # type: ignore[arg-type]
    assert d.state.phase is Phase.STEPPING and "p99_ms" in d.events[0].message
    streamed = Measurements(
        VariantWindow(1000, 0, 1.0, p99_bounds_ms=(1.0, 1.0)),
        VariantWindow(100, 0, 1.0, ttft_p99_ms=50.0, p99_bounds_ms=(1.0, 1.0), ttft_p99_bounds_ms=(30.0, math.inf)),
    )
    d = decide(in_step(p), p, streamed, 10.0)  # type: ignore[arg-type]
    assert d.state.phase is Phase.ROLLED_BACK and "ttft_p99_ms 50" in d.state.reason


def test_the_reference_at_100_percent_keeps_its_upper_bound() -> None:
    p = plan()
    step1 = window([1.0 + 0.001 * i for i in range(1000)], [1.0] * 100)
    d = decide(in_step(p), p, step1, 10.0)  # type: ignore[arg-type]
    assert d.state.step == 1 and d.state.baseline_p99_high_ms == pytest.approx(1.996)
    slow = window([], [3.0] * 200)  # 100 %: 3 ms against the previous step's baseline (<= 2 ms)
    assert decide(d.state, p, slow, 21.0).state.phase is Phase.ROLLED_BACK


def test_prometheus_buckets_give_the_p99_and_its_bounds() -> None:
    point, (low, high) = tail_from_buckets([(0.001, 0.0), (0.005, 1000.0), (math.inf, 1000.0)])  # type: ignore[misc]
    assert point == pytest.approx(0.00496)
    assert (low, high) == (pytest.approx(0.001 + 0.004 * 0.983), pytest.approx(0.001 + 0.004 * 0.997))
    point, (low, high) = tail_from_buckets([(0.01, 95.0), (math.inf, 100.0)])  # type: ignore[misc]
    assert point == 0.01 and high == math.inf and low <= 0.01
    point, (low, high) = tail_from_buckets([(0.01, 95.0), (0.02, 100.0), (math.inf, 100.0)])  # type: ignore[misc]
    assert high == 0.02  # 100 requests cannot bound it: the top of the highest occupied bucket stands in
    assert tail_from_buckets([(0.01, 0.0), (math.inf, 0.0)]) is None


def test_status_shows_an_unconfirmed_tail() -> None:
    p = plan()
    state = in_step(p)
    m = window([1.0] * 1000, [1.0] * 97 + [50.0] * 3)
    rows = _slo_rows(p, state, m)  # type: ignore[arg-type]
    assert next(r for r in rows if r["name"] == "p99_ratio")["undecided"]
    status = {"route": "r", "phase": "stepping", "step": 0, "version": 1, "weights": {}, "slos": rows}
    console = Console(width=120, record=True)
    console.print(render_status(status))
    assert "unconfirmed" in console.export_text()
