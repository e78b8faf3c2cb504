"""A decoder served as a decoupled model: tokens streamed over ModelStreamInfer to real tritonclient."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from builders.examples import tiny_decoder_path
from builders.pipeline import build_model
from builders.request import BuildRequest, DecoderOptions
from runtime.decoder import generate, read_layout
from runtime.onnxruntime import OrtRunner
from runtime.runner import Runner, create_runner
from server.app import ServerHandle, start_server
from server.cli import main

pytestmark = pytest.mark.integration
MODEL = "tiny-fp32-ort"
FINAL = "triton_final_response"


class SlowRunner:
    """The real ONNX Runtime runner, 20 ms slower per run (so a test can cancel mid-stream)."""

    def __init__(self, inner: Runner) -> None:
        self.inner = inner
        self.output_names = inner.output_names

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(0.02)
        return self.inner.run(inputs)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("llm") / "repo"
    build_model(
        BuildRequest(model=tiny_decoder_path(), name="tiny", repo=root, decoder=DecoderOptions(max_new_tokens=200))
    )
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerHandle]:
    handle = start_server(repo, port=0)
    yield handle
    handle.stop()


class Stream:
    """One tritonclient stream; responses land in a queue with their arrival time."""

    def __init__(self, url: str) -> None:
        self.client = tc.InferenceServerClient(url)
        self.responses: queue.Queue[tuple[tc.InferResult | None, InferenceServerException | None]] = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))

    def send(self, request_id: str, prompt: str = "Hello", **extra: tuple[str, np.ndarray]) -> None:
        inputs = [_input("text_input", np.array([prompt.encode()], dtype=object), "BYTES")]
        inputs += [_input(name, arr, dtype) for name, (dtype, arr) in extra.items()]
        self.client.async_stream_infer(MODEL, inputs, request_id=request_id)

    def until_final(self, request_id: str) -> list[tc.InferResult]:
        results: list[tc.InferResult] = []
        while True:
            result, error = self.responses.get(timeout=30)
            assert error is None, str(error)
            assert result is not None and result.get_response().id == request_id
            results.append(result)
            if result.get_response().parameters[FINAL].bool_param:
                return results

    def error(self) -> str:
        result, error = self.responses.get(timeout=30)
        assert error is not None, f"expected an error, got {result.get_response() if result else None}"
        return str(error)

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def _input(name: str, arr: np.ndarray, datatype: str) -> tc.InferInput:
    tensor = tc.InferInput(name, list(arr.shape), datatype)
    tensor.set_data_from_numpy(arr)
    return tensor


def _tokens(n: int) -> tuple[str, np.ndarray]:
    return ("INT32", np.array([n], np.int32))


def test_one_response_per_token_matching_in_process_greedy_decoding(server: ServerHandle) -> None:
    runner = OrtRunner(tiny_decoder_path(), intra_op_threads=1)
    expected = generate(
        runner.run, read_layout(tiny_decoder_path()), list(b"Hello"), max_new_tokens=12, max_context=256
    )
    stream = Stream(server.url)
    try:
        stream.send("r1", max_tokens=_tokens(12))
        results = stream.until_final("r1")
    finally:
        stream.close()
    ids = [int(r.as_numpy("output_ids")[0]) for r in results]
    assert ids == expected and len(results) == 12
    assert [r.get_response().parameters[FINAL].bool_param for r in results] == [False] * 11 + [True]
    text = b"".join(r.as_numpy("text_output")[0] for r in results)
    assert text == bytes(expected).decode("utf-8", errors="replace").encode()
    assert results[-1].get_response().parameters["finish_reason"].string_param == "length"


def test_stream_false_gives_one_final_response(server: ServerHandle) -> None:
    stream = Stream(server.url)
    try:
        stream.send("whole", max_tokens=_tokens(5), stream=("BOOL", np.array([False])))
        results = stream.until_final("whole")
    finally:
        stream.close()
    assert len(results) == 1 and results[0].as_numpy("output_ids").shape == (5,)


def test_bad_requests_get_error_messages_and_the_stream_stays_open(server: ServerHandle) -> None:
    stream = Stream(server.url)
    try:
        stream.send("zero", max_tokens=_tokens(0))
        assert "max_tokens is 0" in stream.error()
        stream.send("huge", max_tokens=_tokens(10**9))
        assert "max_tokens is 1000000000; model 'tiny-fp32-ort' generates 1..200" in stream.error()
        stream.send("long", prompt="x" * 300)
        assert "the prompt is 300 tokens" in stream.error()  # refused before any token response
        stream.send("after", max_tokens=_tokens(3))
        assert len(stream.until_final("after")) == 3
        assert stream.responses.empty()
    finally:
        stream.close()


def test_a_reused_id_in_flight_is_refused(repo: Path) -> None:
    with start_server(repo, port=0, runner_factory=lambda spec: SlowRunner(create_runner(spec))) as handle:
        stream = Stream(handle.url)
        try:
            stream.send("same", max_tokens=_tokens(5))
            stream.send("same", max_tokens=_tokens(5))
            errors: list[str] = []
            tokens = 0
            while True:
                result, error = stream.responses.get(timeout=30)
                if error is not None:
                    errors.append(str(error))
                    continue
                assert result is not None
                tokens += 1
                if result.get_response().parameters[FINAL].bool_param:
                    break
            assert len(errors) == 1 and "request id 'same' is already generating" in errors[0]
            assert tokens == 5
        finally:
            stream.close()


def test_cancel_stops_generation_and_frees_the_kv_cache(repo: Path) -> None:
    with start_server(repo, port=0, runner_factory=lambda spec: SlowRunner(create_runner(spec))) as handle:
        endpoint = handle.store.get(MODEL).decoder
        assert endpoint is not None
        stream = Stream(handle.url)
        stream.send("long", max_tokens=_tokens(200))
        for _ in range(3):
            _, error = stream.responses.get(timeout=30)
            assert error is None
        assert len(endpoint.live) == 1
        stream.close(cancel=True)
        deadline = time.monotonic() + 10
        while endpoint.live and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not endpoint.live
        steps = endpoint.steps_run
        time.sleep(0.2)
        assert endpoint.steps_run == steps < 20


def test_concurrent_streams_share_the_worker_step_by_step(repo: Path) -> None:
    """Pipelined steps queue behind other streams' steps: two streams on one instance interleave
    (the second's first token comes long before the first's last), none waits for the other to end."""
    arrivals: list[tuple[str, bool]] = []
    lock = threading.Lock()

    def record(result: tc.InferResult | None, error: InferenceServerException | None) -> None:
        assert error is None and result is not None
        response = result.get_response()
        with lock:
            arrivals.append((response.id, response.parameters[FINAL].bool_param))

    with start_server(repo, port=0, runner_factory=lambda spec: SlowRunner(create_runner(spec))) as handle:
        clients = [tc.InferenceServerClient(handle.url) for _ in range(2)]
        try:
            for client in clients:
                client.start_stream(callback=record)
            dtype, count = _tokens(12)
            prompt = _input("text_input", np.array([b"Hello"], dtype=object), "BYTES")
            inputs = [prompt, _input("max_tokens", count, dtype)]
            clients[0].async_stream_infer(MODEL, inputs, request_id="a")
            time.sleep(0.05)
            clients[1].async_stream_infer(MODEL, inputs, request_id="b")
            deadline = time.monotonic() + 30
            while sum(final for _, final in arrivals) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            for client in clients:
                client.stop_stream()
                client.close()
    order = [rid for rid, _ in arrivals]
    assert order.count("a") == order.count("b") == 12, order
    b_first, a_last = order.index("b"), len(order) - 1 - order[::-1].index("a")
    assert b_first < 6 and a_last > b_first + 5, order  # b's tokens came among a's, not after them


def test_model_infer_on_a_decoupled_model_is_refused(server: ServerHandle) -> None:
    with tc.InferenceServerClient(server.url) as client:
        text = _input("text_input", np.array([b"Hi"], dtype=object), "BYTES")
        with pytest.raises(InferenceServerException, match="decoupled.*ModelStreamInfer"):
            client.infer(MODEL, [text])
        config = client.get_model_config(MODEL).config
        assert config.model_transaction_policy.decoupled


def test_build_names_the_expected_kv_inputs(example_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["build", str(example_model), "--name", "d", "--decoder", "--repo", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "past_key_values.0.key" in err and "present.0.key" in err and "['input']" in err
    assert not (tmp_path / "r" / "d-fp32-ort").exists()


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_fp16_and_int8_decoders_build_and_stream(precision: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    repo = tmp_path / "repo"
    code = main(["build", str(tiny_decoder_path()), "--name", "tiny", "--precision", precision, "--repo", str(repo)])
    assert code == 0 and "token agreement with the source" in capsys.readouterr().out
    name = f"tiny-{precision}-ort"
    assert "decoupled: true" in (repo / name / "config.pbtxt").read_text()
    with start_server(repo, port=0) as handle:
        client = tc.InferenceServerClient(handle.url)
        got: queue.Queue[tuple[tc.InferResult | None, InferenceServerException | None]] = queue.Queue()
        client.start_stream(callback=lambda result, error: got.put((result, error)))
        client.async_stream_infer(name, [_input("input_ids", np.array([72, 105], np.int64), "INT64")], request_id="x")
        count = 0
        while True:
            result, error = got.get(timeout=30)
            assert error is None and result is not None
            count += 1
            if result.get_response().parameters[FINAL].bool_param:
                break
        client.stop_stream()
        client.close()
    assert count == 64  # the default max_tokens


def test_bench_stream_reports_ttft_itl_and_tokens(server: ServerHandle, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    argv = ["bench", "--url", server.url, "--model", MODEL, "--stream", "--concurrency", "1,2", "--requests", "6"]
    argv += ["--max-tokens", "7", "--json", str(out / "r.json"), "--csv", str(out / "r.csv")]
    assert main([*argv, "--plot", str(out / "r.png")]) == 0
    result = json.loads((out / "r.json").read_text())
    assert [p["load"] for p in result["points"]] == [1, 2]
    for point in result["points"]:
        assert point["ok"] == 6 and point["mean_tokens"] == 7 and not point["errors"]
        assert 0 < point["ttft_ms"]["p50"] <= point["e2e_ms"]["p50"] and point["itl_ms"]["p50"] > 0
    assert (out / "r.png").stat().st_size > 0 and len((out / "r.csv").read_text().splitlines()) == 3
    bad = ["bench", "--url", server.url, "--model", MODEL, "--stream", "--requests", "2", "--max-tokens", "999"]
    assert main(bad) == 1  # every request refused: INVALID_ARGUMENT counted, exit code 1
