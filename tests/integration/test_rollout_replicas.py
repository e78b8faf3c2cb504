"""Several gateway replicas: the controller reads Prometheus (a tiny fake serving canned JSON, since
no Prometheus runs here) and writes a shared routes file that every replica's watcher applies."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from core.errors import InvalidInputError, UnavailableError
from server.cli import main
from server.gateway.app import start_gateway
from server.gateway.client import AdminClient
from server.gateway.config import parse_config
from server.gateway.table import RouteTable
from server.rollout.controller import RolloutController
from server.rollout.plan import plan_from_mapping
from server.rollout.shared_store import RouteFileWatcher, SharedRouteFile, table_applier
from server.rollout.sources import PrometheusSource
from server.rollout.standalone import start_controller, start_route_sync
from server.rollout.store import RolloutStore

pytestmark = pytest.mark.integration


def vector(rows: list[tuple[dict[str, str], float]]) -> dict[str, Any]:
    return {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [{"metric": labels, "value": [1.0, str(value)]} for labels, value in rows],
        },
    }


class FakePrometheus:
    """Answers /api/v1/query by metric name with canned vectors; records every query."""

    def __init__(self) -> None:
        self.queries: list[str] = []
        self.answers: dict[str, dict[str, Any]] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = parse_qs(url.query).get("query", [""])[0]
                fake.queries.append(query)
                body: dict[str, Any] = {"status": "error", "errorType": "bad_data", "error": "unknown query"}
                status = 400
                for needle, answer in fake.answers.items():
                    if url.path == "/api/v1/query" and needle in query:
                        body, status = answer, 200
                        break
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def prometheus() -> Iterator[FakePrometheus]:
    fake = FakePrometheus()
    yield fake
    fake.close()


def healthy(fake: FakePrometheus, candidate_errors: float = 0.0) -> None:
    fake.answers = {
        "kiln_gateway_requests_total": vector(
            [
                ({"variant": "fp32", "code": "OK"}, 400.0),
                ({"variant": "int8", "code": "OK"}, 120.0),
                ({"variant": "int8", "code": "INTERNAL"}, candidate_errors),
            ]
        ),
        "kiln_gateway_request_seconds_bucket": vector(
            [
                ({"variant": "fp32", "le": "0.001"}, 0.0),
                ({"variant": "fp32", "le": "0.005"}, 400.0),
                ({"variant": "fp32", "le": "+Inf"}, 400.0),
                ({"variant": "int8", "le": "0.001"}, 0.0),
                ({"variant": "int8", "le": "0.005"}, 123.0),
                ({"variant": "int8", "le": "+Inf"}, 123.0),
            ]
        ),
        "kiln_gateway_shadow_comparisons_total": vector([({"result": "agree"}, 60.0)]),
        "kiln_gateway_ttft_seconds_bucket": vector([]),  # nothing streamed
        "kiln_gateway_itl_seconds_bucket": vector([]),
    }


UPSTREAMS = {"local": {"address": "127.0.0.1:1"}}
ROUTES = {"digits": {"variants": [{"name": "fp32", "upstream": "local", "model": "digits-fp32-ort", "weight": 100}]}}


def replica_table() -> RouteTable:
    config = parse_config({"upstreams": UPSTREAMS, "routes": ROUTES})
    return RouteTable(config.routes, config.upstreams)


def test_prometheus_source_reads_five_queries(prometheus: FakePrometheus) -> None:
    healthy(prometheus, candidate_errors=3.0)
    source = PrometheusSource(prometheus.url)
    source.mark("digits")
    m = source.read("digits", "fp32", "int8")
    assert (m.baseline.requests, m.candidate.requests, m.candidate.errors) == (400, 123, 3)
    assert m.candidate.p99_ms == pytest.approx(1.0 + 4.0 * 0.99) and (m.compared, m.agreed) == (60, 60)
    assert len(prometheus.queries) == 5 and all('route="digits"' in q for q in prometheus.queries)
    assert m.candidate.ttft_p99_ms is None and m.candidate.itl_p99_ms is None
    prometheus.answers = {}
    with pytest.raises(UnavailableError, match="bad_data: unknown query"):
        source.read("digits", "fp32", "int8")
    with pytest.raises(UnavailableError, match="cannot query Prometheus"):
        PrometheusSource("http://127.0.0.1:9", timeout_s=1).read("digits", "a", "b")


def test_controller_drives_replicas_through_the_shared_file(prometheus: FakePrometheus, tmp_path: Path) -> None:
    healthy(prometheus)
    shared = SharedRouteFile(tmp_path / "routes.json")
    shared.write(ROUTES)
    replicas = [replica_table() for _ in range(2)]
    watchers = [RouteFileWatcher(shared.path, table_applier(t), interval_s=0.05) for t in replicas]
    clock = [0.0]
    controller = RolloutController(
        shared,
        PrometheusSource(prometheus.url, clock=lambda: clock[0]),
        RolloutStore(tmp_path / "rollouts"),
        clock=lambda: clock[0],
    )
    plan = plan_from_mapping(
        {
            "route": "digits",
            "baseline": "fp32",
            "candidate": {"name": "int8", "upstream": "local", "model": "digits-int8-ort"},
            "steps": [10, 100],
            "interval_s": 30,
            "min_requests": 100,
            "shadow": {"duration_s": 30, "min_comparisons": 50},
        }
    )
    controller.start(plan)
    seen = []
    for _ in range(10):  # bounded: shadow, step 1, step 2, promote
        if controller.status("digits")["phase"] in ("promoted", "rolled_back"):
            break
        for watcher in watchers:
            watcher.poll_once()
        seen.append([{v.name: v.weight for v in t.route("digits").variants} for t in replicas])
        clock[0] += 30.0
        controller.tick()
    for watcher in watchers:
        watcher.poll_once()
    assert seen[0][0] == {"fp32": 100.0, "int8": 0.0}  # shadow phase
    assert seen[1] == [{"fp32": 90.0, "int8": 10.0}] * 2
    assert controller.status("digits")["phase"] == "promoted"
    for table in replicas:
        assert [(v.name, v.weight) for v in table.route("digits").variants] == [("int8", 100.0)]
    assert any("[30s]" in q for q in prometheus.queries)  # the window is the step's age


def test_watcher_ignores_a_bad_file_and_keeps_routes(tmp_path: Path) -> None:
    shared = SharedRouteFile(tmp_path / "routes.json")
    table = replica_table()
    watcher = RouteFileWatcher(shared.path, table_applier(table))
    shared.path.write_text("{not json")
    assert watcher.poll_once() is False and "not JSON" in (watcher.last_error or "")
    with pytest.raises(InvalidInputError, match="not JSON"):
        shared.write(ROUTES)  # a writer never overwrites a file it cannot read
    shared.path.unlink()
    bad_weights = {"digits": {"variants": [{**ROUTES["digits"]["variants"][0], "weight": 50}]}}
    shared.write(bad_weights)
    assert watcher.poll_once() is False and "add up to 50" in (watcher.last_error or "")
    assert table.route("digits").variants[0].weight == 100.0
    shared.write(ROUTES)
    watcher.start()
    try:
        threading.Event().wait(0.3)
        assert watcher.applied_version == shared.read()[0] and watcher.last_error is None
    finally:
        watcher.stop()


def test_standalone_controller_and_route_sync_drive_a_real_gateway(prometheus: FakePrometheus, tmp_path: Path) -> None:
    healthy(prometheus)
    routes_file = tmp_path / "routes.json"
    SharedRouteFile(routes_file).write(ROUTES)
    config = {"upstreams": UPSTREAMS, "routes": ROUTES}
    with (
        start_gateway(config, port=0, admin_port=0, admin_token_value="gw") as gw,
        start_controller(
            routes_file, prometheus.url, tmp_path / "state", admin_port=0, token="ctl", tick_s=0.05
        ) as ctl,
    ):
        sync = start_route_sync(routes_file, AdminClient(gw.admin_url, "gw"), interval_s=0.05)
        try:
            token = tmp_path / "token"
            token.write_text("ctl")
            code = main(
                [
                    "rollout",
                    "start",
                    "--admin",
                    ctl.admin_url,
                    "--token-file",
                    str(token),
                    "--route",
                    "digits",
                    "--baseline",
                    "fp32",
                    "--candidate",
                    "int8=local/digits-int8-ort",
                    "--steps",
                    "50,100",
                    "--interval",
                    "0.2",
                    "--no-shadow",
                    "--min-requests",
                    "100",
                ]
            )
            assert code == 0
            deadline = time.perf_counter() + 10
            while [v.name for v in gw.routes.route("digits").variants] != ["int8"]:
                assert time.perf_counter() < deadline, gw.routes.snapshot.to_dict()
                time.sleep(0.05)
            assert ctl.controller.status("digits")["phase"] == "promoted"
            # the controller may write the file once more after the route the gateway already
            # serves (e.g. its final status); the sidecar catches up within a poll interval
            while sync.applied_version != SharedRouteFile(routes_file).read()[0]:
                assert time.perf_counter() < deadline, (sync.applied_version, SharedRouteFile(routes_file).read()[0])
                time.sleep(0.05)
            assert sync.last_error is None
        finally:
            sync.stop()
