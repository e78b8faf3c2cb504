"""Calibration and validation batches chosen from a memory budget (--calib-memory)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders.calib_data import ShapeGroup, make_dataset
from builders.calibrate import CalibrationSettings, calibrate, collect_histograms
from builders.memory_budget import (
    Footprint,
    batch_for_budget,
    estimated_footprint,
    parse_memory,
    validation_batch,
)
from builders.quantize import calibration_tensors
from core.errors import InvalidInputError, ResourceExhaustedError

MIB = 1 << 20


def _conv_model(channels: int = 8):  # type: ignore[no-untyped-def]
    """x[N,3,H,W] -> Conv(channels, 3x3, pad 1) -> Relu -> GlobalAveragePool: activations scale with H*W."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((channels, 3, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["y"], name="gap"),
    ]
    graph = helper.make_graph(
        nodes, "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, 1, 1])],
        [w],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _images(n: int, side: int, seed: int = 1):  # type: ignore[no-untyped-def]
    x = np.random.default_rng(seed).standard_normal((n, 3, side, side)).astype(np.float32)
    return make_dataset([ShapeGroup({"x": x})], "test")


UNITS = [("1GiB", 1 << 30), ("512M", 512 * MIB), ("2.5 GB", int(2.5 * (1 << 30))), (str(4 * MIB), 4 * MIB)]


@pytest.mark.parametrize(("text", "expected"), UNITS)
def test_parse_memory_units(text: str, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "1XB", "", "1KiB"])
def test_parse_memory_rejects_nonsense_and_tiny_budgets(text: str) -> None:
    with pytest.raises(InvalidInputError, match="calib-memory"):
        parse_memory(text)


def test_footprint_from_shape_inference_counts_every_calibrated_tensor() -> None:
    model = _conv_model(channels=8)
    footprint = estimated_footprint(model, calibration_tensors(model), {"x": (3, 32, 32)})
    # x: 3*32*32, c and r: 8*32*32 each, y: 8 floats
    assert footprint.per_sample == 4 * (3 * 1024 + 2 * 8 * 1024 + 8)
    assert footprint.largest[1] == 4 * 8 * 1024
    assert footprint.unknown == ()


def test_budget_too_small_for_one_sample_names_the_largest_tensor() -> None:
    footprint = Footprint(per_sample=3 * MIB, largest=("conv_out", 2 * MIB))
    with pytest.raises(ResourceExhaustedError, match=r"'conv_out'.*at least 6\.0 MiB"):
        batch_for_budget(footprint, 4 * MIB)
    assert batch_for_budget(footprint, 60 * MIB) == 10
    assert batch_for_budget(footprint, 1 << 40, cap=32) == 32
    assert validation_batch(3 * MIB, 60 * MIB) == 10
    assert validation_batch(0, 60 * MIB) == 64


def test_calibration_streams_in_budget_sized_batches_with_identical_ranges(tmp_path: Path) -> None:
    model = _conv_model()
    data = _images(24, side=128)  # x 192 KiB, conv and relu outputs 512 KiB each, per sample
    tensors = calibration_tensors(model)
    small = collect_histograms(model, data, tensors, batch_size=32, memory=16 * MIB)
    large = collect_histograms(model, data, tensors, batch_size=32, memory=1 << 30)
    assert small.bytes_per_sample == large.bytes_per_sample == 4 * (3 + 8 + 8) * 128 * 128 + 4 * 8
    assert small.batch_size == int(16 * MIB // (small.bytes_per_sample * 2)) < large.batch_size == 32
    for name in tensors:  # every sample was seen, and the signed range is exact whatever the batching
        assert small.histograms[name].count == large.histograms[name].count
        assert small.histograms[name].max == large.histograms[name].max
    low = calibrate(model, "1" * 64, data, CalibrationSettings("minmax", memory=16 * MIB), tmp_path / "a")
    high = calibrate(model, "1" * 64, data, CalibrationSettings("minmax", memory=1 << 30), tmp_path / "b")
    assert low.ranges == high.ranges
    assert low.batch_size < high.batch_size
    assert low.manifest()["activation_bytes_per_sample"] == low.bytes_per_sample


def test_calibration_refuses_a_budget_below_one_sample(tmp_path: Path) -> None:
    model = _conv_model(channels=16)
    data = _images(2, side=256)  # conv output alone: 16*256*256*4 = 4 MiB per sample
    with pytest.raises(ResourceExhaustedError, match=r"tensor '(c|r)' at 4\.0 MiB"):
        calibrate(model, "1" * 64, data, CalibrationSettings("minmax", memory=4 * MIB), tmp_path)
