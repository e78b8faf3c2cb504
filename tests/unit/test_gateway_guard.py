"""Pure parts of the gateway's limits and access rules: admission, quiet log, credentials, config."""

from __future__ import annotations

import logging

import grpc
import pytest

from core.errors import InvalidInputError
from server.gateway.config import parse_config
from server.gateway.control import RpcAbort, bearer_token, control_upstream, is_admin, shown
from server.gateway.guard import Admission, QuietLog


def test_admission_refuses_at_once_and_frees_slots() -> None:
    gate = Admission(requests=3, streams=1)
    gate.enter(stream=True)
    with pytest.raises(RpcAbort) as caught:
        gate.enter(stream=True)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "server.max_streams" in caught.value.details
    gate.enter()
    gate.enter()
    with pytest.raises(RpcAbort, match="server.threads"):
        gate.enter()
    gate.leave()
    gate.leave(stream=True)
    gate.enter(stream=True)
    assert (gate.requests, gate.streams, gate.refused) == (2, 1, 2)


def test_quiet_log_logs_once_per_interval_and_counts_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    quiet = QuietLog(logging.getLogger("test.quiet"), interval_s=10.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING)
    assert quiet.warning("bad-body", "bad body %s", 1)
    assert not any(quiet.warning("bad-body", "bad body %s", i) for i in range(500))
    assert quiet.warning("other", "another kind")
    now[0] = 11.0
    assert quiet.warning("bad-body", "bad body %s", 2)
    assert [r.getMessage() for r in caplog.records] == [
        "bad body 1", "another kind", "bad body 2 (500 more like it in the last 10 s)",
    ]  # fmt: skip


def test_bearer_and_admin() -> None:
    token = b"s3cret"
    assert bearer_token([("authorization", "Bearer s3cret")]) == "s3cret"
    assert bearer_token([("authorization", "Basic abc")]) == ""
    assert bearer_token([("x", "y")]) is None
    assert is_admin([("authorization", "bearer s3cret")], token)
    assert not is_admin([("authorization", "Bearer s3cret")], None)  # no token configured: nobody is admin
    assert not is_admin([("authorization", "Bearer s3cre")], token)


def test_control_upstream_rules() -> None:
    config = parse_config({"upstreams": {"a": {"address": "h:1", "control_rpcs": ["RepositoryIndex"]},
                                         "b": {"address": "h:2"}}})  # fmt: skip
    admin = [("authorization", "Bearer t")]
    assert control_upstream("RepositoryIndex", admin, config.upstreams, "a", b"t") == "a"
    cases = [
        (("RepositoryIndex", admin, None), grpc.StatusCode.UNIMPLEMENTED),
        (("RepositoryIndex", [*admin, ("kiln-upstream", "b")], "a"), grpc.StatusCode.PERMISSION_DENIED),
        (("RepositoryModelUnload", admin, "a"), grpc.StatusCode.PERMISSION_DENIED),
        (("RepositoryIndex", [], "a"), grpc.StatusCode.UNAUTHENTICATED),
        (("RepositoryIndex", [("kiln-upstream", "z" * 500)], "a"), grpc.StatusCode.NOT_FOUND),
    ]
    for (method, metadata, default), code in cases:
        with pytest.raises(RpcAbort) as caught:
            control_upstream(method, metadata, config.upstreams, default, b"t")
        assert caught.value.code == code, (method, caught.value.details)
        assert len(caught.value.details) < 400


def test_shown_cuts_long_values() -> None:
    assert shown("digits") == "'digits'"
    assert shown("d" * 5000) == repr("d" * 60) + "... (5000 characters)"


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ({"max_streams": 64, "threads": 32}, "max_streams 64 exceeds threads 32"),
        ({"stream_idle_timeout_s": 0}, "greater than 0"),
        ({"upstream_timeout_s": float("nan")}, "finite number"),
        ({"max_message_bytes": 2**31}, "less than or equal to"),
    ],
)
def test_server_limits_are_validated(server: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        parse_config({"upstreams": {"u": {"address": "h:1"}}, "server": server})


def test_defaults_match_kiln_serve_and_weights_refuse_booleans() -> None:
    from server.app import DEFAULT_MAX_MESSAGE_MB

    config = parse_config({"upstreams": {"u": {"address": "h:1"}}})
    assert config.server.max_message_bytes == DEFAULT_MAX_MESSAGE_MB * 2**20
    route = {"variants": [{"name": "a", "upstream": "u", "model": "m", "weight": True}]}
    with pytest.raises(InvalidInputError, match="valid number"):
        parse_config({"upstreams": {"u": {"address": "h:1"}}, "routes": {"r": route}})


def test_prober_readmits_an_ejected_upstream_that_answers_ready() -> None:
    from tritonclient.grpc import service_pb2

    from server.gateway.resilience import OutlierDetector, ReadinessProber

    detector = OutlierDetector(["a", "b"], base_ejection_s=30, max_ejection_s=60)
    answers = {"a": service_pb2.ServerReadyResponse(ready=True).SerializeToString()}

    def ready_call(upstream: str):  # type: ignore[no-untyped-def]
        def call(request: bytes, timeout: float) -> bytes:
            if upstream not in answers:
                raise ConnectionRefusedError(upstream)
            return answers[upstream]

        return call

    prober = ReadinessProber(detector, ready_call, interval_s=3600)  # driven by hand below
    try:
        detector.record_failure("a", "refused")
        detector.record_failure("b", "refused")
        assert detector.ejected_set() == {"a", "b"}
        assert prober.probe("a") and not prober.probe("b")
        assert detector.ejected_set() == {"b"}
        answers["b"] = service_pb2.ServerReadyResponse(ready=False).SerializeToString()
        assert not prober.probe("b") and detector.is_ejected("b")  # up but not ready: stays out
    finally:
        prober.stop()


def test_envoy_routes_health_and_control_rpcs_to_kiln_first() -> None:
    from server.gateway.config import CONTROL_METHODS
    from server.gateway.envoy.render import LOCAL_CLUSTER, PREFIX, render_route_config

    route = {"variants": [{"name": "a", "upstream": "u", "model": "m", "weight": 100}]}
    config = parse_config({"upstreams": {"u": {"address": "h:1"}}, "default_upstream": "u", "routes": {"d": route}})
    entries = render_route_config(config, config.routes)["virtual_hosts"][0]["routes"]
    names = [e["name"] for e in entries]
    control = [e for e in entries if e["name"].startswith("control:")]
    assert entries[0]["match"] == {"prefix": "/grpc.health.v1.Health/"}
    assert {e["match"]["path"] for e in control} == {PREFIX + m for m in CONTROL_METHODS}
    assert all(e["route"]["cluster"] == LOCAL_CLUSTER for e in [entries[0], *control])
    assert max(names.index(e["name"]) for e in control) < names.index("default-upstream")  # before the catch-all


def test_admission_bounds_bytes_in_flight_but_always_admits_one() -> None:
    gate = Admission(requests=10, streams=1, limit_bytes=100)
    gate.enter(size=150)  # alone: admitted even above the budget
    with pytest.raises(RpcAbort, match="150 bytes of requests in flight.*server.max_in_flight_bytes 100"):
        gate.enter(size=1)
    gate.leave(size=150)
    gate.enter(size=60)
    gate.enter(size=40)
    with pytest.raises(RpcAbort):
        gate.enter(size=1)
    assert gate.bytes == 100
