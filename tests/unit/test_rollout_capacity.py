"""A rollout's capacity check: recorded capacities compared on equal terms, and the plan refusal."""

from __future__ import annotations

from typing import Any

import pytest

from core.errors import InvalidInputError
from server.rollout.capacity import check_capacity, compare_capacity, describe_comparison
from server.rollout.machine import start
from server.rollout.plan import CapacityFigures, plan_from_mapping


def entry(capacity: float, *, p99: float = 50.0, batch: int = 1, hw: str = "cpu-a", mode: str = "rate",
          measured: str = "2026-12-01T10:00:00+00:00", lower_bound: bool = False) -> dict[str, Any]:  # fmt: skip
    return {
        "mode": mode, "capacity": capacity, "unit": "requests/s", "slo": {"p99_ms": p99, "error_rate": 0.01},
        "batch": {"request_batch": batch}, "hardware": {"label": hw}, "lower_bound": lower_bound,
        "measured": measured, "endpoint": {"variant": "whatever"},
    }  # fmt: skip


NAMES = ("digits-fp32-ort:1", "digits-int8-ort:1")


def test_same_conditions_compare() -> None:
    figures = compare_capacity([entry(400.0)], [entry(520.0)], names=NAMES)
    assert figures.ratio == pytest.approx(1.3) and figures.unit == "requests/s"
    assert "p99 <= 50 ms" in figures.conditions and "1.3x" in describe_comparison(figures)


def test_only_matching_conditions_compare_and_the_newest_pair_counts() -> None:
    baseline = [entry(400.0, measured="2026-11-01T00:00:00+00:00"), entry(410.0, measured="2026-11-20T00:00:00+00:00"),
                entry(900.0, batch=8)]  # fmt: skip
    candidate = [entry(300.0, hw="gpu-b"), entry(451.0, measured="2026-11-21T00:00:00+00:00")]
    figures = compare_capacity(baseline, candidate, names=NAMES)
    assert (figures.baseline, figures.candidate) == (410.0, 451.0)


@pytest.mark.parametrize(
    ("baseline", "candidate", "says"),
    [
        ([], [entry(1.0)], "no capacity recorded for digits-fp32-ort:1"),
        ([entry(1.0)], [entry(1.0, p99=20.0)], "different conditions"),
        ([entry(1.0)], [entry(1.0, lower_bound=True)], "load generator, not the server, limited digits-int8-ort:1"),
    ],
)
def test_what_does_not_compare_says_why(baseline: list, candidate: list, says: str) -> None:
    figures = compare_capacity(baseline, candidate, names=NAMES)
    assert figures.ratio is None and says in figures.note


def test_min_capacity_ratio_refusals() -> None:
    good = compare_capacity([entry(400.0)], [entry(380.0)], names=NAMES)
    assert check_capacity(good, None) is None and check_capacity(good, 0.9) is None
    assert "0.95x the baseline's recorded capacity" in (check_capacity(good, 1.0) or "")
    assert "kiln rollout start --repo" in (check_capacity(None, 1.0) or "")
    missing = compare_capacity([], [], names=NAMES)
    assert "cannot be checked: no capacity recorded" in (check_capacity(missing, 1.0) or "")


def test_the_started_event_carries_the_comparison() -> None:
    figures = compare_capacity([entry(400.0)], [entry(520.0)], names=NAMES)
    plan = plan_from_mapping({
        "route": "digits", "baseline": "fp32", "candidate": {"name": "int8", "upstream": "u", "model": "m"},
        "slos": {"min_capacity_ratio": 1.0}, "capacity": figures.model_dump(mode="json"),
    })  # fmt: skip
    assert isinstance(plan.capacity, CapacityFigures) and plan.slos.min_capacity_ratio == 1.0
    event = start(plan, 0.0).events[0]
    assert "capacity: candidate 520 vs baseline 400 requests/s (1.3x)" in event.message
    assert event.figures["capacity"]["ratio"] == pytest.approx(1.3)


@pytest.mark.parametrize("bad", [0, -1])
def test_a_non_positive_min_capacity_ratio_is_refused_naming_the_field(bad: float) -> None:
    with pytest.raises(InvalidInputError, match="min_capacity_ratio"):
        plan_from_mapping({
            "route": "digits", "baseline": "fp32", "candidate": {"name": "int8", "upstream": "u", "model": "m"},
            "slos": {"min_capacity_ratio": bad},
        })  # fmt: skip
