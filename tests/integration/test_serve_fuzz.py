"""Hostile inputs against a real ``kiln serve``: thousands of seeded cases over ModelInfer and
ModelStreamInfer. Every case gets the right status code and message, every stream request its
response, the next good request the right numbers, and nothing served or published changes."""

from __future__ import annotations

import collections
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from builders.model_config import ServingOptions
from builders.tensors import TensorSpec
from harness.infer_fuzz import (
    ACCEPTABLE,
    MODEL,
    Case,
    byte_case,
    chaos_case,
    expected_outputs,
    structured_case,
    undecodable_body,
    valid_request,
)
from harness.models import tree_snapshot
from harness.serve import PAIR_SPECS, make_pair_model, make_string_model, write_model
from server.app import ServerHandle, start_server

pytestmark = pytest.mark.integration
SEED = 20261201
OFFSET = 1.5
INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz") / "repo"
    artifact = make_pair_model(tmp_path_factory.mktemp("onnx") / "pair.onnx", offset=OFFSET)
    write_model(root, MODEL, {1: artifact}, *PAIR_SPECS, ServingOptions(max_batch_size=8))
    words = make_string_model(tmp_path_factory.mktemp("onnx") / "words.onnx")
    specs = ((TensorSpec("s", "object", (2,)),), (TensorSpec("t", "object", (2,)),))
    write_model(root, "words", {1: words}, *specs, ServingOptions(max_batch_size=0))
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerHandle]:
    handle = start_server(repo, port=0, max_message_mb=1)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def channel(server: ServerHandle) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.url) as ch:
        yield ch


class Tally:
    """Cases tried and what went wrong, for the assertion and the printed figures."""

    def __init__(self, root: Path) -> None:
        self.root = str(root.resolve())
        self.tried = 0
        self.codes: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self.lost = 0

    def check(self, case: Case, code: grpc.StatusCode, message: str, response: pb.ModelInferResponse | None) -> None:
        self.tried += 1
        self.codes[code.name] += 1
        problems = []
        if code not in ACCEPTABLE:
            problems.append(f"code {code.name}")
        if case.code is not None and code != case.code:
            problems.append(f"code {code.name}, expected {case.code.name}")
        if case.fragment and case.fragment not in message:
            problems.append(f"message lacks {case.fragment!r}")
        if code != grpc.StatusCode.OK and (not message or len(message) > 2000):
            problems.append(f"message of {len(message)} characters")
        if self.root in message or "Traceback" in message or "numpy" in message:
            problems.append("message leaks a path or internals")
        if code == grpc.StatusCode.OK and response is not None:
            problems.extend(_wrong_numbers(case, response))
        if problems:
            self.failures.append(f"{case.label}: {'; '.join(problems)} -> {code.name}: {message[:300]}")


def _outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    return {
        out.name: np.frombuffer(raw, dtype="<f4").reshape([int(d) for d in out.shape])
        for out, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def _wrong_numbers(case: Case, response: pb.ModelInferResponse) -> list[str]:
    request = case.body if isinstance(case.body, pb.ModelInferRequest) else pb.ModelInferRequest.FromString(case.body)
    expected = expected_outputs(request, OFFSET)
    got = _outputs(response)
    wanted = [o.name for o in request.outputs] or ["y", "z"]
    if sorted(got) != sorted(wanted):
        return [f"outputs {sorted(got)}, expected {wanted}"]
    return [f"output {n} wrong" for n in wanted if not _close(got[n], expected[n])]


def _close(got: np.ndarray, expected: np.ndarray) -> bool:
    return got.shape == expected.shape and bool(np.allclose(got, expected, rtol=1e-6, atol=1e-4, equal_nan=True))


def _good_answer_is_right(channel: grpc.Channel, rng: random.Random) -> bool:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    request = valid_request(rng, "good")
    got = _outputs(stub.ModelInfer(request, timeout=10))
    expected = expected_outputs(request, OFFSET)
    return all(_close(got[n], expected[n]) for n in ("y", "z"))


def _unary(channel: grpc.Channel, case: Case) -> tuple[grpc.StatusCode, str, pb.ModelInferResponse | None]:
    body = case.body if isinstance(case.body, bytes) else case.body.SerializeToString()
    call = channel.unary_unary(INFER)
    try:
        data = call(body, timeout=10)
    except grpc.RpcError as err:
        return err.code(), err.details() or "", None
    return grpc.StatusCode.OK, "", pb.ModelInferResponse.FromString(data)


@pytest.mark.slow
def test_fuzz_model_infer_and_stream(
    channel: grpc.Channel, repo: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.ERROR)
    rng = random.Random(SEED)
    before = tree_snapshot(repo)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    index_before = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
    unary, stream = Tally(repo), Tally(repo)
    not_alive = 0

    makers = [structured_case] * 9 + [chaos_case] * 3 + [lambda r, _id="": byte_case(r)] * 8
    for _ in range(2500):
        case = rng.choice(makers)(rng)
        unary.check(case, *_unary(channel, case))
        not_alive += not _good_answer_is_right(channel, rng)

    for n in range(50):
        bodies, cases, good = [], {}, {}
        for i in range(30):
            kind = rng.random()
            if kind < 0.15:
                request = valid_request(rng, f"good-{n}-{i}")
                good[request.id] = request
                bodies.append(request.SerializeToString())
            elif kind < 0.27:
                bodies.append(undecodable_body(rng))
                cases.setdefault("", []).append(Case("undecodable", b"", grpc.StatusCode.INVALID_ARGUMENT, "protobuf"))
            else:
                case = rng.choice([structured_case] * 3 + [chaos_case])(rng, f"case-{n}-{i}")
                cases[case.body.id] = [case]
                bodies.append(case.body.SerializeToString())
        call = channel.stream_stream(STREAM)
        answers = [pb.ModelStreamInferResponse.FromString(b) for b in call(iter(bodies), timeout=30)]
        seen = collections.Counter(a.infer_response.id for a in answers)
        expected_ids = collections.Counter({k: len(v) for k, v in cases.items()}) + collections.Counter(good.keys())
        stream.lost += sum((expected_ids - seen).values())
        for answer in answers:
            rid = answer.infer_response.id
            if rid in good:
                got, expected = _outputs(answer.infer_response), expected_outputs(good[rid], OFFSET)
                ok = not answer.error_message and all(_close(got[k], v) for k, v in expected.items())
                not_alive += not ok
                continue
            queue = cases.get(rid) or []
            if not queue:
                stream.failures.append(f"unexpected response id {rid!r}")
                continue
            case = queue.pop()
            code_name, _, message = answer.error_message.partition(": ")
            code = grpc.StatusCode[code_name] if answer.error_message else grpc.StatusCode.OK
            stream.check(case, code, message, answer.infer_response if code == grpc.StatusCode.OK else None)
        not_alive += not _good_answer_is_right(channel, rng)

    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    assert stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10) == index_before
    assert tree_snapshot(repo) == before
    total = unary.tried + stream.tried
    with capsys.disabled():
        print(
            f"\nkiln serve fuzz (seed {SEED}): {total} hostile inputs ({unary.tried} ModelInfer, {stream.tried} "
            f"ModelStreamInfer), codes {dict(unary.codes + stream.codes)}, crashes 0 if passed, "
            f"lost stream responses {stream.lost}, wrong good answers {not_alive}"
        )
    assert unary.failures == [], sorted({f[:150] for f in unary.failures})[:30]
    assert stream.failures == [], sorted({f[:150] for f in stream.failures})[:30]
    assert stream.lost == 0
    assert not_alive == 0
    assert total >= 3000
    messages = [r.getMessage() for r in caplog.records]
    assert not any("never retrieved" in m or "failed" in m for m in messages), messages[:5]


def _bytes_body(rng: random.Random) -> tuple[bytes, list[bytes] | None]:
    """A BYTES tensor for ``words`` (s: BYTES [2]): well framed (returns its elements) or not (None)."""
    alphabet = "abc xyz\u00e9\u4e2d"
    text = [("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))) for _ in range(rng.choice([2, 2, 0, 3]))]
    elements = [t.encode() if rng.random() < 0.9 else rng.randbytes(8) for t in text]  # some not UTF-8
    data = b"".join(len(e).to_bytes(4, "little") + e for e in elements)
    if rng.random() < 0.5:
        cut = rng.randrange(len(data)) if data else 0  # strictly shorter: a frame is cut
        data = rng.choice([data[:cut], data + rng.randbytes(rng.randint(1, 9)), (2**32 - 1).to_bytes(4, "little")])
        return data, None
    return data, elements


def test_fuzz_bytes_tensors(channel: grpc.Channel, capsys: pytest.CaptureFixture[str]) -> None:
    """Length prefixes cut, overlong, trailing bytes and wrong counts in BYTES inputs: refused, never a crash;
    well-framed ones come back unchanged (the model is the identity)."""
    rng = random.Random(SEED + 7)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    codes: collections.Counter[str] = collections.Counter()
    for _ in range(400):
        data, elements = _bytes_body(rng)
        shape = rng.choice([[2], [2], [1, 2], [0], [0, 2**62], [3]])
        request = pb.ModelInferRequest(model_name="words")
        request.inputs.add(name="s", datatype="BYTES", shape=shape)
        request.raw_input_contents.append(data)
        try:
            response = stub.ModelInfer(request, timeout=10)
        except grpc.RpcError as err:
            codes[err.code().name] += 1
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (shape, data[:40], err.details())
            assert "input 's'" in err.details(), err.details()
            continue
        codes["OK"] += 1
        assert shape == [2] and elements is not None and len(elements) == 2, (shape, data[:40])
        assert response.raw_output_contents[0] == data
    with capsys.disabled():
        print(f"\nkiln serve BYTES fuzz (seed {SEED + 7}): 400 hostile BYTES inputs, codes {dict(codes)}")
    assert codes["OK"] > 20 and codes["INVALID_ARGUMENT"] > 200, codes
