"""Explicit quantization: both placements on hand-built models, and the real-model traps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders.calib_data import ShapeGroup, make_dataset
from builders.calibrate import CalibrationSettings, calibrate
from builders.inspection import load_model
from builders.qdq_placement import quantize_weight, weight_scales
from builders.quantize import OrtFormat, choose_ort_format, prepare_model, quantize_model

RNG = np.random.default_rng(0)
U8S8 = OrtFormat("uint8", True, "test")


def _w(*shape: int) -> np.ndarray:
    return (RNG.standard_normal(shape) * 0.3).astype(np.float32)


def _model(nodes, inits, inp, out, opset: int = 17) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    graph = helper.make_graph(nodes, "g", [inp], [out], [numpy_helper.from_array(a, n) for n, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def conv_gemm_model(opset: int = 17, trans_b: int = 1) -> onnx.ModelProto:
    """Conv(+bias) -> Relu -> ConvTranspose -> Flatten -> Gemm(+bias) -> MatMul."""
    gemm_w = _w(8, 4 * 6 * 6) if trans_b else _w(4 * 6 * 6, 8)
    inits = {"cw": _w(4, 1, 3, 3), "cb": _w(4), "tw": _w(4, 4, 3, 3), "gw": gemm_w, "gb": _w(8), "mw": _w(8, 5)}
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("ConvTranspose", ["r", "tw"], ["t"], name="convt"),
        helper.make_node("Flatten", ["t"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["g"], name="gemm", transB=trans_b),
        helper.make_node("MatMul", ["g", "mw"], ["y"], name="matmul"),
    ]
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 6, 6])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])
    return _model(nodes, inits, inp, out, opset)


def _data(shape: tuple[int, ...], name: str = "x", n: int = 16):  # type: ignore[no-untyped-def]
    return make_dataset([ShapeGroup({name: RNG.standard_normal((n, *shape)).astype(np.float32)})], "test")


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _calibrated(model: onnx.ModelProto, data, tmp_path: Path):  # type: ignore[no-untyped-def]
    return calibrate(model, "0" * 64, data, CalibrationSettings("minmax"), tmp_path / "cache")


def _dq_axes(model: onnx.ModelProto) -> dict[str, int | None]:
    axes: dict[str, int | None] = {}
    inits = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            axis = next((a.i for a in node.attribute if a.name == "axis"), None)
            axes[node.input[0].removesuffix("_quantized")] = axis
    return axes


@pytest.mark.parametrize("target", ["tensorrt", "ort"])
def test_both_placements_check_run_and_stay_close(tmp_path: Path, target: str) -> None:
    model = conv_gemm_model()
    data = _data((1, 6, 6))
    calibration = _calibrated(model, data, tmp_path)
    quantized = quantize_model(model, calibration.ranges, target, ort_format=U8S8).model
    onnx.checker.check_model(quantized)
    x = data.groups[0].inputs["x"]
    ref, got = _run(model, {"x": x}), _run(quantized, {"x": x})
    cosine = np.sum(ref * got) / (np.linalg.norm(ref) * np.linalg.norm(got))
    assert cosine > 0.99
    assert any(n.op_type == "QuantizeLinear" for n in quantized.graph.node)


@pytest.mark.parametrize(("trans_b", "gemm_axis"), [(1, 0), (0, 1)])
def test_tensorrt_placement_axes_and_no_bias_or_output_qdq(tmp_path: Path, trans_b: int, gemm_axis: int) -> None:
    model = conv_gemm_model(trans_b=trans_b)
    calibration = _calibrated(model, _data((1, 6, 6)), tmp_path)
    quantized = quantize_model(model, calibration.ranges, "tensorrt").model
    assert _dq_axes(quantized) == {"cw": 0, "tw": 1, "gw": gemm_axis, "mw": 1}
    nodes = {n.name: n for n in quantized.graph.node}
    assert nodes["conv"].input[2] == "cb" and nodes["gemm"].input[2] == "gb"  # biases stay float
    inits = {i.name: i for i in quantized.graph.initializer}
    assert inits["cb"].data_type == TensorProto.FLOAT and "cw" not in inits
    quantized_inputs = {n.input[0] for n in quantized.graph.node if n.op_type == "QuantizeLinear"}
    assert quantized_inputs == {"x", "r", "f", "g"}  # compute-op inputs only, never the output "y"
    assert inits["cw_quantized"].data_type == TensorProto.INT8


def test_weight_scales_per_channel_with_a_zero_channel() -> None:
    weight = np.stack([np.full((2, 3), 2.54, np.float32), np.zeros((2, 3), np.float32)])
    scale = weight_scales(weight, 0)
    np.testing.assert_allclose(scale, [0.02, 1.0], rtol=1e-6)
    q = quantize_weight(weight, scale, 0)
    assert q.dtype == np.int8 and q[0].max() == 127 and not q[1].any()


def test_ort_placement_fuses_to_integer_kernels(tmp_path: Path) -> None:
    model = conv_gemm_model()
    calibration = _calibrated(model, _data((1, 6, 6)), tmp_path)
    quantized = quantize_model(model, calibration.ranges, "ort", ort_format=U8S8).model
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(quantized.SerializeToString(), options, providers=["CPUExecutionProvider"])
    fused = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert "QLinearConv" in fused


def test_ort_format_follows_cpu_flags() -> None:
    assert choose_ort_format({"avx2", "fma"}) == OrtFormat("uint8", True, choose_ort_format({"avx2"}).reason)
    vnni = choose_ort_format({"avx2", "avx512_vnni"})
    assert vnni.activation == "uint8" and not vnni.reduce_range and "avx512_vnni" in vnni.reason
    assert choose_ort_format({"asimd", "asimddp"}).activation == "int8"


def test_trap_weights_in_constant_nodes_are_folded(tmp_path: Path) -> None:
    model = conv_gemm_model()
    consts = [helper.make_node("Constant", [], [i.name], value=i) for i in model.graph.initializer]
    del model.graph.initializer[:]
    nodes = consts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    data = _data((1, 6, 6))
    calibration = _calibrated(model, data, tmp_path)
    result = quantize_model(model, calibration.ranges, "tensorrt")
    assert any("Constant-node" in note for note in result.notes)
    assert _dq_axes(result.model)["cw"] == 0
    x = data.groups[0].inputs["x"]
    assert _run(result.model, {"x": x}).shape == (16, 5)


def test_trap_old_opset_is_upgraded_for_per_channel(tmp_path: Path) -> None:
    model = conv_gemm_model(opset=11)
    calibration = _calibrated(model, _data((1, 6, 6)), tmp_path)
    result = quantize_model(model, calibration.ranges, "tensorrt")
    assert any("upgraded opset 11 -> 13" in note for note in result.notes)
    assert result.model.opset_import[0].version == 13 and _dq_axes(result.model)["cw"] == 0
    onnx.checker.check_model(result.model)


def test_trap_minus_inf_attention_mask_stays_float(tmp_path: Path) -> None:
    # scores = q @ k^T + mask, with -inf in the mask; softmax; @ v
    mask = np.where(np.triu(np.ones((4, 4)), 1) > 0, -np.inf, 0).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
        helper.make_node("Add", ["scores", "mask"], ["masked"], name="add_mask"),
        helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["y"], name="pv"),
    ]
    inp = helper.make_tensor_value_info("q", TensorProto.FLOAT, ["N", 4, 8])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8])
    model = _model(nodes, {"kt": _w(8, 4), "mask": mask, "v": _w(4, 8)}, inp, out)
    data = _data((4, 8), name="q")
    calibration = _calibrated(model, data, tmp_path)
    assert "masked" in calibration.skipped and "non-finite" in calibration.skipped["masked"]
    for target in ("tensorrt", "ort"):
        quantized = quantize_model(model, calibration.ranges, target, ort_format=U8S8).model
        assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "masked" for n in quantized.graph.node)
        got = _run(quantized, {"q": data.groups[0].inputs["q"]})
        assert np.isfinite(got).all()


def test_trap_unresolved_symbolic_shapes(tmp_path: Path) -> None:
    # Reshape to a runtime-computed shape: shape inference cannot resolve the Gemm input's dims.
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Reshape", ["x", "s"], ["xr"], name="reshape"),
        helper.make_node("MatMul", ["xr", "w"], ["y"], name="mm"),
    ]
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 6])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", "K"])
    model = _model(nodes, {"w": _w(6, 3)}, inp, out)
    data = _data((5, 6))
    calibration = _calibrated(model, data, tmp_path)
    for target in ("tensorrt", "ort"):
        quantized = quantize_model(model, calibration.ranges, target, ort_format=U8S8).model
        assert _run(quantized, {"x": data.groups[0].inputs["x"]}).shape == (16, 5, 3)


def test_trap_external_data_model(tmp_path: Path) -> None:
    model = conv_gemm_model()
    path = tmp_path / "ext" / "model.onnx"
    path.parent.mkdir()
    onnx.save_model(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    assert (path.parent / "weights.bin").is_file()
    loaded = load_model(path)
    data = _data((1, 6, 6))
    calibration = _calibrated(loaded, data, tmp_path)
    quantized = quantize_model(loaded, calibration.ranges, "ort", ort_format=U8S8).model
    onnx.checker.check_model(quantized)
    assert _run(quantized, {"x": data.groups[0].inputs["x"]}).shape == (16, 5)


def test_prepare_names_unnamed_nodes() -> None:
    model = conv_gemm_model()
    model.graph.node[1].name = ""
    prepared = prepare_model(model)
    assert all(n.name for n in prepared.model.graph.node)
