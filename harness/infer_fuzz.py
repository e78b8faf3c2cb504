"""Hostile ModelInfer requests, seeded and reproducible, each with what the server must answer.

The target is a model like ``harness.serve.make_pair_model``: input ``x`` FP32 [-1,4], outputs
``y = x`` and ``z = x + offset``, max_batch_size 8. ``structured_case`` changes one thing of a
valid request and knows the status code and a fragment of the message it must get;
``chaos_case`` changes several things at once (any refusal but a crash will do, and a success
must compute the right numbers); ``byte_case`` mutates or invents the serialized body itself.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb

MODEL = "pair"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
OK = grpc.StatusCode.OK
# Codes a hostile request may get from kiln serve; INTERNAL and UNKNOWN mean a crash or a bug.
ACCEPTABLE = {OK, INVALID, NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
BAD_VERSIONS = (" 1", "1 ", "\uff11", "\u0661", "0_1", "+1", "-1", "0", "01", "1.0", "1e0", "\t1", "9" * 20)
BAD_DATATYPES = ("", "fp32", "FP3", "FLOAT", "BF16x", "FP32\n", "\x00", "X" * 300)
OTHER_DATATYPES = ("FP16", "FP64", "INT8", "INT32", "INT64", "UINT8", "BOOL")


@dataclass(frozen=True)
class Case:
    """One hostile request and what must come back: ``code`` None means any acceptable code."""

    label: str
    body: pb.ModelInferRequest | bytes
    code: grpc.StatusCode | None = None
    fragment: str = ""


def valid_request(rng: random.Random, request_id: str = "") -> pb.ModelInferRequest:
    """A correct request: a batch of 1-8 rows of 4 floats."""
    batch = rng.randint(1, 8)
    x = np.asarray([[rng.uniform(-1e3, 1e3) for _ in range(4)] for _ in range(batch)], dtype="<f4")
    request = pb.ModelInferRequest(model_name=MODEL, id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=[batch, 4])
    request.raw_input_contents.append(x.tobytes())
    return request


def expected_outputs(request: pb.ModelInferRequest, offset: float) -> dict[str, np.ndarray]:
    """What the pair model answers to a request the server accepted (from the request as parsed)."""
    x = _input_array(request)
    return {"y": x, "z": x + np.float32(offset)}


def _input_array(request: pb.ModelInferRequest) -> np.ndarray:
    tensor = request.inputs[0]
    shape = [int(d) for d in tensor.shape]
    if request.raw_input_contents:
        return np.frombuffer(request.raw_input_contents[0], dtype="<f4").reshape(shape)
    return np.asarray(tensor.contents.fp32_contents, dtype=np.float32).reshape(shape)


def _version(rng: random.Random, r: pb.ModelInferRequest) -> tuple[str, grpc.StatusCode, str]:
    version = rng.choice(BAD_VERSIONS)
    r.model_version = version
    return f"version {version!r}", INVALID, "is not a version number"


def _missing_version(rng: random.Random, r: pb.ModelInferRequest) -> tuple[str, grpc.StatusCode, str]:
    r.model_version = str(rng.randint(2, 10**12))
    return f"version {r.model_version}", NOT_FOUND, "has no version"


def _model_name(rng: random.Random, r: pb.ModelInferRequest) -> tuple[str, grpc.StatusCode, str]:
    r.model_name = rng.choice(["", "nope", "../pair", "pair/1", "/etc/passwd", "PAIR", "pair\x00", "p" * 5000])
    return f"model {r.model_name[:20]!r}", NOT_FOUND, "is not in the repository"


def _bad_datatype(rng: random.Random, r: pb.ModelInferRequest) -> tuple[str, grpc.StatusCode, str]:
    r.inputs[0].datatype = rng.choice(BAD_DATATYPES)
    return f"datatype {r.inputs[0].datatype[:10]!r}", INVALID, "unknown datatype"


def _other_datatype(rng: random.Random, r: pb.ModelInferRequest) -> tuple[str, grpc.StatusCode, str]:
    datatype = rng.choice(OTHER_DATATYPES)
    size = {"FP16": 2, "FP64": 8, "INT8": 1, "INT32": 4, "INT64": 8, "UINT8": 1, "BOOL": 1}[datatype]
    r.inputs[0].datatype = datatype
    r.raw_input_contents[0] = bytes(size * _count(r))
    return f"datatype {datatype}", INVALID, f"has datatype {datatype}; model 'pair' expects FP32"


def _absurd_shape(rng: random.Random, r: pb.ModelInferRequest) -> tuple[str, grpc.StatusCode, str]:
    shape, fragment = rng.choice(
        [
            ([0, 2**63 - 1], "no request can carry"),
            ([0, 2**62, 2**62], "no request can carry"),
            ([2**31, 2**31, 4], "no request can carry"),
            ([1] * rng.randint(65, 300), "at most 64 are supported"),
            ([rng.randint(1, 8), -rng.randint(1, 2**62)], "dims must be >= 0"),
        ]
    )
    r.inputs[0].ClearField("shape")
    r.inputs[0].shape.extend(shape)
    if 0 in shape:
        r.raw_input_contents[0] = b""
    return f"shape {shape[:3]}..{len(shape)}", INVALID, fragment


def _wrong_shape(rng: random.Random, r: pb.ModelInferRequest) -> tuple[str, grpc.StatusCode, str]:
    shape = rng.choice([[4], [1, 5], [1, 4, 1], [1, 2, 2], [], [1, 0]])
    r.inputs[0].ClearField("shape")
    r.inputs[0].shape.extend(shape)
    r.raw_input_contents[0] = bytes(4 * int(np.prod(shape)))
    return f"shape {shape}", INVALID, "model 'pair' expects [-1,4]"


def _batch(rng: random.Random, r: pb.ModelInferRequest) -> tuple[str, grpc.StatusCode, str]:
    batch = rng.choice([0, 9, 64, 1000])
    r.inputs[0].ClearField("shape")
    r.inputs[0].shape.extend([batch, 4])
    r.raw_input_contents[0] = bytes(16 * batch)
    return f"batch {batch}", INVALID, "outside 1..8"


def _size(rng: random.Random, r: pb.ModelInferRequest) -> tuple[str, grpc.StatusCode, str]:
    data = r.raw_input_contents[0]
    cut = rng.choice([0, 1, 3, len(data) - 1, len(data) + 1, len(data) * 2, len(data) + rng.randint(1, 999)])
    r.raw_input_contents[0] = (data * 3)[: max(cut, 0)]
    return f"{cut} bytes", INVALID, "bytes of raw data"


def _raw_count(rng: random.Random, r: pb.ModelInferRequest) -> tuple[str, grpc.StatusCode, str]:
    r.raw_input_contents.append(bytes(rng.randint(0, 64)))
    return "extra raw_input_contents", INVALID, "raw_input_contents; send one per input"


def _typed(rng: random.Random, r: pb.ModelInferRequest) -> tuple[str, grpc.StatusCode, str]:
    del r.raw_input_contents[:]
    count = _count(r) + rng.choice([-1, 1, 5])
    r.inputs[0].contents.fp32_contents.extend(rng.uniform(-1, 1) for _ in range(max(count, 0)))
    return "typed contents of the wrong count", INVALID, "elements in contents.fp32_contents"


def _names(rng: random.Random, r: pb.ModelInferRequest) -> tuple[str, grpc.StatusCode, str]:
    choice = rng.randrange(4)
    if choice == 0:
        r.inputs[0].name = rng.choice(["", "y", "X", "x\u202e", "x" * 3000])
        return "input name", INVALID, "has no input"
    if choice == 1:
        r.inputs.add().CopyFrom(r.inputs[0])
        r.raw_input_contents.append(r.raw_input_contents[0])
        return "input twice", INVALID, "appears twice"
    if choice == 2:
        r.outputs.add(name=rng.choice(["", "w", "Y", "x", "y" * 3000]))
        return "unknown output", INVALID, "has no output"
    del r.inputs[:]
    del r.raw_input_contents[:]
    return "no inputs", INVALID, "is missing"


STRUCTURED: tuple[Callable[[random.Random, pb.ModelInferRequest], tuple[str, grpc.StatusCode, str]], ...] = (
    _version,
    _missing_version,
    _model_name,
    _bad_datatype,
    _other_datatype,
    _absurd_shape,
    _wrong_shape,
    _batch,
    _size,
    _raw_count,
    _typed,
    _names,
)


_REQUEST_LEVEL = (_version, _missing_version, _model_name)


def _count(r: pb.ModelInferRequest) -> int:
    """Elements the first input's shape asks for, capped (an earlier mutation may have made it absurd)."""
    count = 1
    for d in r.inputs[0].shape if r.inputs else [0]:
        count *= max(int(d), 0)
    return min(count, 4096)


def structured_case(rng: random.Random, request_id: str = "") -> Case:
    """A valid request with one thing wrong, and the code and message fragment it must get."""
    request = valid_request(rng, request_id)
    mutate = rng.choice(STRUCTURED)
    label, code, fragment = mutate(rng, request)
    return Case(f"{mutate.__name__.strip('_')}: {label}", request, code, fragment)


def chaos_case(rng: random.Random, request_id: str = "") -> Case:
    """Two to four structured mutations at once: any acceptable answer, never a crash."""
    request = valid_request(rng, request_id)
    labels = []
    for mutate in rng.sample(STRUCTURED, rng.randint(2, 4)):
        if mutate not in _REQUEST_LEVEL and (not request.inputs or not request.raw_input_contents):
            continue  # it rewrites the first input, which an earlier mutation removed
        labels.append(mutate(rng, request)[0])
    if rng.random() < 0.3:
        request.parameters["k"].string_param = "v" * rng.randint(0, 100)
    return Case("chaos: " + "; ".join(labels), request)


def byte_case(rng: random.Random) -> Case:
    """A serialized valid request with bytes flipped, cut or inserted, or random bytes altogether."""
    data = bytearray(valid_request(rng).SerializeToString())
    kind = rng.randrange(4)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 1:
        data = data[: rng.randrange(len(data))]
    elif kind == 2:
        at = rng.randrange(len(data))
        data[at:at] = rng.randbytes(rng.randint(1, 32))
    else:
        data = bytearray(rng.randbytes(rng.randint(0, 300)))
    return Case(f"bytes ({['flipped', 'cut', 'inserted', 'random'][kind]})", bytes(data))


def undecodable_body(rng: random.Random) -> bytes:
    """Bytes that are never a protobuf message: a field key with the invalid wire type 7 first."""
    return bytes([0x0F]) + rng.randbytes(rng.randint(0, 64))
