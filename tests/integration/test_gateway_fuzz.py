"""Seeded hostile-input runs against a live gateway: ModelInfer, ModelStreamInfer and admin bodies.

The upstream is an echo server that answers every message it gets, so what a case returns is the
gateway's own doing. For each case: the status code is the one the case calls for (exactly, where
the body is valid protobuf; one of the gateway's refusal codes otherwise), the message is short
and names no address; every ``CHECK_EVERY`` cases a good request is answered correctly; at the end
the routes are the ones configured and the log holds no traceback. Failures print seed and index.
"""

from __future__ import annotations

import json
import logging
import random
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2

from harness.gateway import INFER, TOKEN, request_bytes, variant
from harness.gateway_fuzz import admin_case, infer_body
from server.gateway.app import GatewayHandle, start_gateway
from server.gateway.wire import read_name_version

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED = 20261201
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
CHECK_EVERY = 250
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED}
ROUTES = {"digits": {"variants": [{**variant("a", "digits", 70), "version": "1"},
                                  {**variant("b", "digits", 30), "version": "2"},
                                  {**variant("c", "digits", 0), "version": "3"}]}}  # fmt: skip


@pytest.fixture(scope="module")
def echo() -> Iterator[int]:
    """An upstream that answers any ModelInfer body with an empty response, and each stream message."""
    answer = service_pb2.ModelInferResponse(model_name="digits").SerializeToString()
    stream_answer = service_pb2.ModelStreamInferResponse(infer_response={"model_name": "digits"}).SerializeToString()

    def stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for _ in requests:
            yield stream_answer

    handlers = {"ModelInfer": grpc.unary_unary_rpc_method_handler(lambda request, context: answer),
                "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(stream)}  # fmt: skip
    server = grpc.server(futures.ThreadPoolExecutor(8), options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)


def start(port: int, mode: str) -> GatewayHandle:
    config = {"upstreams": {"up": {"address": f"127.0.0.1:{port}"}}, "routes": ROUTES, "server": {"mode": mode}}
    return start_gateway(config, port=0, admin_port=0, admin_token_value=TOKEN, plugins=())


def expected(body: bytes) -> set[grpc.StatusCode]:
    """The codes a body may get: exact when protobuf parses it, else OK or one of the refusals."""
    try:
        parsed = service_pb2.ModelInferRequest.FromString(body)
    except DecodeError:
        return {grpc.StatusCode.OK, *REFUSALS}
    if parsed.model_name != "digits":
        return {grpc.StatusCode.NOT_FOUND}
    return {
        "": {grpc.StatusCode.OK},
        "1": {grpc.StatusCode.OK},
        "2": {grpc.StatusCode.OK},
        "3": {grpc.StatusCode.PERMISSION_DENIED},  # only weight-0 'c' serves it
    }.get(parsed.model_version, {grpc.StatusCode.NOT_FOUND})


def check_details(code: grpc.StatusCode, details: str, body: bytes) -> None:
    assert len(details) < 400 and "127.0.0.1" not in details and "Traceback" not in details
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        try:
            read_name_version(body)
        except Exception as err:  # the wire reader's own words reach the client
            assert details == str(err)
    elif code == grpc.StatusCode.NOT_FOUND:
        assert "not routed" in details or "does not serve model_version" in details
    elif code == grpc.StatusCode.PERMISSION_DENIED:
        assert "weight 0" in details


def good_request(channel: grpc.Channel) -> None:
    response, call = channel.unary_unary(INFER).with_call(request_bytes("digits"), timeout=10)
    assert service_pb2.ModelInferResponse.FromString(response).model_name == "digits"
    assert dict(call.trailing_metadata())["kiln-variant"] in {"a", "b"}


@pytest.mark.parametrize(("mode", "cases"), [("threads", 3000), ("aio", 2000)])
def test_fuzz_model_infer(echo: int, mode: str, cases: int, caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(SEED)
    seen: Counter[str] = Counter()
    caplog.set_level(logging.WARNING)
    with start(echo, mode) as gw, grpc.insecure_channel(gw.address) as channel:
        call = channel.unary_unary(INFER)
        for index in range(cases):
            body = infer_body(rng)
            try:
                call(body, timeout=10)
                code, details = grpc.StatusCode.OK, ""
            except grpc.RpcError as err:
                code, details = err.code(), err.details() or ""
            where = f"seed {SEED} case {index}: {body[:80]!r}"
            assert code in expected(body), f"{where}: {code} {details}"
            check_details(code, details, body)
            seen[code.name] += 1
            if index % CHECK_EVERY == 0:
                good_request(channel)
        good_request(channel)
        assert gw.routes.snapshot.version == 0
    assert seen["OK"] > cases / 20 and seen["INVALID_ARGUMENT"] > cases / 10, seen  # both kinds exercised
    assert "Traceback" not in caplog.text and len(caplog.records) <= 5, caplog.text


@pytest.mark.parametrize("mode", ["threads", "aio"])
def test_fuzz_model_stream_infer(echo: int, mode: str) -> None:
    """100 streams of 10 messages each: every message of a stream whose first message routes is answered."""
    rng = random.Random(SEED + 1)
    with start(echo, mode) as gw, grpc.insecure_channel(gw.address) as channel:
        for index in range(100):
            first = request_bytes("digits") if rng.random() < 0.7 else infer_body(rng)
            rest = [rng.choice([request_bytes("digits"), infer_body(rng)]) for _ in range(9)]
            responses: list[bytes] = []
            try:
                for response in channel.stream_stream(STREAM)(iter([first, *rest]), timeout=10):
                    responses.append(response)
                code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                code = err.code()
            if code == grpc.StatusCode.OK:
                assert len(responses) == 10, f"seed {SEED + 1} stream {index}: {len(responses)} of 10 answered"
            else:  # only the first message is routed; a refusal ends the stream with a gateway code
                assert code in REFUSALS, f"seed {SEED + 1} stream {index}: {code}"
                assert responses == []
        good_request(channel)


def test_fuzz_admin_bodies(echo: int, caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(SEED + 2)
    caplog.set_level(logging.WARNING)
    statuses: Counter[int] = Counter()
    with start(echo, "threads") as gw, grpc.insecure_channel(gw.address) as channel:
        for index in range(1500):
            method, path, body = admin_case(rng)
            before = gw.routes.snapshot.version
            request = urllib.request.Request(gw.admin_url + path, data=body or None, method=method)
            request.add_header("Authorization", f"Bearer {TOKEN}")
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:
                    status, payload = answer.status, answer.read()
            except urllib.error.HTTPError as err:
                status, payload = err.code, err.read()
            where = f"seed {SEED + 2} case {index}: {method} {path[:60]} {body[:80]!r}"
            assert status in {200, 400, 404, 409, 413}, f"{where}: {status} {payload[:300]!r}"
            if status != 200:
                message = json.loads(payload)["error"]
                assert message and "Traceback" not in message and "internal" not in message, where
                assert gw.routes.snapshot.version == before, f"{where}: a refused change was applied"
            statuses[status] += 1
            if index % CHECK_EVERY == 0:
                good_request(channel)
        good_request(channel)
    assert statuses[400] > 500, statuses
    assert "Traceback" not in caplog.text


def test_fuzz_wire_reader_never_fails_unexpectedly() -> None:
    """20,000 bodies straight into the wire reader: a result or InvalidInputError, nothing else."""
    from core.errors import InvalidInputError

    rng = random.Random(SEED + 3)
    outcomes: Counter[str] = Counter()
    for _ in range(20_000):
        body = infer_body(rng)
        try:
            name, version = read_name_version(body)
            outcomes["read"] += 1
        except InvalidInputError:
            outcomes["refused"] += 1
            continue
        try:
            parsed: Any = service_pb2.ModelInferRequest.FromString(body)
        except DecodeError:
            continue
        assert (name, version) == (parsed.model_name, parsed.model_version)  # agrees with protobuf
    assert outcomes["read"] > 5000 and outcomes["refused"] > 5000, outcomes
