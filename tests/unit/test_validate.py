"""Validation metrics, the gate decision and its message, latency measurement."""

from __future__ import annotations

import numpy as np
import pytest

from builders.validate import (
    GateSettings,
    Validation,
    check_gate,
    choose_fastest,
    compare,
    measure_latency,
    metric_drop,
)
from core.errors import AccuracyGateError, InvalidInputError


def _validation(drop: float, metrics: dict[str, float]) -> Validation:
    return Validation("accuracy", 0.01, drop, metrics, {}, 100, "ab" * 32)


def test_compare_reports_agreement_cosine_errors_and_accuracy() -> None:
    ref = [np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([[3.0, 1.0]])]
    cand = [np.array([[1.0, 0.0], [1.0, 0.5]]), np.array([[3.0, 1.0]])]
    m = compare(ref, cand, [np.array([0, 1]), np.array([0])])
    assert m["top1_agreement"] == pytest.approx(2 / 3)
    assert m["max_abs_error"] == pytest.approx(1.5) and m["mse"] == pytest.approx((1 + 2.25) / 6)
    assert m["accuracy_reference"] == 1.0 and m["accuracy_candidate"] == pytest.approx(2 / 3)
    assert 0 < m["cosine"] < 1
    assert metric_drop(m, "accuracy") == pytest.approx(1 / 3)
    assert metric_drop(m, "top1") == pytest.approx(1 / 3)


def test_gate_refuses_over_budget_saying_by_how_much_and_what_to_try() -> None:
    over = _validation(0.035, {"accuracy_reference": 0.98, "accuracy_candidate": 0.945})
    with pytest.raises(AccuracyGateError) as info:
        check_gate(over, "int8", "entropy")
    text = str(info.value)
    assert "over the 0.0100 budget by 0.0250" in text and "0.9800 -> 0.9450" in text
    assert "--precision auto" in text and "--calib-method percentile" in text and "nothing was published" in text
    check_gate(_validation(0.01, {"accuracy_reference": 0.98, "accuracy_candidate": 0.97}), "int8", "entropy")


def test_accuracy_metric_needs_labels() -> None:
    assert GateSettings().resolved_metric(has_labels=False) == "top1"
    with pytest.raises(InvalidInputError, match="needs labels"):
        GateSettings(metric="accuracy").resolved_metric(has_labels=False)


class _Clock:
    """A fake runner: records the order in which runners run."""

    output_names = ("y",)

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def run(self, _inputs: object) -> dict:
        self.log.append(self.name)
        return {}

    def close(self) -> None:
        return None


def test_latency_interleaves_sessions_in_alternating_order() -> None:
    log: list[str] = []
    sessions = {"a": _Clock("a", log), "b": _Clock("b", log)}
    result = measure_latency(sessions, {"1": {}}, repeats=4, min_seconds=0.0)
    assert log == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then ABBA
    assert set(result["1"]) == {"a", "b"}


def _timed(speedup_max: float, passed: bool = True) -> Validation:
    latency = {"1": {"speedup": 1.0}, "32": {"speedup": speedup_max}}
    return Validation("cosine", 0.01, 0.0 if passed else 0.5, {}, latency, 10, "ab" * 32)


def test_choose_fastest_takes_the_fastest_within_budget_and_the_safest_among_ties() -> None:
    assert choose_fastest([_timed(2.0, passed=False), _timed(1.7), _timed(1.2), _timed(1.0)]) == 1
    assert choose_fastest([_timed(1.75), _timed(1.70), _timed(1.0)]) == 1  # 1.70 is 2.9 % off: a tie, the later wins
    assert choose_fastest([_timed(1.80), _timed(1.70), _timed(1.0)]) == 0  # 5.6 % faster: not a tie
    assert choose_fastest([_timed(1.001), _timed(0.996)]) == 1  # FP16 noise over FP32: FP32 kept
    assert choose_fastest([_timed(3.0, passed=False), _timed(2.0, passed=False)]) == 1  # none passes: the last
