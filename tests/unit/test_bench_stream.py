"""Stream bench arithmetic: GenAI-Perf's TTFT and ITL from per-request token times."""

from __future__ import annotations

from collections import Counter

import pytest

from core.errors import InvalidInputError
from server.bench.stream import StreamBenchConfig, StreamTiming, make_stream_point


def test_itl_is_the_gap_after_the_first_token_over_tokens_minus_one() -> None:
    ms = 1_000_000
    timings = [StreamTiming(10 * ms, 40 * ms, 4, "a"), StreamTiming(20 * ms, 20 * ms, 1, "b")]
    point = make_stream_point("concurrency", 1, timings, Counter({"UNAVAILABLE": 1}), {}, 2_000 * ms, [])
    assert timings[0].itl_ns == 10 * ms and timings[1].itl_ns == 0
    assert point.itl_ms["p50"] == pytest.approx(10.0)  # single-token requests have no ITL
    assert point.ttft_ms["p50"] == pytest.approx(15.0) and point.e2e_ms["p99"] > 39
    assert point.output_tokens_per_s == pytest.approx(2.5) and point.errors == {"UNAVAILABLE": 1}
    assert point.variants["a"]["ttft_ms"]["p50"] == pytest.approx(10.0) and point.variants["b"]["ok"] == 1
    assert point.tokens_per_s["p50"] == pytest.approx((100 + 50) / 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "--max-tokens must be >= 1"),
        ({"prompts": ()}, "at least one non-empty prompt"),
        ({"concurrency": (0,)}, "--concurrency values must be >= 1"),
        ({"rates": (-1.0,)}, "--rate values must be > 0"),
        ({"requests": 0}, "--requests must be >= 1"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        StreamBenchConfig(url="127.0.0.1:1", model="m", **kwargs).check()
