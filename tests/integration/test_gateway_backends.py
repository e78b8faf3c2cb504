"""The gateway in front of Kiln's embedded server and in front of a real Triton server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc

from builders.examples import example_model_path
from builders.pipeline import build_model
from builders.request import BuildRequest
from core.errors import MissingDependencyError
from harness.gateway import PLANES, TOKEN, digits_input, gateway_config, plane_options, served_variant, variant
from harness.triton.cli import default_venv_path, ensure_triton_venv, start_triton, write_python_backend_model
from server.app import start_server
from server.gateway.app import start_gateway

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gw-repo") / "repo"
    build_model(BuildRequest(model=example_model_path(), name="digits", precision="fp32", repo=path))
    return path


@pytest.mark.parametrize("plane", PLANES)
def test_embedded_server_behind_the_gateway(repo: Path, plane: str) -> None:
    with start_server(repo, port=0) as server:
        routes = {"digits": {"variants": [variant("fp32", "digits-fp32-ort", 100)]}}
        config = gateway_config({"up": server.url}, routes)
        with start_gateway(config, port=0, admin_port=0, admin_token_value=TOKEN, plugins=(),
                           **plane_options(plane)) as gw:  # fmt: skip
            _, tensor = digits_input(batch=4)
            through = tc.InferenceServerClient(gw.address).infer("digits", [tensor])
            direct = tc.InferenceServerClient(server.url).infer("digits-fp32-ort", [tensor])
            np.testing.assert_array_equal(through.as_numpy("logits"), direct.as_numpy("logits"))
            client = tc.InferenceServerClient(gw.address)
            assert client.get_model_metadata("digits").name == "digits"
            assert [t.name for t in client.get_model_metadata("digits").inputs] == ["input"]
            assert gw.metrics.window("digits", "fp32").requests == 1


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    try:
        install = ensure_triton_venv(default_venv_path())
    except MissingDependencyError as err:
        if os.environ.get("KILN_REQUIRE_TRITON") == "1":
            raise
        pytest.skip(f"the nvidia-pytriton wheel cannot be installed or run here: {err}")
    repo = tmp_path_factory.mktemp("triton-repo")
    write_python_backend_model(repo, "digits-onnx", example_model_path(), max_batch_size=16, dynamic_batching=False)
    with start_triton(install, repo) as server:
        yield server.grpc_url


@pytest.mark.triton
@pytest.mark.parametrize("plane", PLANES)
def test_real_triton_behind_the_gateway(triton: str, repo: Path, plane: str) -> None:
    """A/B across a real Triton server and the embedded server, answers identical to direct calls."""
    with start_server(repo, port=0) as embedded:
        routes = {
            "digits": {
                "variants": [
                    variant("triton", "digits-onnx", 50, "triton"),
                    variant("kiln", "digits-fp32-ort", 50, "kiln"),
                ]
            }
        }
        config = gateway_config({"triton": triton, "kiln": embedded.url}, routes)
        with start_gateway(config, port=0, admin_port=0, admin_token_value=TOKEN, plugins=(),
                           **plane_options(plane)) as gw:  # fmt: skip
            client = tc.InferenceServerClient(gw.address)
            _, tensor = digits_input(batch=2, seed=3)
            pinned = client.infer("digits", [tensor], headers={"kiln-variant": "triton"})
            direct = tc.InferenceServerClient(triton).infer("digits-onnx", [tensor])
            np.testing.assert_allclose(pinned.as_numpy("logits"), direct.as_numpy("logits"), rtol=1e-5, atol=1e-5)
            assert pinned.get_response().model_name == "digits"
            assert client.is_model_ready("digits")
            with grpc.insecure_channel(gw.address) as channel:
                seen = {served_variant(channel, "digits")[0] for _ in range(40)}
            assert seen == {"triton", "kiln"}
            assert gw.metrics.window("digits", "triton").errors == 0
