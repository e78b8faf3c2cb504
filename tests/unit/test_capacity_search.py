"""The capacity search against simulated endpoints whose true knee is known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.errors import InvalidInputError
from server.bench.capacity import (
    Run,
    SearchSettings,
    Slo,
    Step,
    find_capacity,
    judge,
    level_duration,
    next_step,
)
from server.bench.stats import LoadPoint, make_point

SLO = Slo(p99_ms=50.0)


def mm1(step: Step, mu: float = 1000.0) -> LoadPoint:
    assert step.load is not None
    return mm1_point(step.load, step.duration_s, mu, mode=step.mode)


def mm1_point(load: float, duration_s: float, mu: float = 1000.0, *, mode: str = "rate") -> LoadPoint:
    """An M/M/1 queue with service rate ``mu``: the p99 sojourn time is ln(100) / (mu - rate)."""
    rate = load if mode == "rate" else mu * load / (load + 1)  # closed loop: throughput saturates at mu
    if rate >= mu:
        p99_us, p50_us, ok_rps = 10e6, 5e6, mu
    else:
        p99_us, p50_us, ok_rps = math.log(100) / (mu - rate) * 1e6, math.log(2) / (mu - rate) * 1e6, rate
    ok = max(1, int(ok_rps * duration_s))
    latency = {
        "p50": p50_us,
        "p90": p99_us * 0.5,
        "p95": p99_us * 0.65,
        "p99": p99_us,
        "p99.9": p99_us * 1.5,
        "max": p99_us * 2,
        "mean": p50_us,
    }
    return LoadPoint(mode, load, ok, {}, duration_s, ok / duration_s, latency, sent_rps=load if mode == "rate" else 0)


def true_knee(mu: float, slo_ms: float) -> float:
    return mu - math.log(100) / (slo_ms / 1e3)


@pytest.mark.parametrize("mu", [200.0, 1000.0, 7000.0])
def test_rate_search_brackets_the_true_knee_within_precision(mu: float) -> None:
    settings = SearchSettings(mode="rate", start=10, max_load=50000, precision=0.05)
    seen: list[Run] = []
    result = find_capacity(lambda step: mm1(step, mu), SLO, settings, on_run=seen.append)
    knee = true_knee(mu, SLO.p99_ms)
    assert result.outcome == "found" and result.limited_by == "server" and result.capacity is not None
    assert result.failed_above is not None
    assert result.capacity <= knee < result.failed_above  # the knee lies inside the final bracket
    assert knee * 0.9 <= result.capacity  # within 10 % of it
    assert (result.knee_runs, result.knee_passes) == (1 + settings.repeats, 1 + settings.repeats)
    assert [r.phase for r in seen][-settings.repeats :] == ["confirm"] * settings.repeats
    assert len(seen) <= 16  # explore + bisect + confirm, far fewer than a fine sweep
    assert "capacity" in result.message and f"{result.capacity:g}" in result.message


def test_concurrency_search_finds_the_integer_knee() -> None:
    mu = 500.0
    settings = SearchSettings(mode="concurrency", start=1, max_load=1024)

    result = find_capacity(lambda step: mm1(step, mu), SLO, settings)
    assert result.outcome == "found" and result.capacity is not None and result.failed_above is not None
    assert result.capacity == int(result.capacity)
    # the highest integer concurrency whose throughput keeps p99 within the SLO
    within = [c for c in range(1, 1025) if mm1_point(c, 1, mu, mode="concurrency").latency_us["p99"] <= 50e3]
    best = max(within)
    assert result.capacity == best and result.failed_above == best + 1


def test_an_slo_no_level_meets_reports_the_lowest_level() -> None:
    settings = SearchSettings(start=50, probe_concurrency=0)
    result = find_capacity(lambda step: mm1(step, 1000.0), Slo(p99_ms=1.0), settings)
    assert result.outcome == "none" and result.capacity is None and not result.ok
    assert len(result.runs) == 1
    assert "no load level met the SLO" in result.message and "the lowest level, 50 requests/s" in result.message
    assert "had p99 4.85 ms" in result.message  # ln(100) / 950 s


def test_the_lowest_level_is_reported_by_its_failing_run() -> None:
    """The lowest level passed, then failed its confirmation: the message shows the failure."""
    calls: list[float] = []

    def measure(step: Step) -> LoadPoint:
        assert step.load is not None
        calls.append(step.load)
        slow = step.load > 10 or calls.count(10.0) > 1
        return mm1_point(step.load, step.duration_s, 10.5 if slow else 1000.0)

    result = find_capacity(measure, SLO, SearchSettings(start=10, probe_concurrency=0, repeats=1))
    assert result.outcome == "none" and [r.load for r in result.runs][-1] == 10
    assert "the lowest level, 10 requests/s, had p99 9210.34 ms" in result.message  # ln(100) / 0.5 s
    assert "p99 9210.34 ms > 50 ms" in result.message


def test_an_endpoint_failing_every_request() -> None:
    def failing(step: Step) -> LoadPoint:
        assert step.load is not None
        errors = {"UNAVAILABLE": int(step.load * step.duration_s)}
        point = make_point(step.mode, step.load, [], errors, int(step.duration_s * 1e9))
        return LoadPoint(**{**point.__dict__, "error_examples": {"UNAVAILABLE": "connection refused"}})

    result = find_capacity(failing, SLO, SearchSettings(start=20))
    assert [r.phase for r in result.runs] == ["probe", "explore"]  # the probe failed too: start at --start
    assert result.outcome == "none" and result.runs[1].load == 20 and result.runs[1].judgement.cause == "errors"
    assert "every request failed (UNAVAILABLE: connection refused)" in result.message
    assert "check the URL" in result.message


def test_errors_over_the_allowed_rate_fail_a_level_and_under_it_pass() -> None:
    point = make_point("rate", 100, [1_000_000] * 990, {"UNAVAILABLE": 10}, 10**10)
    settings = SearchSettings()
    assert not judge(point, Slo(50.0, 0.0), settings).meets
    assert judge(point, Slo(50.0, 0.0), settings).cause == "errors"
    assert judge(point, Slo(50.0, 0.02), settings).meets


def test_a_rate_the_client_cannot_send_is_the_clients_limit() -> None:
    """Beyond 3,000/s this simulated load generator falls behind its schedule."""

    def measure(step: Step) -> LoadPoint:
        point = mm1(step, mu=100000.0)
        if step.mode == "concurrency":
            return point
        load = point.load
        return LoadPoint(
            **{**point.__dict__, "sent_rps": min(load, 3000.0), "send_lag_us_p50": 0 if load <= 3000 else 40000.0}
        )

    result = find_capacity(measure, SLO, SearchSettings(start=100, max_load=50000, probe_concurrency=0))
    assert result.outcome == "found" and result.limited_by == "client"
    assert result.capacity is not None and 2800 <= result.capacity <= 3000
    assert "client's limit" in result.message
    failed = [r for r in result.runs if not r.judgement.meets]
    assert failed and all(r.judgement.cause == "client" for r in failed)
    assert "sent only" in failed[0].judgement.reason


def test_client_limit_at_the_first_level_says_so() -> None:
    point = LoadPoint("rate", 1e6, 5000, {}, 5.0, 1000.0, {"p99": 900.0, "p50": 500.0}, sent_rps=40000.0)
    result = find_capacity(lambda step: point, SLO, SearchSettings(start=1e6, max_load=1e6, probe_concurrency=0))
    assert result.outcome == "none" and result.limited_by == "client"
    assert "sent only 40000 requests/s of the 1e+06/s offered" in result.message
    assert "another machine" in result.message


def test_a_failed_confirmation_moves_the_boundary_down() -> None:
    """The first repeat of the final level fails: that level no longer counts, a lower one is confirmed."""
    counts: dict[float, int] = {}
    spoiled: list[float] = []

    def measure(step: Step) -> LoadPoint:
        assert step.load is not None
        load = step.load
        counts[load] = counts.get(load, 0) + 1
        point = mm1(step, 1000.0)
        if step.phase == "confirm" and not spoiled:
            spoiled.append(load)
            return LoadPoint(**{**point.__dict__, "latency_us": {**point.latency_us, "p99": 1e6}})
        return point

    result = find_capacity(measure, Slo(p99_ms=100.0), SearchSettings(start=100))
    assert result.outcome == "found" and result.capacity is not None and spoiled
    assert result.capacity < spoiled[0] and result.failed_above == spoiled[0]
    assert result.knee_passes == result.knee_runs == 3


def test_search_stops_at_max_load_and_says_capacity_is_at_least_that() -> None:
    settings = SearchSettings(start=100, max_load=1000, probe_concurrency=0)
    result = find_capacity(lambda step: mm1(step, 1e6), SLO, settings)
    assert result.outcome == "above-max" and result.capacity == 1000 and result.limited_by == "max-load"
    assert "raise --max-load" in result.message


def test_running_out_of_levels_gives_a_lower_bound_or_says_so() -> None:
    short = SearchSettings(start=10, probe_concurrency=0, max_levels=2)
    bound = find_capacity(lambda step: mm1(step, 1000.0), SLO, short)
    assert bound.outcome == "budget" and bound.capacity == 40 and bound.limited_by == "max-levels"
    assert "ran out of --max-levels (2): the capacity is at least that" in bound.message
    nothing = find_capacity(lambda step: mm1(step, 5.0), SLO, SearchSettings(start=10, max_levels=1))
    assert nothing.outcome == "none" and "stopped after 1 levels, --max-levels" in nothing.message


def test_level_duration_collects_enough_samples_within_bounds() -> None:
    settings = SearchSettings(min_samples=2000, min_duration_s=2, max_duration_s=15)
    assert level_duration(100, [], settings) == 15  # 20 s needed, capped
    assert level_duration(500, [], settings) == 4
    assert level_duration(5000, [], settings) == 2
    closed = SearchSettings(mode="concurrency", min_samples=1000, min_duration_s=1, max_duration_s=15)
    assert level_duration(4, [], closed) == 1
    run = Run(4, "explore", mm1_point(4, 1, 250.0, mode="concurrency"), judge(mm1_point(4, 1), SLO, closed))
    assert level_duration(4, [run], closed) == pytest.approx(1000 / run.point.throughput_rps)


def test_the_probe_sets_the_first_level_at_half_its_throughput() -> None:
    settings = SearchSettings(start=10, probe_concurrency=16, probe_s=1.0)
    first = next_step([], SLO, settings)
    assert (first.phase, first.mode, first.load, first.duration_s) == ("probe", "concurrency", 16, 1.0)
    probe = mm1(first, 1000.0)  # closed loop at 16: 941 requests/s
    step = next_step([Run(16, "probe", probe, judge(probe, SLO, settings))], SLO, settings)
    assert (step.phase, step.mode, step.load) == ("explore", "rate", 470)


def test_a_first_level_that_fails_leads_down_to_start() -> None:
    settings = SearchSettings(start=10, probe_concurrency=16)
    result = find_capacity(lambda step: mm1(step, 1000.0), Slo(p99_ms=5.0), settings)
    levels = [r for r in result.runs if r.phase != "probe"]
    assert levels[0].load == 470 and not levels[0].judgement.meets  # p99 8.7 ms
    assert levels[1].load == pytest.approx(470 / 4, abs=1)
    assert result.outcome == "found" and result.capacity is not None
    assert 0.9 * true_knee(1000.0, 5.0) <= result.capacity <= true_knee(1000.0, 5.0)
    none = find_capacity(lambda step: mm1(step, 1000.0), Slo(p99_ms=0.5), settings)
    assert none.outcome == "none" and min(r.load for r in none.runs if r.phase != "probe") == 10
    assert "the lowest level, 10 requests/s" in none.message


def test_a_level_that_has_certainly_failed_may_stop_early() -> None:
    settings = SearchSettings(start=100, probe_concurrency=0, min_duration_s=2, max_duration_s=2)
    step = next_step([], SLO, settings)
    assert step.stop is not None and step.stop.slow_ns == 50_000_000
    assert step.stop.max_slow == 5 and step.stop.max_errors == 5  # 1 % of 240 expected, at least 5
    point = mm1_point(100, 0.3)
    stopped = judge(LoadPoint(**{**point.__dict__, "stopped_early": "7 requests over 50 ms"}), SLO, settings)
    assert not stopped.meets and stopped.cause == "latency" and "stopped early: 7 requests" in stopped.reason
    assert next_step([], SLO, SearchSettings(stop_early=False, probe_concurrency=0)).stop is None


def test_bisection_interpolates_toward_the_knee() -> None:
    """1/p99 is linear in the rate for M/M/1: one interpolation lands within precision of the knee."""
    settings = SearchSettings(start=100, probe_concurrency=0, precision=0.05)
    runs = []
    for load in (250.0, 1000.0):
        point = mm1_point(load, 2, 1000.0)
        runs.append(Run(load, "explore", point, judge(point, SLO, settings)))
    step = next_step(runs, SLO, settings)
    knee = true_knee(1000.0, SLO.p99_ms)
    assert step.phase == "bisect" and step.load is not None
    assert abs(step.load - knee) <= 0.05 * knee
    assert step.load == float(f"{step.load:.3g}")  # levels keep three significant digits


def test_first_step_and_fast_growth_while_far_below_the_slo() -> None:
    settings = SearchSettings(start=10, growth=2, fast_growth=4, probe_concurrency=0)
    assert next_step([], SLO, settings).load == 10
    far = Run(10, "explore", mm1_point(10, 1), judge(mm1_point(10, 1), SLO, settings))
    assert next_step([far], SLO, settings).load == 40  # p99 4.7 ms < 50/4
    near = mm1_point(800, 1, 1000.0)  # p99 23 ms
    assert next_step([Run(800, "explore", near, judge(near, SLO, settings))], SLO, settings).load == 1600


@pytest.mark.parametrize(
    ("slo", "settings", "match"),
    [
        (Slo(p99_ms=0), SearchSettings(), "--slo-p99-ms must be a number > 0, got 0"),
        (Slo(p99_ms=float("nan")), SearchSettings(), "--slo-p99-ms"),
        (Slo(p99_ms=50, error_rate=1.5), SearchSettings(), r"--slo-error-rate must be a fraction in \[0, 1\), got 1.5"),
        (SLO, SearchSettings(start=0), "--start must be > 0"),
        (SLO, SearchSettings(mode="concurrency", start=0.5), "--start must be > 0"),
        (SLO, SearchSettings(start=100, max_load=10), "--max-load 10 must be >= --start 100"),
        (SLO, SearchSettings(precision=2), "--precision must be in"),
        (SLO, SearchSettings(mode="sideways"), "mode must be one of"),
    ],
)
def test_bad_settings_are_refused_with_the_value(slo: Slo, settings: SearchSettings, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        find_capacity(mm1, slo, settings)


def test_result_json_has_the_confidence_and_every_run() -> None:
    result = find_capacity(lambda step: mm1(step, 1000.0), SLO, SearchSettings(start=10))
    data = result.to_dict()
    assert data["capacity"] == result.capacity and data["outcome"] == "found"
    assert data["confidence"]["runs"] == 3 and len(data["confidence"]["p99_ms"]) == 3
    assert len(data["runs"]) == len(result.runs) and data["runs"][0]["phase"] == "probe"
    assert np.isfinite(data["confidence"]["p99_spread_ms"])
