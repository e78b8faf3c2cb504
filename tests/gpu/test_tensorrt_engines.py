"""FP32/FP16/INT8 TensorRT engines of the example model, built by `kiln build` and run by the embedded runner.

Outputs are compared with ONNX Runtime FP32; INT8 must pass the accuracy gate. Needs a GPU host
with TensorRT and Polygraphy (skips elsewhere with the reason). Figures are printed (-s to see them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from core.errors import InvalidInputError
from runtime.tensorrt.runner import TensorRTRunner
from server.cli import main

pytestmark = pytest.mark.gpu

TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, example_model: Path, example_data: Path) -> Path:
    root = tmp_path_factory.mktemp("trt") / "repo"
    for precision in ("fp32", "fp16", "int8"):
        data = ["--calib", str(example_data)] if precision == "int8" else ["--eval", str(example_data)]
        argv = ["build", str(example_model), "--name", "digits", "--target", "tensorrt", "--precision", precision,
                "--repo", str(root), "--max-batch", "32", *data]  # fmt: skip
        assert main(argv) == 0, precision
    return root


@pytest.fixture(scope="module")
def heldout(example_data: Path) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(example_data)
    return data["input"][:32], data["labels"][:32]


def reference(example_model: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(example_model), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": x})[0])


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engine_matches_onnxruntime_fp32(
    repo: Path, example_model: Path, heldout: tuple[np.ndarray, np.ndarray], precision: str
) -> None:
    x, _ = heldout
    version = repo / f"digits-{precision}-tensorrt" / "1"
    manifest = json.loads((version / "kiln.json").read_text())
    runner = TensorRTRunner(version / "model.plan")
    try:
        got = runner.run({"input": x})["logits"]
        single = runner.run({"input": x[:1]})["logits"]  # dynamic batch through set_input_shape
    finally:
        runner.close()
    ref = reference(example_model, x)
    np.testing.assert_allclose(single[0], got[0], rtol=1e-2, atol=1e-2)
    if precision in TOLERANCE:
        np.testing.assert_allclose(got, ref, atol=TOLERANCE[precision], rtol=TOLERANCE[precision])
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.97
    validation = manifest["validation"]
    assert validation["passed"], validation
    print(precision, manifest["build"]["tensorrt"]["plans"], validation["latency_ms"], validation["metrics"])


def test_int8_accuracy_within_the_gate(repo: Path) -> None:
    manifest = json.loads((repo / "digits-int8-tensorrt" / "1" / "kiln.json").read_text())
    metrics = manifest["validation"]["metrics"]
    assert metrics["accuracy_reference"] - metrics["accuracy_candidate"] <= 0.01
    assert manifest["build"]["tensorrt"]["strongly_typed"] is True
    layers = json.loads((repo / "digits-int8-tensorrt" / "1" / "model.layers.json").read_text())
    assert "Layers" in layers


def test_runner_refuses_shapes_outside_the_profile_and_repeats_exactly(repo: Path) -> None:
    plan = repo / "digits-fp16-tensorrt" / "1" / "model.plan"
    runner = TensorRTRunner(plan)
    try:
        with pytest.raises(InvalidInputError, match="outside the plan's profile"):
            runner.run({"input": np.zeros((64, 1, 8, 8), np.float32)})
        x = np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32)
        first = runner.run({"input": x})["logits"]
        again = runner.run({"input": x})["logits"]
        np.testing.assert_allclose(again, first, rtol=1e-3, atol=1e-3)
    finally:
        runner.close()
