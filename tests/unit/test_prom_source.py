"""PromQL queries of the Prometheus metrics source and parsing of /api/v1/query answers."""

from __future__ import annotations

import pytest

from core.errors import UnavailableError
from server.rollout.sources import (
    measurements_from,
    parse_vector,
    promql_buckets,
    promql_requests,
    promql_shadow,
    range_of,
)


def vector(*rows: tuple[dict[str, str], str]) -> dict:
    return {
        "status": "success",
        "data": {"resultType": "vector", "result": [{"metric": m, "value": [1700000000.0, v]} for m, v in rows]},
    }


def test_query_strings() -> None:
    assert promql_requests("digits", ("fp32", "int8"), 29.2) == (
        'sum by (variant, code) (increase(kiln_gateway_requests_total{route="digits",variant=~"fp32|int8"}[30s]))'
    )
    assert promql_buckets("digits", ("fp32", "int8"), 10) == (
        'sum by (variant, le) (increase(kiln_gateway_request_seconds_bucket{route="digits",variant=~"fp32|int8"}[10s]))'
    )
    assert promql_shadow("digits", ("a", "b"), 0.2) == (
        'sum by (result) (increase(kiln_gateway_shadow_comparisons_total{route="digits",variant=~"a|b"}[1s]))'
    )


def test_label_values_are_escaped() -> None:
    query = promql_requests('we"ird\\', ("v1.2", "c-3"), 5)
    assert 'route="we\\"ird\\\\"' in query
    assert 'variant=~"v1\\\\.2|c\\\\-3"' in query
    assert range_of(0) == "1s" and range_of(60.0) == "60s"


def test_parse_vector_and_nan() -> None:
    rows = parse_vector(vector(({"variant": "a"}, "1.5"), ({"variant": "b"}, "NaN")))
    assert rows == [({"variant": "a"}, 1.5), ({"variant": "b"}, None)]


def test_parse_errors_say_what_failed() -> None:
    with pytest.raises(UnavailableError, match="bad_data: parse error"):
        parse_vector({"status": "error", "errorType": "bad_data", "error": "parse error"})
    with pytest.raises(UnavailableError, match="'matrix'"):
        parse_vector({"status": "success", "data": {"resultType": "matrix", "result": []}})


def test_measurements_from_three_answers() -> None:
    requests = parse_vector(
        vector(
            ({"variant": "fp32", "code": "OK"}, "950.2"),
            ({"variant": "fp32", "code": "UNAVAILABLE"}, "2"),
            ({"variant": "int8", "code": "OK"}, "97.9"),
            ({"variant": "int8", "code": "INVALID_ARGUMENT"}, "3"),
            ({"variant": "other", "code": "OK"}, "5"),
        )
    )
    buckets = parse_vector(
        vector(
            ({"variant": "fp32", "le": "0.001"}, "0"),
            ({"variant": "fp32", "le": "0.005"}, "954.2"),
            ({"variant": "fp32", "le": "+Inf"}, "954.2"),
            ({"variant": "int8", "le": "0.005"}, "90"),
            ({"variant": "int8", "le": "0.01"}, "100.9"),
            ({"variant": "int8", "le": "+Inf"}, "100.9"),
        )
    )
    shadow = parse_vector(
        vector(({"result": "agree"}, "48"), ({"result": "disagree"}, "2"), ({"result": "error"}, "1"))
    )
    m = measurements_from(requests, buckets, shadow, "fp32", "int8")
    assert (m.baseline.requests, m.baseline.errors) == (952, 2)
    assert (m.candidate.requests, m.candidate.errors) == (101, 3)
    # read like histogram_quantile: linear within the bucket holding rank 0.99 * count
    assert m.baseline.p99_ms == pytest.approx(1.0 + 4.0 * 0.99)
    assert m.candidate.p99_ms == pytest.approx(5.0 + 5.0 * (0.99 * 100.9 - 90) / 10.9)
    assert m.baseline.p99_bounds_ms is not None and m.baseline.p99_bounds_ms[1] < 5.0  # 954 requests bound it
    assert m.candidate.p99_bounds_ms is not None and m.candidate.p99_bounds_ms[1] == pytest.approx(10.0)
    assert (m.compared, m.agreed, m.shadow_errors) == (50, 48, 1)


def test_no_traffic_means_no_p99() -> None:
    m = measurements_from([], parse_vector(vector(({"variant": "int8"}, "NaN"))), [], "fp32", "int8")
    assert m.candidate.requests == 0 and m.candidate.p99_ms is None and m.agreement is None


def test_stream_tails_come_from_the_ttft_and_itl_histograms() -> None:
    requests = parse_vector(
        vector(({"variant": "fp32", "code": "OK"}, "400"), ({"variant": "int8", "code": "OK"}, "400"))
    )
    latency = parse_vector(
        vector(*(({"variant": v, "le": le}, n) for v in ("fp32", "int8") for le, n in (("0.5", "0"), ("1", "400"))))
    )
    ttft = parse_vector(
        vector(
            ({"variant": "fp32", "le": "0.1"}, "400"),
            ({"variant": "int8", "le": "0.1"}, "0"),
            ({"variant": "int8", "le": "0.25"}, "400"),
            ({"variant": "int8", "le": "+Inf"}, "400"),
        )
    )
    m = measurements_from(requests, latency, [], "fp32", "int8", ttft, [])
    assert m.baseline.ttft_p99_ms == pytest.approx(99.0) and m.candidate.ttft_p99_ms == pytest.approx(100 + 150 * 0.99)
    assert m.candidate.ttft_p99_bounds_ms is not None and m.candidate.ttft_p99_bounds_ms[1] == pytest.approx(250.0)
    assert m.candidate.itl_p99_ms is None
