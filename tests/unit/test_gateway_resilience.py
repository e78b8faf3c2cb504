"""Outlier ejection: growing interval, recovery, decay."""

from __future__ import annotations

from server.gateway.resilience import OutlierDetector


class Clock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1e9)


def test_ejection_interval_grows_and_recovers() -> None:
    clock = Clock()
    detector = OutlierDetector(["a", "b"], failures_to_eject=1, base_ejection_s=1, max_ejection_s=4, clock=clock)
    assert detector.record_failure("a", "connection refused")
    assert detector.is_ejected("a") and not detector.is_ejected("b") and detector.any_ejected
    clock.advance(1.01)
    assert not detector.is_ejected("a")
    assert detector.record_failure("a", "again")  # second ejection: 2 s
    clock.advance(1.5)
    assert detector.is_ejected("a")
    clock.advance(0.6)
    assert detector.record_failure("a", "third")  # 4 s (capped)
    health = {h.upstream: h for h in detector.health()}
    assert health["a"].ejections == 3 and 3.9 < health["a"].ejected_for_s <= 4.0
    assert health["a"].last_error == "third"
    clock.advance(4.1)
    assert detector.ejected_set() == frozenset() and not detector.any_ejected


def test_failures_while_ejected_do_not_extend_and_threshold_counts() -> None:
    clock = Clock()
    detector = OutlierDetector(["a"], failures_to_eject=2, base_ejection_s=1, clock=clock)
    assert not detector.record_failure("a", "1")
    detector.record_success("a")  # resets the consecutive count
    assert not detector.record_failure("a", "1")
    assert detector.record_failure("a", "2")
    assert not detector.record_failure("a", "while ejected")
    assert detector.health()[0].ejections == 1


def test_streak_decays_after_a_quiet_period() -> None:
    clock = Clock()
    detector = OutlierDetector(["a"], base_ejection_s=1, max_ejection_s=2, clock=clock)
    detector.record_failure("a", "x")
    clock.advance(1.1)
    detector.record_failure("a", "x")  # streak 2 -> 2 s
    clock.advance(10)
    detector.record_success("a")  # quiet for longer than max: streak resets
    detector.record_failure("a", "x")
    clock.advance(1.1)
    assert not detector.is_ejected("a")  # back to the base 1 s
