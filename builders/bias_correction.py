"""Bias correction: fold the expected quantization error of each layer's output back into its bias.

INT8 rounding of a layer's input and weights shifts the mean of its output channels a little (the
errors do not average out when weights and activations are skewed), and the shift compounds
through the network. ``bias_corrections`` measures that shift per output channel on held-out data
(``builders.layer_profile``: each layer run alone, exact vs fake-quantized), and ``apply`` is the
graph transform that subtracts it from the layer's FP32 bias before Q/DQ placement, so the
quantized layer's expected output matches FP32's. Only Conv / ConvTranspose / Gemm (and MatMul
followed by a constant Add, the exporters' form of a linear layer) with constant weights change.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from builders.calib_data import Dataset
from builders.inspection import consumers_of
from builders.layer_profile import layer_errors
from builders.quantize import TensorRange, prepare_model


def bias_corrections(
    model: onnx.ModelProto, ranges: Mapping[str, TensorRange], dataset: Dataset
) -> dict[str, np.ndarray]:
    """layer -> mean INT8 output error per output channel (what ``apply`` subtracts)."""
    return {name: mean for name, (_, mean) in layer_errors(model, ranges, dataset).items() if np.any(mean)}


def apply(model: onnx.ModelProto, corrections: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of the prepared ``model`` with ``bias -= correction`` for every corrected layer.

    A layer without a bias gets one (zeros minus the correction). With no corrections the result
    computes exactly what ``model`` computes.
    """
    out = prepare_model(model).model
    inits = {i.name: i for i in out.graph.initializer}
    consumers = consumers_of(out.graph)
    for node in out.graph.node:
        shift = corrections.get(node.name)
        if shift is None:
            continue
        shift = np.asarray(shift, np.float64)
        if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
            _correct_input(out, node, 2, shift, inits)
        elif node.op_type == "MatMul":
            users = consumers.get(node.output[0], [])
            if len(users) == 1 and users[0].op_type == "Add":
                add = users[0]
                index = 1 if add.input[0] == node.output[0] else 0
                if add.input[index] in inits and numpy_helper.to_array(inits[add.input[index]]).shape == shift.shape:
                    _correct_input(out, add, index, shift, inits)
    return out


def _correct_input(model: onnx.ModelProto, node: onnx.NodeProto, index: int, shift: np.ndarray,
                   inits: dict[str, onnx.TensorProto]) -> None:  # fmt: skip
    if len(node.input) > index and node.input[index]:
        name = node.input[index]
        if name not in inits:
            return  # a computed bias: leave it
        bias = numpy_helper.to_array(inits[name]).astype(np.float64)
        if bias.shape != shift.shape:
            return
        new_name = f"{name}_bias_corrected_{node.name}"
    else:
        bias = np.zeros_like(shift)
        new_name = f"{node.name}_bias_corrected"
        while len(node.input) < index:
            node.input.append("")
        node.input.append(new_name)
    corrected = numpy_helper.from_array((bias - shift).astype(np.float32), new_name)
    model.graph.initializer.append(corrected)
    inits[new_name] = corrected
    node.input[index] = new_name
