"""Layers Kiln keeps in float must run in float: ONNX Runtime's weight re-quantization trap."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from builders.op_speed import depthwise_nodes
from builders.quantize import OrtFormat, TensorRange, quantize_model, read_float_inputs

RNG = np.random.default_rng(3)
U8S8 = OrtFormat("uint8", False, "test")


def _dw_weight() -> np.ndarray:
    w = RNG.standard_normal((8, 1, 3, 3)).astype(np.float32)
    return w * np.logspace(-3, 1, 8, dtype=np.float32).reshape(8, 1, 1, 1)  # channel ranges 10^4 apart


def _model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "C", "H", "W"])],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _optimized(model: onnx.ModelProto, tmp_path) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "optimized.onnx"))


def _weight_is_float(model: onnx.ModelProto, conv: str) -> bool:
    node = next(n for n in model.graph.node if n.op_type == "Conv" and n.name == conv)
    return node.input[1] in {i.name for i in model.graph.initializer}


def _qdq_conv() -> onnx.ModelProto:
    """DQ -> depthwise Conv (float weight) -> Q, the pattern ONNX Runtime completes by itself."""
    scale, zero = np.array(0.05, np.float32), np.array(128, np.uint8)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="xQ"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="xDQ"),
        helper.make_node("Conv", ["xd", "w"], ["c"], name="dw", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["c", "s", "z"], ["cq"], name="cQ"),
        helper.make_node("DequantizeLinear", ["cq", "s", "z"], ["y"], name="cDQ"),
    ]
    return _model(nodes, {"w": _dw_weight(), "s": scale, "z": zero})


def test_onnxruntime_requantizes_a_float_conv_between_qdq_unless_it_reads_float(tmp_path) -> None:  # type: ignore[no-untyped-def]
    trap = _qdq_conv()
    x = RNG.standard_normal((2, 8, 6, 6)).astype(np.float32)
    # the trap this guards against (onnxruntime >= 1.20): the float weight is quantized at load
    assert not _weight_is_float(_optimized(trap, tmp_path), "dw")
    fixed = onnx.ModelProto()
    fixed.CopyFrom(trap)
    assert read_float_inputs(fixed, {"dw"}) == 1
    assert [n.name for n in fixed.graph.node] == ["dw", "cQ", "cDQ"]  # the unread input Q/DQ pair is gone
    assert _weight_is_float(_optimized(fixed, tmp_path), "dw")
    # and the conv really runs in float: only its output quantization remains, and it is closer to FP32
    weight = numpy_helper.to_array(next(i for i in trap.graph.initializer if i.name == "w"))
    exact = _run(_model([helper.make_node("Conv", ["x", "w"], ["y"], group=8, pads=[1, 1, 1, 1])], {"w": weight}), x)
    expected = (np.clip(np.rint(exact / 0.05) + 128, 0, 255) - 128) * 0.05
    assert np.abs(_run(fixed, x) - expected).max() <= 0.05 + 1e-5
    assert np.abs(_run(fixed, x) - exact).mean() < np.abs(_run(trap, x) - exact).mean()


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_nodes_kept_float_by_name_are_not_rewired_when_not_kept(tmp_path) -> None:  # type: ignore[no-untyped-def]
    trap = _qdq_conv()
    assert read_float_inputs(trap, {"another"}) == 0
    assert len(trap.graph.node) == 5


def test_ort_placement_keeps_excluded_depthwise_conv_float(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """pointwise -> HardSwish -> depthwise (kept float) -> pointwise: the depthwise weight stays float in
    the session ONNX Runtime builds, the pointwise convs are int8."""
    nodes = [
        helper.make_node("Conv", ["x", "p1"], ["a"], name="pw1"),
        helper.make_node("Relu", ["a"], ["ar"], name="relu"),
        helper.make_node("Conv", ["ar", "w"], ["d"], name="dw", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["d", "p2"], ["y"], name="pw2"),
    ]
    p1, p2 = RNG.standard_normal((8, 8, 1, 1)).astype(np.float32), RNG.standard_normal((4, 8, 1, 1)).astype(np.float32)
    model = _model(nodes, {"p1": p1, "w": _dw_weight(), "p2": p2})
    assert depthwise_nodes(model) == ["dw"]
    x = RNG.standard_normal((4, 8, 6, 6)).astype(np.float32)
    values = {"x": x}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in ("a", "ar", "d"))
    names = ["y", "a", "ar", "d"]
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    values |= dict(zip(names, session.run(names, {"x": x}), strict=True))
    ranges = {k: TensorRange(float(np.abs(v).max()), float(v.min()), float(v.max())) for k, v in values.items()}
    placed = quantize_model(model, ranges, "ort", exclude_nodes=["dw"], ort_format=U8S8).model
    optimized = _optimized(placed, tmp_path)
    assert _weight_is_float(optimized, "dw")
    assert not _weight_is_float(optimized, "pw1") and not _weight_is_float(optimized, "pw2")  # pointwise: int8


def test_a_relu_folded_into_the_q_comes_back_for_the_float_layer(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """conv -> Add -> Relu -> conv (kept float) -> conv: the placement folds the Relu into the Add's Q
    (range from 0); the float conv must still see the Relu's output, not the Add's negative values."""
    w1 = RNG.standard_normal((8, 8, 1, 1)).astype(np.float32)
    w2 = RNG.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2
    w3 = RNG.standard_normal((8, 8, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="c1"),
        helper.make_node("Add", ["a", "x"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["k"], name="kept", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["k", "w3"], ["y"], name="c3"),
    ]
    model = _model(nodes, {"w1": w1, "w2": w2, "w3": w3})
    x = RNG.standard_normal((4, 8, 6, 6)).astype(np.float32)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in ("a", "s", "r", "k"))
    names = ["y", "a", "s", "r", "k"]
    values = dict(zip(names, ort.InferenceSession(probe.SerializeToString()).run(names, {"x": x}), strict=True))
    values["x"] = x
    ranges = {k: TensorRange(float(np.abs(v).max()), float(v.min()), float(v.max())) for k, v in values.items()}
    placed = quantize_model(model, ranges, "ort", exclude_nodes=["kept"], ort_format=U8S8).model
    assert "relu" not in {n.name for n in placed.graph.node}  # folded into the Q by the placement
    kept = next(n for n in placed.graph.node if n.name == "kept")
    feeding = next(n for n in placed.graph.node if kept.input[0] in n.output)
    assert feeding.op_type == "Relu"  # given back, reading the float sum
    error = np.abs(_run(placed, x) - values["y"]).max()
    assert error < 0.05 * np.abs(values["y"]).max()
