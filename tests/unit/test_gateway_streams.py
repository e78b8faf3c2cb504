"""Stream timing and greedy replay logic of the gateway, and the rollout's stream SLO checks (no sockets)."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from server.codec import to_raw
from server.gateway.metrics import GatewayMetrics
from server.gateway.stream_metrics import StreamMetrics
from server.gateway.streams import StreamMeter, StreamTarget, first_divergence, greedy_request
from server.rollout.analysis import Measurements, Tail, VariantWindow, shadow_checks, step_checks
from server.rollout.plan import plan_from_mapping


def _request(request_id: str, **inputs: tuple[str, np.ndarray]) -> bytes:
    request = pb.ModelInferRequest(model_name="llm", id=request_id)
    for name, (datatype, arr) in inputs.items():
        request.inputs.add(name=name, datatype=datatype, shape=list(arr.shape))
        request.raw_input_contents.append(to_raw(arr))
    return request.SerializeToString()


def _response(request_id: str, ids: list[int], final: bool, error: str = "") -> bytes:
    inner = pb.ModelInferResponse(model_name="tiny", id=request_id)
    inner.outputs.add(name="output_ids", datatype="INT64", shape=[len(ids)])
    inner.raw_output_contents.append(np.asarray(ids, np.int64).tobytes())
    inner.parameters["triton_final_response"].bool_param = final
    return pb.ModelStreamInferResponse(infer_response=inner, error_message=error).SerializeToString()


def test_the_meter_records_ttft_itl_and_errors_per_request_id() -> None:
    metrics, streams = GatewayMetrics(), StreamMetrics()
    meter = StreamMeter(StreamTarget("llm", "base", None, 0), metrics, streams, None, lambda: 0.0)
    meter.sent(_request("a"))
    meter.sent(_request("b"))
    for token in (1, 2, 3):
        meter.received(_response("a", [token], final=token == 3))
    meter.received(_response("b", [], final=True, error="INVALID_ARGUMENT: max_tokens is 0"))
    meter.sent(_request("c"))
    meter.received(_response("c", [7], final=False))
    meter.finish("OK")  # the client went away with c still open
    window = streams.window("llm", "base", None)
    assert window is not None and window.requests == 1 and window.tokens == 3 and window.itl.count == 1
    assert window.ttft.p50_ms > 0 and window.ttft.p50_ms <= window.ttft.p99_ms
    codes = metrics.window("llm", "base").codes
    assert codes == {"OK": 1, "INVALID_ARGUMENT": 1, "CANCELLED": 1}


def test_greedy_replay_requests_drop_sampling_and_ask_for_one_response() -> None:
    raw = _request(
        "r1",
        text_input=("BYTES", np.array([b"hi"], dtype=object)),
        temperature=("FP32", np.array([0.8], np.float32)),
        seed=("INT64", np.array([3], np.int64)),
        stream=("BOOL", np.array([True])),
        max_tokens=("INT32", np.array([5], np.int32)),
    )
    greedy = pb.ModelInferRequest.FromString(greedy_request(raw))
    assert [t.name for t in greedy.inputs] == ["text_input", "max_tokens", "stream"]
    assert greedy.raw_input_contents[-1] == b"\x00" and greedy.raw_input_contents[1] == to_raw(np.array([5], np.int32))
    assert greedy.id == "replay-r1"


def test_first_divergence() -> None:
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 9, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2


def _plan(**slos: float) -> object:
    return plan_from_mapping({
        "route": "llm", "baseline": "base", "candidate": {"name": "c", "upstream": "u", "model": "m"},
        "steps": [50], "sample_percent": 0, "slos": slos,
    })  # fmt: skip


@pytest.mark.parametrize(
    ("slos", "candidate", "failed"),
    [
        (
            {"max_ttft_p99_ratio": 1.2},
            VariantWindow(20, 0, 10.0, ttft_p99_ms=150.0, itl_p99_ms=10.0),
            ["ttft_p99_ratio"],
        ),
        ({"max_ttft_p99_ratio": 1.2}, VariantWindow(20, 0, 10.0, ttft_p99_ms=110.0, itl_p99_ms=10.0), []),
        (
            {"max_itl_p99_ratio": 1.05},
            VariantWindow(20, 0, 10.0, ttft_p99_ms=100.0, itl_p99_ms=11.0),
            ["itl_p99_ratio"],
        ),
        ({"max_ttft_p99_ms": 120.0}, VariantWindow(20, 0, 10.0, ttft_p99_ms=130.0), ["ttft_p99_ms"]),
        ({"max_itl_p99_ms": 20.0}, VariantWindow(20, 0, 10.0, ttft_p99_ms=100.0, itl_p99_ms=19.0), []),
    ],
)
def test_stream_slos_on_a_step(slos: dict, candidate: VariantWindow, failed: list[str]) -> None:
    baseline = VariantWindow(20, 0, 10.0, ttft_p99_ms=100.0, itl_p99_ms=10.0)
    checks = step_checks(_plan(**slos), Measurements(baseline, candidate), Tail(10.0, 10.0, 10.0))
    assert [c.name for c in checks if c.ok is False] == failed


def test_ttft_ratio_waits_for_a_streaming_baseline_and_token_agreement_names_itself() -> None:
    plan = _plan(max_ttft_p99_ratio=1.2, min_token_agreement=0.95)
    lone = Measurements(VariantWindow(0, 0, None), VariantWindow(20, 0, 10.0, ttft_p99_ms=500.0))
    ratio = next(c for c in step_checks(plan, lone, Tail(10.0, 10.0, 10.0)) if c.name == "ttft_p99_ratio")
    assert ratio.ok is None and ratio.measured is None
    diverged = Measurements(compared=20, agreed=18, first_divergence=(3, 7))
    check = shadow_checks(plan, diverged)[1]  # type: ignore[arg-type]
    assert (check.name, check.ok, check.measured) == ("token_agreement", False, 0.9)
    assert diverged.to_dict()["first_divergence"] == [3, 7]
