"""Per-layer error profile of static INT8 from one FP32 run: how much each compute layer's own
output changes when its input and weights are quantized with the calibrated ranges.

``--precision auto`` ranks layers by this to choose which to keep in float. The older ranking built
and ran a whole model per layer (minutes on a real CNN); this one runs the FP32 model once on a few
held-out samples with every compute layer's input fetched, then runs each layer alone as a one-node
model twice (exact and fake-quantized inputs/weights): seconds, and memory for a few samples only.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from builders.calib_data import Dataset
from builders.quantize import TensorRange, prepare_model, save_model

logger = logging.getLogger(__name__)

PROFILE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
PROFILE_SAMPLES = 8


def static_error_profile(
    model: onnx.ModelProto, ranges: Mapping[str, TensorRange], dataset: Dataset, samples: int = PROFILE_SAMPLES
) -> dict[str, float]:
    """layer -> ||y_q - y||^2 / ||y||^2 with uint8 activations (calibrated range) and per-channel int8
    weights, worst first; layers without a calibrated input or constant weight are left out."""
    errors = layer_errors(model, ranges, dataset, samples)
    return dict(sorted(((k, v[0]) for k, v in errors.items()), key=lambda kv: -kv[1]))


def layer_errors(
    model: onnx.ModelProto, ranges: Mapping[str, TensorRange], dataset: Dataset, samples: int = PROFILE_SAMPLES
) -> dict[str, tuple[float, np.ndarray]]:
    """layer -> (relative squared error, mean error per output channel) of its own output under INT8."""
    import onnxruntime as ort

    prepared = prepare_model(model).model
    weights = {i.name: numpy_helper.to_array(i) for i in prepared.graph.initializer}
    layers = [
        n for n in prepared.graph.node
        if n.op_type in PROFILE_OPS and len(n.input) > 1 and n.input[1] in weights and n.input[0] in ranges
    ]  # fmt: skip
    if not layers or not dataset.groups:
        return {}
    wanted = sorted({n.input[0] for n in layers})
    augmented = onnx.ModelProto()
    augmented.CopyFrom(prepared)
    existing = {o.name for o in augmented.graph.output} | {i.name for i in augmented.graph.input}
    augmented.graph.output.extend(onnx.ValueInfoProto(name=n) for n in wanted if n not in existing)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    feed = dataset.first_batch(min(samples, len(dataset.groups[0])))
    with tempfile.TemporaryDirectory(prefix="kiln-layer-profile-") as tmp:
        session = ort.InferenceSession(str(save_model(augmented, Path(tmp) / "m.onnx")), options,
                                       providers=["CPUExecutionProvider"])  # fmt: skip
        del augmented
        values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
        values.update(feed)
        del session
    opset = max(o.version for o in prepared.opset_import if o.domain in ("", "ai.onnx"))
    errors: dict[str, tuple[float, np.ndarray]] = {}
    for node in layers:
        x = values.get(node.input[0])
        if not isinstance(x, np.ndarray) or x.dtype != np.float32:
            continue
        w = weights[node.input[1]]
        exact = _run_alone(node, x, w, weights, opset)
        quantized_x = _fake_uint8(x, ranges[node.input[0]])
        approx = _run_alone(node, quantized_x, _fake_int8_per_channel(node, w), weights, opset)
        if exact.shape != approx.shape or exact.ndim < 2:
            continue
        denom = float(np.square(exact).sum())
        diff = approx - exact
        axis = 1 if node.op_type in ("Conv", "ConvTranspose") else exact.ndim - 1
        mean = diff.mean(axis=tuple(i for i in range(diff.ndim) if i != axis))
        errors[node.name] = (float(np.square(diff).sum()) / denom if denom > 0 else 0.0, mean)
    logger.info("static INT8 error profile: %s", {k: v[0] for k, v in errors.items()})
    return errors


def _run_alone(node: onnx.NodeProto, x: np.ndarray, w: np.ndarray, weights: dict[str, np.ndarray],
               opset: int) -> np.ndarray:  # fmt: skip
    import onnxruntime as ort

    inits = [numpy_helper.from_array(w.astype(np.float32), "w")]
    inputs = ["x", "w"]
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] not in weights:
            return np.zeros(1, np.float32)  # a computed bias: cannot run alone
        inits.append(numpy_helper.from_array(weights[node.input[2]], "b"))
        inputs.append("b")
    alone = helper.make_node(node.op_type, inputs, ["y"], name="alone")
    alone.attribute.extend(node.attribute)
    graph = helper.make_graph([alone], "alone", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0], np.float64)


def _fake_uint8(x: np.ndarray, rng: TensorRange) -> np.ndarray:
    """Quantize-dequantize with the asymmetric uint8 range the ORT placement uses for this tensor."""
    low, high = rng.clipped()
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255.0 or 1.0
    zero = np.round(-low / scale)
    return ((np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale).astype(np.float32)


def _fake_int8_per_channel(node: onnx.NodeProto, w: np.ndarray) -> np.ndarray:
    """Symmetric int8 per output channel (Conv: axis 0; MatMul/Gemm weights [in, out]: axis 1)."""
    trans_b = any(a.name == "transB" and a.i for a in node.attribute)
    axis = 0 if node.op_type in ("Conv", "ConvTranspose") or trans_b else w.ndim - 1
    if node.op_type == "ConvTranspose":
        axis = 1
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    scale = np.abs(w).max(axis=reduce, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    return (np.clip(np.round(w / scale), -127, 127) * scale).astype(np.float32)
