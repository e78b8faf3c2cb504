"""``--int8-mode dynamic`` for the ONNX Runtime target: int8 weights, activations quantized at run time.

Weights of every MatMul/Gemm with a constant weight are quantized per output channel (symmetric
int8), embedding tables read by Gather are stored in int8 too; the MatMul input activations are
quantized per run by ONNX Runtime (DynamicQuantizeLinear, uint8 over the tensor's actual range),
so no calibration data is needed. This is the usual recipe
for transformer encoders on CPUs, whose activations have a few large outlier channels that a fixed
calibrated range handles badly. onnxruntime's ``quantize_dynamic`` writes the graph.

``error_profile`` ranks those layers by how much dynamic quantization changes their own output on
real inputs (relative squared error of ``Q(x) @ Q(W)`` against ``x @ W``), from one run of the FP32
model: the build keeps the worst layers in float, one more at a time, until the gate passes.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from builders.calib_data import Dataset
from builders.quantize import prepare_model, save_model
from builders.validate import GateSettings, Validation, validate
from core.errors import InvalidInputError

logger = logging.getLogger(__name__)

DYNAMIC_OPS = ("MatMul", "Gemm")
PROFILE_SAMPLES = 16
MAX_FLOAT_LAYERS = 8


@dataclass(frozen=True)
class DynamicQuantized:
    path: Path
    quantized: tuple[str, ...]
    float_layers: tuple[str, ...]
    notes: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)


def weight_layers(model: onnx.ModelProto) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (input activation, weight as [in, out]) for every MatMul/Gemm with a constant 2-D weight."""
    inits = {i.name: i for i in model.graph.initializer}
    layers: dict[str, tuple[str, np.ndarray]] = {}
    for node in model.graph.node:
        if node.op_type not in DYNAMIC_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if weight.ndim != 2 or node.input[0] in inits:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and attrs.get("transA", 0):
            continue
        if node.op_type == "Gemm" and attrs.get("transB", 0):
            weight = weight.T
        layers[node.name] = (node.input[0], weight.astype(np.float32))
    return layers


def embedding_tables(model: onnx.ModelProto) -> list[str]:
    """Gather nodes reading a constant 2-D table (embeddings): stored int8, rows dequantized as gathered."""
    inits = {i.name: i for i in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2]  # fmt: skip


def quantize_dynamic_model(model: onnx.ModelProto, dest: Path, exclude_nodes: Sequence[str] = ()) -> DynamicQuantized:
    """Dynamic INT8 of ``model`` (prepared: named nodes, opset >= 13) written to ``dest``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    prepared = prepare_model(model)
    layers = weight_layers(prepared.model)
    if not layers:
        raise InvalidInputError(
            "--int8-mode dynamic quantizes MatMul/Gemm layers with constant weights, and this model has none; "
            "use --int8-mode static (the default) with --calib for convolutional models"
        )
    excluded = tuple(n for n in exclude_nodes if n in layers)
    chosen = [n for n in layers if n not in excluded]
    tables = embedding_tables(prepared.model)
    with tempfile.TemporaryDirectory(prefix="kiln-dynamic-") as tmp:
        source = save_model(prepared.model, Path(tmp) / "prepared.onnx")
        try:
            quantize_dynamic(
                str(source), str(dest), per_channel=prepared.per_channel, weight_type=QuantType.QInt8,
                op_types_to_quantize=[*DYNAMIC_OPS, "Gather"], nodes_to_quantize=[*chosen, *tables],
            )  # fmt: skip
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            raise InvalidInputError(f"ONNX Runtime dynamic quantization failed: {err}; try --int8-mode static") from err
    details = {
        "mode": "dynamic",
        "scheme": "int8 weights per output channel (symmetric), uint8 activations quantized per run",
        "quantized_layers": len(chosen),
        "quantized_embeddings": len(tables),
        "float_layers": list(excluded),
    }
    return DynamicQuantized(dest, tuple(chosen), excluded, prepared.notes, details)


def error_profile(model: onnx.ModelProto, dataset: Dataset, samples: int = PROFILE_SAMPLES) -> dict[str, float]:
    """Relative squared output error of each weight layer under dynamic INT8, worst first (one FP32 run)."""
    import onnxruntime as ort

    prepared = prepare_model(model).model
    layers = weight_layers(prepared)
    inputs = sorted({x for x, _ in layers.values()})
    augmented = onnx.ModelProto()
    augmented.CopyFrom(prepared)
    existing = {o.name for o in augmented.graph.output} | {i.name for i in augmented.graph.input}
    augmented.graph.output.extend(onnx.ValueInfoProto(name=n) for n in inputs if n not in existing)
    with tempfile.TemporaryDirectory(prefix="kiln-profile-") as tmp:
        path = save_model(augmented, Path(tmp) / "profile.onnx")
        del augmented
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = dataset.first_batch(min(samples, len(dataset.groups[0]))) if dataset.groups else {}
        values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
        values.update(feed)
        del session
    scores = {name: _dynamic_error(np.asarray(values[x], np.float32), w) for name, (x, w) in layers.items()}
    return dict(sorted(scores.items(), key=lambda kv: -kv[1]))


def _dynamic_error(x: np.ndarray, weight: np.ndarray) -> float:
    """||Q(x) Q(W) - x W||^2 / ||x W||^2 with ORT's dynamic uint8 x and per-column int8 W."""
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    lo, hi = min(0.0, float(flat.min())), max(0.0, float(flat.max()))
    scale = (hi - lo) / 255.0 or 1.0
    zero = np.round(-lo / scale)
    xq = (np.clip(np.round(flat / scale) + zero, 0, 255) - zero) * scale
    w = weight.astype(np.float64)
    wscale = np.abs(w).max(axis=0) / 127.0
    wscale[wscale == 0] = 1.0
    wq = np.clip(np.round(w / wscale), -127, 127) * wscale
    exact = flat @ w
    denom = float(np.square(exact).sum())
    return float(np.square(xq @ wq - exact).sum()) / denom if denom > 0 else 0.0


@dataclass(frozen=True)
class DynamicSearch:
    """The dynamic INT8 candidate chosen, its validation (no latency yet) and every step tried."""

    chosen: DynamicQuantized
    validation: Validation
    tried: tuple[dict[str, Any], ...]


def search_dynamic(
    reference: Path, model: onnx.ModelProto, evaluation: Dataset, gate: GateSettings, workdir: Path
) -> DynamicSearch:
    """All weight layers dynamic INT8; while over the gate, keep the next worst layer (error profile) float.

    At most ``MAX_FLOAT_LAYERS`` layers go back to float; the last candidate is returned either way
    and the caller applies the gate.
    """
    tried: list[dict[str, Any]] = []
    ranked: list[str] | None = None
    excluded: list[str] = []
    while True:
        dest = workdir / f"dynamic-{len(excluded)}.onnx"
        candidate = quantize_dynamic_model(model, dest, excluded)
        validation = validate(reference, candidate.path, evaluation, gate, 1, latency=False)
        tried.append({"float_layers": list(excluded), "metric": validation.metric, "drop": validation.drop,
                      "passed": validation.passed})  # fmt: skip
        logger.info("dynamic int8 with %d float layer(s): %s drop %.5f", len(excluded), validation.metric,
                    validation.drop)  # fmt: skip
        if validation.passed or len(excluded) >= MAX_FLOAT_LAYERS:
            return DynamicSearch(candidate, validation, tuple(tried))
        if ranked is None:
            ranked = list(error_profile(model, evaluation))
        remaining = [n for n in ranked if n not in excluded]
        if len(remaining) <= 1:
            return DynamicSearch(candidate, validation, tuple(tried))
        excluded.append(remaining[0])
        dest.unlink()
