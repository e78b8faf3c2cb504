"""Seeded hostile inputs for the gateway: KServe v2 request bodies and admin API bodies.

Every generator takes a ``random.Random``; the same seed gives the same cases, so a failure
names its seed and index and replays exactly. Used by tests/integration/test_gateway_fuzz.py
and benchmarks/bench_soak.py.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from typing import Any

from tritonclient.grpc import service_pb2

NAMES = ["digits", "", "unknown", "digits\x00", "d" * 5000, "\uff44igits", "../../etc/passwd", " digits", "DIGITS"]
VERSIONS = ["", "1", "2", "3", " 1", "\uff11", "0_1", "-1", "01", "9" * 40, "1\n", "latest"]
DATATYPES = ["FP32", "INT8", "BYTES", "FP64", "", "BOOL", "fp32", "X" * 300]


def valid_request(rng: random.Random, name: str = "digits") -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=name, id=f"fuzz-{rng.randrange(10**6)}")
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "input", "FP32"
    tensor.shape.extend([1, 1, 8, 8])
    request.raw_input_contents.append(rng.randbytes(256))
    return request


def _structured(rng: random.Random) -> bytes:
    """Valid protobuf with hostile values: names, versions, shapes, datatypes, parameters."""
    request = valid_request(rng, rng.choice(NAMES))
    request.model_version = rng.choice(VERSIONS)
    tensor = request.inputs[0]
    kind = rng.randrange(6)
    if kind == 0:
        del tensor.shape[:]
        tensor.shape.extend([0, 2**63 - 1] if rng.random() < 0.5 else [1] * rng.randrange(60, 80))
    elif kind == 1:
        tensor.datatype = rng.choice(DATATYPES)
    elif kind == 2:
        request.raw_input_contents[0] = rng.randbytes(rng.randrange(0, 600))
    elif kind == 3:
        request.parameters["sequence_id"].int64_param = rng.choice([-1, 2**63 - 1, 0])
        request.parameters["binary_data_output"].string_param = "x" * rng.randrange(0, 2000)
    elif kind == 4:
        for _ in range(rng.randrange(1, 40)):
            request.inputs.add().name = rng.choice(["input", "", "x" * 100])
    else:
        request.outputs.add().name = rng.choice(["logits", "", "nope", "\u2603"])
    return request.SerializeToString()


def _mutated(rng: random.Random) -> bytes:
    """A valid body damaged at the byte level: truncated, flipped, spliced, or framed oddly."""
    data = bytearray(valid_request(rng).SerializeToString())
    kind = rng.randrange(7)
    if kind == 0:
        return bytes(data[: rng.randrange(0, len(data))])
    if kind == 1:
        for _ in range(rng.randrange(1, 9)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if kind == 2:
        at = rng.randrange(len(data))
        return bytes(data[:at] + rng.randbytes(rng.randrange(1, 16)) + data[at:])
    if kind == 3:
        return rng.randbytes(rng.randrange(0, 64))
    if kind == 4:  # an overlong varint tag or length
        return bytes([0x0A]) + b"\xff" * rng.randrange(1, 12) + bytes(data)
    if kind == 5:  # a length that points past the end
        return bytes([0x0A, 0xFF, 0xFF, 0x03]) + b"digits"
    return bytes([rng.choice([0x03, 0x04, 0x06, 0x07, 0x0B, 0x0C])]) + bytes(data)  # group/unknown wire types


def infer_body(rng: random.Random) -> bytes:
    """One hostile ModelInferRequest body (about half valid protobuf with hostile values)."""
    return _structured(rng) if rng.random() < 0.5 else _mutated(rng)


# ---- admin API ----------------------------------------------------------------------------------
def _weird_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(10)
    if kind == 0:
        return rng.choice([True, False, None])
    if kind == 1:
        return rng.choice([math.nan, math.inf, -math.inf, 1e308, -1.0, 0, 100, 101, 2**70])
    if kind == 2:
        return rng.choice(["", "x" * 3000, "\u0000", "100", "NaN", "a b"])
    if kind == 3 and depth < 4:
        return [_weird_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    if kind == 4 and depth < 4:
        return {rng.choice(["name", "weight", "variants", "x"]): _weird_value(rng, depth + 1) for _ in range(3)}
    return rng.uniform(-10, 110)


def _route(rng: random.Random) -> dict[str, Any]:
    route: dict[str, Any] = {"variants": [
        {"name": "a", "upstream": "up", "model": "digits", "weight": 60},
        {"name": "b", "upstream": "up", "model": "digits", "weight": 40},
    ]}  # fmt: skip
    target = rng.choice([route, route["variants"][0], route["variants"][1]])
    key = rng.choice([*target.keys(), "extra", "shadow", "sticky", "pinning"])
    target[key] = _weird_value(rng)
    return route


def admin_case(rng: random.Random) -> tuple[str, str, bytes]:
    """(method, path, body) of one hostile admin request (authenticated by the caller)."""
    kind = rng.randrange(8)
    if kind == 0:
        return "PUT", "/routes/digits", json.dumps(_route(rng)).encode()
    if kind == 1:
        weights = {rng.choice(["a", "b", "c", ""]): _weird_value(rng) for _ in range(rng.randrange(0, 3))}
        return "POST", "/routes/digits/weights", json.dumps({"weights": weights}).encode()
    if kind == 2:
        body = {"routes": {"digits": _route(rng)}, "expected_version": _weird_value(rng)}
        return "PUT", "/routes", json.dumps(body).encode()
    if kind == 3:
        depth = rng.randrange(20, 3000)
        return "POST", "/routes/digits/weights", b"[" * depth + b"]" * depth
    if kind == 4:
        return "POST", "/routes/digits/weights", rng.randbytes(rng.randrange(0, 200))
    if kind == 5:
        window = rng.choice(["nan", "inf", "-1", "0", "abc", "1e999", "", "5", "%00"])
        return "GET", f"/stats?window_s={window}", b""
    if kind == 6:
        path = rng.choice(["/routes/digits/x", "/routes//", "/%2e%2e/", "/rollouts", "/routes/" + "x" * 3000])
        return rng.choice(["GET", "DELETE", "PATCH", "POST"]), path, json.dumps(_weird_value(rng)).encode()
    body = json.dumps(_weird_value(rng)).encode()
    return "PUT", "/routes/digits", body


Generator = Callable[[random.Random], Any]
