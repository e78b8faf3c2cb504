"""The real Triton 2.51 (nvidia-pytriton wheel) serves an ONNX model through its Python backend.

The outputs must equal ONNX Runtime in-process within 1e-5: a wrong environment (the venv's bin
not first on PATH, numpy 2 in the stub) makes Triton return silently wrong or empty tensors.
Skips only when the wheel cannot be installed or run on this machine; with
``KILN_REQUIRE_TRITON=1`` that is a failure instead.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aio_grpcclient
from onnx import TensorProto, helper

from builders.examples import example_model_path
from core.errors import MissingDependencyError, NotFoundError
from harness.triton.cli import (
    TritonInstall,
    TritonProcess,
    default_venv_path,
    ensure_triton_venv,
    start_triton,
    write_python_backend_model,
)

pytestmark = [pytest.mark.integration, pytest.mark.triton]

MODEL = "onnx_py"
MAX_BATCH = 32
QUEUE_DELAY_US = 100_000  # long enough that concurrent requests surely share a batch


@pytest.fixture(scope="module")
def install() -> TritonInstall:
    try:
        return ensure_triton_venv(default_venv_path())
    except MissingDependencyError as err:
        if os.environ.get("KILN_REQUIRE_TRITON") == "1":
            raise
        pytest.skip(f"the nvidia-pytriton wheel cannot be installed or run here: {err}")


def tiny_model(path: Path) -> Path:
    """MatMul + Add + Softmax, input ``input`` float32 [batch,1,8,8] -> ``logits`` [batch,10]."""
    rng = np.random.default_rng(7)
    weights = helper.make_tensor("w", TensorProto.FLOAT, [64, 10], rng.standard_normal(640).tolist())
    bias = helper.make_tensor("b", TensorProto.FLOAT, [10], rng.standard_normal(10).tolist())
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 64])
    nodes = [
        helper.make_node("Reshape", ["input", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["z"]),
        helper.make_node("Softmax", ["z"], ["logits"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [weights, bias, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return example_model_path()
    except NotFoundError:
        return tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


@pytest.fixture(scope="module")
def triton(
    install: TritonInstall, onnx_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonProcess]:
    repo = tmp_path_factory.mktemp("triton") / "repo"
    write_python_backend_model(
        repo, MODEL, onnx_path, MAX_BATCH, dynamic_batching=True, max_queue_delay_us=QUEUE_DELAY_US
    )
    with start_triton(install, repo, log_path=repo.parent / "tritonserver.log") as server:
        yield server


def reference(onnx_path: Path, batch: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["logits"], {"input": batch})[0])


def inputs_for(batch: np.ndarray) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    return [tensor]


def test_triton_is_real_and_serves_the_python_backend_config(triton: TritonProcess) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        assert client.get_server_metadata().version.startswith("2.51")
        config = client.get_model_config(MODEL).config
    finally:
        client.close()
    assert config.backend == "python"
    assert config.max_batch_size == MAX_BATCH
    assert [(t.name, list(t.dims)) for t in config.input] == [("input", [1, 8, 8])]
    assert [(t.name, list(t.dims)) for t in config.output] == [("logits", [10])]
    assert config.dynamic_batching.max_queue_delay_microseconds == QUEUE_DELAY_US


@pytest.mark.parametrize("rows", [1, 5, MAX_BATCH])
def test_outputs_equal_onnxruntime_in_process(triton: TritonProcess, onnx_path: Path, rows: int) -> None:
    batch = np.random.default_rng(rows).standard_normal((rows, 1, 8, 8)).astype(np.float32)
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        served = client.infer(MODEL, inputs_for(batch)).as_numpy("logits")
    finally:
        client.close()
    assert served is not None and served.shape == (rows, 10) and served.dtype == np.float32
    np.testing.assert_allclose(served, reference(onnx_path, batch), rtol=0, atol=1e-5)


def test_concurrent_requests_are_batched_and_scattered_correctly(triton: TritonProcess, onnx_path: Path) -> None:
    rng = np.random.default_rng(11)
    batches = [rng.standard_normal((1 + i % 3, 1, 8, 8)).astype(np.float32) for i in range(12)]

    async def send_all() -> tuple[list[np.ndarray], int, int]:
        client = aio_grpcclient.InferenceServerClient(triton.grpc_url)
        try:
            results = await asyncio.gather(*(client.infer(MODEL, inputs_for(b)) for b in batches))
            stats = await client.get_inference_statistics(MODEL, as_json=True)
        finally:
            await client.close()
        model_stats = stats["model_stats"][0]
        return (
            [r.as_numpy("logits") for r in results],
            int(model_stats["inference_count"]),
            int(model_stats["execution_count"]),
        )

    outputs, inferences, executions = asyncio.run(send_all())
    for batch, served in zip(batches, outputs, strict=True):
        np.testing.assert_allclose(served, reference(onnx_path, batch), rtol=0, atol=1e-5)
    assert inferences >= sum(b.shape[0] for b in batches)
    assert executions < len(batches), f"{executions} executions for {len(batches)} requests: no batching"


def test_server_stops_and_frees_its_port(install: TritonInstall, onnx_path: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_python_backend_model(repo, "unbatched", onnx_path, 0, dynamic_batching=False)
    with start_triton(install, repo, metrics_port=0) as server:
        assert server.metrics_port is not None
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            assert client.is_model_ready("unbatched")
            assert client.get_model_config("unbatched").config.max_batch_size == 0
        finally:
            client.close()
    assert server.process.returncode is not None
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", server.grpc_port), 1):
        pass
    assert "Started GRPCInferenceService at 127.0.0.1:" in server.log_text()
