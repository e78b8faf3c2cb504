"""A version rollout end to end: version 1 -> 2 of one model on a real ``kiln serve`` (explicit
model control) behind a real gateway: loaded before any traffic moves, canaried, promoted, version 1
retired, no client request failing; and the refusals (missing version, server that cannot load)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as tc

from builders.pipeline import build_model
from builders.request import BuildRequest
from core.errors import NotFoundError, UnavailableError
from harness.gateway import PLANES, plane_options
from harness.rollout import Load
from server.app import ServerHandle, start_server
from server.cli import main
from server.gateway.app import GatewayHandle, start_gateway
from server.rollout.machine import Command
from server.rollout.plan import RolloutPlan, plan_from_mapping
from server.rollout.plugin import controller_for
from server.rollout.timeline import run_rollout

pytestmark = pytest.mark.integration
MODEL = "digits-fp32-ort"


@pytest.fixture
def repo(tmp_path: Path, example_model: Path) -> Path:
    """Version 1, and version 2 published after the server started; the policy serves only the newest
    (Triton's default), so only the rollout's load keeps version 1 serving during the canary."""
    root = tmp_path / "repo"
    build_model(BuildRequest(model=example_model, name="digits", repo=root, keep_versions="1"))
    return root


@pytest.fixture
def server(repo: Path, example_model: Path) -> Iterator[ServerHandle]:
    with start_server(repo, port=0, model_control_mode="explicit") as handle:
        build_model(BuildRequest(model=example_model, name="digits", repo=repo))  # version 2, not loaded yet
        yield handle


def gateway(*servers: ServerHandle, plane: str = "python") -> GatewayHandle:
    upstreams = {f"up{i}": {"address": s.url} for i, s in enumerate(servers)}
    routes = {
        "digits": {"variants": [{"name": "v1", "upstream": "up0", "model": MODEL, "version": "1", "weight": 100}]}
    }
    return start_gateway(
        {"upstreams": upstreams, "routes": routes, "metrics": {"window_s": 30}},
        port=0,
        admin_port=0,
        insecure_admin=True,
        plugins=("server.rollout.plugin",),
        **plane_options(plane),
    )


def version_plan(version: str = "2", **changes: Any) -> RolloutPlan:
    data: dict[str, Any] = {
        "route": "digits",
        "baseline": "v1",
        "candidate": {"name": "v2", "upstream": "up0", "model": MODEL, "version": version},
        "steps": [50, 100],
        "interval_s": 0.3,
        "min_requests": 5,
        "max_wait_s": 15,
        "shadow": {"duration_s": 0.3, "percent": 100, "min_comparisons": 5},
        "sample_percent": 50,
        "min_comparisons": 3,
        "ready_timeout_s": 10,
        "slos": {"max_error_rate": 0.0, "max_p99_ratio": 20.0, "min_agreement": 0.95},
        "retire_previous": True,
    }
    data.update(changes)
    return plan_from_mapping(data)


@pytest.mark.parametrize("plane", PLANES)
def test_version_rollout_loads_canaries_promotes_and_retires(server: ServerHandle, plane: str) -> None:
    client = tc.InferenceServerClient(server.url)
    assert client.is_model_ready(MODEL, "1") and not client.is_model_ready(MODEL, "2")
    with gateway(server, plane=plane) as gw, Load(gw.address, "digits", threads=2) as load:
        run = run_rollout(gw, version_plan(), timeout_s=40)
        controller = controller_for(gw)
        for _ in range(200):  # the retirement follows promotion on the next tick (bounded: 10 s)
            if controller.status("digits")["retire"]:
                break
            time.sleep(0.05)
        load.stop()
    kinds = [e["kind"] for e in run.events]
    assert run.outcome == "promoted", [(e["kind"], e["message"]) for e in run.events]
    ready = next(e for e in run.events if e["kind"] == "candidate_ready")
    assert ready["figures"]["upstreams"][0]["loaded"] is True and kinds.index("candidate_ready") < kinds.index(
        "shadowing"
    )
    assert controller.status("digits")["retire"]["state"] == "retired"
    assert client.is_model_ready(MODEL, "2") and not client.is_model_ready(MODEL, "1")
    assert load.result.errors() == 0 and len(load.result.calls) > 20
    client.close()


def test_missing_candidate_version_is_refused_naming_the_upstream(
    server: ServerHandle, capsys: pytest.CaptureFixture[str]
) -> None:
    with gateway(server) as gw:
        with pytest.raises(NotFoundError, match=r"upstream 'up0' \(127\.0\.0\.1:\d+\) could not load .* version 7"):
            controller_for(gw).start(version_plan("7"))
        assert gw.routes.route("digits").variants[0].name == "v1" and len(gw.routes.route("digits").variants) == 1
        code = main(
            [
                "rollout",
                "start",
                "--admin",
                gw.admin_url,
                "--route",
                "digits",
                "--baseline",
                "v1",
                "--candidate",
                f"v2=up0/{MODEL}:7",
                "--steps",
                "50,100",
            ]
        )
        assert code == 3 and "upstream 'up0'" in capsys.readouterr().err


def test_an_upstream_that_cannot_load_it_fails_the_start_after_the_timeout(server: ServerHandle, repo: Path) -> None:
    """A server in model-control mode none serves version 2 only (latest:1) and refuses to load 1."""
    with start_server(repo, port=0, model_control_mode="none") as fixed, gateway(fixed) as gw:
        gw.routes.replace_route(
            "digits", {"variants": [{"name": "v2", "upstream": "up0", "model": MODEL, "version": "2", "weight": 100}]}
        )
        plan = version_plan(
            "1",
            baseline="v2",
            candidate={"name": "v1", "upstream": "up0", "model": MODEL, "version": "1"},
            ready_timeout_s=0.5,
        )
        with pytest.raises(UnavailableError, match=r"upstream 'up0' .* not ready after 0.5 s; it refuses to load"):
            controller_for(gw).start(plan)
        assert [v.name for v in gw.routes.route("digits").variants] == ["v2"]


def test_retire_is_refused_while_a_route_points_at_the_version(
    server: ServerHandle, capsys: pytest.CaptureFixture[str]
) -> None:
    client = tc.InferenceServerClient(server.url)
    with gateway(server) as gw:
        controller = controller_for(gw)
        controller.start(version_plan(retire_previous=False))
        assert controller.command("digits", Command.PROMOTE)["phase"] == "promoted"  # as `kiln rollout promote`
        gw.routes.replace_route(
            "pinned", {"variants": [{"name": "old", "upstream": "up0", "model": MODEL, "version": "1", "weight": 100}]}
        )
        retire = ["rollout", "retire", "digits", "--admin", gw.admin_url]
        assert main(retire) == 11
        assert "still pointed at by ['pinned/old']" in " ".join(capsys.readouterr().err.split())
        assert client.is_model_ready(MODEL, "1")  # refused: nothing changed
        gw.routes.remove_route("pinned")
        assert main(retire) == 0
        assert client.is_model_ready(MODEL, "2") and not client.is_model_ready(MODEL, "1")
    client.close()
