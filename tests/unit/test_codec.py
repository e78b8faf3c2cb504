"""Wire tensors <-> numpy: raw and typed contents, BYTES framing, and the errors' wording."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from core.errors import InvalidInputError
from server.codec import decode_inputs, encode_outputs, to_raw


def request(datatype: str, shape: list[int], raw: bytes | None = None) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="a", datatype=datatype, shape=shape)
    if raw is not None:
        req.raw_input_contents.append(raw)
    return req


def test_raw_fp32_round_trip() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = decode_inputs(request("FP32", [2, 3], x.tobytes()))["a"]
    np.testing.assert_array_equal(out, x)
    response = pb.ModelInferResponse()
    encode_outputs(response, {"y": x})
    assert response.outputs[0].datatype == "FP32" and list(response.outputs[0].shape) == [2, 3]
    assert response.raw_output_contents[0] == x.tobytes()


def test_raw_size_mismatch_says_got_and_needed() -> None:
    with pytest.raises(InvalidInputError, match=r"has 8 bytes .* needs 24"):
        decode_inputs(request("FP32", [2, 3], b"\0" * 8))


def test_bytes_are_length_prefixed() -> None:
    raw = to_raw(np.array([b"ab", b""], dtype=object))
    assert raw == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0)
    out = decode_inputs(request("BYTES", [2], raw))["a"]
    assert list(out) == [b"ab", b""]


@pytest.mark.parametrize(
    ("raw", "message"),
    [(b"\x05\x00", "inside a 4-byte length prefix"), (struct.pack("<I", 9) + b"abc", "claims 9 bytes")],
)
def test_truncated_bytes_are_invalid(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        decode_inputs(request("BYTES", [1], raw))


def test_typed_contents_and_count_check() -> None:
    req = request("INT64", [3])
    req.inputs[0].contents.int64_contents.extend([1, 2, 3])
    assert decode_inputs(req)["a"].tolist() == [1, 2, 3]
    req.inputs[0].shape[:] = [4]
    with pytest.raises(InvalidInputError, match="3 elements in contents.int64_contents"):
        decode_inputs(req)


def test_fp16_needs_raw_contents() -> None:
    with pytest.raises(InvalidInputError, match="raw_input_contents"):
        decode_inputs(request("FP16", [1]))


def test_unknown_datatype_and_duplicate_inputs() -> None:
    with pytest.raises(InvalidInputError, match="unknown datatype 'FP8'"):
        decode_inputs(request("FP8", [1], b"\0"))
    req = request("FP32", [1], b"\0" * 4)
    req.inputs.add(name="a", datatype="FP32", shape=[1])
    req.raw_input_contents.append(b"\0" * 4)
    with pytest.raises(InvalidInputError, match="appears twice"):
        decode_inputs(req)


def test_raw_count_must_match_inputs() -> None:
    req = request("FP32", [1], b"\0" * 4)
    req.raw_input_contents.append(b"\0" * 4)
    with pytest.raises(InvalidInputError, match="1 inputs but 2 raw_input_contents"):
        decode_inputs(req)


@pytest.mark.parametrize(
    ("shape", "raw", "message"),
    [
        ([0, 2**63 - 1], b"", r"has shape \[0,9223372036854775807\]: even with its zero dims left out that is more"),
        ([0, 2**62, 2**62], b"", "which no request can carry; send the tensor's real shape"),
        ([2**21, 2**21], b"", r"has shape \[2097152,2097152\]: even with"),
        ([1] * 65, b"\0" * 4, r"has 65 dims \(\[1,1,1,1,1,1,1,1,...\]\); at most 64 are supported"),
        ([2, -3], b"", r"has shape \[2,-3\]; dims must be >= 0"),
    ],
)
def test_absurd_shapes_get_kilns_message_not_numpys(shape: list[int], raw: bytes, message: str) -> None:
    for datatype in ("FP32", "BYTES"):
        with pytest.raises(InvalidInputError, match=message):
            decode_inputs(request(datatype, shape, raw))
    typed = request("FP32", shape)
    with pytest.raises(InvalidInputError, match=message):
        decode_inputs(typed)


def test_largest_shapes_that_fit_still_decode() -> None:
    assert decode_inputs(request("FP32", [0, 2**40], b""))["a"].shape == (0, 2**40)
    assert decode_inputs(request("FP32", [1] * 64, b"\0" * 4))["a"].ndim == 64
