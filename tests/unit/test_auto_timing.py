"""``--precision auto`` times each candidate for a bounded time: long rounds get fewer of them."""

from __future__ import annotations

import time

import numpy as np
import pytest

import builders.auto as auto
from builders.examples import example_model_path
from builders.validate import make_runner


class _SlowRunner:
    """A model that takes ``seconds`` per run (standing in for a large encoder at batch 32)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.runs = 0

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.runs += 1
        time.sleep(self.seconds)
        return {}

    def close(self) -> None:
        pass


def test_slow_rounds_are_fewer_but_never_below_the_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auto, "TIMING_SECONDS", 0.6)
    pair = {"reference": _SlowRunner(0.05), "candidate": _SlowRunner(0.05)}
    assert auto._rounds(pair, {}, 30) == 8  # 0.6 s / 0.1 s a round = 6, raised to MIN_ROUNDS
    assert all(r.runs == 2 for r in pair.values())  # one warm-up and one timed round each
    monkeypatch.setattr(auto, "TIMING_SECONDS", 1.5)
    assert 10 <= auto._rounds(pair, {}, 30) <= 15  # ~1.5 s / 0.1 s
    assert auto._rounds(pair, {}, 5) == 5  # never more than --repeats asks, nor a floor above it


def test_a_fast_model_keeps_every_requested_round() -> None:
    runner = make_runner(example_model_path())
    try:
        feed = {"input": np.zeros((1, 1, 8, 8), np.float32)}
        assert auto._rounds({"reference": runner, "candidate": runner}, feed, 30) == 30
    finally:
        runner.close()
