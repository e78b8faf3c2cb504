"""Histogram collection, threshold choice and the calibration cache (reuse only on a full match)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders.calib_data import ShapeGroup, make_dataset
from builders.calibrate import CALIBRATION_FILE, RANGES_FILE, TRT_CACHE_FILE, CalibrationSettings, calibrate
from builders.calibration_file import CalibrationTable, read_trt_cache
from core.errors import InvalidInputError

SHA = "1" * 64


def _relu_gemm():  # type: ignore[no-untyped-def]
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32) * 2, "w")
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w"], ["y"], name="mm"),
        helper.make_node("Shape", ["y"], ["s"], name="shape"),  # int64 output: never calibrated
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("s", TensorProto.INT64, [2])],
        [w],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _data(scale: float = 1.0):  # type: ignore[no-untyped-def]
    x = (np.linspace(-3, 3, 64, dtype=np.float32) * scale).reshape(16, 4)
    return make_dataset([ShapeGroup({"x": x})], "test")


def test_minmax_ranges_match_the_data_and_files_are_written(tmp_path: Path) -> None:
    result = calibrate(_relu_gemm(), SHA, _data(), CalibrationSettings("minmax", batch_size=5), tmp_path)
    assert set(result.ranges) == {"x", "r", "y"}
    assert result.ranges["x"].amax == 3.0 and result.ranges["x"].min == -3.0
    assert result.ranges["r"].min == 0.0 and result.ranges["y"].amax == 6.0
    table = CalibrationTable.read_json(result.directory / CALIBRATION_FILE)
    assert table.matches(model_sha256=SHA, data_sha256=result.data_sha256, method="minmax")
    assert table.num_samples == 16 and dict(table.amax) == {k: r.amax for k, r in result.ranges.items()}
    assert read_trt_cache(result.directory / TRT_CACHE_FILE).trt_algorithm == "MinMaxCalibration"


def test_reuse_only_when_model_data_and_method_match(tmp_path: Path) -> None:
    model = _relu_gemm()
    first = calibrate(model, SHA, _data(), CalibrationSettings("entropy"), tmp_path)
    assert not first.reused
    again = calibrate(model, SHA, _data(), CalibrationSettings("entropy"), tmp_path)
    assert again.reused and again.ranges == first.ranges
    assert not calibrate(model, SHA, _data(), CalibrationSettings("minmax"), tmp_path).reused
    assert not calibrate(model, SHA, _data(2.0), CalibrationSettings("entropy"), tmp_path).reused
    assert not calibrate(model, "2" * 64, _data(), CalibrationSettings("entropy"), tmp_path).reused


def test_corrupt_cache_is_recomputed(tmp_path: Path) -> None:
    first = calibrate(_relu_gemm(), SHA, _data(), CalibrationSettings("percentile", 99.0), tmp_path)
    (first.directory / RANGES_FILE).write_text("{not json")
    again = calibrate(_relu_gemm(), SHA, _data(), CalibrationSettings("percentile", 99.0), tmp_path)
    assert not again.reused and again.ranges == first.ranges
    assert json.loads((first.directory / RANGES_FILE).read_text())["method"] == "percentile"


def test_calibrate_each_takes_every_method_from_one_pass(tmp_path: Path) -> None:
    from builders.calibrate import calibrate_each

    model = _relu_gemm()
    methods = ("entropy", "percentile", "minmax")
    each = calibrate_each(model, SHA, _data(), CalibrationSettings("entropy"), methods, tmp_path)
    assert list(each) == list(methods)
    assert len({r.seconds for r in each.values()}) == 1  # one histogram pass, shared
    alone = calibrate(model, SHA, _data(), CalibrationSettings("minmax"), tmp_path / "alone")
    assert each["minmax"].ranges == alone.ranges
    again = calibrate_each(model, SHA, _data(), CalibrationSettings("entropy"), methods, tmp_path)
    assert all(r.reused for r in again.values())
    with pytest.raises(InvalidInputError, match="'kl' is unknown"):
        calibrate_each(model, SHA, _data(), CalibrationSettings("entropy"), ("kl",), tmp_path)
