"""Shadow comparison math and the in-flight cap."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from server.gateway.metrics import GatewayMetrics
from server.gateway.shadow import ShadowSender, compare_arrays, compare_responses


def response(**outputs: np.ndarray) -> bytes:
    message = service_pb2.ModelInferResponse(model_name="m")
    for name, array in outputs.items():
        out = message.outputs.add()
        out.name, out.datatype = name, "FP32"
        out.shape.extend(array.shape)
        message.raw_output_contents.append(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return message.SerializeToString()


def test_identical_outputs_agree_fully() -> None:
    logits = np.random.default_rng(0).normal(size=(8, 10)).astype(np.float32)
    result = compare_responses(response(logits=logits), response(logits=logits))
    assert (result.rows, result.agreed_rows, result.agreed) == (8, 8, True)
    assert result.min_cosine == pytest.approx(1.0) and result.max_abs_error == 0.0


def test_partial_agreement_cosine_and_max_abs_error() -> None:
    a = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=np.float32)
    b = np.array([[1.0, 0.5, 0.0], [0.0, 0.0, 2.0]], dtype=np.float32)
    result = compare_arrays(a, b)
    assert (result.rows, result.agreed_rows) == (2, 1)
    assert result.min_cosine == pytest.approx(0.0)
    assert result.mean_cosine == pytest.approx((1 / math.sqrt(1.25) + 0.0) / 2)
    assert result.max_abs_error == pytest.approx(2.0)


def test_missing_output_or_shape_mismatch_disagrees() -> None:
    logits = np.ones((2, 3), dtype=np.float32)
    assert not compare_responses(response(logits=logits), response(other=logits)).agreed
    assert compare_responses(response(logits=logits), response(logits=np.ones((3, 3)))).max_abs_error == math.inf


def test_every_output_must_agree_for_a_row_to_agree() -> None:
    a = np.eye(2, 3, dtype=np.float32)
    flipped = a[:, ::-1].copy()  # row 0 now disagrees, row 1 ([0, 1, 0]) still agrees
    result = compare_responses(response(x=a, y=a), response(x=a, y=flipped))
    assert (result.rows, result.agreed_rows, result.agreed) == (2, 1, False)


def test_in_flight_cap_drops_and_counts() -> None:
    metrics = GatewayMetrics()
    sender = ShadowSender(metrics, max_in_flight=2, workers=1)
    release = threading.Event()
    served = response(logits=np.ones((1, 3)))

    def slow() -> bytes:
        release.wait(5)
        return served

    accepted = [sender.submit("r", "s", slow, served) for _ in range(5)]
    release.set()
    sender.close()
    assert accepted == [True, True, False, False, False]
    assert metrics.cumulative("r", "s").shadow is not None
    assert metrics.cumulative("r", "s").shadow.dropped == 3  # type: ignore[union-attr]
