"""Two builds of one model, end to end: the policy keeps both servable, a gateway routes to both."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from builders.model_config import parse_config, policy_of
from harness.gateway import gateway_config, served_variant
from server.app import start_server
from server.cli import main
from server.gateway.app import start_gateway

pytestmark = pytest.mark.integration
MODEL = "digits-fp32-ort"


def test_second_build_keeps_the_first_servable_and_a_route_reaches_both(
    tmp_path: Path, example_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    build = ["build", str(example_model), "--name", "digits", "--repo", str(repo)]
    assert main(build) == 0
    assert main(build) == 0
    config = parse_config((repo / MODEL / "config.pbtxt").read_text())
    assert policy_of(config) == "latest:2"
    manifests = [json.loads((repo / MODEL / v / "kiln.json").read_text()) for v in ("1", "2")]
    assert [m["replaces"] for m in manifests] == [None, 1]
    capsys.readouterr()
    assert main([*build, "--keep-versions", "3"]) == 11  # a build never changes an existing policy
    assert "kiln repo policy digits-fp32-ort --keep-versions 3" in capsys.readouterr().err
    assert sorted(p.name for p in (repo / MODEL).iterdir() if p.name.isdigit()) == ["1", "2"]
    with start_server(repo, port=0) as server:
        routes = {
            "digits": {
                "variants": [
                    {"name": "v1", "upstream": "up", "model": MODEL, "version": "1", "weight": 50},
                    {"name": "v2", "upstream": "up", "model": MODEL, "version": "2", "weight": 50},
                ]
            }
        }
        with (
            start_gateway(
                gateway_config({"up": server.url}, routes), port=0, admin_port=0, insecure_admin=True
            ) as gateway,
            grpc.insecure_channel(gateway.address) as channel,
        ):
            for pin in ("v1", "v2"):  # version 1 answered NOT_FOUND under Triton's default policy (latest:1)
                assert served_variant(channel, "digits", [("kiln-variant", pin)]) == (pin, "digits")


def test_keep_versions_zero_is_refused_before_any_work(
    tmp_path: Path, example_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    assert main(["build", str(example_model), "--name", "d", "--repo", str(repo), "--keep-versions", "0"]) == 2
    assert "--keep-versions 0 would serve no version" in capsys.readouterr().err
    assert not repo.exists()


def test_repo_policy_command(tmp_path: Path, example_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    assert main(["build", str(example_model), "--name", "digits", "--repo", str(repo), "--keep-versions", "1"]) == 0
    capsys.readouterr()
    assert main(["repo", "policy", MODEL, "--repo", str(repo), "--keep-versions", "all"]) == 0
    assert "version policy latest:1 -> all; serves versions [1] of [1]" in capsys.readouterr().out
    assert main(["repo", "policy", MODEL, "--repo", str(repo), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["policy"] == "all"
    assert main(["repo", "policy", MODEL, "--repo", str(repo), "--keep-versions", "specific:1,2"]) == 3
    assert "no versions [2]" in capsys.readouterr().err
