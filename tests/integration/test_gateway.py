"""The gateway in front of a real KServe v2 gRPC upstream, driven by tritonclient and raw gRPC."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from builders.examples import example_model_path
from core.errors import PermissionDeniedError
from harness.gateway import (
    INFER,
    MODES,
    TOKEN,
    digits_input,
    digits_models,
    gateway_config,
    negated_model,
    plane_options,
    publish_example,
    request_bytes,
    served_variant,
    variant,
)
from harness.triton.kserve_upstream import UpstreamServer, start_upstream
from server.app import ServerHandle, start_server
from server.gateway.app import GatewayHandle, start_gateway

pytestmark = pytest.mark.integration

MODEL = "digits-fp32-ort"  # versions 1 and 2 in the embedded server
NEGATED = "digitsneg-fp32-ort"  # a deliberately different model


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """Kiln's embedded KServe v2 server (``kiln serve``) with two versions of digits and a negated model."""
    repo = tmp_path_factory.mktemp("gw-upstream") / "repo"
    publish_example(repo, "digits", example_model_path(), versions=2)
    negated = negated_model(example_model_path(), tmp_path_factory.mktemp("neg") / "neg.onnx")
    publish_example(repo, "digitsneg", negated)
    with start_server(repo, port=0) as server:
        yield server


@pytest.fixture(scope="module")
def stub() -> Iterator[UpstreamServer]:
    """An in-test KServe v2 server whose latency a test can change."""
    with start_upstream(digits_models()) as server:
        yield server


def start(address: str, routes: dict[str, Any], mode: str = "threads", **extra: Any) -> GatewayHandle:
    config = gateway_config({"up": address}, routes, **extra)
    if mode != "envoy":
        config["server"]["mode"] = mode
    return start_gateway(config, port=0, admin_port=0, admin_token_value=TOKEN, plugins=(), **plane_options(mode))


def versions(a: str = "1", b: str = "2", weights: tuple[float, float] = (75, 25)) -> dict[str, Any]:
    return {
        "variants": [
            {**variant("a", MODEL, weights[0]), "version": a},
            {**variant("b", MODEL, weights[1]), "version": b},
        ],
        "sticky": "header:x-user",
    }


@pytest.fixture(params=MODES)
def gateway(upstream: ServerHandle, request: pytest.FixtureRequest) -> Iterator[GatewayHandle]:
    with start(upstream.url, {"digits": versions()}, request.param) as handle:
        yield handle


def success_count(address: str, model: str, version: str) -> int:
    stats = tc.InferenceServerClient(address).get_inference_statistics(model, version)
    return int(stats.model_stats[0].inference_stats.success.count)


def admin(handle: GatewayHandle, method: str, path: str, body: Any = None, token: str | None = TOKEN) -> Any:
    request = urllib.request.Request(
        handle.admin_url + path, method=method, data=json.dumps(body).encode() if body is not None else None
    )
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        payload = response.read()
        return json.loads(payload) if "json" in response.headers["Content-Type"] else payload.decode()


def test_split_response_metadata_and_public_name(gateway: GatewayHandle) -> None:
    with grpc.insecure_channel(gateway.address) as channel:
        seen = [served_variant(channel, "digits") for _ in range(400)]
    counts = Counter(v for v, _ in seen)
    assert {name for _, name in seen} == {"digits"}  # responses name the public model
    assert abs(counts["b"] / 400 - 0.25) < 0.08, counts
    window = gateway.metrics.window("digits", "b")
    assert window.requests == counts["b"] and window.errors == 0 and window.total.p50_ms > 0


def test_tritonclient_results_match_direct(gateway: GatewayHandle, upstream: ServerHandle) -> None:
    _, tensor = digits_input(batch=3)
    through = tc.InferenceServerClient(gateway.address).infer("digits", [tensor])
    direct = tc.InferenceServerClient(upstream.url).infer(MODEL, [tensor])
    np.testing.assert_array_equal(through.as_numpy("logits"), direct.as_numpy("logits"))
    assert through.get_response().model_name == "digits"


def test_sticky_keys_stay_and_spread(gateway: GatewayHandle) -> None:
    with grpc.insecure_channel(gateway.address) as channel:
        first = {k: served_variant(channel, "digits", [("x-user", f"u{k}")])[0] for k in range(60)}
        again = {k: served_variant(channel, "digits", [("x-user", f"u{k}")])[0] for k in range(60)}
    assert first == again
    assert set(first.values()) == {"a", "b"}


def test_pin_header_reaches_the_pinned_version(gateway: GatewayHandle, upstream: ServerHandle) -> None:
    client = tc.InferenceServerClient(gateway.address)
    _, tensor = digits_input()
    before = (success_count(upstream.url, MODEL, "1"), success_count(upstream.url, MODEL, "2"))
    for _ in range(10):
        client.infer("digits", [tensor], headers={"kiln-variant": "b"})
    after = (success_count(upstream.url, MODEL, "1"), success_count(upstream.url, MODEL, "2"))
    assert (after[0] - before[0], after[1] - before[1]) == (0, 10)  # the version rewrite reached the server
    assert gateway.metrics.window("digits", "b").requests == 10
    with pytest.raises(InferenceServerException, match="pins variant 'zz'"):
        client.infer("digits", [tensor], headers={"kiln-variant": "zz"})


def test_model_control_methods_answer_under_the_public_name(gateway: GatewayHandle) -> None:
    client = tc.InferenceServerClient(gateway.address)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits")
    assert client.get_model_metadata("digits").name == "digits"
    assert client.get_model_config("digits").config.name == "digits"
    with pytest.raises(InferenceServerException, match="not routed by this gateway"):
        client.get_model_metadata("unknown")
    _, tensor = digits_input()
    with pytest.raises(InferenceServerException, match=r"model 'unknown' is not routed.*\['digits'\]"):
        client.infer("unknown", [tensor])


def test_unknown_models_pass_through_when_configured(upstream: ServerHandle) -> None:
    routes = {"public": {"variants": [variant("a", MODEL, 100)]}}
    with start(upstream.url, routes, unknown_models="passthrough", default_upstream="up") as gw:
        _, tensor = digits_input()
        result = tc.InferenceServerClient(gw.address).infer(NEGATED, [tensor])
        assert result.get_response().model_name == NEGATED
        assert gw.metrics.window("(passthrough)", "up").requests == 1


@pytest.mark.parametrize("mode", MODES)
def test_deadline_propagates(stub: UpstreamServer, mode: str) -> None:
    stub.behaviour.delay_s = 1.0
    routes = {"digits": {"variants": [variant("a", "digits", 100)]}}
    with start(stub.address, routes, mode) as gateway:
        with grpc.insecure_channel(gateway.address) as channel, pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary(INFER)(request_bytes("digits"), metadata=(("kiln-variant", "a"),), timeout=0.2)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 5
        while gateway.metrics.window("digits", "a").requests == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        window = gateway.metrics.window("digits", "a")
        # the gateway's own upstream call carried the client's deadline: cut at ~0.2 s, not after 1 s
        assert window.codes == {"DEADLINE_EXCEEDED": 1}
        assert 150 < window.upstream.p50_ms < 800
    stub.behaviour.delay_s = 0.0


def test_stream_infer_passes_through(gateway: GatewayHandle) -> None:
    client = tc.InferenceServerClient(gateway.address)
    results: list[Any] = []
    done = threading.Event()

    def callback(result: Any, error: Any) -> None:
        results.append(error or result)
        if len(results) == 3:
            done.set()

    client.start_stream(callback=callback, headers={"kiln-variant": "a"})
    try:
        for seed in range(3):
            client.async_stream_infer("digits", [digits_input(seed=seed)[1]])
        assert done.wait(10)
    finally:
        client.stop_stream()
    assert all(not isinstance(r, InferenceServerException) for r in results), results
    assert results[0].as_numpy("logits").shape == (1, 10)


@pytest.mark.parametrize("mode", MODES)
def test_shadow_disagreement_is_counted_and_never_returned(upstream: ServerHandle, mode: str) -> None:
    routes = {
        "digits": {
            "variants": [variant("main", MODEL, 100), variant("rev", NEGATED, 0)],
            "shadow": {"variant": "rev", "percent": 100},
        },
        "twin": {
            "variants": [
                {**variant("main", MODEL, 100), "version": "1"},
                {**variant("same", MODEL, 0), "version": "2"},
            ],
            "shadow": {"variant": "same", "percent": 100},
        },
    }
    with start(upstream.url, routes, mode) as gw:
        client = tc.InferenceServerClient(gw.address)
        direct = tc.InferenceServerClient(upstream.url)
        for seed in range(20):
            _, tensor = digits_input(batch=2, seed=seed)
            served = client.infer("digits", [tensor]).as_numpy("logits")
            np.testing.assert_array_equal(served, direct.infer(MODEL, [tensor]).as_numpy("logits"))
            client.infer("twin", [tensor])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            rev, same = gw.metrics.window("digits", "rev").shadow, gw.metrics.window("twin", "same").shadow
            if rev and same and rev.compared + rev.dropped >= 20 and same.compared + same.dropped >= 20:
                break
            time.sleep(0.05)
        assert rev is not None and same is not None
        assert rev.compared > 0 and rev.agreement < 0.3 and rev.max_abs_error > 1.0
        assert same.compared > 0 and same.agreement == 1.0 and same.max_abs_error == 0.0
        assert gw.metrics.window("digits", "rev").requests == 0  # shadows are not served requests
        stats = admin(gw, "GET", "/stats")
        assert stats["routes"]["digits"]["variants"]["rev"]["window"]["shadow"]["compared"] == rev.compared


def test_metrics_and_stats_endpoints(gateway: GatewayHandle) -> None:
    with grpc.insecure_channel(gateway.address) as channel:
        for _ in range(20):
            served_variant(channel, "digits", [("kiln-variant", "a")])
    text = admin(gateway, "GET", "/metrics")
    assert 'kiln_gateway_requests_total{code="OK",route="digits",variant="a"} 20.0' in text
    assert 'kiln_gateway_upstream_seconds_count{route="digits",variant="a"} 20.0' in text
    stats = admin(gateway, "GET", "/stats")
    a = stats["routes"]["digits"]["variants"]["a"]
    assert a["window"]["requests"] == 20 and a["cumulative"]["requests"] == 20
    assert a["window"]["total"]["p99_ms"] >= a["window"]["total"]["p50_ms"] > 0
    assert stats["upstreams"][0]["upstream"] == "up" and stats["upstreams"][0]["ejected"] is False


def test_admin_refuses_without_or_with_wrong_token(gateway: GatewayHandle) -> None:
    for token in (None, "wrong"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            admin(gateway, "GET", "/routes", token=token)
        assert caught.value.code == 401 and caught.value.headers["WWW-Authenticate"].startswith("Bearer")
    with pytest.raises(urllib.error.HTTPError) as caught:
        admin(gateway, "POST", "/routes/digits/weights", {"weights": {"a": 50}})
    assert caught.value.code == 400 and "add up to 75" in json.loads(caught.value.read())["error"]


def test_gateway_without_token_refuses_to_start_unless_local_and_insecure(upstream: ServerHandle) -> None:
    config = gateway_config({"up": upstream.url}, {})
    with pytest.raises(PermissionDeniedError, match="--insecure-admin"):
        start_gateway(config, port=0, admin_port=0, plugins=())
    with pytest.raises(PermissionDeniedError, match="got '0.0.0.0'"):
        start_gateway(config, port=0, admin_port=0, admin_host="0.0.0.0", insecure_admin=True, plugins=())
    with start_gateway(config, port=0, admin_port=0, insecure_admin=True, plugins=()) as gw:
        assert admin(gw, "GET", "/routes", token=None) == {"version": 0, "routes": {}}


def test_admin_changes_apply_live_without_dropping_requests(gateway: GatewayHandle) -> None:
    stop = threading.Event()
    outcomes: list[str] = []

    def load() -> None:
        with grpc.insecure_channel(gateway.address) as channel:
            while not stop.is_set():
                try:
                    outcomes.append(served_variant(channel, "digits")[0])
                except grpc.RpcError as err:
                    outcomes.append(f"error {err.code()}")

    workers = [threading.Thread(target=load) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        for step in range(10):
            weight = 10.0 * step
            snap = admin(gateway, "POST", "/routes/digits/weights", {"weights": {"a": 100 - weight, "b": weight}})
            assert snap["routes"]["digits"]["variants"][1]["weight"] == weight
            time.sleep(0.05)
        admin(gateway, "POST", "/routes/digits/weights", {"weights": {"a": 0, "b": 100}})
        mark = len(outcomes)
        time.sleep(0.3)
    finally:
        stop.set()
        for worker in workers:
            worker.join(10)
    assert len(outcomes) > 50
    assert not [o for o in outcomes if o.startswith("error")]
    assert set(outcomes[mark + 3 :]) == {"b"}  # after the last change (3 may have been in flight)
    assert admin(gateway, "GET", "/routes")["version"] == 11


def test_aio_mode_on_uvloop_routes_and_names_the_variant(stub: UpstreamServer) -> None:
    pytest.importorskip("uvloop", reason="server.event_loop: uvloop needs the optional uvloop package")
    config = gateway_config({"up": stub.address}, {"digits": {"variants": [variant("a", "digits", 100)]}})
    config["server"].update(mode="aio", event_loop="uvloop")
    with start_gateway(config, port=0, admin_port=0, admin_token_value=TOKEN, plugins=()) as gateway:
        with grpc.insecure_channel(gateway.address) as channel:
            _, call = channel.unary_unary(INFER).with_call(request_bytes("digits"), timeout=10)
        assert dict(call.trailing_metadata())["kiln-variant"] == "a"
        assert gateway.metrics.window("digits", "a").codes == {"OK": 1}
