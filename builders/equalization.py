"""Cross-layer equalization: rescale consecutive conv channels so their weight ranges even out.

For two convolutions A -> (ReLU) -> B, scaling output channel i of A by 1/s_i and input channel i
of B by s_i leaves the network's function unchanged (ReLU is positively homogeneous: relu(x/s) =
relu(x)/s for s > 0). With s_i = sqrt(r1_i / r2_i) -- r1_i the range of A's weights for channel i,
r2_i that of B's weights reading channel i -- both become sqrt(r1_i r2_i): a channel with tiny
weights in A (common after BatchNorm folding in depthwise-separable nets) no longer wastes INT8
levels. Only pairs whose intermediate tensor feeds nothing else are changed; activations that are
not positively homogeneous (HardSwish, SiLU, GELU...) end a pair, so a network built from them has
nothing to equalize (``equalize`` says how many pairs it changed).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

from builders.inspection import consumers_of
from builders.quantize import prepare_model

logger = logging.getLogger(__name__)

HOMOGENEOUS = ("Relu",)


def equalize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A prepared copy of ``model`` with every eligible conv pair equalized, and how many pairs."""
    out = prepare_model(model).model
    inits = {i.name: i for i in out.graph.initializer}
    consumers = consumers_of(out.graph)
    outputs = {o.name for o in out.graph.output}
    pairs = 0
    for first in out.graph.node:
        second = _next_conv(first, consumers, outputs, inits)
        if second is not None and _equalize_pair(out, first, second, inits):
            pairs += 1
    used = {name for node in out.graph.node for name in node.input}
    kept = [i for i in out.graph.initializer if i.name in used or i.name in {g.name for g in out.graph.input}]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    logger.info("cross-layer equalization: %d conv pair(s) rescaled", pairs)
    return out, pairs


def _only_consumer(name: str, consumers: dict[str, list[onnx.NodeProto]], outputs: set[str]) -> onnx.NodeProto | None:
    users = consumers.get(name, [])
    return users[0] if len(users) == 1 and name not in outputs else None


def _next_conv(first: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]], outputs: set[str],
               inits: dict[str, onnx.TensorProto]) -> onnx.NodeProto | None:  # fmt: skip
    if first.op_type != "Conv" or len(first.input) < 2 or first.input[1] not in inits:
        return None
    if len(first.input) > 2 and first.input[2] and first.input[2] not in inits:
        return None
    node = _only_consumer(first.output[0], consumers, outputs)
    if node is not None and node.op_type in HOMOGENEOUS:
        node = _only_consumer(node.output[0], consumers, outputs)
    if node is None or node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
        return None
    if next((a.i for a in node.attribute if a.name == "group"), 1) != 1:
        return None  # a grouped second conv mixes channels per group: not handled
    return node


def _equalize_pair(model: onnx.ModelProto, first: onnx.NodeProto, second: onnx.NodeProto,
                   inits: dict[str, onnx.TensorProto]) -> bool:  # fmt: skip
    w1 = numpy_helper.to_array(inits[first.input[1]]).astype(np.float64)
    w2 = numpy_helper.to_array(inits[second.input[1]]).astype(np.float64)
    if w1.shape[0] != w2.shape[1]:
        return False
    r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1)
    r2 = np.abs(np.moveaxis(w2, 1, 0).reshape(w2.shape[1], -1)).max(axis=1)
    scale = np.ones_like(r1)
    ok = (r1 > 0) & (r2 > 0)
    scale[ok] = np.sqrt(r1[ok] / r2[ok])
    if np.allclose(scale, 1.0):
        return False
    shape1 = (-1,) + (1,) * (w1.ndim - 1)
    shape2 = (1, -1) + (1,) * (w2.ndim - 2)
    _replace(model, first, 1, w1 / scale.reshape(shape1), inits)
    if len(first.input) > 2 and first.input[2]:
        _replace(model, first, 2, numpy_helper.to_array(inits[first.input[2]]).astype(np.float64) / scale, inits)
    _replace(model, second, 1, w2 * scale.reshape(shape2), inits)
    return True


def _replace(model: onnx.ModelProto, node: onnx.NodeProto, index: int, value: np.ndarray,
             inits: dict[str, onnx.TensorProto]) -> None:  # fmt: skip
    """A new initializer for ``node.input[index]`` (an initializer shared with other nodes stays as it was)."""
    name = f"{node.input[index]}_equalized_{node.name}"
    tensor = numpy_helper.from_array(value.astype(np.float32), name)
    model.graph.initializer.append(tensor)
    inits[name] = tensor
    node.input[index] = name
