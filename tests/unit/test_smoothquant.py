"""SmoothQuant: FP32 outputs unchanged (beyond rounding), activation outliers moved into the weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import builders
from builders.smoothquant import (
    activation_absmax,
    attention_inputs,
    normalized_inputs,
    place_weight_layers,
    real_positions,
    smooth,
    smooth_with_scales,
    smoothed_absmax,
)
from builders.smoothquant_search import smoothquant_applies
from core.errors import InvalidInputError

K = 16


def _block() -> onnx.ModelProto:
    """LayerNorm -> Q/K/V MatMuls (+bias) -> scores MatMul -> Softmax -> MatMul -> Gelu -> Gemm(transB)."""
    rng = np.random.default_rng(0)
    gamma = np.ones(K, np.float32)
    gamma[3] = 40.0  # one outlier channel, as in real transformers
    inits = [
        numpy_helper.from_array(gamma, "gamma"),
        numpy_helper.from_array(rng.standard_normal(K).astype(np.float32), "beta"),
        *(numpy_helper.from_array(rng.standard_normal((K, K)).astype(np.float32) * 0.2, n) for n in ("wq", "wk", "wv")),
        numpy_helper.from_array(rng.standard_normal(K).astype(np.float32), "bq"),
        numpy_helper.from_array(rng.standard_normal((8, K)).astype(np.float32) * 0.2, "wo"),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1),
        helper.make_node("MatMul", ["ln", "wq"], ["q0"]),
        helper.make_node("Add", ["q0", "bq"], ["q"]),
        helper.make_node("MatMul", ["ln", "wk"], ["k"]),
        helper.make_node("MatMul", ["ln", "wv"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["ctx"]),
        helper.make_node("Gelu", ["ctx"], ["g"], domain="com.microsoft"),
        helper.make_node("Reshape", ["g", "flat"], ["g2"]),
        helper.make_node("Gemm", ["g2", "wo"], ["y"], transB=1),
    ]
    inits.append(numpy_helper.from_array(np.array([-1, K], np.int64), "flat"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [10, 8])
    graph = helper.make_graph(nodes, "block", [x], [y], inits)
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def _batches() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((2, 5, K)).astype(np.float32)} for _ in range(3)]


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothing_keeps_fp32_outputs(alpha: float) -> None:
    model = _block()
    absmax = activation_absmax(model, _batches())
    assert set(absmax) == {"ln", "g2"}  # the scores/context MatMuls read two activations: untouched
    smoothed, count = smooth(model, absmax, alpha)
    assert count == 2
    onnx.checker.check_model(smoothed)
    x = _batches()[0]["x"]
    np.testing.assert_allclose(_run(smoothed, x), _run(model, x), rtol=1e-4, atol=1e-4)


def test_layernorm_folded_and_outlier_moved() -> None:
    model = _block()
    smoothed, _ = smooth(model, activation_absmax(model, _batches()), 0.5)
    ops = [n.op_type for n in smoothed.graph.node]
    assert ops.count("Mul") == 1  # only in front of the Gemm (its input comes from Reshape, not a LayerNorm)
    mul = next(n for n in smoothed.graph.node if n.op_type == "Mul")
    assert ops.index("Mul") == ops.index("Gemm") - 1 and mul.input[0] == "g2"
    gamma = numpy_helper.to_array(next(i for i in smoothed.graph.initializer if i.name == "gamma"))
    assert gamma[3] / np.delete(gamma, 3).max() < 40.0 / 1.0 / 2  # the outlier channel's range shrank
    after = activation_absmax(smoothed, _batches())["ln"]
    before = activation_absmax(model, _batches())["ln"]
    assert after.max() / np.median(after) < before.max() / np.median(before)


def test_bad_alpha_and_foreign_absmax_are_refused() -> None:
    model = _block()
    with pytest.raises(InvalidInputError, match="alpha 1.5"):
        smooth(model, {}, 1.5)
    with pytest.raises(InvalidInputError, match="channels"):
        smooth(model, {"ln": np.ones(K + 1, np.float32)}, 0.5)
    with pytest.raises(InvalidInputError, match="no batches"):
        activation_absmax(model, [])


def test_placement_quantizes_weight_layers_only_and_stays_close() -> None:
    model = _block()
    absmax = activation_absmax(model, _batches())
    smoothed, _ = smooth(model, absmax, 0.8)
    quantized, placement = place_weight_layers(smoothed, activation_absmax(smoothed, _batches()))
    assert set(placement.weights) == {"wq", "wk", "wv", "wo"}
    assert set(placement.activations) == {"ln", "g2_smoothed"}  # not q/kt (scores) nor p/v (context)
    ops = [n.op_type for n in quantized.graph.node]
    assert ops.count("QuantizeLinear") == 2 and "LayerNormalization" in ops and "Softmax" in ops
    x = _batches()[0]["x"]
    ref, out = _run(model, x), _run(quantized, x)
    cosine = float((ref * out).sum() / np.linalg.norm(ref) / np.linalg.norm(out))
    assert cosine > 0.99


def test_placement_refuses_a_model_without_weight_layers() -> None:
    nodes = [helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")]
    graph = helper.make_graph(
        nodes,
        "two_activations",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 2]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(InvalidInputError, match="no MatMul/Gemm with a constant"):
        place_weight_layers(model, {})


def test_attention_placement_quantizes_the_activation_pairs_too() -> None:
    model = _block()
    assert attention_inputs(model) == ["kt", "p", "q", "v"]
    absmax = activation_absmax(model, _batches(), attention_inputs(model))
    _, weights_only = place_weight_layers(model, absmax)
    quantized, placement = place_weight_layers(model, absmax, attention=True)
    assert set(placement.activations) - set(weights_only.activations) == {"q", "kt", "p", "v"}
    x = _batches()[0]["x"]
    ref, out = _run(model, x), _run(quantized, x)
    assert float((ref * out).sum() / np.linalg.norm(ref) / np.linalg.norm(out)) > 0.99


def test_smoothed_absmax_matches_a_second_measuring_run() -> None:
    model = _block()
    absmax = activation_absmax(model, _batches())
    smoothed, scales = smooth_with_scales(model, absmax, 0.8)
    assert set(scales) == {"ln", "g2"} and scales["ln"][0] == "ln" and scales["g2"][0] == "g2_smoothed"
    derived = smoothed_absmax(absmax, scales)
    measured = activation_absmax(smoothed, _batches())
    for name in ("ln", "g2_smoothed"):
        np.testing.assert_allclose(derived[name], measured[name], rtol=1e-5)
    np.testing.assert_array_equal(derived["g2"], absmax["g2"])  # the Mul's input keeps its own values


def _masked_batch() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The block with an int64 attention_mask input (unused by the graph, as a BERT's LayerNorm does)."""
    model = _block()
    model.graph.input.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [2, 5]))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 5, K)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], np.int64)
    x[mask == 0] = 0.0
    x[mask == 0, 7] = 500.0  # padded positions: a spike that means nothing (LayerNorm makes it ~sqrt(K) there)
    return model, {"x": x, "attention_mask": mask}


def _tensor(model: onnx.ModelProto, feed: dict[str, np.ndarray], name: str) -> np.ndarray:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run([name], feed)[0])


def test_absmax_ignores_padded_positions_given_the_mask() -> None:
    model, batch = _masked_batch()
    extra = attention_inputs(model)
    unmasked = activation_absmax(model, [batch], extra)
    masked = activation_absmax(model, [batch], extra, mask="attention_mask")
    real = batch["attention_mask"] == 1
    ln = np.abs(_tensor(model, batch, "ln"))[real].max(axis=0)  # [B, S, K]: the real rows only
    g2 = np.abs(_tensor(model, batch, "g2")).reshape(2, 5, K)[real].max(axis=0)  # [B*S, K] before the Gemm
    np.testing.assert_allclose(masked["ln"], ln, rtol=1e-6)
    np.testing.assert_allclose(masked["g2"], g2, rtol=1e-6)
    assert masked["ln"][7] < unmasked["ln"][7] - 0.5
    assert (masked["q"] <= unmasked["q"] + 1e-6).all()


def test_real_positions_masks_only_layouts_it_recognizes() -> None:
    mask = np.array([[1, 0, 0], [1, 1, 0]])
    ones = np.ones
    assert real_positions(ones((2, 3, 4)), mask).sum() == 3 * 4  # [B, S, K]
    assert real_positions(ones((6, 4)), mask).sum() == 3 * 4  # [B*S, K]
    assert real_positions(ones((2, 2, 3, 5)), mask).sum() == 3 * 2 * 5  # [B, H, S, d]
    assert real_positions(ones((2, 2, 5, 3)), mask).sum() == 3 * 2 * 5  # [B, H, d, S]
    assert real_positions(ones((2, 2, 3, 3)), mask).sum() == 2 * 2 * 3 * 3  # [B, H, S, S]: left whole
    assert real_positions(ones((3, 2, 4)), mask).sum() == 3 * 2 * 4  # sequence-first: left whole
    assert real_positions(ones((2, 3, 4)), None).sum() == 2 * 3 * 4


def _decomposed_layernorm_mlp(rms: bool) -> onnx.ModelProto:
    """x -> LayerNorm written out (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add), or RMSNorm
    (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul) -> MatMul; opset 13 (ReduceMean axes as attribute)."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
        numpy_helper.from_array(np.ones(K, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(K, np.float32), "beta"),
        numpy_helper.from_array(rng.standard_normal((K, 4)).astype(np.float32), "w"),
    ]
    if rms:
        nodes = [
            helper.make_node("Pow", ["x", "two"], ["sq"]),
            helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
            helper.make_node("Add", ["var", "eps"], ["var_eps"]),
            helper.make_node("Sqrt", ["var_eps"], ["std"]),
            helper.make_node("Reciprocal", ["std"], ["inv"]),
            helper.make_node("Mul", ["x", "inv"], ["normed"]),
            helper.make_node("Mul", ["normed", "gamma"], ["ln"]),
        ]
    else:
        nodes = [
            helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1]),
            helper.make_node("Sub", ["x", "mean"], ["centered"]),
            helper.make_node("Pow", ["centered", "two"], ["sq"]),
            helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
            helper.make_node("Add", ["var", "eps"], ["var_eps"]),
            helper.make_node("Sqrt", ["var_eps"], ["std"]),
            helper.make_node("Div", ["centered", "std"], ["normed"]),
            helper.make_node("Mul", ["normed", "gamma"], ["scaled"]),
            helper.make_node("Add", ["scaled", "beta"], ["ln"]),
        ]
    nodes.append(helper.make_node("MatMul", ["ln", "w"], ["y"]))
    graph = helper.make_graph(
        nodes, "decomposed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 4])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _cnn() -> onnx.ModelProto:
    """Conv -> Relu -> ReduceMean (global pooling) -> Flatten -> Gemm: a classifier with no LayerNorm."""
    rng = np.random.default_rng(4)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.standard_normal((10, 4)).astype(np.float32), "fc_w"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("ReduceMean", ["r"], ["pooled"], axes=[2, 3]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_transformers_are_recognized_from_the_graph_and_cnns_are_not() -> None:
    assert normalized_inputs(_block()) == ["ln"]  # the fused LayerNormalization feeds Q/K/V
    assert normalized_inputs(_decomposed_layernorm_mlp(rms=False)) == ["ln"]
    assert normalized_inputs(_decomposed_layernorm_mlp(rms=True)) == ["ln"]
    assert smoothquant_applies(_block()) and smoothquant_applies(_decomposed_layernorm_mlp(rms=True))
    assert normalized_inputs(_cnn()) == [] and not smoothquant_applies(_cnn())
    digits = onnx.load(str(Path(builders.__file__).parent / "data" / "digits.onnx"))
    assert not smoothquant_applies(digits)
