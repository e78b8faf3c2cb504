"""Which op patterns run faster in INT8 than in FP32 on this CPU, measured once per ISA and cached.

ONNX Runtime's integer kernels are not faster everywhere: on many x86 CPUs a depthwise
convolution, or a small layer whose Q/DQ overhead outweighs its arithmetic, runs slower in INT8.
``measure_patterns`` times each pattern (a one-node model at a representative size) in FP32 and in
Kiln's ORT placement, interleaved, and ``load_or_measure`` caches the ratios per (CPU ISA,
onnxruntime version, integer format). ``slow_nodes`` names the nodes of a model whose pattern is
slower in INT8; the ORT placement leaves them in float unless the user insists (``--allow-slower``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from builders.quantize import TensorRange, quantize_model, save_model
from builders.validate import make_runner, measure_latency
from core.atomic_file import write_atomic

logger = logging.getLogger(__name__)

# pattern -> (op, input shape, weight shape, conv group)
PATTERNS: dict[str, tuple[str, tuple[int, ...], tuple[int, ...], int]] = {
    "conv-dense": ("Conv", (1, 64, 28, 28), (64, 64, 3, 3), 1),
    "conv-pointwise": ("Conv", (1, 128, 28, 28), (128, 128, 1, 1), 1),
    "conv-depthwise": ("Conv", (1, 128, 28, 28), (128, 1, 3, 3), 128),
    "matmul": ("MatMul", (8, 64, 384), (384, 384), 1),
}
SLOWER_ABOVE = 1.0  # int8 / fp32 latency ratio above which a pattern stays float


def pattern_of(node: onnx.NodeProto, weights: dict[str, onnx.TensorProto]) -> str | None:
    """The measured pattern a node belongs to, or None (not a compute op with constant weights)."""
    if node.op_type in ("MatMul", "Gemm"):
        return "matmul" if len(node.input) > 1 and node.input[1] in weights else None
    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in weights:
        return None
    dims = list(weights[node.input[1]].dims)
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    if group > 1 and len(dims) >= 2 and dims[1] == 1:
        return "conv-depthwise"
    if all(d == 1 for d in dims[2:]):
        return "conv-pointwise"
    return "conv-dense"


def slow_nodes(model: onnx.ModelProto, ratios: dict[str, float]) -> dict[str, str]:
    """node name -> reason, for every compute node whose pattern measured slower in INT8."""
    weights = _weights(model)
    slow: dict[str, str] = {}
    for index, node in enumerate(model.graph.node):
        pattern = pattern_of(node, weights)
        if pattern is not None and ratios.get(pattern, 0.0) > SLOWER_ABOVE:
            name = node.name or f"{node.op_type}_{index}"
            slow[name] = f"{pattern} is {ratios[pattern]:.2f}x slower in INT8 than FP32 on this CPU (measured)"
    return slow


def compute_nodes(model: onnx.ModelProto) -> list[str]:
    weights = _weights(model)
    return [n.name or f"{n.op_type}_{i}" for i, n in enumerate(model.graph.node) if pattern_of(n, weights) is not None]


def depthwise_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the depthwise convolutions (one input channel per group, constant weights)."""
    weights = _weights(model)
    return [n.name or f"{n.op_type}_{i}" for i, n in enumerate(model.graph.node)
            if pattern_of(n, weights) == "conv-depthwise"]  # fmt: skip


def _weights(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    found = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            found[node.output[0]] = node.attribute[0].t
    return found


def cache_key(flags: Iterable[str], ort_version: str, fmt: str) -> str:
    relevant = sorted(set(flags) & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "sse4_1"})
    text = json.dumps({"isa": relevant, "ort": ort_version, "format": fmt}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_or_measure(cache_dir: Path, flags: Iterable[str], fmt_name: str) -> dict[str, float]:
    """The cached ratios for this ISA / onnxruntime / format, measuring (a few seconds) when absent."""
    import onnxruntime as ort

    path = cache_dir / f"op-speed-{cache_key(flags, ort.__version__, fmt_name)}.json"
    try:
        raw = json.loads(path.read_text())
        if set(raw.get("ratios", {})) == set(PATTERNS):
            return {k: float(v) for k, v in raw["ratios"].items()}
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    ratios = measure_patterns()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"ratios": ratios, "onnxruntime": ort.__version__, "format": fmt_name, "isa": sorted(flags)}
        write_atomic(path, json.dumps(payload, indent=1, sort_keys=True).encode())
    except OSError as err:
        logger.warning("cannot cache INT8 op timings in %s (%s); they will be measured again", path, err.strerror)
    return ratios


def measure_patterns(seconds: float = 0.25) -> dict[str, float]:
    """int8 / fp32 median latency per pattern on this CPU (interleaved runs)."""
    ratios: dict[str, float] = {}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="kiln-op-speed-") as tmp:
        for name, (op, x_shape, w_shape, group) in PATTERNS.items():
            model = _one_node(op, x_shape, w_shape, group, rng)
            x = rng.standard_normal(x_shape).astype(np.float32)
            fp32 = save_model(model, Path(tmp) / f"{name}-fp32.onnx")
            runners = {"fp32": make_runner(fp32)}
            try:
                y = runners["fp32"].run({"x": x})["y"]
                quantized = quantize_model(model, {"x": _range(x), "y": _range(y)}, "ort").model
                runners["int8"] = make_runner(save_model(quantized, Path(tmp) / f"{name}-int8.onnx"))
                timings = measure_latency(runners, {"1": {"x": x}}, repeats=20, min_seconds=seconds)["1"]
            finally:
                for runner in runners.values():
                    runner.close()
            ratios[name] = round(timings["int8"] / timings["fp32"], 3)
    logger.info("INT8/FP32 latency per op pattern on this CPU: %s", ratios)
    return ratios


def _range(a: np.ndarray) -> TensorRange:
    return TensorRange(float(np.abs(a).max()), float(a.min()), float(a.max()))


def _one_node(op: str, x_shape: tuple[int, ...], w_shape: tuple[int, ...], group: int,
              rng: np.random.Generator) -> onnx.ModelProto:  # fmt: skip
    weight = numpy_helper.from_array((rng.standard_normal(w_shape) * 0.1).astype(np.float32), "w")
    if op == "Conv":
        pad = [w_shape[2] // 2] * 4
        node = helper.make_node("Conv", ["x", "w"], ["y"], name="op", group=group, pads=pad)
        out_shape: list[int] = [x_shape[0], w_shape[0], x_shape[2], x_shape[3]]
    else:
        node = helper.make_node("MatMul", ["x", "w"], ["y"], name="op")
        out_shape = [*x_shape[:-1], w_shape[1]]
    graph = helper.make_graph(
        [node], "pattern", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], [weight],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
