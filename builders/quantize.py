"""Step 3 of an INT8 build: explicit quantization (Q/DQ) from Kiln's calibrated ranges.

One calibration, two placements:

* ``tensorrt``: symmetric int8, per-channel weights, Q/DQ on compute-op inputs only
  (``builders/qdq_placement.py``).
* ``ort``: the placement ONNX Runtime's CPU graph optimizer fuses into QLinearConv /
  QLinearMatMul / MatMulIntegerToFloat and friends (Q/DQ on inputs *and* outputs, bias in int32,
  removable Relu/Clip). onnxruntime.quantization's ``QDQQuantizer`` writes it, fed with ranges
  Kiln computed (its own calibrators are never used).

Before either placement ``prepare_model`` removes the usual traps of real models: weights held in
Constant nodes become initializers, opset < 13 is upgraded (per-channel DequantizeLinear needs 13;
if the upgrade fails, weights fall back to per tensor).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from builders.inspection import consumers_of, model_opset
from builders.qdq_placement import MIN_PER_CHANNEL_OPSET, TRT_QUANTIZED_OPS, Placement, place_tensorrt
from core.errors import InvalidInputError

logger = logging.getLogger(__name__)

# Ops the ORT placement quantizes: those with integer kernels or pure data movement. Ops without
# int8 kernels (HardSigmoid, HardSwish, Erf, norms...) stay float.
ORT_QUANTIZED_OPS: tuple[str, ...] = (
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Relu", "Clip", "MaxPool", "AveragePool",
    "GlobalAveragePool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Resize",
    "Concat", "Add", "Mul", "Pad", "Split", "Slice", "Gather", "Sigmoid", "LeakyRelu", "Softmax",
)  # fmt: skip
SAVE_EXTERNAL_ABOVE = 1_800_000_000  # protobuf's 2 GB limit, with margin


@dataclass(frozen=True)
class TensorRange:
    """A calibrated activation: Kiln's threshold ``amax`` and the signed range actually seen."""

    amax: float
    min: float
    max: float

    def clipped(self) -> tuple[float, float]:
        """The range seen, clipped to [-amax, amax] (what an asymmetric quantizer should cover)."""
        return max(self.min, -self.amax), min(self.max, self.amax)


@dataclass(frozen=True)
class OrtFormat:
    """Integer formats for the ORT placement, and why they were chosen."""

    activation: str = "uint8"  # "uint8" (U8S8) or "int8" (S8S8)
    reduce_range: bool = True
    reason: str = ""

    @property
    def name(self) -> str:
        return ("U8S8" if self.activation == "uint8" else "S8S8") + ("+reduce_range" if self.reduce_range else "")


@dataclass(frozen=True)
class Prepared:
    model: onnx.ModelProto
    notes: tuple[str, ...] = ()
    per_channel: bool = True


@dataclass(frozen=True)
class Quantized:
    model: onnx.ModelProto
    target: str
    notes: tuple[str, ...] = field(default_factory=tuple)
    skipped: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU feature flags (empty when /proc/cpuinfo is unreadable, e.g. not Linux)."""
    try:
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def choose_ort_format(flags: Iterable[str]) -> OrtFormat:
    """The ORT integer formats for a CPU, from its feature flags.

    x86 without VNNI: MLAS's int8 GEMM multiplies u8 x s8 with VPMADDUBSW, whose 16-bit pair
    sums can saturate unless weights use 7 bits, so U8S8 + reduce_range. x86 with VNNI/AMX:
    VPDPBUSD accumulates in 32 bits, so full-range U8S8 is exact; measured on an AVX-512 VNNI
    CPU (benchmarks/bench_int8.py), U8S8 also beat S8S8 (S8S8 QDQ keeps a float Relu and its
    convolutions run a slower kernel). Non-x86 (no AVX flags, e.g. ARM): S8S8, ORT's default.
    """
    present = set(flags)
    fast = sorted(present & {"avx512_vnni", "avx_vnni", "amx_int8"})
    if fast:
        return OrtFormat("uint8", False, f"CPU has {', '.join(fast)}: 32-bit int8 dot products, U8S8 full range")
    if "avx2" in present or "avx512f" in present or "sse4_1" in present:
        reason = "x86 CPU without VNNI/AMX: U8S8 with 7-bit weights avoids VPMADDUBSW saturation"
        return OrtFormat("uint8", True, reason)
    return OrtFormat("int8", False, "non-x86 CPU (no AVX flags): S8S8, ONNX Runtime's default")


def calibration_tensors(model: onnx.ModelProto) -> list[str]:
    """Activations either placement may quantize: inputs/outputs of the ops both place Q/DQ around."""
    ops = set(ORT_QUANTIZED_OPS) | set(TRT_QUANTIZED_OPS)
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    names: list[str] = []
    seen: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in ops:
            continue
        for name in [*node.input, *node.output]:
            if name and name not in constants and name not in seen:
                seen.add(name)
                names.append(name)
    return names


def prepare_model(model: onnx.ModelProto) -> Prepared:
    """Fold Constant-node weights into initializers, name unnamed nodes, bring the opset to >= 13."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    notes: list[str] = []
    folded = fold_constants(out)
    for index, node in enumerate(out.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"  # exclusion lists need names
    if folded:
        notes.append(f"moved {folded} Constant-node tensor(s) into initializers")
    per_channel = True
    opset = model_opset(out)
    if opset < MIN_PER_CHANNEL_OPSET:
        try:
            converted = onnx.version_converter.convert_version(out, MIN_PER_CHANNEL_OPSET)
            onnx.checker.check_model(converted)
            out = converted
            notes.append(f"upgraded opset {opset} -> {MIN_PER_CHANNEL_OPSET} for per-channel weights")
        except Exception as err:  # the converter raises bare RuntimeError/ValidationError
            per_channel = False
            notes.append(f"opset {opset} could not be upgraded ({str(err).splitlines()[0]}); weights per tensor")
    for note in notes:
        logger.info("prepare: %s", note)
    return Prepared(out, tuple(notes), per_channel)


def fold_constants(model: onnx.ModelProto) -> int:
    """Turn top-level ``Constant`` nodes holding a tensor into initializers; returns how many."""
    keep: list[onnx.NodeProto] = []
    moved = 0
    for node in model.graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None and value.type == onnx.AttributeProto.TENSOR:
            array = numpy_helper.to_array(value.t)
            model.graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
            moved += 1
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return moved


def quantize_model(
    model: onnx.ModelProto,
    ranges: Mapping[str, TensorRange],
    target: str,
    *,
    exclude_nodes: Sequence[str] = (),
    ort_format: OrtFormat | None = None,
) -> Quantized:
    """Prepare ``model`` and place Q/DQ for ``target`` ("ort" or "tensorrt") from ``ranges``."""
    prepared = prepare_model(model)
    if target == "tensorrt":
        amaxes = {k: r.amax for k, r in ranges.items()}
        qmodel, placement = place_tensorrt(
            prepared.model, amaxes, exclude_nodes=exclude_nodes, per_channel=prepared.per_channel
        )
        return Quantized(qmodel, target, prepared.notes, placement.skipped, _placement_details(placement))
    if target == "ort":
        fmt = ort_format or choose_ort_format(cpu_flags())
        qmodel, skipped = place_ort(prepared, ranges, fmt, exclude_nodes)
        details = {"format": fmt.name, "format_reason": fmt.reason, "excluded_nodes": list(exclude_nodes)}
        return Quantized(qmodel, target, prepared.notes, skipped, details)
    raise InvalidInputError(f"unknown quantization target {target!r}; choose ort or tensorrt")


def _placement_details(placement: Placement) -> dict[str, Any]:
    return {
        "activations": len(placement.activations),
        "weights": {k: v for k, v in placement.weights.items()},
        "scheme": "symmetric int8, per-channel weights, Q/DQ on compute-op inputs",
    }


def place_ort(
    prepared: Prepared,
    ranges: Mapping[str, TensorRange],
    fmt: OrtFormat,
    exclude_nodes: Sequence[str] = (),
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """ORT-fusable QDQ placement written by onnxruntime's QDQQuantizer from Kiln's ranges."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import QuantType

    model = _with_shapes(prepared.model)
    wanted = set(calibration_tensors(model))
    skipped = {n: "no calibrated range (skipped or not calibrated)" for n in wanted if n not in ranges}
    excluded = list(exclude_nodes) + [
        n.name for n in model.graph.node if any(t in skipped for t in [*n.input, *n.output])
    ]
    data = {}
    for name, rng in ranges.items():
        low, high = rng.clipped()
        data[name] = TensorData(lowest=np.float32(min(low, 0.0)), highest=np.float32(max(high, 0.0)))
    act = QuantType.QUInt8 if fmt.activation == "uint8" else QuantType.QInt8
    producers = {o: n.op_type for n in model.graph.node for o in n.output}  # before the quantizer edits it
    quantizer = QDQQuantizer(
        model,
        prepared.per_channel,
        fmt.reduce_range,
        QuantType.QInt8,
        act,
        TensorsData(CalibrationMethod.MinMax, data),
        [],
        excluded,
        list(ORT_QUANTIZED_OPS),
        {"ActivationSymmetric": fmt.activation == "int8", "WeightSymmetric": True},
    )
    try:
        quantizer.quantize_model()
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise InvalidInputError(
            f"ONNX Runtime QDQ placement failed: {err}; try --target tensorrt placement or --precision fp16"
        ) from err
    quantizer.model.topological_sort()
    qmodel = quantizer.model.model
    rewired = read_float_inputs(qmodel, set(excluded), producers)
    if rewired:
        logger.info("%d kept-float compute node(s) now read float inputs (no ORT weight re-quantization)", rewired)
    return qmodel, skipped


def read_float_inputs(model: onnx.ModelProto, kept: set[str], producers: Mapping[str, str] | None = None) -> int:
    """Make compute nodes kept in float really run in float; returns how many inputs were rewired.

    ONNX Runtime (>= 1.20, basic level, its ``WeightBiasQuantization`` transformer) completes any
    ``DQ -> Conv/Gemm(float weight) -> Q`` it finds by quantizing the float weight itself, on one
    axis that is wrong for depthwise convolutions (effectively per tensor) -- so a layer Kiln kept
    float (measured slower, ``--keep-float``, ``auto``'s sensitive layers) silently ran in int8 with
    a worse weight scale than Kiln's. Such a node reads the float tensor in front of the Q/DQ pair
    instead (more accurate too); Q/DQ pairs nobody reads any more are removed.

    ``producers`` (tensor -> op type before placement) catches a Relu the placement folded into the
    Q (its range starts at 0): the float node then gets that Relu back; any other op the placement
    removed leaves the input as it was.
    """
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers = consumers_of(graph)
    rewired = 0
    added: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.name not in kept or node.op_type not in TRT_QUANTIZED_OPS:
            continue
        if not any(c.op_type == "QuantizeLinear" for o in node.output for c in consumers.get(o, [])):
            continue  # without an output Q, ONNX Runtime leaves the node's weights alone
        for index, name in enumerate(node.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is None or q.op_type != "QuantizeLinear":
                continue
            source = q.input[0]
            now = producer[source].op_type if source in producer else None
            was = (producers or {}).get(source, now)
            if was != now and was != "Relu":
                continue  # the placement folded some other op into this Q: keep the quantized input
            if was != now:  # a Relu folded into the Q: the float node gets it back
                relu = f"{source}_relu_for_{node.name}"
                added.append(helper.make_node("Relu", [source], [relu], name=relu))
                source = relu
            node.input[index] = source
            rewired += 1
    graph.node.extend(added)
    if rewired:
        _drop_unread_qdq(graph)
        _sort_in_place(model)
    return rewired


def _sort_in_place(model: onnx.ModelProto) -> None:
    from onnxruntime.quantization.onnx_model import ONNXModel

    ONNXModel(model).topological_sort()  # edits ``model``'s graph itself


def _drop_unread_qdq(graph: onnx.GraphProto) -> None:
    while True:
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in read for o in n.output)]  # fmt: skip
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)


def _with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference when it works; a model with unresolved symbolic shapes is kept as is."""
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception as err:  # inference raises several untyped errors on odd graphs
        logger.info("shape inference failed (%s); quantizing only tensors with known types", err)
        return model


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    """Save, with weights in an external data file beside it when the model passes ~2 GB."""
    if model.ByteSize() > SAVE_EXTERNAL_ABOVE:
        onnx.save_model(model, str(path), save_as_external_data=True, location=f"{path.name}.data")
    else:
        onnx.save_model(model, str(path))
    return path
