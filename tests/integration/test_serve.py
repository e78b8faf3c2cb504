"""``kiln serve`` through real tritonclient calls (sync and aio) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from builders.model_config import ServingOptions, parse_config
from builders.pipeline import build_model
from builders.request import BuildRequest
from builders.tensors import TensorSpec
from harness.serve import PAIR_SPECS, make_pair_model, make_string_model, write_model
from server.app import ServerHandle, start_server

pytestmark = pytest.mark.integration
DIGITS = "digits-fp32-ort"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, example_model: Path) -> Path:
    root = tmp_path_factory.mktemp("serve") / "repo"
    build_model(BuildRequest(model=example_model, name="digits", precision="fp32", repo=root))
    models = tmp_path_factory.mktemp("onnx")
    pair = {v: make_pair_model(models / f"pair{v}.onnx", offset=float(v)) for v in (1, 2, 3)}
    write_model(
        root,
        "pair",
        {1: pair[1], 2: pair[2]},
        *PAIR_SPECS,
        ServingOptions(max_batch_size=8, dynamic_batching=False, version_policy="all"),
    )
    write_model(root, "latest2", pair, *PAIR_SPECS, ServingOptions(max_batch_size=8, version_policy="latest:2"))
    write_model(root, "specific", pair, *PAIR_SPECS, ServingOptions(max_batch_size=8, version_policy="specific:1"))
    words = make_string_model(models / "words.onnx")
    specs = ((TensorSpec("s", "object", (2,)),), (TensorSpec("t", "object", (2,)),))
    write_model(root, "words", {1: words}, *specs, ServingOptions(max_batch_size=0))
    plan_dir = write_model(
        root, "digits-fp32-trt", {}, *PAIR_SPECS, ServingOptions(max_batch_size=8), target="tensorrt"
    )
    (plan_dir / "1").mkdir()
    (plan_dir / "1" / "model.plan").write_bytes(b"not a real plan")
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerHandle]:
    handle = start_server(repo, port=0, max_message_mb=1, model_control_mode="explicit")
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(server: ServerHandle) -> Iterator[tc.InferenceServerClient]:
    with tc.InferenceServerClient(server.url) as c:
        yield c


@pytest.fixture(scope="module")
def digits_x(example_data: Path) -> np.ndarray:
    with np.load(example_data) as npz:
        return npz["input"][:16].copy()


def _input(name: str, arr: np.ndarray, datatype: str = "FP32") -> tc.InferInput:
    tensor = tc.InferInput(name, list(arr.shape), datatype)
    tensor.set_data_from_numpy(arr)
    return tensor


def _status(excinfo: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(excinfo.value.status())


def test_server_live_ready_and_metadata(client: tc.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "kiln" and "model_repository" in meta.extensions


def test_model_metadata_and_config_match_the_repository(client: tc.InferenceServerClient, repo: Path) -> None:
    meta = client.get_model_metadata(DIGITS)
    assert meta.platform == "onnxruntime_onnx" and list(meta.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, 1, 8, 8])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("logits", "FP32", [-1, 10])]
    config = client.get_model_config(DIGITS).config
    on_disk = parse_config((repo / DIGITS / "config.pbtxt").read_text())
    assert config == on_disk
    assert client.get_model_metadata("pair").versions == ["1", "2"]


def test_inference_equals_onnxruntime_in_process(
    client: tc.InferenceServerClient, repo: Path, digits_x: np.ndarray
) -> None:
    result = client.infer(DIGITS, [_input("input", digits_x[:5])])
    session = ort.InferenceSession(str(repo / DIGITS / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": digits_x[:5]})[0]
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-6)
    assert result.get_response().model_version == "1"


def test_requested_outputs_and_versions(client: tc.InferenceServerClient) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    only_z = client.infer("pair", [_input("x", x)], model_version="2", outputs=[tc.InferRequestedOutput("z")])
    assert [o.name for o in only_z.get_response().outputs] == ["z"]
    np.testing.assert_array_equal(only_z.as_numpy("z"), x + 2)
    both = client.infer("pair", [_input("x", x)], model_version="1")
    np.testing.assert_array_equal(both.as_numpy("y"), x)
    np.testing.assert_array_equal(both.as_numpy("z"), x + 1)


def test_typed_contents_are_accepted(server: ServerHandle) -> None:
    request = pb.ModelInferRequest(model_name="pair", model_version="1")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])
    with grpc.insecure_channel(server.url) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    z = np.frombuffer(response.raw_output_contents[1], dtype=np.float32)
    assert [o.name for o in response.outputs] == ["y", "z"]
    np.testing.assert_array_equal(z, [2.0, 3.0, 4.0, 5.0])


def test_bytes_tensors_round_trip(client: tc.InferenceServerClient) -> None:
    words = np.array([b"kiln", "\u00e9t\u00e9".encode()], dtype=object)
    result = client.infer("words", [_input("s", words, "BYTES")])
    assert list(result.as_numpy("t")) == [b"kiln", "\u00e9t\u00e9".encode()]


def test_version_policy(client: tc.InferenceServerClient) -> None:
    assert client.get_model_metadata("latest2").versions == ["2", "3"]
    assert client.get_model_metadata("specific").versions == ["1"]
    assert client.is_model_ready("latest2", "3") and not client.is_model_ready("latest2", "1")
    x = np.zeros((1, 4), dtype=np.float32)
    assert client.infer("latest2", [_input("x", x)]).get_response().model_version == "3"
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer("latest2", [_input("x", x)], model_version="1")
    assert _status(excinfo) == "StatusCode.NOT_FOUND" and "[2, 3]" in excinfo.value.message()


@pytest.mark.parametrize(
    ("model", "inputs", "code", "words"),
    [
        ("nope", [("x", np.zeros((1, 4), np.float32), "FP32")], "NOT_FOUND", ["'nope'"]),
        ("pair", [("w", np.zeros((1, 4), np.float32), "FP32")], "INVALID_ARGUMENT", ["'w'", "['x']"]),
        ("pair", [("x", np.zeros((1, 5), np.float32), "FP32")], "INVALID_ARGUMENT", ["[1,5]", "[-1,4]"]),
        ("pair", [("x", np.zeros((1, 4), np.float64), "FP64")], "INVALID_ARGUMENT", ["FP64", "FP32"]),
        ("pair", [("x", np.zeros((9, 4), np.float32), "FP32")], "INVALID_ARGUMENT", ["batch size 9", "1..8"]),
    ],
)
def test_errors_have_their_status_codes(
    client: tc.InferenceServerClient, model: str, inputs: list[tuple[str, np.ndarray, str]], code: str, words: list[str]
) -> None:
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer(model, [_input(n, a, d) for n, a, d in inputs])
    assert _status(excinfo) == f"StatusCode.{code}"
    for word in words:
        assert word in excinfo.value.message()


def test_raw_byte_size_mismatch_is_invalid_argument(server: ServerHandle) -> None:
    request = pb.ModelInferRequest(model_name="pair")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(b"\0" * 12)
    with grpc.insecure_channel(server.url) as channel, pytest.raises(grpc.RpcError) as excinfo:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert excinfo.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "12 bytes" in excinfo.value.details() and "needs 16" in excinfo.value.details()


def test_oversized_message_is_resource_exhausted(client: tc.InferenceServerClient) -> None:
    big = np.zeros((8, 1, 8, 8 * 600), np.float32)  # ~1.2 MiB > the 1 MiB limit
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer(DIGITS, [_input("input", big)])
    assert _status(excinfo) == "StatusCode.RESOURCE_EXHAUSTED"
    assert str(2**20) in excinfo.value.message()


def test_tensorrt_plan_without_tensorrt_fails_alone(client: tc.InferenceServerClient) -> None:
    index = {(m.name, m.version): m for m in client.get_model_repository_index().models}
    failed = index[("digits-fp32-trt", "")]
    assert failed.state == "UNAVAILABLE" and "kiln-serve[tensorrt]" in failed.reason
    assert index[(DIGITS, "1")].state == "READY"
    with pytest.raises(InferenceServerException) as excinfo:
        client.load_model("digits-fp32-trt")
    assert _status(excinfo) == "StatusCode.FAILED_PRECONDITION"
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer("digits-fp32-trt", [_input("x", np.zeros((1, 4), np.float32))])
    assert _status(excinfo) == "StatusCode.UNAVAILABLE"


def test_load_refuses_paths_outside_the_repository(client: tc.InferenceServerClient) -> None:
    for name in ("..", "../repo", "nope"):  # ../repo is the repository itself
        with pytest.raises(InferenceServerException) as excinfo:
            client.load_model(name)
        assert _status(excinfo) == "StatusCode.NOT_FOUND"


def test_unload_and_load(client: tc.InferenceServerClient) -> None:
    x = np.ones((1, 4), np.float32)
    client.unload_model("specific")
    assert not client.is_model_ready("specific")
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer("specific", [_input("x", x)])
    assert _status(excinfo) == "StatusCode.UNAVAILABLE"
    client.load_model("specific")
    assert client.is_model_ready("specific")
    np.testing.assert_array_equal(client.infer("specific", [_input("x", x)]).as_numpy("z"), x + 1)


def test_statistics_count_requests(client: tc.InferenceServerClient) -> None:
    x = np.ones((3, 4), np.float32)
    before = client.get_inference_statistics("pair", "1").model_stats[0]
    for _ in range(2):
        client.infer("pair", [_input("x", x)], model_version="1")
    after = client.get_inference_statistics("pair", "1").model_stats[0]
    assert after.inference_count - before.inference_count == 6
    assert after.execution_count - before.execution_count == 2
    assert after.inference_stats.success.count - before.inference_stats.success.count == 2
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns


def test_health_service_reports_serving(server: ServerHandle) -> None:
    with grpc.insecure_channel(server.url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status = stub.Check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_aio_client_and_stream(server: ServerHandle, digits_x: np.ndarray) -> None:
    async def scenario() -> tuple[np.ndarray, dict[str, str]]:
        async with tca.InferenceServerClient(server.url) as client:
            tensor = tca.InferInput("input", [2, 1, 8, 8], "FP32")
            tensor.set_data_from_numpy(digits_x[:2])
            result = await client.infer(DIGITS, [tensor])

            async def requests():  # type: ignore[no-untyped-def]
                for index, model in enumerate((DIGITS, "nope", DIGITS)):
                    yield {"model_name": model, "inputs": [tensor], "request_id": str(index)}

            seen = {}
            async for response, error in client.stream_infer(requests()):
                key = response.get_response().id if error is None else str(error)
                seen[key] = "ok" if error is None else "error"
            return result.as_numpy("logits"), seen

    logits, seen = asyncio.run(scenario())
    assert logits.shape == (2, 10)
    assert [k for k, v in seen.items() if v == "ok"] in (["0", "2"], ["2", "0"])
    assert any("NOT_FOUND" in k for k, v in seen.items() if v == "error")


def test_shutdown_drains_in_flight_requests(repo: Path) -> None:
    from harness.serve import DelayFactory

    handle = start_server(repo, models=["pair"], runner_factory=DelayFactory(0.3))
    results: list[str] = []

    def call() -> None:
        with tc.InferenceServerClient(handle.url) as c:
            out = c.infer("pair", [_input("x", np.ones((1, 4), np.float32))], model_version="1")
            results.append("ok" if out.as_numpy("y") is not None else "empty")

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    batcher = handle.store.get("pair", "1").batcher
    for _ in range(500):  # until all three are queued or running (bounded: 5 s)
        if batcher.outstanding == 3:
            break
        threading.Event().wait(0.01)
    assert batcher.outstanding == 3
    handle.stop(grace=5)
    for t in threads:
        t.join(timeout=10)
    assert results == ["ok", "ok", "ok"]
    with pytest.raises(InferenceServerException), tc.InferenceServerClient(handle.url) as c:
        c.is_server_live()


def test_explicitly_named_model_that_fails_to_load_stops_start_up(tmp_path: Path) -> None:
    from core.errors import UnavailableError

    broken = tmp_path / "repo" / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "1" / "model.onnx").write_bytes(b"not onnx")
    (broken / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\nmax_batch_size: 0\n')
    with pytest.raises(UnavailableError, match="models named with --models did not load: broken"):
        start_server(tmp_path / "repo", port=0, models=["broken"])
