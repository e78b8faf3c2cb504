"""``kiln rollout`` through ``main(argv)`` against a real gateway's admin API (token required)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.gateway import PLANES, plane_options
from harness.rollout import Load, gateway_config, serve_models
from server.app import ServerHandle
from server.bench.record import record_capacity
from server.cli import main
from server.gateway.app import GatewayHandle, start_gateway

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    yield from serve_models(tmp_path_factory)


@pytest.fixture(params=PLANES)
def gateway(upstream: ServerHandle, request: pytest.FixtureRequest) -> Iterator[GatewayHandle]:
    with start_gateway(
        gateway_config(upstream),
        port=0,
        admin_port=0,
        admin_token_value="t0ken",
        plugins=("server.rollout.plugin",),
        **plane_options(request.param),
    ) as gw:
        yield gw


def connection(gw: GatewayHandle, tmp_path: Path) -> list[str]:
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    return ["--admin", gw.admin_url, "--token-file", str(token)]


FLAGS = [
    "--route",
    "digits",
    "--baseline",
    "fp32",
    "--candidate",
    "cand=local/next-fp32-ort",
    "--steps",
    "25,50",
    "--min-requests",
    "10",
    "--no-shadow",
    "--sample-percent",
    "0",
]


def test_start_watch_until_promoted(gateway: GatewayHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    admin = connection(gateway, tmp_path)
    with Load(gateway.address, "digits"):
        # the CLI flow is under test, not latency: a candidate's first 0.3 s window holds a few dozen
        # requests, whose p99 on a shared 2-core box swings by 5x on either data plane
        code = main(
            [
                "rollout",
                "start",
                *admin,
                *FLAGS,
                "--interval",
                "0.3",
                "--max-p99-ratio",
                "10",
                "--watch",
                "--every",
                "0.2",
                "--refreshes",
                "150",
            ]
        )
    out = capsys.readouterr().out
    assert code == 0 and "promoted" in out
    assert main(["rollout", "events", *admin, "digits", "--json"]) == 0
    kinds = [json.loads(line)["kind"] for line in capsys.readouterr().out.strip().splitlines()]
    # started, step, step, promoted (a step that waits for more requests may log one more event)
    assert kinds[0] == "started" and kinds.count("step") == 2 and kinds[-1] == "promoted", kinds


def test_status_commands_and_error_exit_codes(
    gateway: GatewayHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    admin = connection(gateway, tmp_path)
    assert main(["rollout", "status", *admin]) == 0 and "no rollouts" in capsys.readouterr().out
    assert (
        main(["rollout", "start", *admin, *FLAGS, "--interval", "60", "--max-wait", "120", "--max-error-rate", "0.05"])
        == 0
    )
    out = capsys.readouterr().out
    assert "stepping" in out and "cand 25%" in out and "error_rate" in out and "<= 0.05" in out
    assert main(["rollout", "start", *admin, *FLAGS]) == 11  # ConflictError: already running
    assert "already has a rollout" in capsys.readouterr().err
    assert main(["rollout", "pause", *admin, "digits"]) == 0 and "paused" in capsys.readouterr().out
    assert main(["rollout", "resume", *admin, "digits", "--expect-version", "0"]) == 11
    assert main(["rollout", "resume", *admin, "digits"]) == 0
    assert main(["rollout", "abort", *admin, "digits"]) == 0
    assert "fp32 100%" in capsys.readouterr().out
    assert main(["rollout", "status", *admin, "nothing"]) == 3  # NotFoundError
    assert main(["rollout", "start", *admin, "--route", "digits", "--baseline", "fp32"]) == 2
    assert "candidate" in capsys.readouterr().err
    bad_token = tmp_path / "bad"
    bad_token.write_text("nope")
    assert main(["rollout", "status", "--admin", gateway.admin_url, "--token-file", str(bad_token)]) == 10


def test_plan_file_with_flag_override(
    gateway: GatewayHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "route: digits\nbaseline: fp32\ncandidate: {name: c2, upstream: local, model: next-fp32-ort}\n"
        "steps: [5, 100]\ninterval_s: 60\nshadow: null\n"
    )
    assert main(["rollout", "start", *connection(gateway, tmp_path), "--plan", str(plan), "--steps", "40,100"]) == 0
    assert gateway.routes.route("digits").variant("c2").weight == 40.0
    assert main(["rollout", "status", *connection(gateway, tmp_path), "digits", "--json"]) == 0
    assert '"candidate_weight": 40.0' in capsys.readouterr().out


def test_capacity_is_compared_from_the_repository_and_can_refuse_the_start(
    gateway: GatewayHandle, upstream: ServerHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    admin = connection(gateway, tmp_path)
    repo = tmp_path / "repo"  # a copy of what the upstream serves: only the manifests are read
    shutil.copytree(upstream.store.root, repo)
    quiet = [*FLAGS, "--interval", "60", "--max-wait", "120"]
    # nothing recorded: the rollout starts and says what it could not compare
    assert main(["rollout", "start", *admin, *quiet, "--repo", str(repo)]) == 0
    assert "capacity not compared: no capacity recorded for digits-fp32-ort:1 and next-fp32-ort:1" in " ".join(
        capsys.readouterr().out.split()
    )
    assert main(["rollout", "abort", *admin, "digits"]) == 0
    # and --min-capacity-ratio refuses without figures
    assert main(["rollout", "start", *admin, *quiet, "--min-capacity-ratio", "0.9"]) == 2
    assert "needs the recorded capacities" in capsys.readouterr().err
    for model, capacity in (("digits-fp32-ort", 400.0), ("next-fp32-ort", 200.0)):
        record_capacity(repo, model, ("1",), "", lambda precision, serving, c=capacity: entry(c, precision, serving))
    assert main(["rollout", "start", *admin, *quiet, "--repo", str(repo), "--min-capacity-ratio", "0.9"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "holds 0.5x the baseline's recorded capacity (200 vs 400 requests/s" in err
    assert [v.name for v in gateway.routes.route("digits").variants] == ["fp32"]  # nothing started
    assert main(["rollout", "start", *admin, *quiet, "--repo", str(repo), "--min-capacity-ratio", "0.5"]) == 0
    assert "capacity: candidate 200 vs baseline 400 requests/s (0.5x)" in " ".join(capsys.readouterr().out.split())
    started = json.loads(_events_json(admin, capsys))[0]
    assert started["kind"] == "started" and started["figures"]["capacity"]["ratio"] == 0.5
    assert main(["rollout", "abort", *admin, "digits"]) == 0


def _events_json(admin: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(["rollout", "events", *admin, "digits", "--json"]) == 0
    return "[" + ",".join(capsys.readouterr().out.split("\n")[:-1]) + "]"


def entry(capacity: float, precision: str | None, serving: dict) -> dict:
    return {
        "mode": "rate", "capacity": capacity, "unit": "requests/s", "slo": {"p99_ms": 50.0, "error_rate": 0.01},
        "precision": precision, "batch": {"request_batch": 1, **serving}, "hardware": {"label": "test-cpu"},
        "lower_bound": False, "measured": "2026-12-01T10:00:00+00:00", "endpoint": {"variant": "a"},
    }  # fmt: skip
