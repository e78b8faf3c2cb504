"""The one-run static INT8 error profile that --precision auto ranks layers by."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from builders.calib_data import ShapeGroup, make_dataset
from builders.layer_profile import static_error_profile
from builders.quantize import TensorRange


def _two_convs():  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), n) for n in ("w1", "w2")]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="first", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="second", pads=[1, 1, 1, 1]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_coarse_range_ranks_its_layer_first() -> None:
    model = _two_convs()
    x = np.random.default_rng(1).standard_normal((6, 4, 8, 8)).astype(np.float32)
    data = make_dataset([ShapeGroup({"x": x})], "d")
    fine = {"x": TensorRange(4.0, -4.0, 4.0), "r": TensorRange(30.0, 0.0, 30.0)}
    profile = static_error_profile(model, fine, data)
    assert set(profile) == {"first", "second"} and all(v > 0 for v in profile.values())
    coarse = {**fine, "r": TensorRange(3000.0, 0.0, 3000.0)}  # 100x too wide: ~every value rounds to 0
    ranked = static_error_profile(model, coarse, data)
    assert next(iter(ranked)) == "second" and ranked["second"] > 10 * profile["second"]
    assert ranked["first"] == profile["first"]  # a layer's score depends on its own input only


def test_layers_without_a_calibrated_input_are_left_out() -> None:
    model = _two_convs()
    data = make_dataset([ShapeGroup({"x": np.ones((2, 4, 8, 8), np.float32)})], "d")
    assert list(static_error_profile(model, {"x": TensorRange(1.0, 0.0, 1.0)}, data)) == ["first"]
