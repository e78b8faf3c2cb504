"""An upstream killed mid-load, and a gateway restarted from its state file (through the CLI)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml

from builders.examples import example_model_path
from harness.gateway import (
    MODES,
    TOKEN,
    digits_models,
    gateway_config,
    plane_options,
    publish_example,
    served_variant,
    variant,
)
from harness.triton.kserve_upstream import start_upstream
from server.app import start_server
from server.cli import main
from server.gateway.app import start_gateway

pytestmark = pytest.mark.integration
DETECTION_S = 0.5  # Envoy data plane: longest a killed variant keeps receiving requests
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("failover") / "repo"
    publish_example(path, "digits", example_model_path())
    return path


@pytest.mark.parametrize("mode", MODES)
def test_killed_upstream_is_ejected_and_its_share_retried_on_baseline(mode: str, repo: Path) -> None:
    """Two `kiln serve` instances; the candidate's is killed mid-load."""
    baseline, candidate = start_server(repo, port=0), start_server(repo, port=0)
    model = "digits-fp32-ort"
    config = gateway_config(
        {"base": baseline.url, "cand": candidate.url},
        {"digits": {"variants": [variant("a", model, 50, "base"), variant("b", model, 50, "cand")]}},
        resilience={"base_ejection_s": 0.5, "max_ejection_s": 2.0},
    )
    if mode != "envoy":
        config["server"]["mode"] = mode
    errors: list[tuple[float, str]] = []
    served: list[tuple[float, str]] = []
    stop = threading.Event()
    with start_gateway(config, port=0, admin_port=0, admin_token_value=TOKEN, plugins=(), **plane_options(mode)) as gw:

        def load() -> None:
            with grpc.insecure_channel(gw.address) as channel:
                while not stop.is_set():
                    try:
                        served.append((time.monotonic(), served_variant(channel, "digits")[0]))
                    except grpc.RpcError as err:
                        errors.append((time.monotonic(), f"{err.code()} {err.details()}"))

        workers = [threading.Thread(target=load) for _ in range(4)]
        for worker in workers:
            worker.start()
        try:
            time.sleep(0.5)
            candidate.stop(grace=0)  # killed: in-flight RPCs are cancelled, the port refuses
            killed_at, killed_time = len(served), time.monotonic()
            time.sleep(1.0)
        finally:
            stop.set()
            for worker in workers:
                worker.join(10)
            baseline.stop()
        health = {h.upstream: h for h in gw.health.health()}
        retried = gw.metrics.cumulative("digits", "b").codes.get("UNAVAILABLE", 0)
    if mode != "envoy":
        after_kill = [v for _, v in served[killed_at + 4 :]]
        assert len(errors) <= 4, errors  # at most the requests in flight on the killed upstream (others retried)
    else:
        # Envoy: no retry on the baseline; requests sent to the candidate fail until Kiln sees the
        # failure in Envoy's access log and moves its weight to the baseline (one flush + poll)
        assert all(at - killed_time < DETECTION_S for at, _ in errors), [round(at - killed_time, 3) for at, _ in errors]
        after_kill = [v for at, v in served if at - killed_time > DETECTION_S]
    assert after_kill and set(after_kill) == {"a"}  # its share went to the baseline
    assert health["cand"].ejections >= 1 and not health["base"].ejected
    assert retried >= 1  # the failure is counted on the variant that failed


def test_restart_restores_routes_through_the_cli(tmp_path: Path) -> None:
    with start_upstream(digits_models()) as upstream:
        config = gateway_config(
            {"up": upstream.address},
            {"digits": {"variants": [variant("a", "digits", 90), variant("b", "digits-v2", 10)]}},
            admin={"token_file": str(tmp_path / "token")},
        )
        (tmp_path / "token").write_text(TOKEN + "\n", encoding="utf-8")
        (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
        state = tmp_path / "state.json"
        first = _gateway_process(tmp_path, state)
        try:
            admin = f"http://127.0.0.1:{first[1]['admin_port']}"
            common = ["--admin", admin, "--token-file", str(tmp_path / "token")]
            assert main(["routes", "set", "digits", "--weights", "a=30,b=70", *common]) == 0
            assert main(["routes", "set", "digits", "--weights", "a=30,b=60", *common]) == 2  # refused whole
            assert main(["routes", "show", "--admin", admin]) == 10  # no token -> permission denied
            route_file = tmp_path / "route.yaml"
            route_file.write_text(
                yaml.safe_dump({"variants": [variant("b", "digits-v2", 100), variant("c", "digits", 0)]}),
                encoding="utf-8",
            )
            assert main(["routes", "set", "digits", "--file", str(route_file), *common]) == 0
            assert main(["routes", "set", "digits", "--weights", "b=30,c=70", *common]) == 0
        finally:
            _stop(first[0])
        saved = json.loads(state.read_text())["routes"]["digits"]["variants"]
        assert [(v["name"], v["weight"]) for v in saved] == [("b", 30), ("c", 70)]
        second = _gateway_process(tmp_path, state)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{second[1]['port']}") as channel:
                assert served_variant(channel, "digits", [("kiln-variant", "c")])[0] == "c"
            admin = f"http://127.0.0.1:{second[1]['admin_port']}"
            assert main(["routes", "show", "--admin", admin, "--token-file", str(tmp_path / "token"), "--stats"]) == 0
            from server.gateway.client import AdminClient

            routes = AdminClient(admin, TOKEN).get("/routes")
            assert [(v["name"], v["weight"]) for v in routes["routes"]["digits"]["variants"]] == [("b", 30), ("c", 70)]
        finally:
            _stop(second[0])


def _gateway_process(tmp_path: Path, state: Path) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    ready = tmp_path / "ready.json"
    ready.unlink(missing_ok=True)
    code = "import sys; from server.cli import main; sys.exit(main(sys.argv[1:]))"
    args = ["gateway", "--config", str(tmp_path / "gateway.yaml"), "--port", "0", "--admin-port", "0",
            "--state", str(state), "--ready-file", str(ready)]  # fmt: skip
    process = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env={**os.environ})
    deadline = time.monotonic() + 30
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            _stop(process)
            raise AssertionError(f"kiln gateway did not start (exit {process.returncode})")
        time.sleep(0.05)
    return process, json.loads(ready.read_text())


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(15) == 0
    except subprocess.TimeoutExpired:
        process.kill()
        raise
