"""``kiln bench`` counts and times correctly against a server with a known injected latency."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc

from builders.model_config import ServingOptions
from core.errors import NotFoundError
from harness.serve import PAIR_SPECS, DelayFactory, make_pair_model, write_model
from server.app import ServerHandle, start_server
from server.bench import BenchConfig, run_bench
from server.cli import main

pytestmark = pytest.mark.integration
DELAY_S = 0.01


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench") / "repo"
    pair = make_pair_model(tmp_path_factory.mktemp("onnx") / "pair.onnx")
    write_model(root, "pair", {1: pair}, *PAIR_SPECS, ServingOptions(max_batch_size=8, dynamic_batching=False))
    write_model(root, "flaky", {1: pair}, *PAIR_SPECS, ServingOptions(max_batch_size=8, dynamic_batching=False))
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerHandle]:
    handle = start_server(repo, models=["pair"], runner_factory=DelayFactory(DELAY_S))
    yield handle
    handle.stop()


def test_closed_loop_counts_and_latency(server: ServerHandle) -> None:
    config = BenchConfig(url=server.url, model="pair", concurrency=(1, 2), requests=30, duration_s=None, warmup_s=0.05)
    result = run_bench(config)
    one, two = result.points
    assert (one.ok, one.errors, two.ok, two.errors) == (30, {}, 30, {})
    # one instance, 10 ms per run: c1 takes >= 10 ms each, c2 queues behind the other request
    assert one.latency_us["p50"] >= DELAY_S * 1e6
    assert one.throughput_rps <= 1 / DELAY_S * 1.05
    assert two.latency_us["p50"] >= 1.8 * DELAY_S * 1e6
    assert two.throughput_rps <= 1 / DELAY_S * 1.05


def test_open_loop_offers_the_rate_and_counts_from_schedule(server: ServerHandle) -> None:
    config = BenchConfig(url=server.url, model="pair", rates=(40.0,), requests=30, duration_s=None, warmup_s=0)
    point = run_bench(config).first
    assert point.mode == "rate" and point.ok == 30 and point.errors == {}
    assert point.latency_us["p50"] >= DELAY_S * 1e6
    assert 15 <= point.throughput_rps <= 80  # Poisson at 40/s over 30 arrivals


def test_errors_are_counted_by_status_code(repo: Path) -> None:
    with start_server(repo, models=["flaky"], runner_factory=DelayFactory(0.0, fail_every=3)) as handle:
        result = run_bench(BenchConfig(url=handle.url, model="flaky", requests=30, duration_s=None, warmup_s=0))
    assert result.first.ok == 20 and result.first.errors == {"INVALID_ARGUMENT": 10}


def test_unknown_model_is_not_found(server: ServerHandle) -> None:
    with pytest.raises(NotFoundError, match="nope"):
        run_bench(BenchConfig(url=server.url, model="nope", requests=1, duration_s=None))


def test_cli_bench_writes_json_csv_and_plot(server: ServerHandle, tmp_path: Path) -> None:
    data = tmp_path / "data.npz"
    np.savez(data, x=np.arange(40, dtype=np.float32).reshape(10, 4))
    out = tmp_path / "out"
    code = main(
        [
            "bench",
            "--url",
            server.url,
            "--model",
            "pair",
            "--concurrency",
            "1,2",
            "--requests",
            "10",
            "--warmup",
            "0",
            "--batch",
            "2",
            "--data",
            str(data),
            "--json",
            str(out / "r.json"),
            "--csv",
            str(out / "r.csv"),
            "--plot",
            str(out / "r.png"),
        ]
    )
    assert code == 0
    report = json.loads((out / "r.json").read_text())
    assert [p["load"] for p in report["points"]] == [1, 2] and report["batch"] == 2
    assert all(p["ok"] == 10 for p in report["points"])
    assert (out / "r.csv").read_text().count("\n") == 3
    assert (out / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_bench_rejects_bad_levels(server: ServerHandle) -> None:
    assert main(["bench", "--url", server.url, "--model", "pair", "--concurrency", "1,x"]) == 2


def test_kiln_serve_process_drains_on_sigterm(repo: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    code = "import sys; from server.cli import main; sys.exit(main(sys.argv[1:]))"
    with subprocess.Popen(
        [sys.executable, "-c", code, "serve", "--repo", str(repo), "--port", "0", "--models", "pair"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=Path(__file__).parents[2],
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert "listening on 127.0.0.1:" in line, line
            url = line.split("listening on ")[1].split()[0]
            with tc.InferenceServerClient(url) as client:
                assert client.is_model_ready("pair")
            time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
            assert "draining" in proc.stdout.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_kiln_serve_refuses_unknown_models(repo: Path) -> None:
    assert main(["serve", "--repo", str(repo), "--port", "0", "--models", "pair,ghost"]) == 3


def test_kiln_serve_refuses_missing_repository(tmp_path: Path) -> None:
    assert main(["serve", "--repo", str(tmp_path / "none"), "--port", "0"]) == 3


def test_kiln_serve_port_in_use_is_unavailable(server: ServerHandle, repo: Path) -> None:
    assert main(["serve", "--repo", str(repo), "--port", str(server.port), "--models", "pair"]) == 8


def test_bench_reports_gateway_variants(server: ServerHandle) -> None:
    from server.gateway.app import start_gateway

    variants = [{"name": name, "upstream": "up", "model": "pair", "weight": 50} for name in ("blue", "green")]
    config = {"upstreams": {"up": {"address": server.url}}, "routes": {"pairs": {"variants": variants}}}
    with start_gateway(config, port=0, admin_port=0, admin_token_value="t", plugins=()) as gateway:
        bench = BenchConfig(
            url=gateway.address,
            model="pairs",
            concurrency=(2,),
            requests=40,
            duration_s=None,
            warmup_s=0,
            by_variant=True,
        )
        point = run_bench(bench).first
    assert point.ok == 40 and set(point.variants) == {"blue", "green"}
    assert sum(v["ok"] for v in point.variants.values()) == 40
    assert all(v["p50"] >= DELAY_S * 1e6 for v in point.variants.values())


def test_open_loop_beyond_capacity_is_capped_and_counted(server: ServerHandle) -> None:
    # 10 ms per request on one instance: 2,000/s offered is far past capacity; at most 4 in flight
    config = BenchConfig(
        url=server.url, model="pair", rates=(2000.0,), requests=200, duration_s=None, warmup_s=0, max_in_flight=4
    )
    point = run_bench(config).first
    assert point.errors.get("CLIENT_BACKLOG", 0) > 100
    assert point.ok + point.errors["CLIENT_BACKLOG"] == 200
    assert "already in flight" in point.error_examples["CLIENT_BACKLOG"]
