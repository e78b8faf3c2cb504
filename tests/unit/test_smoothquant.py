"""SmoothQuant: FP32 outputs unchanged (beyond rounding), activation outliers moved into the weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders.smoothquant import activation_absmax, attention_inputs, place_weight_layers, smooth
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
