"""The version rollout against the real Triton 2.51 (explicit model control) as the upstream:
version 2 is loaded through the repository API beside version 1 before traffic moves, canaried,
promoted, and version 1 retired, with no failed client request."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as tc

from builders.examples import example_model_path
from core.errors import MissingDependencyError
from harness.rollout import Load
from harness.triton.cli import TritonInstall, TritonProcess, default_venv_path, ensure_triton_venv, start_triton
from harness.triton.repository import add_python_backend_version, write_python_backend_model
from server.gateway.app import start_gateway
from server.rollout.plan import plan_from_mapping
from server.rollout.plugin import controller_for
from server.rollout.timeline import run_rollout

pytestmark = [pytest.mark.integration, pytest.mark.triton, pytest.mark.slow]
MODEL = "digits"


@pytest.fixture(scope="module")
def install() -> TritonInstall:
    try:
        return ensure_triton_venv(default_venv_path())
    except MissingDependencyError as err:
        if os.environ.get("KILN_REQUIRE_TRITON") == "1":
            raise
        pytest.skip(f"the nvidia-pytriton wheel cannot be installed or run here: {err}")


@pytest.fixture
def triton(install: TritonInstall, tmp_path: Path) -> Iterator[TritonProcess]:
    repo = tmp_path / "repo"
    model_dir = write_python_backend_model(
        repo, MODEL, example_model_path(), max_batch_size=8, dynamic_batching=False
    )  # version 1; policy: Triton's latest 1
    with start_triton(install, repo, models=[MODEL]) as server:
        add_python_backend_version(model_dir, 2, example_model_path())  # published while serving
        yield server


def test_version_rollout_on_real_triton(triton: TritonProcess) -> None:
    client = tc.InferenceServerClient(triton.grpc_url)
    assert client.is_model_ready(MODEL, "1") and not client.is_model_ready(MODEL, "2")
    config = {
        "upstreams": {"triton": {"address": triton.grpc_url}},
        "routes": {
            "digits": {
                "variants": [{"name": "v1", "upstream": "triton", "model": MODEL, "version": "1", "weight": 100}]
            }
        },
    }
    plan = plan_from_mapping(
        {
            "route": "digits",
            "baseline": "v1",
            "candidate": {"name": "v2", "upstream": "triton", "model": MODEL, "version": "2"},
            "steps": [50, 100],
            "interval_s": 0.5,
            "min_requests": 5,
            "max_wait_s": 20,
            "shadow": {"duration_s": 0.5, "percent": 100, "min_comparisons": 5},
            "sample_percent": 50,
            "min_comparisons": 3,
            "ready_timeout_s": 60,
            "slos": {"max_error_rate": 0.0, "max_p99_ratio": 20.0, "min_agreement": 0.95},
            "retire_previous": True,
        }
    )
    with (
        start_gateway(config, port=0, admin_port=0, insecure_admin=True, plugins=("server.rollout.plugin",)) as gw,
        Load(gw.address, "digits", threads=2) as load,
    ):
        run = run_rollout(gw, plan, timeout_s=90)
        controller = controller_for(gw)
        for _ in range(600):  # retirement reloads the model in Triton (bounded: 30 s)
            if controller.status("digits")["retire"]:
                break
            time.sleep(0.05)
        load.stop()
    assert run.outcome == "promoted", [(e["kind"], e["message"]) for e in run.events]
    assert controller.status("digits")["retire"]["state"] == "retired", controller.status("digits")["retire"]
    assert client.is_model_ready(MODEL, "2") and not client.is_model_ready(MODEL, "1")
    assert load.result.errors() == 0 and len(load.result.calls) > 10
    client.close()
