"""SmoothQuant: migrate per-channel activation outliers into the weights of MatMul/Gemm layers.

For a layer ``Y = X @ W`` (``W`` a constant ``[K, N]``), dividing input channel ``j`` of ``X`` by
``s_j`` and multiplying row ``j`` of ``W`` by ``s_j`` leaves ``Y`` unchanged. Transformers carry a
few activation channels hundreds of times larger than the rest, which ruins per-tensor INT8
activation scales; with ``s_j = a_j**alpha / w_j**(1 - alpha)`` (``a_j`` the calibration absmax of
channel ``j``, ``w_j`` the absmax of weight row ``j``) both sides share the range and quantize well.

``1/s`` is folded into the preceding ``LayerNormalization``'s scale and bias when every consumer
of its output is a smoothed layer; otherwise a ``Mul`` by the constant ``1/s`` is inserted in front
of the smoothed layers only. Layers that read the same activation (Q, K and V projections) share
one ``s`` (``w_j`` the max over their weights). The transform is pure: FP32 outputs are unchanged
beyond rounding (``tests/unit/test_smoothquant.py``).

:func:`place_weight_layers` then puts Q/DQ on the weight layers' inputs only; ``kiln build
--smoothquant`` (``builders.int8_build``) searches alpha over :data:`ALPHAS` on a slice of the
calibration data and gates the best candidate on the evaluation data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from builders.qdq_placement import TRT_QUANTIZED_OPS, Placement, place_tensorrt
from core.errors import InvalidInputError


@dataclass(frozen=True)
class _Layer:
    node: onnx.NodeProto
    weight: str
    rows_axis: int  # axis of the weight indexed by the input channel


def smoothable(model: onnx.ModelProto) -> dict[str, list[_Layer]]:
    """Activation tensor name -> the MatMul/Gemm layers reading it with a constant 2-D weight."""
    inits = {i.name: i for i in model.graph.initializer}
    found: dict[str, list[_Layer]] = {}
    for node in model.graph.node:
        layer = _layer(node, inits)
        if layer is not None:
            found.setdefault(node.input[0], []).append(layer)
    return found


def _layer(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> _Layer | None:
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
        return None
    if node.input[0] in inits or len(inits[node.input[1]].dims) != 2:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Gemm" and attrs.get("transA", 0):
        return None
    rows_axis = 1 if node.op_type == "Gemm" and attrs.get("transB", 0) else 0
    return _Layer(node, node.input[1], rows_axis)


def attention_inputs(model: onnx.ModelProto) -> list[str]:
    """Inputs of the MatMuls that multiply two activations (attention scores and context)."""
    inits = {i.name for i in model.graph.initializer}
    pairs = [n for n in model.graph.node if n.op_type == "MatMul" and not set(n.input[:2]) & inits]
    return sorted({name for node in pairs for name in node.input[:2]})


def activation_absmax(model: onnx.ModelProto, batches: Iterable[dict[str, np.ndarray]],
                      extra: Sequence[str] = ()) -> dict[str, np.ndarray]:  # fmt: skip
    """Per-channel (last axis) absmax of every smoothable activation (and of ``extra``) over ``batches``.

    One batch is run at a time and only the running ``[K]`` maxima are kept, so memory is one
    batch of activations plus one vector per tensor.
    """
    names = sorted(set(smoothable(model)) | set(extra))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    graph_inputs = {i.name for i in probe.graph.input}
    for name in names:
        if name not in existing and name not in graph_inputs:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds_needed = [i.name for i in session.get_inputs()]
    maxima: dict[str, np.ndarray] = {}
    fetch = [n for n in names if n not in graph_inputs]
    for batch in batches:
        values = dict(zip(fetch, session.run(fetch, {k: batch[k] for k in feeds_needed}), strict=True))
        values.update({n: batch[n] for n in names if n in graph_inputs})
        for name in names:
            arr = np.abs(np.asarray(values[name], dtype=np.float32))
            channel = arr.reshape(-1, arr.shape[-1]).max(axis=0)
            maxima[name] = channel if name not in maxima else np.maximum(maxima[name], channel)
    if not maxima:
        raise InvalidInputError("SmoothQuant calibration got no batches: pass at least one calibration sample")
    return maxima


def smooth(model: onnx.ModelProto, absmax: dict[str, np.ndarray], alpha: float) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with every smoothable layer smoothed at ``alpha``, and how many activations."""
    if not 0.0 <= alpha <= 1.0:
        raise InvalidInputError(f"SmoothQuant alpha {alpha!r} is outside [0, 1]: pick e.g. 0.5")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in out.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producers = {o: n for n in out.graph.node for o in n.output}
    outputs = {o.name for o in out.graph.output}
    weight_users: dict[str, int] = {}
    for node in out.graph.node:
        for name in node.input:
            weight_users[name] = weight_users.get(name, 0) + 1
    smoothed = 0
    pending: dict[str, onnx.NodeProto] = {}
    for activation, layers in smoothable(out).items():
        if activation not in absmax or any(weight_users[layer.weight] != 1 for layer in layers):
            continue  # shared weights would be scaled twice
        a = np.asarray(absmax[activation], dtype=np.float64)
        weights = [numpy_helper.to_array(inits[layer.weight]).astype(np.float64) for layer in layers]
        w = np.max(
            [np.abs(wt).max(axis=1 - layer.rows_axis) for wt, layer in zip(weights, layers, strict=True)], axis=0
        )
        if a.shape != w.shape:
            raise InvalidInputError(
                f"SmoothQuant: activation {activation!r} has {a.shape[0]} channels but its weights read "
                f"{w.shape[0]}: the calibration absmax does not belong to this model"
            )
        s = np.where(
            (a > 0) & (w > 0), np.power(np.maximum(a, 1e-8), alpha) / np.power(np.maximum(w, 1e-8), 1 - alpha), 1.0
        )
        s = np.clip(s, 1e-5, 1e5)
        for wt, layer in zip(weights, layers, strict=True):
            scaled = wt * (s[:, None] if layer.rows_axis == 0 else s[None, :])
            _set(inits[layer.weight], scaled)
        users = consumers.get(activation, [])
        norm = producers.get(activation)
        if _fold_into_norm(norm, users, layers, activation, outputs, inits, weight_users, s):
            smoothed += 1
            continue
        scale_name = f"{activation}_smooth_inv"
        new_name = f"{activation}_smoothed"
        out.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), scale_name))
        for layer in layers:
            layer.node.input[0] = new_name
        mul = helper.make_node("Mul", [activation, scale_name], [new_name], name=f"{activation}_smooth")
        pending[new_name] = mul
        smoothed += 1
    if pending:  # each Mul goes right before its first user: after its producer in topological order
        nodes: list[onnx.NodeProto] = []
        for node in out.graph.node:
            for name in node.input:
                if name in pending:
                    nodes.append(pending.pop(name))
            kept = onnx.NodeProto()
            kept.CopyFrom(node)
            nodes.append(kept)
        del out.graph.node[:]
        out.graph.node.extend(nodes)
    return out, smoothed


def _fold_into_norm(norm: onnx.NodeProto | None, users: list[onnx.NodeProto], layers: list[_Layer], activation: str,
                    outputs: set[str], inits: dict[str, onnx.TensorProto], weight_users: dict[str, int],
                    s: np.ndarray) -> bool:  # fmt: skip
    if norm is None or norm.op_type != "LayerNormalization" or activation in outputs:
        return False
    if len(users) != len(layers) or norm.output[0] != activation:
        return False
    params = [name for name in norm.input[1:3] if name]
    if not params or any(p not in inits or weight_users[p] != 1 for p in params):
        return False
    for name in params:
        value = numpy_helper.to_array(inits[name]).astype(np.float64)
        if value.shape != s.shape:
            return False
    for name in params:
        _set(inits[name], numpy_helper.to_array(inits[name]).astype(np.float64) / s)
    return True


def _set(tensor: onnx.TensorProto, value: np.ndarray) -> None:
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    tensor.CopyFrom(numpy_helper.from_array(value.astype(dtype), tensor.name))


ALPHAS = (0.5, 0.65, 0.8, 0.9)  # searched per model; outlier-heavy encoders tend to want 0.8-0.9


def place_weight_layers(model: onnx.ModelProto, absmax: dict[str, np.ndarray], *,
                        attention: bool = False) -> tuple[onnx.ModelProto, Placement]:  # fmt: skip
    """Q/DQ on the inputs of the weight MatMul/Gemm layers only (symmetric per-tensor activations from
    ``absmax``, per-channel int8 weights); everything else -- LayerNorm, Softmax, GELU, the attention
    score and context MatMuls that multiply two activations, any Conv -- stays float. With
    ``attention`` the activation x activation MatMuls are quantized too (their inputs need an
    ``absmax`` entry, see :func:`attention_inputs`)."""
    named = onnx.ModelProto()
    named.CopyFrom(model)
    taken = {n.name for n in named.graph.node}
    for i, node in enumerate(named.graph.node):
        if not node.name:  # exclusion is by node name
            node.name = next(c for c in (f"{node.op_type}_{i}_{j}" for j in range(len(taken) + 1)) if c not in taken)
            taken.add(node.name)
    model = named
    layers = smoothable(model)
    quantized = {layer.node.name for name, group in layers.items() if name in absmax for layer in group}
    if attention:
        pairs = set(attention_inputs(model))
        quantized |= {n.name for n in model.graph.node if n.op_type == "MatMul" and set(n.input[:2]) <= pairs}
    if not quantized:
        raise InvalidInputError(
            "SmoothQuant found no MatMul/Gemm with a constant 2-D weight and a calibrated input in this model; "
            "use --int8-mode dynamic or the default static placement instead"
        )
    excluded = [n.name for n in model.graph.node if n.op_type in TRT_QUANTIZED_OPS and n.name not in quantized]
    amaxes = {name: float(value.max()) for name, value in absmax.items()}
    return place_tensorrt(model, amaxes, exclude_nodes=excluded)
