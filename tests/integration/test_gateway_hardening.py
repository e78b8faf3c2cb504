"""Gateway hardening: each test first reproduces a problem the hostile-input pass found.

Control RPCs through the gateway, grpc.health.v1, idle streams and stalled upstreams, malformed
bodies, the client's model_version, pinning weight-0 variants, and upstream details in errors.
Admin HTTP cases are in test_gateway_admin_http.py; the seeded fuzzer in test_gateway_fuzz.py.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2

from builders.examples import example_model_path
from harness.gateway import (
    INFER,
    TOKEN,
    digits_models,
    gateway_config,
    plane_options,
    publish_example,
    request_bytes,
    variant,
)
from harness.triton.kserve_upstream import UpstreamServer, start_upstream
from server.app import ServerHandle, start_server
from server.gateway.app import GatewayHandle, start_gateway

pytestmark = pytest.mark.integration

SERVICE = "/inference.GRPCInferenceService/"
STREAM = SERVICE + "ModelStreamInfer"
ADMIN = (("authorization", f"Bearer {TOKEN}"),)
MODES = ["threads", "aio"]  # the Python data plane's two flavours
ALL_MODES = [*MODES, "envoy"]  # control RPCs and health are the same on the Envoy plane


@pytest.fixture(scope="module")
def stub() -> Iterator[UpstreamServer]:
    with start_upstream(digits_models(), threads=32) as server:
        yield server


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """A real ``kiln serve`` with the example model (digits-fp32-ort)."""
    repo = tmp_path_factory.mktemp("hardening") / "repo"
    publish_example(repo, "digits", example_model_path())
    with start_server(repo, port=0) as server:
        yield server


class Recorder:
    """A KServe v2 upstream that only records which methods (and metadata) reached it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []

        def handler(method: str) -> grpc.RpcMethodHandler:
            def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
                self.calls.append((method, {k: str(v) for k, v in context.invocation_metadata()}))
                return b""

            return grpc.unary_unary_rpc_method_handler(answer)

        names = ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload", "LogSettings")
        self.server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.so_reuseport", 0)])
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {n: handler(n) for n in names})]
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


def start(upstreams: dict[str, str], routes: dict[str, Any], mode: str = "threads", **extra: Any) -> GatewayHandle:
    server = {"threads": 16, **extra.pop("server", {}), **({"mode": mode} if mode != "envoy" else {})}
    config = {**gateway_config(upstreams, routes), "server": server, **extra}
    return start_gateway(config, port=0, admin_port=0, admin_token_value=TOKEN, plugins=(), **plane_options(mode))


def rpc(channel: grpc.Channel, method: str, body: bytes = b"", metadata: Any = (), timeout: float = 10) -> bytes:
    return channel.unary_unary(SERVICE + method)(body, metadata=tuple(metadata), timeout=timeout)  # type: ignore[no-any-return]


def refused(channel: grpc.Channel, method: str, body: bytes = b"", metadata: Any = ()) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        rpc(channel, method, body, metadata)
    return caught.value


def infer_ok(channel: grpc.Channel, model: str = "digits", metadata: Any = ()) -> service_pb2.ModelInferResponse:
    return service_pb2.ModelInferResponse.FromString(rpc(channel, "ModelInfer", request_bytes(model), metadata))


DIGITS = {"digits": {"variants": [variant("a", "digits", 100)]}}


# ---- 1. repository control RPCs -------------------------------------------------------------------
@pytest.mark.parametrize("mode", ALL_MODES)
def test_unload_through_the_gateway_is_refused_and_production_keeps_serving(served: ServerHandle, mode: str) -> None:
    routes = {"digits": {"variants": [variant("a", "digits-fp32-ort", 100)]}}
    with start({"up": served.url}, routes, mode, default_upstream="up") as gw, grpc.insecure_channel(gw.address) as ch:
        unload = service_pb2.RepositoryModelUnloadRequest(model_name="digits-fp32-ort").SerializeToString()
        for metadata in ((), ADMIN):  # not enabled for the upstream: refused even for the admin
            err = refused(ch, "RepositoryModelUnload", unload, metadata)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "control RPC" in err.details() and "upstreams.up.control_rpcs" in err.details()
        index = refused(ch, "RepositoryIndex", service_pb2.RepositoryIndexRequest().SerializeToString())
        assert index.code() == grpc.StatusCode.PERMISSION_DENIED
        assert infer_ok(ch).model_name == "digits"  # still served after the refused unloads
    with grpc.insecure_channel(served.url) as direct:
        ready = rpc(direct, "ModelReady", service_pb2.ModelReadyRequest(name="digits-fp32-ort").SerializeToString())
        assert service_pb2.ModelReadyResponse.FromString(ready).ready


@pytest.mark.parametrize("mode", ALL_MODES)
def test_enabled_control_rpcs_need_the_admin_token(mode: str) -> None:
    recorder = Recorder()
    try:
        enabled = {"ctl": {"address": f"127.0.0.1:{recorder.port}", "control_rpcs": ["RepositoryModelUnload"]}}
        server = {"mode": mode} if mode != "envoy" else {}
        raw = {"upstreams": enabled, "routes": {}, "default_upstream": "ctl", "server": server}
        options = plane_options(mode)
        with start_gateway(raw, port=0, admin_port=0, admin_token_value=TOKEN, plugins=(), **options) as gw, \
                grpc.insecure_channel(gw.address) as ch:  # fmt: skip
            body = service_pb2.RepositoryModelUnloadRequest(model_name="m").SerializeToString()
            missing = refused(ch, "RepositoryModelUnload", body)
            assert missing.code() == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer" in missing.details()
            wrong = refused(ch, "RepositoryModelUnload", body, (("authorization", "Bearer nope"),))
            assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED and "does not carry" in wrong.details()
            other = refused(ch, "RepositoryModelLoad", body, ADMIN)  # not in control_rpcs
            assert other.code() == grpc.StatusCode.PERMISSION_DENIED
            unknown = refused(ch, "RepositoryModelUnload", body, (*ADMIN, ("kiln-upstream", "nope")))
            assert unknown.code() == grpc.StatusCode.NOT_FOUND and "['ctl']" in unknown.details()
            assert recorder.calls == []  # nothing refused reached the upstream
            rpc(ch, "RepositoryModelUnload", body, ADMIN)
            assert [c[0] for c in recorder.calls] == ["RepositoryModelUnload"]
            assert "authorization" not in recorder.calls[0][1]  # the admin token is not passed on
    finally:
        recorder.server.stop(0)


def test_control_rpcs_config_is_validated() -> None:
    from core.errors import InvalidInputError
    from server.gateway.config import CONTROL_METHODS, parse_config

    with pytest.raises(InvalidInputError, match="'ModelInfer'.* are not control methods"):
        parse_config({"upstreams": {"u": {"address": "h:1", "control_rpcs": ["ModelInfer"]}}})
    every = parse_config({"upstreams": {"u": {"address": "h:1", "control_rpcs": ["all"]}}})
    assert every.upstreams["u"].control_rpcs == CONTROL_METHODS


# ---- 3. grpc.health.v1 ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ALL_MODES)
def test_health_overall_per_route_and_unknown(stub: UpstreamServer, mode: str) -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    routes = {**DIGITS, "gone": {"variants": [variant("g", "digits", 100, upstream="dead")]}}
    with start({"up": stub.address, "dead": f"127.0.0.1:{dead_port}"}, routes, mode) as gw, \
            grpc.insecure_channel(gw.address) as ch:  # fmt: skip
        health = health_pb2_grpc.HealthStub(ch)
        serving = health_pb2.HealthCheckResponse.SERVING
        for service in ("", "inference.GRPCInferenceService", "digits", "gone"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == serving
        with pytest.raises(grpc.RpcError) as caught:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "['digits', 'gone']" in caught.value.details()
        if mode != "envoy":  # Envoy ejects on its own; Kiln's per-route status follows the Python plane's ejections
            with pytest.raises(grpc.RpcError):
                infer_ok(ch, "gone")  # the upstream refuses connections: ejected
            gone = health.Check(health_pb2.HealthCheckRequest(service="gone"), timeout=5).status
            assert gone == health_pb2.HealthCheckResponse.NOT_SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert next(watch).status == serving
        watch.cancel()


# ---- 2. idle streams and stalled upstreams --------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_idle_streams_and_stalled_upstream_do_not_block_the_data_plane(stub: UpstreamServer, mode: str) -> None:
    server = {"threads": 4, "max_streams": 2, "stream_idle_timeout_s": 1.5, "upstream_timeout_s": 2.5}
    with start({"up": stub.address}, DIGITS, mode, server=server) as gw, grpc.insecure_channel(gw.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        idle: list[Any] = []
        gate = threading.Event()

        def nothing() -> Iterator[bytes]:
            gate.wait(30)
            return
            yield b""

        for _ in range(2):  # two streams that never send: both stream slots taken
            idle.append(ch.stream_stream(STREAM)(nothing(), timeout=30))
        time.sleep(0.3)
        third = ch.stream_stream(STREAM)(iter([request_bytes("digits")]), timeout=5)
        with pytest.raises(grpc.RpcError) as caught:
            list(third)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "server.max_streams" in caught.value.details()
        stub.behaviour.delay_s = 4.0  # the upstream stalls: two unary calls take the last two slots
        try:
            stalled = [ch.unary_unary(INFER).future(request_bytes("digits"), timeout=20) for _ in range(2)]
            time.sleep(0.3)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                rpc(ch, "ModelInfer", request_bytes("digits"), timeout=5)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "server.threads" in caught.value.details()
            assert time.monotonic() - started < 2.0  # refused at once, not queued behind the stalled calls
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
            assert status == health_pb2.HealthCheckResponse.SERVING  # health is answered while full
            for stream in idle:  # the reaper ends the idle streams with a message saying why
                with pytest.raises(grpc.RpcError) as caught:
                    list(stream)
                assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "stream idle for 1.5 s" in caught.value.details()
            for future in stalled:  # upstream_timeout_s caps a call that came without a deadline
                assert future.exception(10).code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[union-attr]
        finally:
            stub.behaviour.delay_s = 0.0
            gate.set()
        assert infer_ok(ch).model_name == "digits"  # every slot is free again
        responses = list(ch.stream_stream(STREAM)(iter([request_bytes("digits")] * 3), timeout=10))
        assert len(responses) == 3


# ---- 6. malformed bodies, model_version, pinning, details ---------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_malformed_bodies_get_invalid_argument_without_a_log_flood(
    stub: UpstreamServer, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    bodies = [b"\x0a", b"\x0a\x05ab", b"\x0b", b"\x08", b"\x80", b"\xff" * 11, b"\x00\x01", b"\x12"]
    with start({"up": stub.address}, DIGITS, mode) as gw, grpc.insecure_channel(gw.address) as ch:
        caplog.set_level(logging.INFO)
        for body in bodies * 5:
            for method in ("ModelInfer", "ModelMetadata", "ModelReady"):
                err = refused(ch, method, body)
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, body, err.details())
                assert "request bytes" in err.details() and len(err.details()) < 200
        responses = ch.stream_stream(STREAM)(iter([b"\x0a"]), timeout=5)
        with pytest.raises(grpc.RpcError) as caught:
            list(responses)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert infer_ok(ch).model_name == "digits"
    assert "Traceback" not in caplog.text
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) <= 1


@pytest.mark.parametrize("mode", MODES)
def test_model_version_is_honoured_or_refused(stub: UpstreamServer, mode: str) -> None:
    routes = {"digits": {"variants": [{**variant("a", "digits", 50), "version": "1"},
                                      {**variant("b", "digits", 50), "version": "2"},
                                      {**variant("c", "digits", 0), "version": "3"}]}}  # fmt: skip
    with start({"up": stub.address}, routes, mode) as gw, grpc.insecure_channel(gw.address) as ch:

        def infer(version: str, metadata: Any = ()) -> tuple[str, str]:
            body = service_pb2.ModelInferRequest.FromString(request_bytes("digits"))
            body.model_version = version
            response, call = ch.unary_unary(INFER).with_call(body.SerializeToString(), metadata=metadata, timeout=10)
            served = service_pb2.ModelInferResponse.FromString(response).model_version
            return dict(call.trailing_metadata())["kiln-variant"], served

        assert {infer("2") for _ in range(20)} == {("b", "2")}  # the upstream got the version asked for
        assert {infer("")[0] for _ in range(40)} == {"a", "b"}  # no version: the split decides
        with pytest.raises(grpc.RpcError) as caught:
            infer("7")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "model_version '7'" in caught.value.details() and "['1', '2', '3']" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            infer("3")  # only a weight-0 variant serves it: that is pinning
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert infer("3", ADMIN) == ("c", "3")
        with pytest.raises(grpc.RpcError) as caught:
            infer("1", (("kiln-variant", "b"),))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "send one or the other" in caught.value.details()


@pytest.mark.parametrize("mode", MODES)
def test_pinning_a_weight_zero_variant_needs_the_admin_token(stub: UpstreamServer, mode: str) -> None:
    def routes(pinning: str | None) -> dict[str, Any]:
        route: dict[str, Any] = {"variants": [variant("base", "digits", 100), variant("cand", "digits-reversed", 0)],
                                 "shadow": {"variant": "cand", "percent": 10}}  # fmt: skip
        return {"digits": {**route, "pinning": pinning} if pinning else route}

    with start({"up": stub.address}, routes(None), mode) as gw, grpc.insecure_channel(gw.address) as ch:
        err = refused(ch, "ModelInfer", request_bytes("digits"), (("kiln-variant", "cand"),))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "weight 0" in err.details() and "clients may pin ['base']" in err.details()
        bad_token = (("kiln-variant", "cand"), ("authorization", "Bearer x"))
        wrong = refused(ch, "ModelInfer", request_bytes("digits"), bad_token)
        assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
        pinned = ch.unary_unary(INFER).with_call(request_bytes("digits"), metadata=(("kiln-variant", "cand"), *ADMIN))
        assert dict(pinned[1].trailing_metadata())["kiln-variant"] == "cand"
        assert infer_ok(ch, metadata=(("kiln-variant", "base"),)).model_name == "digits"
        gw.routes.replace_route("digits", routes("any")["digits"], reason="test: open pinning")
        assert infer_ok(ch, metadata=(("kiln-variant", "cand"),)).model_name == "digits"


@pytest.mark.parametrize("mode", MODES)
def test_errors_do_not_carry_upstream_addresses(mode: str) -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{dead.getsockname()[1]}"
    dead.close()
    with start({"up": address}, DIGITS, mode, default_upstream="up", unknown_models="passthrough") as gw, \
            grpc.insecure_channel(gw.address) as ch:  # fmt: skip
        for model in ("digits", "unrouted"):
            err = refused(ch, "ModelInfer", request_bytes(model))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert "127.0.0.1" not in err.details() and address not in err.details(), err.details()
        meta = refused(ch, "ModelMetadata", service_pb2.ModelMetadataRequest(name="digits").SerializeToString())
        assert meta.code() == grpc.StatusCode.UNAVAILABLE and "127.0.0.1" not in meta.details()


def test_client_details_scrubs_addresses_and_paths() -> None:
    from server.gateway.control import client_details

    text = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:10.1.2.3:8001: Connection refused; "
            "loading /srv/models/digits/3/model.onnx failed; [::1]:8001 and triton.ns.svc:8001 down")  # fmt: skip
    scrubbed = client_details(text)
    for leaked in ("10.1.2.3", "/srv/models", "::1", "triton.ns.svc", "8001"):
        assert leaked not in scrubbed
    assert "Connection refused" in scrubbed and "<path>" in scrubbed
    kept = "input 'images' has shape [1,3,32,32]; model 'digits-int8-ort' expects [-1,1,8,8]"
    assert client_details(kept) == kept
    assert len(client_details("x" * 5000)) == 500


# ---- recovery: an ejected upstream is readmitted as soon as it is ready again -------------------
@pytest.mark.slow
def test_restarted_upstream_takes_traffic_within_about_a_second(stub: UpstreamServer) -> None:
    from harness.gateway import digits_models as models

    second = start_upstream(models())
    port = second.port
    routes = {"digits": {"variants": [variant("a", "digits", 50), variant("b", "digits", 50, upstream="up2")]}}
    resilience = {"base_ejection_s": 20.0, "max_ejection_s": 60.0}  # without probing: 20 s out
    with start({"up": stub.address, "up2": second.address}, routes, resilience=resilience) as gw, \
            grpc.insecure_channel(gw.address) as ch:  # fmt: skip
        second.stop(0)
        deadline = time.monotonic() + 10
        while not gw.health.is_ejected("up2") and time.monotonic() < deadline:
            infer_ok(ch)  # retried on 'a' when 'b' fails: the client sees no error
        assert gw.health.is_ejected("up2")
        second = start_upstream(models(), port=port)
        try:
            restarted = time.monotonic()
            while True:
                _, call = ch.unary_unary(INFER).with_call(request_bytes("digits"), timeout=5)
                if dict(call.trailing_metadata())["kiln-variant"] == "b":
                    break
                assert time.monotonic() - restarted < 5.0, "the restarted upstream got no traffic within 5 s"
                time.sleep(0.01)
            print(f"restarted upstream served again after {time.monotonic() - restarted:.2f} s")
        finally:
            second.stop(0)


@pytest.mark.parametrize("mode", MODES)
def test_large_bodies_in_flight_are_bounded(stub: UpstreamServer, mode: str) -> None:
    big = request_bytes("digits") + b"\x1a\x80\x80\x60" + bytes(1_572_864)  # +1.5 MiB in field 3
    server = {"max_in_flight_bytes": 2**21}  # 2 MiB: one big body fits, two do not
    with start({"up": stub.address}, DIGITS, mode, server=server) as gw, grpc.insecure_channel(gw.address) as ch:
        stub.behaviour.delay_s = 1.5
        try:
            first = ch.unary_unary(INFER).future(big, timeout=10)
            time.sleep(0.4)
            err = refused(ch, "ModelInfer", big)
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "server.max_in_flight_bytes" in err.details()
            assert infer_ok(ch).model_name == "digits"  # small requests still fit
            first.result(10)
        finally:
            stub.behaviour.delay_s = 0.0
