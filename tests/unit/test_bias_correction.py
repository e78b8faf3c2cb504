"""Bias correction as a graph transform: exact FP32 equivalence without corrections, exact shifts with them."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from builders.bias_correction import apply, bias_corrections
from builders.calib_data import ShapeGroup, make_dataset
from builders.quantize import TensorRange


def _model():  # type: ignore[no-untyped-def]
    """Conv without bias -> Relu -> Flatten -> MatMul + Add (an exported linear layer)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((4 * 6 * 6, 5)).astype(np.float32), "fc"),
        numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "fc"], ["m"], name="fc"),
        helper.make_node("Add", ["m", "fc_b"], ["y"], name="fc_add"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x: np.ndarray, output: str = "y") -> np.ndarray:  # type: ignore[no-untyped-def]
    if output not in {o.name for o in model.graph.output}:
        model.graph.output.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([output], {"x": x})[0]


X = np.random.default_rng(1).standard_normal((4, 3, 6, 6)).astype(np.float32)


def test_no_correction_computes_exactly_the_same() -> None:
    model = _model()
    np.testing.assert_array_equal(_run(apply(model, {}), X), _run(model, X))


def test_corrections_shift_each_output_channel_by_exactly_minus_the_correction() -> None:
    model = _model()
    conv_shift = np.array([0.5, -1.0, 0.0, 2.0])
    fc_shift = np.arange(5, dtype=np.float64) / 10
    corrected = apply(model, {"conv": conv_shift, "fc": fc_shift})
    before, after = _run(model, X, "c"), _run(corrected, X, "c")
    np.testing.assert_allclose(after, before - conv_shift[None, :, None, None].astype(np.float32), rtol=0, atol=1e-5)
    only_fc = apply(model, {"fc": fc_shift})
    np.testing.assert_allclose(_run(only_fc, X), _run(model, X) - fc_shift.astype(np.float32), rtol=0, atol=1e-5)


def test_measured_corrections_cover_the_quantized_layers() -> None:
    model = _model()
    data = make_dataset([ShapeGroup({"x": X})], "d")
    ranges = {"x": TensorRange(4.0, -4.0, 4.0), "f": TensorRange(20.0, 0.0, 20.0)}
    found = bias_corrections(model, ranges, data)
    assert set(found) == {"conv", "fc"} and found["conv"].shape == (4,) and found["fc"].shape == (5,)
