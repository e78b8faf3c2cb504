"""Byte-level rewrite of KServe v2 messages: name/version change, tensors byte-identical."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from core.errors import InvalidInputError
from server.gateway.wire import encode_varint, name_version_suffix, read_model_name, read_string_field


def infer_request(name: str = "digits", version: str = "3") -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=name, model_version=version, id="req-1")
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "input", "FP32"
    tensor.shape.extend([4, 1, 8, 8])
    tensor.parameters["binary_data_size"].int64_param = 1024
    request.outputs.add().name = "logits"
    request.parameters["priority"].int64_param = 2
    request.raw_input_contents.append(np.arange(256, dtype=np.float32).tobytes())
    return request


def test_rewrite_round_trip_changes_only_name_and_version() -> None:
    original = infer_request()
    data = original.SerializeToString()
    rewritten = service_pb2.ModelInferRequest.FromString(data + name_version_suffix("digits-int8-ort", "7"))
    assert (rewritten.model_name, rewritten.model_version) == ("digits-int8-ort", "7")
    assert rewritten.raw_input_contents == original.raw_input_contents
    assert rewritten.inputs == original.inputs and rewritten.outputs == original.outputs
    assert rewritten.id == "req-1" and rewritten.parameters["priority"].int64_param == 2


def test_empty_version_override_clears_the_version() -> None:
    data = infer_request(version="3").SerializeToString() + name_version_suffix("m", "")
    assert service_pb2.ModelInferRequest.FromString(data).model_version == ""


def test_read_model_name_skips_tensors_and_takes_the_last_value() -> None:
    data = infer_request(name="digits").SerializeToString()
    assert read_model_name(data) == "digits"
    assert read_model_name(data + name_version_suffix("other", "")) == "other"
    assert read_string_field(data, 2) == "3"
    assert read_model_name(b"") == ""
    long_name = "m" * 300  # two-byte length varint
    assert read_model_name(service_pb2.ModelInferRequest(model_name=long_name).SerializeToString()) == long_name


def test_other_model_requests_share_the_layout() -> None:
    data = service_pb2.ModelMetadataRequest(name="digits", version="1").SerializeToString()
    rewritten = service_pb2.ModelMetadataRequest.FromString(data + name_version_suffix("x", "2"))
    assert (read_model_name(data), rewritten.name, rewritten.version) == ("digits", "x", "2")


def test_truncated_or_foreign_bytes_are_refused() -> None:
    data = infer_request().SerializeToString()
    with pytest.raises(InvalidInputError, match="truncated"):
        read_model_name(data[:-5])
    with pytest.raises(InvalidInputError, match="wire type 3"):
        read_model_name(bytes([0x0B]))


def test_varint_encoding() -> None:
    assert encode_varint(1) == b"\x01"
    assert encode_varint(300) == b"\xac\x02"
