"""The gateway's Kubernetes probe passes against a real gateway started from the manifest's own config."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.gateway import TOKEN
from server.gateway.app import start_gateway
from server.gateway.config import parse_config

pytestmark = pytest.mark.integration
MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "gateway.yaml"


def test_manifest_grpc_probe_is_answered_serving() -> None:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    config = parse_config(yaml.safe_load(config_map["data"]["gateway.yaml"]))
    config = config.model_copy(update={"admin": config.admin.model_copy(update={"token_file": None})})
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "gateway")
    with start_gateway(config, port=0, admin_port=0, admin_token_value=TOKEN, plugins=()) as gateway:
        with grpc.insecure_channel(gateway.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for kind in ("readinessProbe", "livenessProbe"):
                service = container[kind]["grpc"].get("service", "")  # what the kubelet asks
                answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
