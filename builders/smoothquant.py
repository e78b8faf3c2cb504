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

:func:`place_weight_layers` then puts Q/DQ on the weight layers' inputs only;
``builders.smoothquant_search`` searches alpha over :data:`ALPHAS` on a slice of the calibration
data for ``kiln build --smoothquant`` and for ``--precision auto``, which tries it on graphs where
:func:`normalized_inputs` finds LayerNorm-fed weight layers (transformers).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from builders.inspection import consumers_of
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


NORM_OPS = (
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "RMSNormalization",
)  # fused LayerNorm-like ops (ai.onnx, ORT)


def normalized_inputs(model: onnx.ModelProto) -> list[str]:
    """The smoothable activations a LayerNorm-like node produces: how a transformer shows in the graph.

    LayerNorm-like: a fused normalization op (:data:`NORM_OPS`), or the decomposed form exporters
    write below opset 17 -- a ``Div``/``Mul`` by ``Sqrt`` of a ``ReduceMean`` (LayerNorm, RMSNorm),
    possibly followed by the constant scale and shift. A CNN's classifier ``Gemm`` (fed by pooling or
    ``Flatten``) is not, so a CNN has none.
    """
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    return sorted(a for a in smoothable(model) if _norm_like(producers.get(a), producers, inits))


def _dynamic_inputs(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto], inits: set[str]) -> list[str]:
    return [i for i in node.input if i and i not in inits and getattr(producers.get(i), "op_type", "") != "Constant"]


def _norm_like(node: onnx.NodeProto | None, producers: dict[str, onnx.NodeProto], inits: set[str]) -> bool:
    for _ in range(3):  # the normalization itself, or at most two affine steps (x gamma, + beta) after it
        if node is None:
            return False
        if node.op_type in NORM_OPS:
            return True
        if node.op_type in ("Div", "Mul") and any(
            _rsqrt_of_mean(producers.get(i), producers, inits) for i in _dynamic_inputs(node, producers, inits)
        ):
            return True
        dynamic = _dynamic_inputs(node, producers, inits)
        if node.op_type not in ("Add", "Mul") or len(dynamic) != 1:
            return False
        node = producers.get(dynamic[0])
    return False


def _rsqrt_of_mean(node: onnx.NodeProto | None, producers: dict[str, onnx.NodeProto], inits: set[str]) -> bool:
    """``Sqrt(ReduceMean(...) [+ eps])``, optionally inverted (``Reciprocal``, ``Div(1, .)``)."""
    seen_sqrt = False
    for _ in range(4):
        if node is None:
            return False
        if node.op_type == "ReduceMean":
            return seen_sqrt
        if node.op_type == "Sqrt":
            seen_sqrt = True
        elif node.op_type not in ("Add", "Reciprocal", "Div", "Cast"):
            return False
        dynamic = _dynamic_inputs(node, producers, inits)
        if len(dynamic) != 1:
            return False
        node = producers.get(dynamic[0])
    return False


def activation_absmax(model: onnx.ModelProto, batches: Iterable[dict[str, np.ndarray]],
                      extra: Sequence[str] = (), mask: str | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """Per-channel (last axis) absmax of every smoothable activation (and of ``extra``) over ``batches``.

    One batch is run at a time and only the running ``[K]`` maxima are kept, so memory is one
    batch of activations plus one vector per tensor. With ``mask`` (the name of a 0/1 ``[batch,
    sequence]`` attention-mask input) padded positions do not count: see :func:`real_positions`.
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
        positions = np.asarray(batch[mask]) if mask is not None and mask in batch else None
        for name in names:
            arr = real_positions(np.abs(np.asarray(values[name], dtype=np.float32)), positions)
            channel = arr.reshape(-1, arr.shape[-1]).max(axis=0)
            maxima[name] = channel if name not in maxima else np.maximum(maxima[name], channel)
    if not maxima:
        raise InvalidInputError("SmoothQuant calibration got no batches: pass at least one calibration sample")
    return maxima


def real_positions(values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """``values`` (non-negative) with padded sequence positions zeroed, where the layout shows them.

    ``mask`` is ``[B, S]`` (1 = real token). Recognized layouts: ``[B, S, K]`` (hidden states),
    ``[B*S, K]`` (flattened before a Gemm), ``[B, H, S, d]`` and ``[B, H, d, S]`` (attention
    heads, when exactly one of the last two axes has length S). Anything else -- ``[B, H, S, S]``
    scores (softmax rows are bounded anyway), sequence-first layouts -- is left whole: a tensor is
    never masked on a guess that could drop real values.
    """
    if mask is None or mask.ndim != 2 or values.ndim < 2:
        return values
    keep = mask != 0
    batch, seq = keep.shape
    shape = values.shape
    if values.ndim == 2 and shape[0] == batch * seq and seq > 1:
        return values * keep.reshape(-1, 1)
    if shape[0] != batch:
        return values
    if values.ndim == 3 and shape[1] == seq:
        return values * keep[:, :, None]
    if values.ndim == 4 and (shape[2] == seq) != (shape[3] == seq):  # [B, S, S] scores: ambiguous, left whole
        view = [batch, 1, seq, 1] if shape[2] == seq else [batch, 1, 1, seq]
        return values * keep.reshape(view)
    return values


def smooth(model: onnx.ModelProto, absmax: dict[str, np.ndarray], alpha: float) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with every smoothable layer smoothed at ``alpha``, and how many activations."""
    smoothed, scales = smooth_with_scales(model, absmax, alpha)
    return smoothed, len(scales)


def smoothed_absmax(absmax: dict[str, np.ndarray], scales: dict[str, tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The absmax of the smoothed model without running it: a smoothed activation is the original divided by
    ``s`` channel by channel (``s > 0``), under the name its layers now read; every other tensor (an
    activation read through a new ``Mul`` keeps its own values too) is unchanged (FP32 outputs are kept)."""
    out = dict(absmax)
    for name, (reads, s) in scales.items():
        out[reads] = (np.asarray(absmax[name], np.float64) / s).astype(np.float32)
    return out


def smooth_with_scales(model: onnx.ModelProto, absmax: dict[str, np.ndarray],
                       alpha: float) -> tuple[onnx.ModelProto, dict[str, tuple[str, np.ndarray]]]:  # fmt: skip
    """:func:`smooth`, also returning activation -> (the tensor its layers read now, the scales ``s``)."""
    if not 0.0 <= alpha <= 1.0:
        raise InvalidInputError(f"SmoothQuant alpha {alpha!r} is outside [0, 1]: pick e.g. 0.5")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}
    consumers = consumers_of(out.graph)
    producers = {o: n for n in out.graph.node for o in n.output}
    outputs = {o.name for o in out.graph.output}
    weight_users: dict[str, int] = {}
    for node in out.graph.node:
        for name in node.input:
            weight_users[name] = weight_users.get(name, 0) + 1
    scales: dict[str, tuple[str, np.ndarray]] = {}
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
            scales[activation] = (activation, s)
            continue
        scale_name = f"{activation}_smooth_inv"
        new_name = f"{activation}_smoothed"
        out.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), scale_name))
        for layer in layers:
            layer.node.input[0] = new_name
        mul = helper.make_node("Mul", [activation, scale_name], [new_name], name=f"{activation}_smooth")
        pending[new_name] = mul
        scales[activation] = (new_name, s)
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
    return out, scales


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
