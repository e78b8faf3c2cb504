"""Regressions from the hostile-input pass on ``kiln serve``: every stream request gets an answer,
absurd shapes and undecodable bodies are INVALID_ARGUMENT with Kiln's words, versions are parsed
strictly, and error details never show where the repository lives."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from builders.model_config import ServingOptions
from harness.serve import PAIR_SPECS, make_pair_model, write_model
from server.app import ServerHandle, start_server

pytestmark = pytest.mark.integration
FULL_WIDTH_ONE = "\uff11"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile") / "repo"
    artifact = make_pair_model(tmp_path_factory.mktemp("onnx") / "pair.onnx")
    write_model(root, "pair", {1: artifact}, *PAIR_SPECS, ServingOptions(max_batch_size=8))
    broken = write_model(root, "broken", {1: artifact}, *PAIR_SPECS, ServingOptions(max_batch_size=8))
    (broken / "1" / "model.onnx").write_bytes(b"not an onnx model")
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerHandle]:
    handle = start_server(repo, port=0)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def stub(server: ServerHandle) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _request(shape: list[int], raw: bytes, request_id: str = "", version: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="pair", id=request_id, model_version=version)
    request.inputs.add(name="x", datatype="FP32", shape=shape)
    request.raw_input_contents.append(raw)
    return request


def _good(request_id: str = "") -> pb.ModelInferRequest:
    return _request([1, 4], np.arange(4, dtype="<f4").tobytes(), request_id)


def test_a_stream_request_that_fails_unexpectedly_still_gets_its_answer(
    stub: pb_grpc.GRPCInferenceServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    requests = [_good("a"), _request([0, 2**63 - 1], b"", "b"), _good("c"), _request([1] * 65, b"\0" * 4, "d")]
    answers = {a.infer_response.id: a for a in stub.ModelStreamInfer(iter(requests), timeout=20)}
    assert sorted(answers) == ["a", "b", "c", "d"]
    assert answers["a"].error_message == answers["c"].error_message == ""
    assert answers["b"].error_message.startswith("INVALID_ARGUMENT: input 'x' has shape [0,9223372036854775807]")
    assert answers["d"].error_message.startswith("INVALID_ARGUMENT: input 'x' has 65 dims")
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([0, 2**63 - 1], "even with its zero dims left out that is more than 2**40 elements"),
        ([1] * 65, "has 65 dims ([1,1,1,1,1,1,1,1,...]); at most 64 are supported"),
        ([1] * 1000, "has 1000 dims"),
    ],
)
def test_absurd_shapes_are_invalid_argument_in_kilns_words(
    stub: pb_grpc.GRPCInferenceServiceStub, shape: list[int], message: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(_request(shape, b"" if 0 in shape else b"\0" * 4), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    assert stub.ModelInfer(_good(), timeout=10).outputs[0].name == "y"


def test_undecodable_bodies_are_invalid_argument_and_keep_the_stream(server: ServerHandle) -> None:
    with grpc.insecure_channel(server.url) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(b"\x0f\xff\xff", timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request body (3 bytes) is not a ModelInferRequest protobuf" in caught.value.details()
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        bodies = [_good("a").SerializeToString(), b"\x0f\x00", _good("b").SerializeToString()]
        answers = [pb.ModelStreamInferResponse.FromString(b) for b in stream(iter(bodies), timeout=20)]
    by_id = {a.infer_response.id: a.error_message for a in answers}
    assert by_id[""].startswith("INVALID_ARGUMENT: request body (2 bytes) is not a ModelInferRequest protobuf")
    assert by_id["a"] == by_id["b"] == ""
    assert len(answers) == 3


@pytest.mark.parametrize("version", [" 1", FULL_WIDTH_ONE, "0_1", "+1", "01", "1 ", "-1"])
def test_versions_must_be_ascii_digits(server: ServerHandle, version: str) -> None:
    with tc.InferenceServerClient(server.url) as client:
        x = tc.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
        for call in (
            lambda: client.infer("pair", [x], model_version=version),
            lambda: client.get_model_metadata("pair", model_version=version),
            lambda: client.is_model_ready("pair", model_version=version),
        ):
            with pytest.raises(InferenceServerException) as caught:
                call()
            assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
            assert f"model version {version!r} is not a version number" in caught.value.message()
        assert client.infer("pair", [x], model_version="1").as_numpy("y").tolist() == [[1.0] * 4]
        assert client.is_model_ready("pair", model_version="1")


def test_error_details_never_show_the_repository_path(stub: pb_grpc.GRPCInferenceServiceStub, repo: Path) -> None:
    shown: list[str] = []
    for request in (
        pb.ModelInferRequest(model_name="broken"),
        pb.ModelInferRequest(model_name="absent"),
        pb.ModelInferRequest(model_name="pair", model_version="7"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=10)
        shown.append(caught.value.details())
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
    shown.extend(m.reason for m in index.models)
    assert "model 'broken' is not loaded" in shown[0]
    assert shown[1] == "model 'absent' is not in the repository; see RepositoryIndex"
    assert any("broken/1/model.onnx" in s for s in shown), shown
    for text in shown:
        assert str(repo.resolve()) not in text and str(repo.parent) not in text, text
