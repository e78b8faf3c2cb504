"""The data plane's transport-free decisions: routing, retry, metadata, unrouted models."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import grpc
import pytest
from tritonclient.grpc import service_pb2

from server.gateway.config import parse_config
from server.gateway.forward import PASSTHROUGH_ROUTE, Forwarder, RpcAbort, rename_response
from server.gateway.metrics import GatewayMetrics
from server.gateway.resilience import OutlierDetector
from server.gateway.shadow import ShadowSender
from server.gateway.table import RouteTable
from server.gateway.upstreams import UpstreamPool


def forwarder(**extra: Any) -> tuple[Forwarder, GatewayMetrics, OutlierDetector]:
    config = parse_config(
        {
            "upstreams": {"u1": {"address": "127.0.0.1:1"}, "u2": {"address": "127.0.0.1:2"}},
            "routes": {
                "digits": {
                    "variants": [
                        {"name": "a", "upstream": "u1", "model": "m-a", "version": "1", "weight": 50},
                        {"name": "b", "upstream": "u2", "model": "m-b", "weight": 50},
                    ],
                    "sticky": "header:x-user",
                }
            },
            **extra,
        }
    )
    metrics = GatewayMetrics()
    health = OutlierDetector(list(config.upstreams))
    core = Forwarder(
        config, RouteTable(config.routes, config.upstreams), metrics, health, ShadowSender(metrics),
        UpstreamPool(config.upstreams, 2**20),
    )  # fmt: skip
    return core, metrics, health


def request(model: str = "digits") -> bytes:
    return service_pb2.ModelInferRequest(model_name=model, id="x").SerializeToString()


def test_decide_rewrites_the_body_and_forwards_foreign_metadata() -> None:
    core, _, _ = forwarder()
    metadata = (("kiln-variant", "b"), ("x-trace", "t1"), ("user-agent", "grpc-python"))
    decision = core.decide(request(), metadata, start=0)
    forwarded = service_pb2.ModelInferRequest.FromString(decision.body)
    assert (decision.variant, decision.upstream, forwarded.model_name, forwarded.model_version) == (
        "b",
        "u2",
        "m-b",
        "",
    )
    assert decision.forwarded == (("x-trace", "t1"),)
    assert core.response_metadata(decision) == (("kiln-variant", "b"), ("kiln-model", "digits"))


def test_sticky_header_decides_and_pin_overrides() -> None:
    core, _, _ = forwarder()
    picks = {core.decide(request(), (("x-user", "alice"),), 0).variant for _ in range(20)}
    assert len(picks) == 1


def test_unavailable_ejects_and_retries_once_on_the_baseline() -> None:
    core, metrics, health = forwarder()
    decision = core.decide(request(), (("kiln-variant", "b"),), 0)
    decision = replace(decision, pin=None)  # as if the weighted draw had picked b
    retry = core.failed(decision, grpc.StatusCode.UNAVAILABLE, "connection refused", sent=0)
    assert retry is not None and (retry.variant, retry.upstream, retry.retried) == ("a", "u1", True)
    assert service_pb2.ModelInferRequest.FromString(retry.body).model_name == "m-a"
    assert health.is_ejected("u2") and metrics.cumulative("digits", "b").codes == {"UNAVAILABLE": 1}
    # while u2 is ejected, new requests (even sticky ones) avoid b
    assert {core.decide(request(), (("x-user", f"k{i}"),), 0).variant for i in range(30)} == {"a"}
    assert core.failed(retry, grpc.StatusCode.UNAVAILABLE, "down too", sent=0) is None  # only once
    # everything ejected: traffic is spread over all variants rather than refused
    assert {core.decide(request(), (), 0).variant for _ in range(60)} == {"a", "b"}


def test_no_retry_for_pinned_requests_or_other_codes() -> None:
    core, _, _ = forwarder()
    pinned = core.decide(request(), (("kiln-variant", "b"),), 0)
    assert core.failed(pinned, grpc.StatusCode.UNAVAILABLE, "x", sent=0) is None
    plain = core.decide(request(), (("kiln-variant", "a"),), 0)
    assert core.failed(plain, grpc.StatusCode.INVALID_ARGUMENT, "bad", sent=0) is None


def test_unrouted_models_not_found_or_passthrough() -> None:
    core, _, _ = forwarder()
    with pytest.raises(RpcAbort) as caught:
        core.decide(request("other"), (), 0)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND and "['digits']" in caught.value.details
    passing, _, _ = forwarder(unknown_models="passthrough", default_upstream="u2")
    decision = passing.decide(request("other"), (), 0)
    assert (decision.route, decision.upstream, decision.body) == (PASSTHROUGH_ROUTE, "u2", request("other"))


def test_bad_bytes_are_invalid_argument_and_responses_are_renamed() -> None:
    core, _, _ = forwarder()
    with pytest.raises(RpcAbort) as caught:
        core.decide(b"\x0a\x05ab", (), 0)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    metadata = service_pb2.ModelMetadataResponse(name="m-a").SerializeToString()
    assert (
        service_pb2.ModelMetadataResponse.FromString(rename_response("ModelMetadata", metadata, "digits")).name
        == "digits"
    )
