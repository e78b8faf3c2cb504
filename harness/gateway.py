"""Helpers for gateway integration tests: upstreams, gateway configs, clients, TLS certificates."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2

from builders.examples import example_model_path
from harness.triton.kserve_upstream import Model, onnx_model, reversed_model

TOKEN = "test-admin-token"
INFER = "/inference.GRPCInferenceService/ModelInfer"


def digits_models() -> dict[str, Model]:
    """``digits`` (the example model), ``digits-v2`` (the same) and ``digits-reversed`` (disagrees)."""
    model = onnx_model(example_model_path())
    return {"digits": model, "digits-v2": model, "digits-reversed": reversed_model(model)}


def variant(name: str, model: str, weight: float, upstream: str = "up") -> dict[str, Any]:
    return {"name": name, "upstream": upstream, "model": model, "weight": weight}


def gateway_config(upstreams: dict[str, str], routes: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "upstreams": {name: {"address": address} for name, address in upstreams.items()},
        "routes": routes,
        "server": {"threads": 16},
        **extra,
    }


def digits_input(batch: int = 1, seed: int = 0) -> tuple[np.ndarray, tc.InferInput]:
    x = np.random.default_rng(seed).random((batch, 1, 8, 8), dtype=np.float32)
    tensor = tc.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return x, tensor


def request_bytes(model: str, batch: int = 1) -> bytes:
    x = np.random.default_rng(batch).random((batch, 1, 8, 8), dtype=np.float32)
    request = service_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "input", "FP32"
    tensor.shape.extend(x.shape)
    request.raw_input_contents.append(x.tobytes())
    return request.SerializeToString()


def served_variant(channel: grpc.Channel, model: str, metadata: Sequence[tuple[str, str]] = ()) -> tuple[str, str]:
    """(kiln-variant, response model_name) of one raw ModelInfer call."""
    response, call = channel.unary_unary(INFER).with_call(request_bytes(model), metadata=tuple(metadata), timeout=10)
    trailing = dict(call.trailing_metadata())
    return trailing["kiln-variant"], service_pb2.ModelInferResponse.FromString(response).model_name


def make_certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server cert for 127.0.0.1/localhost and a client cert, made with the openssl CLI."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {k: directory / f"{k}.pem" for k in ("ca", "ca_key", "server", "server_key", "client", "client_key")}

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=kiln-test-ca",
        "-keyout", str(paths["ca_key"]), "-out", str(paths["ca"]))  # fmt: skip
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n", encoding="utf-8")
    for who in ("server", "client"):
        csr = directory / f"{who}.csr"
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}", "-keyout", str(paths[f"{who}_key"]),
            "-out", str(csr))  # fmt: skip
        run("x509", "-req", "-in", str(csr), "-CA", str(paths["ca"]), "-CAkey", str(paths["ca_key"]),
            "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(paths[who]))  # fmt: skip
    return paths


def negated_model(source: Path, path: Path) -> Path:
    """The example model with its logits negated: a deliberately different model (top-1 disagrees)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(source))
    output = model.graph.output[0]
    raw = f"{output.name}_raw"
    for node in model.graph.node:
        node.output[:] = [raw if name == output.name else name for name in node.output]
    model.graph.node.append(helper.make_node("Neg", [raw], [output.name]))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def publish_example(repo: Path, name: str, onnx_path: Path, versions: int = 1) -> str:
    """Publish ``onnx_path`` as ``<name>-fp32-ort`` with ``versions`` versions, all of them served."""
    import shutil
    import tempfile

    from builders.inspection import describe_model, load_model
    from builders.model_config import ARTIFACTS, ServingOptions
    from builders.publish import publish_artifact
    from builders.request import BuildRequest

    request = BuildRequest(model=onnx_path, name=name, precision="fp32", repo=repo)
    info = describe_model(load_model(onnx_path), onnx_path)
    serving = ServingOptions(max_batch_size=32, version_policy="all")
    with tempfile.TemporaryDirectory(prefix="kiln-gw-test-") as tmp:
        artifact = Path(tmp) / ARTIFACTS["ort"]
        shutil.copyfile(onnx_path, artifact)
        for _ in range(versions):
            publish_artifact(request, info, artifact, 32, build_extra={}, serving=serving)
    return request.triton_name


def envoy_unusable() -> str | None:
    """Why the Envoy data plane cannot run here (None when it can): tests skip with this reason."""
    from core.errors import MissingDependencyError
    from server.gateway.envoy.binary import find_envoy

    try:
        find_envoy()
    except MissingDependencyError as err:
        return str(err)
    return None


def plane_options(mode: str) -> dict[str, Any]:
    """start_gateway keyword arguments for a test mode: 'threads'/'aio' (Python data plane) or 'envoy'."""
    import pytest

    if mode != "envoy":
        return {"data_plane": "python"}
    reason = envoy_unusable()
    if reason is not None:
        pytest.skip(f"Envoy data plane unavailable: {reason}")
    return {"data_plane": "envoy"}


MODES = ("threads", "aio", "envoy")  # Python data plane (two server flavours) and Envoy
PLANES = ("python", "envoy")
