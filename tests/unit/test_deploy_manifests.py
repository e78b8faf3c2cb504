"""The Kubernetes sketch in deploy/k8s parses, its configs validate, and its kiln command lines are accepted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from server.cli import build_parser
from server.gateway.config import parse_config
from server.rollout.shared_store import parse_routes_document

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


def documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def named(kind: str, name: str) -> dict[str, Any]:
    return next(d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name)


def test_shared_routes_and_gateway_config_validate() -> None:
    gateway = parse_config(yaml.safe_load(named("ConfigMap", "kiln-gateway-config")["data"]["gateway.yaml"]))
    raw = named("ConfigMap", "kiln-routes")["data"]["routes.json"].encode()
    version, routes = parse_routes_document(raw, "kiln-routes")
    assert version == 1
    config = parse_config({"upstreams": {k: v.model_dump() for k, v in gateway.upstreams.items()}, "routes": routes})
    assert config.routes["digits"].baseline.upstream == "triton"


def test_every_kiln_command_line_is_accepted() -> None:
    parser = build_parser()
    seen = []
    for doc in documents():
        if doc["kind"] != "Deployment":
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            if container["image"].startswith("kiln-gateway"):
                args = parser.parse_args(container["args"])
                assert callable(args.func)
                seen.append(container["args"][:2])
    assert ["gateway", "--config"] in seen and ["rollout", "sync-routes"] in seen and ["rollout", "controller"] in seen


def test_gateway_pods_run_envoy_beside_kiln_on_a_shared_directory() -> None:
    pod = next(d for d in documents() if d["kind"] == "Deployment" and d["metadata"]["name"] == "kiln-gateway")
    containers = {c["name"]: c for c in pod["spec"]["template"]["spec"]["containers"]}
    envoy, kiln = containers["envoy"], containers["gateway"]
    assert envoy["image"].startswith("envoyproxy/envoy:v1.40")
    args = build_parser().parse_args(kiln["args"])
    expected = ("envoy", "127.0.0.1:9901", "/var/run/kiln-envoy")
    assert (args.data_plane, args.envoy_admin, str(args.envoy_dir)) == expected
    assert str(args.envoy_dir) in envoy["args"][0]  # Envoy starts from the bootstrap Kiln writes there
    mounts = {c: {m["name"]: m["mountPath"] for m in containers[c]["volumeMounts"]} for c in ("envoy", "gateway")}
    assert mounts["envoy"]["envoy"] == mounts["gateway"]["envoy"] == "/var/run/kiln-envoy"


def test_single_writer_and_scrape_annotations() -> None:
    controller = named("Deployment", "kiln-rollout-controller")["spec"]
    assert controller["replicas"] == 1 and controller["strategy"]["type"] == "Recreate"
    gateway = named("Deployment", "kiln-gateway")["spec"]["template"]["metadata"]["annotations"]
    assert gateway["prometheus.io/scrape"] == "true" and gateway["prometheus.io/port"] == "8080"
    assert json.loads(named("ConfigMap", "kiln-routes")["data"]["routes.json"])["routes"]
