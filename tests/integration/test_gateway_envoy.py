"""What only the Envoy data plane has: config validation, supervision, runtime weights, bad input at Envoy."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from tritonclient.grpc import service_pb2

from core.errors import InvalidInputError, MissingDependencyError
from harness.gateway import (
    INFER,
    TOKEN,
    digits_models,
    envoy_unusable,
    gateway_config,
    request_bytes,
    served_variant,
    variant,
)
from harness.triton.kserve_upstream import UpstreamServer, start_upstream
from server.gateway.app import GatewayHandle, start_gateway
from server.gateway.envoy.choice import choose_data_plane
from server.gateway.wire import encode_varint, name_version_suffix
from tests.integration.test_gateway_fuzz import echo  # noqa: F401  (fixture: an upstream answering anything)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(envoy_unusable() is not None, reason=f"Envoy data plane unavailable: {envoy_unusable()}"),
]


@pytest.fixture(scope="module")
def stub() -> Iterator[UpstreamServer]:
    with start_upstream(digits_models()) as server:
        yield server


def start(stub: UpstreamServer, routes: dict[str, Any] | None = None) -> GatewayHandle:
    routes = routes or {"digits": {"variants": [variant("a", "digits", 100), variant("b", "digits-v2", 0)]}}
    config = gateway_config({"up": stub.address}, routes)
    return start_gateway(config, port=0, admin_port=0, admin_token_value=TOKEN, plugins=(), data_plane="envoy")


def test_a_weight_change_is_in_effect_for_the_next_request(stub: UpstreamServer) -> None:
    with start(stub) as gw, grpc.insecure_channel(gw.address) as channel:
        for flip in range(10):
            target = "b" if flip % 2 == 0 else "a"
            gw.routes.set_weights("digits", {"a": 0 if target == "b" else 100, "b": 100 if target == "b" else 0})
            assert served_variant(channel, "digits")[0] == target


def test_envoy_killed_is_restarted_with_the_current_routes(stub: UpstreamServer) -> None:
    with start(stub) as gw, grpc.insecure_channel(gw.address) as channel:
        gw.routes.set_weights("digits", {"a": 0, "b": 100})
        gw.routes.replace_route("added", {"variants": [variant("x", "digits", 100)]})
        assert gw.envoy is not None
        gw.envoy.process.kill()
        deadline = time.monotonic() + 20
        while gw.envoy.process.restarts == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gw.envoy.process.restarts == 1
        assert served_variant(channel, "digits") == ("b", "digits")  # weights survived the restart
        assert served_variant(channel, "added") == ("x", "added")  # so did the route added at run time


def test_unknown_model_and_unreadable_body_are_answered_by_envoy(stub: UpstreamServer) -> None:
    with start(stub) as gw, grpc.insecure_channel(gw.address) as channel:
        call = channel.unary_unary(INFER)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as unknown:
            call(request_bytes("nope"), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert "model 'nope' is not routed by this gateway; routed models are ['digits']" in unknown.value.details()
        assert time.monotonic() - started < 5  # an answer, not a hang until the deadline
        for garbage in (b"\xff\xff\xff\xff\xff\xff", b""):
            with pytest.raises(grpc.RpcError) as bad:
                call(garbage, timeout=10)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT, garbage
            assert "could not read model_name" in bad.value.details()
        assert served_variant(channel, "digits")[0] == "a"  # Envoy stayed up


def test_a_route_envoy_refuses_is_refused_whole_and_named(stub: UpstreamServer) -> None:
    with start(stub) as gw, grpc.insecure_channel(gw.address) as channel:
        before = gw.routes.snapshot.version
        bad = {"variants": [variant("a", "digits", 100)], "sticky": "header:x\nuser"}  # Kiln lets it through
        refused = r"Envoy refused the config for route\(s\) \[.broken.\].*HeaderName"
        with pytest.raises(InvalidInputError, match=refused):
            gw.routes.replace_route("broken", bad)
        assert gw.routes.snapshot.version == before and "broken" not in gw.routes.snapshot.routes
        assert served_variant(channel, "digits")[0] == "a"  # the running config is untouched


def test_explicit_envoy_without_its_binary_is_a_clear_error_and_auto_falls_back(tmp_path: Path) -> None:
    missing = tmp_path / "envoy"
    with pytest.raises(MissingDependencyError, match=r"--data-plane envoy: Envoy binary .* does not exist"):
        choose_data_plane("envoy", missing)
    plane, binary, why = choose_data_plane("auto", missing)
    assert (plane, binary) == ("python", None) and "serving on the Python data plane" in why
    old = tmp_path / "old-envoy"
    old.write_text("#!/bin/sh\necho 'envoy  version: abc/1.39.2/Clean/RELEASE/BoringSSL'\n", encoding="utf-8")
    old.chmod(0o755)
    with pytest.raises(MissingDependencyError, match=r"is version 1\.39\.2; Kiln's generated config needs 1\.40\.x"):
        choose_data_plane("envoy", old)


def test_stop_drains_and_ends_envoy(stub: UpstreamServer) -> None:
    gw = start(stub)
    assert gw.envoy is not None and gw.envoy.process.pid is not None
    pid = gw.envoy.process.pid
    gw.stop()
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(pid, 0)


@pytest.mark.slow
def test_hostile_bodies_get_statuses_and_envoy_stays_up(echo: int) -> None:  # noqa: F811
    """600 seeded random ModelInfer bodies (harness.gateway_fuzz) against an upstream that answers
    anything: each gets OK, NOT_FOUND or INVALID_ARGUMENT within its deadline, good requests keep
    working, Envoy never restarts. (Envoy's field extractor is more lenient than Kiln's wire reader:
    a truncated body whose model_name it can still read is forwarded, and the upstream judges it.)"""
    from harness.gateway_fuzz import infer_body

    rng = random.Random(20261201)
    seen: Counter[str] = Counter()
    routes = {"digits": {"variants": [variant("a", "digits", 100)]}}
    config = gateway_config({"up": f"127.0.0.1:{echo}"}, routes)
    with start_gateway(config, port=0, admin_port=0, admin_token_value=TOKEN, plugins=(), data_plane="envoy") as gw, \
            grpc.insecure_channel(gw.address) as channel:  # fmt: skip
        call = channel.unary_unary(INFER)
        for index in range(600):
            body = infer_body(rng)
            try:
                call(body, timeout=10)
                code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                code = err.code()
            allowed = {grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT}
            assert code in allowed, f"case {index}: {code} {body[:80]!r}"
            seen[code.name] += 1
            if index % 100 == 0:
                assert served_variant(channel, "digits") == ("a", "digits")
        assert gw.envoy is not None and gw.envoy.process.restarts == 0
    assert seen["INVALID_ARGUMENT"] > 0 and seen["NOT_FOUND"] > 0, seen


def test_closed_variants_and_model_versions_follow_the_python_planes_rules(stub: UpstreamServer) -> None:
    """Envoy hands pins of weight-0 variants and requests naming a model_version to Kiln's Python
    data plane beside it: the same answers as `--data-plane python` (credential, version choice)."""
    routes = {"digits": {"variants": [{**variant("a", "digits", 100), "version": "1"},
                                      {**variant("b", "digits-v2", 0), "version": "2"}]}}  # fmt: skip
    with start(stub, routes) as gw, grpc.insecure_channel(gw.address) as channel:
        with pytest.raises(grpc.RpcError) as closed:
            served_variant(channel, "digits", [("kiln-variant", "b")])
        assert closed.value.code() == grpc.StatusCode.PERMISSION_DENIED and "weight 0" in closed.value.details()
        admin = [("kiln-variant", "b"), ("authorization", f"Bearer {TOKEN}")]
        assert served_variant(channel, "digits", admin) == ("b", "digits")
        assert served_variant(channel, "digits", [("kiln-variant", "a")]) == ("a", "digits")  # open: on Envoy
        with pytest.raises(grpc.RpcError) as missing:
            channel.unary_unary(INFER)(request_bytes("digits") + name_version_suffix("digits", "7"), timeout=10)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert "does not serve model_version" in missing.value.details()
        gw.routes.set_weights("digits", {"a": 50, "b": 50})  # b opens: its pins go straight through Envoy again
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if served_variant(channel, "digits", [("kiln-variant", "b")])[0] == "b":
                    break
            except grpc.RpcError:
                time.sleep(0.05)
        assert served_variant(channel, "digits", [("kiln-variant", "b")]) == ("b", "digits")


def test_streams_run_through_envoy_when_no_name_changes(stub: UpstreamServer) -> None:
    """Variants that use the public model name: ModelStreamInfer stays on Envoy, routed by its first
    message (a pin here), the variant named in the initial metadata."""
    routes = {"digits": {"variants": [variant("a", "digits", 50), variant("b", "digits", 50)]}}
    with start(stub, routes) as gw, grpc.insecure_channel(gw.address) as channel:
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        call = stream(iter([request_bytes("digits")] * 3), metadata=(("kiln-variant", "b"),), timeout=10)
        answers = list(call)
        assert len(answers) == 3 and dict(call.initial_metadata())["kiln-variant"] == "b"
        assert gw.metrics.window("digits", "b").requests == 1  # one stream, recorded from Envoy's log


@pytest.fixture(scope="module")
def big_echo() -> Iterator[int]:
    """An upstream answering any ModelInfer, taking messages up to 128 MiB."""
    from concurrent import futures

    answer = service_pb2.ModelInferResponse(model_name="digits").SerializeToString()
    server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.so_reuseport", 0),
                                                               ("grpc.max_receive_message_length", 2**27)])  # fmt: skip
    handlers = {"ModelInfer": grpc.unary_unary_rpc_method_handler(lambda request, context: answer)}
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)


@pytest.mark.slow
def test_oversize_messages_are_refused_and_large_ones_pass(big_echo: int) -> None:
    """The listener's stream window is the message limit: 40 MB passes, 250 MB is refused at once
    (FAILED_PRECONDITION from Envoy's field extraction; the Python plane says RESOURCE_EXHAUSTED)."""
    routes = {"digits": {"variants": [variant("a", "digits", 100)]}}
    config = gateway_config({"up": f"127.0.0.1:{big_echo}"}, routes)
    options = [("grpc.max_send_message_length", -1)]
    with start_gateway(config, port=0, admin_port=0, admin_token_value=TOKEN, plugins=(), data_plane="envoy") as gw, \
            grpc.insecure_channel(gw.address, options=options) as channel:  # fmt: skip
        call = channel.unary_unary(INFER)
        for size, ok in ((40_000_000, True), (250_000_000, False)):
            body = request_bytes("digits") + b"\x1a" + encode_varint(size) + bytes(size)  # field 3: tensors
            if ok:
                assert call(body, timeout=60)
                continue
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                call(body, timeout=60)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "buffer limits" in caught.value.details() and time.monotonic() - started < 30
        assert served_variant(channel, "digits") == ("a", "digits")
        assert gw.envoy is not None and gw.envoy.process.restarts == 0


def test_cli_falls_back_with_one_line_or_refuses_an_explicit_envoy(stub: UpstreamServer, tmp_path: Path) -> None:
    import subprocess
    import sys

    import yaml

    config = gateway_config({"up": stub.address}, {"digits": {"variants": [variant("a", "digits", 100)]}})
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    common = ["gateway", "--config", str(tmp_path / "gateway.yaml"), "--port", "0", "--admin-port", "0",
              "--insecure-admin", "--envoy-binary", str(tmp_path / "no-envoy")]  # fmt: skip
    code = "import sys; from server.cli import main; sys.exit(main(sys.argv[1:]))"
    root = Path(__file__).resolve().parents[2]
    refused = subprocess.run([sys.executable, "-c", code, *common, "--data-plane", "envoy"], cwd=root,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode == 6, refused.stderr  # missing dependency
    assert "--data-plane envoy: Envoy binary" in refused.stderr + refused.stdout
    ready = tmp_path / "ready.json"
    process = subprocess.Popen([sys.executable, "-c", code, *common, "--ready-file", str(ready)], cwd=root,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert ready.exists()
    finally:
        process.terminate()
        out, _ = process.communicate(timeout=20)
    lines = [line for line in out.splitlines() if "serving on the Python data plane" in line]
    assert len(lines) == 1 and "does not exist" in lines[0], out
    assert "(python data plane)" in out and process.returncode == 0


def test_kiln_configures_an_envoy_started_beside_it(stub: UpstreamServer, tmp_path: Path) -> None:
    """--envoy-dir/--envoy-admin (the deploy/ containers): Kiln writes the bootstrap, an Envoy started
    from it by someone else carries the requests, and a restart of that Envoy gets the weights back."""
    import socket
    import subprocess
    import threading

    from server.gateway.envoy.binary import find_envoy

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    binary, bootstrap = find_envoy().path, tmp_path / "bootstrap.json"
    command = [str(binary), "-c", str(bootstrap), "--disable-hot-restart", "-l", "error", "--concurrency", "1"]
    envoys: list[subprocess.Popen[bytes]] = []

    def start_envoy() -> None:  # the "other container": waits for the bootstrap, then runs Envoy
        deadline = time.monotonic() + 30
        while not bootstrap.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        envoys.append(subprocess.Popen(command))

    threading.Thread(target=start_envoy, daemon=True).start()
    config = gateway_config({"up": stub.address}, {"digits": {"variants": [variant("a", "digits", 100),
                                                                          variant("b", "digits-v2", 0)]}})  # fmt: skip
    admin = f"127.0.0.1:{free_port()}"
    try:
        with start_gateway(config, port=free_port(), admin_port=0, admin_token_value=TOKEN, plugins=(),
                           data_plane="envoy", envoy_dir=tmp_path, envoy_admin=admin) as gw, \
                grpc.insecure_channel(gw.address) as channel:  # fmt: skip
            gw.routes.set_weights("digits", {"a": 0, "b": 100})
            assert served_variant(channel, "digits") == ("b", "digits")
            envoys[0].kill()
            envoys[0].wait()
            envoys.append(subprocess.Popen(command))  # restarted by its platform, from the same files
            assert gw.envoy is not None
            deadline = time.monotonic() + 20
            while gw.envoy.process.restarts == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert gw.envoy.process.restarts >= 1
            assert served_variant(channel, "digits") == ("b", "digits")  # weights re-applied
    finally:
        for envoy in envoys:
            envoy.kill()
            envoy.wait()
