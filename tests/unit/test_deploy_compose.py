"""The single-host Compose deployment: files parse and the gateway configs they mount validate."""

from __future__ import annotations

from pathlib import Path

import yaml

from server.cli import build_parser
from server.gateway.app import resolve_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_compose_mounts_a_valid_gateway_config_and_prometheus_scrapes_it() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert set(compose["services"]) == {"triton", "gateway", "envoy", "prometheus"}
    envoy = compose["services"]["envoy"]  # the official Envoy image as the data plane, Kiln beside it
    assert envoy["image"].startswith("envoyproxy/envoy:v1.40") and envoy["network_mode"] == "service:gateway"
    gateway_args = compose["services"]["gateway"]["command"]
    assert build_parser().parse_args(gateway_args).envoy_admin == "127.0.0.1:9901"
    assert "envoy-config:/var/run/kiln-envoy" in envoy["volumes"]
    mounted = [v.split(":")[0] for v in compose["services"]["gateway"]["volumes"] if v.endswith(":ro")]
    for host_path in mounted:
        config = resolve_config(DEPLOY / host_path)
        assert config.routes["digits"].variants[0].upstream == "triton"
    scrape = yaml.safe_load((DEPLOY / "prometheus.yaml").read_text())
    targets = {t for job in scrape["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert "gateway:8080" in targets


def test_example_gateway_config_validates() -> None:
    config = resolve_config(DEPLOY / "gateway.example.yaml")
    assert [v.name for v in config.routes["digits"].variants] == ["fp32", "int8", "trt"]


def test_dockerfiles_install_the_package_from_this_repository() -> None:
    for name in ("Dockerfile.builder", "Dockerfile.gateway"):
        text = (DEPLOY / "docker" / name).read_text()
        assert "COPY builders ./builders" in text and "COPY server ./server" in text
    assert "'.[tensorrt]'" in (DEPLOY / "docker" / "Dockerfile.builder").read_text()
