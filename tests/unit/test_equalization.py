"""Cross-layer equalization: FP32 outputs unchanged (beyond rounding), per-channel weight ranges evened out."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from builders.equalization import equalize


def _chain(activation: str = "Relu"):  # type: ignore[no-untyped-def]
    """depthwise 3x3 (+bias) -> act -> pointwise 1x1 -> act -> 3x3; channel scales spread over 1e-3..10."""
    rng = np.random.default_rng(0)
    dw = rng.standard_normal((8, 1, 3, 3)) * np.logspace(-3, 1, 8)[:, None, None, None]
    inits = [
        numpy_helper.from_array(dw.astype(np.float32), "dw"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "dw_b"),
        numpy_helper.from_array(rng.standard_normal((16, 8, 1, 1)).astype(np.float32), "pw"),
        numpy_helper.from_array(rng.standard_normal((4, 16, 3, 3)).astype(np.float32), "last"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "dw", "dw_b"], ["a"], name="dw", group=8, pads=[1, 1, 1, 1]),
        helper.make_node(activation, ["a"], ["a1"], name="act1"),
        helper.make_node("Conv", ["a1", "pw"], ["b"], name="pw"),
        helper.make_node(activation, ["b"], ["b1"], name="act2"),
        helper.make_node("Conv", ["b1", "last"], ["y"], name="last", pads=[1, 1, 1, 1]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 10, 10])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 10, 10])
    graph = helper.make_graph(nodes, "chain", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _ranges(model, name: str, axis: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    node = next(n for n in model.graph.node if n.name == name)
    w = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == node.input[1])
    return np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1)


def test_equalization_keeps_fp32_outputs_and_evens_out_channel_ranges() -> None:
    model = _chain()
    x = np.random.default_rng(1).standard_normal((3, 8, 10, 10)).astype(np.float32)
    equalized, pairs = equalize(model)
    assert pairs == 2
    np.testing.assert_allclose(_run(equalized, x), _run(model, x), rtol=1e-4, atol=1e-4)
    before = _ranges(model, "dw", 0)
    after = _ranges(equalized, "dw", 0)
    assert before.max() / before.min() > 1000 and after.max() / after.min() < before.max() / before.min() / 10
    # the last pair rescaled (pw -> last) now has equal ranges per channel (earlier pairs move on as
    # later ones rescale their shared layer)
    np.testing.assert_allclose(_ranges(equalized, "pw", 0), _ranges(equalized, "last", 1), rtol=1e-5)
    assert len(equalized.graph.initializer) == len(model.graph.initializer)  # replaced weights were dropped


def test_non_homogeneous_activations_end_a_pair() -> None:
    equalized, pairs = equalize(_chain("HardSwish"))
    assert pairs == 0
    x = np.random.default_rng(2).standard_normal((1, 8, 10, 10)).astype(np.float32)
    np.testing.assert_array_equal(_run(equalized, x), _run(_chain("HardSwish"), x))
