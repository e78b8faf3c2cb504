"""TensorRT-style explicit quantization: where Q/DQ nodes go, and the int8 weights they carry.

TensorRT's rule for explicitly quantized networks: symmetric int8 (zero point 0), activations
per tensor, weights per output channel, Q/DQ on the *inputs* of the compute ops (Conv,
ConvTranspose, Gemm, MatMul), biases and outputs left in float (TensorRT fuses the bias and
decides the output precision itself). Weights are stored as int8 initializers followed by one
DequantizeLinear, which both TensorRT and ONNX Runtime accept and which makes the file ~4x smaller.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

logger = logging.getLogger(__name__)

INT8_MAX = 127.0
# Compute ops whose inputs TensorRT wants quantized, and which inputs are data (not bias).
TRT_QUANTIZED_OPS: dict[str, tuple[int, ...]] = {
    "Conv": (0, 1),
    "ConvTranspose": (0, 1),
    "Gemm": (0, 1),
    "MatMul": (0, 1),
}
MIN_PER_CHANNEL_OPSET = 13


@dataclass(frozen=True)
class Placement:
    """What a placement did: tensors quantized, weights with their axis, and what it left alone."""

    activations: tuple[str, ...]
    weights: dict[str, int | None]  # weight name -> per-channel axis, None = per tensor
    skipped: dict[str, str]  # tensor -> reason it stayed float


def weight_axis(node: onnx.NodeProto, input_index: int, weight: np.ndarray) -> int | None:
    """The output-channel axis of a weight input, or None when per-channel does not apply."""
    if weight.ndim < 2 or (input_index != 1 and node.op_type != "Gemm"):
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1 if int(attrs.get("group", 1)) == 1 else None
    if node.op_type == "Gemm":
        if input_index == 0:
            return 0 if int(attrs.get("transA", 0)) == 0 else 1
        return 0 if int(attrs.get("transB", 0)) else 1
    if node.op_type == "MatMul":
        return weight.ndim - 1 if input_index == 1 else None
    return None


def weight_scales(weight: np.ndarray, axis: int | None) -> np.ndarray:
    """Symmetric scales amax/127 per channel along ``axis`` (or one scale); zero channels get 1."""
    w = np.abs(weight.astype(np.float64))
    if axis is None:
        amax = np.array(w.max() if w.size else 0.0)
    else:
        amax = w.max(axis=tuple(i for i in range(w.ndim) if i != axis))
    scale = amax / INT8_MAX
    return np.where(scale > 0, scale, 1.0).astype(np.float32)


def quantize_weight(weight: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    """Round-to-nearest-even symmetric int8 weights for the given scales."""
    if axis is None:
        shaped = scale
    else:
        shape = [1] * weight.ndim
        shape[axis] = -1
        shaped = scale.reshape(shape)
    return np.clip(np.rint(weight / shaped), -INT8_MAX, INT8_MAX).astype(np.int8)


def place_tensorrt(
    model: onnx.ModelProto,
    amaxes: Mapping[str, float],
    *,
    exclude_nodes: Iterable[str] = (),
    per_channel: bool = True,
) -> tuple[onnx.ModelProto, Placement]:
    """A copy of ``model`` with TensorRT-style Q/DQ inserted from activation ``amaxes``.

    Nodes named in ``exclude_nodes`` and activations without an amax stay in float.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {i.name: i for i in graph.initializer}
    excluded = set(exclude_nodes)
    new_nodes: list[onnx.NodeProto] = []
    done: dict[str, str] = {}  # original tensor -> dequantized tensor
    weights: dict[str, int | None] = {}
    skipped: dict[str, str] = {}
    for node in graph.node:
        data_inputs = TRT_QUANTIZED_OPS.get(node.op_type, ())
        if node.name in excluded:
            data_inputs = ()
        for index in data_inputs:
            if index >= len(node.input) or not node.input[index]:
                continue
            name = node.input[index]
            if name not in done:
                if name in inits and inits[name].data_type == TensorProto.FLOAT:
                    dq_name, axis = _dequantized_weight(graph, inits[name], node, index, per_channel, new_nodes)
                    done[name], weights[name] = dq_name, axis
                elif name in amaxes and np.isfinite(amaxes[name]) and amaxes[name] > 0:
                    done[name] = _qdq_activation(graph, name, float(amaxes[name]), new_nodes)
                else:
                    skipped[name] = "no calibrated range (skipped or not calibrated)"
                    continue
            node.input[index] = done[name]
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused_initializers(graph, weights)
    activations = tuple(n for n in done if n not in weights)
    logger.info("TensorRT placement: %d activations, %d weights quantized", len(activations), len(weights))
    return out, Placement(activations, weights, skipped)


def _dequantized_weight(
    graph: onnx.GraphProto,
    init: onnx.TensorProto,
    node: onnx.NodeProto,
    index: int,
    per_channel: bool,
    new_nodes: list[onnx.NodeProto],
) -> tuple[str, int | None]:
    weight = numpy_helper.to_array(init)
    axis = weight_axis(node, index, weight) if per_channel else None
    scale = weight_scales(weight, axis)
    q_name, s_name, z_name = f"{init.name}_quantized", f"{init.name}_scale", f"{init.name}_zero_point"
    zero = np.zeros(scale.shape, dtype=np.int8)
    graph.initializer.extend(
        [
            numpy_helper.from_array(quantize_weight(weight, scale, axis), q_name),
            numpy_helper.from_array(scale if axis is not None else scale.reshape(()), s_name),
            numpy_helper.from_array(zero if axis is not None else zero.reshape(()), z_name),
        ]
    )
    out_name = f"{init.name}_dequantized"
    dq = helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [out_name], name=f"{init.name}_DQ")
    if axis is not None:
        dq.attribute.append(helper.make_attribute("axis", axis))
    new_nodes.append(dq)
    return out_name, axis


def _drop_unused_initializers(graph: onnx.GraphProto, names: Iterable[str]) -> None:
    """Remove float weights that no node uses any more (all consumers now read the int8 copy)."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    unused = {n for n in names if n not in used}
    keep = [i for i in graph.initializer if i.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    keep_inputs = [i for i in graph.input if i.name not in unused]
    del graph.input[:]
    graph.input.extend(keep_inputs)


def _qdq_activation(graph: onnx.GraphProto, name: str, amax: float, new_nodes: list[onnx.NodeProto]) -> str:
    scale_name, zero_name = f"{name}_scale", f"{name}_zero_point"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(amax / INT8_MAX, dtype=np.float32), scale_name),
            helper.make_tensor(zero_name, TensorProto.INT8, [], [0]),
        ]
    )
    q_out, dq_out = f"{name}_quantized", f"{name}_dequantized"
    new_nodes.append(helper.make_node("QuantizeLinear", [name, scale_name, zero_name], [q_out], name=f"{name}_Q"))
    new_nodes.append(helper.make_node("DequantizeLinear", [q_out, scale_name, zero_name], [dq_out], name=f"{name}_DQ"))
    return dq_out
