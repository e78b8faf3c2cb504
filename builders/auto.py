"""``--precision auto``: the fastest candidate within the accuracy budget, and the whole trade-off.

Search order: INT8 everywhere (one calibration, its threshold method chosen by ``--calib-method
auto``); on transformer graphs (weight MatMul/Gemm layers fed by a LayerNorm-like node, see
``builders.smoothquant.normalized_inputs``) SmoothQuant static INT8 and dynamic INT8, always; on
other MatMul-dominated models dynamic INT8 when the plain INT8 misses the budget; INT8 with the
most sensitive layers kept in float (one more layer each step, until within budget) when nothing
so far is within budget; FP16; FP32. Sensitivity of a layer is the relative error of its own output
under INT8, from one FP32 run (``builders.layer_profile``), not a rebuild per layer.
Every candidate is validated on the evaluation data; the published one is the candidate within
budget with the best speedup over FP32 at the max batch (ties: batch 1), measured in the same
interleaved runs. A CNN costs what it did: the graph check is all it adds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from builders.calib_data import Dataset
from builders.calibrate import Calibration
from builders.dynamic_quant import search_dynamic, weight_layers
from builders.layer_profile import static_error_profile
from builders.prepare import BuildData, PreparedOnnx, measured_slow_nodes, prepare_onnx
from builders.qdq_placement import TRT_QUANTIZED_OPS
from builders.quantize import prepare_model
from builders.request import BuildRequest, Int8Options
from builders.smoothquant_search import search_smoothquant, smoothquant_applies
from builders.validate import (
    Validation,
    choose_fastest,
    latency_batches,
    make_runner,
    measure_latency,
    validate,
    with_speedup,
)
from runtime.runner import Runner

logger = logging.getLogger(__name__)

MAX_EXCLUDED = 8
TABLE_FILE = "tradeoff.md"
PLOT_FILE = "tradeoff.png"


@dataclass(frozen=True)
class Candidate:
    label: str
    prepared: PreparedOnnx
    excluded: tuple[str, ...]
    validation: Validation
    seconds: float = 0.0  # making and validating this candidate (not the shared calibration)

    def row(self) -> dict[str, Any]:
        v = self.validation
        sizes = list(v.latency_ms)
        return {
            "candidate": self.label,
            "precision": self.prepared.precision,
            "method": _method(self.prepared),
            "seconds": round(self.seconds, 2),
            "excluded_layers": list(self.excluded),
            "metric": v.metric,
            "drop": round(v.drop, 6),
            "value": round(_metric_value(v), 6),
            "passed": v.passed,
            "latency_ms_batch1": v.latency_ms[sizes[0]]["candidate"],
            "latency_ms_max_batch": v.latency_ms[sizes[-1]]["candidate"],
            "speedup_max_batch": v.latency_ms[sizes[-1]].get("speedup", 0.0),
            "speedup_batch1": v.latency_ms[sizes[0]].get("speedup", 0.0),
            "bytes": self.prepared.path.stat().st_size,
        }


def _method(prepared: PreparedOnnx) -> str:
    """static | smoothquant | dynamic for INT8 candidates, else the precision."""
    if prepared.precision != "int8":
        return prepared.precision
    return str(prepared.details.get("method") or prepared.details.get("mode") or "static")


def _metric_value(v: Validation) -> float:
    m = v.metrics
    return {
        "accuracy": m.get("accuracy_candidate", 0.0),
        "top1": m["top1_agreement"],
        "cosine": m["cosine"],
        "pooled-cosine": m.get("pooled_cosine", 0.0),
        "mse": m["mse"],
    }[v.metric]


def compute_layers(model: onnx.ModelProto) -> list[str]:
    """Names of the compute nodes (Conv/ConvTranspose/Gemm/MatMul) of the prepared model."""
    return [n.name for n in prepare_model(model).model.graph.node if n.op_type in TRT_QUANTIZED_OPS]


def layer_sensitivity(
    request: BuildRequest, model: onnx.ModelProto, calibration: Calibration, data: Dataset, workdir: Path
) -> dict[str, float]:
    """Relative output error of each compute layer under static INT8, worst first, from one FP32 run
    (``builders.layer_profile``); layers the placement keeps float anyway (measured slower) are left out."""
    slow = measured_slow_nodes(request, model) if request.target == "ort" else {}
    profile = static_error_profile(model, calibration.ranges, data)
    return {k: v for k, v in profile.items() if k not in slow}


def _dynamic_applies(request: BuildRequest, model: onnx.ModelProto) -> bool:
    """Dynamic INT8 is worth a candidate on the ORT target when MatMul/Gemm layers make up most of the model."""
    if request.target != "ort":
        return False
    prepared = prepare_model(model).model
    layers = weight_layers(prepared)
    convs = sum(1 for n in prepared.graph.node if n.op_type in ("Conv", "ConvTranspose"))
    return len(layers) >= 2 and len(layers) >= convs


def search_precision(
    request: BuildRequest,
    model: onnx.ModelProto,
    data: BuildData,
    calibration: Calibration,
    opts: Int8Options,
    batch: int,
    workdir: Path,
    source: onnx.ModelProto | None = None,
) -> tuple[PreparedOnnx, Validation, dict[str, Path], dict[str, Any]]:
    """Run the search; returns the chosen candidate, its validation, files to publish, details.

    ``model`` is what the static placement quantizes (bias-corrected when that calibration won);
    ``source`` the FP32 model as given, which SmoothQuant and dynamic INT8 start from (default: ``model``).
    """
    source = model if source is None else source

    def evaluate(label: str, precision: str, excluded: tuple[str, ...] = ()) -> Candidate:
        start = time.perf_counter()
        prepared = prepare_onnx(
            request, model, precision, workdir, calibration=calibration if precision == "int8" else None,
            exclude_nodes=excluded,
        )  # fmt: skip
        validation = validate(request.model, prepared.path, data.evaluation, opts.gate, batch, latency=False)
        logger.info("auto: %s drop %.5f passed=%s", label, validation.drop, validation.passed)
        return Candidate(label, prepared, excluded, validation, time.perf_counter() - start)

    candidates = [evaluate("int8", "int8")]
    transformer = request.target == "ort" and smoothquant_applies(source)
    if transformer:
        candidates.append(_smoothquant_candidate(request, source, data, opts, workdir))
    if transformer or (not candidates[0].validation.passed and _dynamic_applies(request, source)):
        candidates.append(_dynamic_candidate(request, source, data, opts, workdir))
    sensitivity: dict[str, float] = {}
    if not any(c.validation.passed for c in candidates):
        sensitivity = layer_sensitivity(request, model, calibration, data.evaluation, workdir)
        ranked = list(sensitivity)
        for k in range(1, min(len(ranked) - 1, MAX_EXCLUDED) + 1):
            candidate = evaluate(f"int8 ({k} layer(s) float)", "int8", tuple(ranked[:k]))
            candidates.append(candidate)
            if candidate.validation.passed:
                break
    candidates.append(evaluate("fp16", "fp16"))
    candidates.append(evaluate("fp32", "fp32"))
    candidates = time_together(request, candidates, data.evaluation, opts, batch)
    chosen = candidates[choose_fastest([c.validation for c in candidates])]
    rows = [c.row() for c in candidates]
    table = table_markdown(rows, chosen.label)
    files = {TABLE_FILE: workdir / TABLE_FILE, PLOT_FILE: workdir / PLOT_FILE}
    files[TABLE_FILE].write_text(f"# Precision trade-off for {request.triton_name}\n\n{table}")
    plot_tradeoff(rows, chosen.label, opts.max_drop, files[PLOT_FILE])
    details = {
        "chosen": chosen.label,
        "chosen_method": _method(chosen.prepared),
        "transformer": transformer,
        "excluded_layers": list(chosen.excluded),
        "sensitivity_mse": {k: float(v) for k, v in sensitivity.items()},
        "candidates": rows,
        "table_markdown": table,
        "plot": PLOT_FILE,
    }
    return chosen.prepared, chosen.validation, files, details


def _smoothquant_candidate(request: BuildRequest, source: onnx.ModelProto, data: BuildData, opts: Int8Options,
                           workdir: Path) -> Candidate:  # fmt: skip
    """SmoothQuant static INT8 (one absmax pass, alpha searched), validated on the evaluation data."""
    start = time.perf_counter()
    prepared = search_smoothquant(request.model, source, data.calibration, opts.gate, opts.eval_batch, workdir)
    validation = validate(request.model, prepared.path, data.evaluation, opts.gate, 1, latency=False)
    attention = " + attention" if prepared.details["attention_int8"]["kept"] else ""
    label = f"int8 smoothquant (alpha {prepared.details['alpha']}{attention})"
    logger.info("auto: %s drop %.5f passed=%s", label, validation.drop, validation.passed)
    return Candidate(label, prepared, (), validation, time.perf_counter() - start)


def _dynamic_candidate(request: BuildRequest, source: onnx.ModelProto, data: BuildData, opts: Int8Options,
                       workdir: Path) -> Candidate:  # fmt: skip
    """Dynamic INT8, the worst layers back in float until within budget (``builders.dynamic_quant``)."""
    start = time.perf_counter()
    found = search_dynamic(request.model, source, data.evaluation, opts.gate, workdir)
    dynamic = PreparedOnnx(found.chosen.path, "int8", request.target, None, found.chosen.notes,
                           {**found.chosen.details, "steps": list(found.tried)})  # fmt: skip
    kept = len(found.chosen.float_layers)
    label = "int8 dynamic" + (f" ({kept} layer(s) float)" if kept else "")
    return Candidate(label, dynamic, found.chosen.float_layers, found.validation, time.perf_counter() - start)


TIMING_SECONDS = 4.0  # per candidate and batch size; a large model gets fewer rounds than --repeats ...
MIN_ROUNDS = 8  # ... but never fewer than this


def time_together(
    request: BuildRequest, candidates: list[Candidate], data: Dataset, opts: Int8Options, batch: int
) -> list[Candidate]:
    """Latency of every candidate against the reference, each pair interleaved (serving's threads).

    One candidate session at a time beside the reference: at the max batch every session's arena
    holds a batch of activations, so timing all candidates at once multiplied the build's memory.
    Rounds per batch size: ``opts.repeats``, fewer when one round takes long (about
    ``TIMING_SECONDS`` per pair, at least ``MIN_ROUNDS``): at 32 x 64 tokens a BERT-class pair takes
    ~0.4 s a round, and 30 rounds for each of five candidates were most of an ``auto`` build.
    """
    batches = latency_batches(data, batch)
    reference = make_runner(request.model)
    timed = []
    try:
        for c in candidates:
            runner = make_runner(c.prepared.path)
            pair = {"reference": reference, c.label: runner}
            try:
                timings = {
                    size: measure_latency(pair, {size: inputs}, _rounds(pair, inputs, opts.repeats))[size]
                    for size, inputs in batches.items()
                }
            finally:
                runner.close()
            latency = {size: with_speedup(row["reference"], row[c.label]) for size, row in timings.items()}
            timed.append(replace(c, validation=replace(c.validation, latency_ms=latency)))
    finally:
        reference.close()
    return timed


def _rounds(pair: dict[str, Runner], inputs: dict[str, np.ndarray], repeats: int) -> int:
    """Rounds that fit ``TIMING_SECONDS`` (one warm-up and one timed round first), within [MIN_ROUNDS, repeats]."""
    for runner in pair.values():
        runner.run(inputs)
    start = time.perf_counter_ns()
    for runner in pair.values():
        runner.run(inputs)
    seconds = (time.perf_counter_ns() - start) / 1e9
    return max(min(MIN_ROUNDS, repeats), min(repeats, int(TIMING_SECONDS / max(seconds, 1e-9))))


def table_markdown(rows: list[dict[str, Any]], chosen: str) -> str:
    """The trade-off table (precision, excluded layers, metric, latency, size)."""
    lines = [
        "| candidate | excluded layers | metric | drop | within budget | ms @1 | ms @max | speedup @max | bytes "
        "| build s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = " **(published)**" if r["candidate"] == chosen else ""
        excluded = ", ".join(r["excluded_layers"]) or "-"
        lines.append(
            f"| {r['candidate']}{mark} | {excluded} | {r['metric']} {r['value']:.4f} | {r['drop']:.4f} | "
            f"{'yes' if r['passed'] else 'no'} | {r['latency_ms_batch1']:.4f} | {r['latency_ms_max_batch']:.4f} | "
            f"{r['speedup_max_batch']:.2f}x | {r['bytes']} | {r.get('seconds', 0.0):.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot_tradeoff(rows: list[dict[str, Any]], chosen: str, max_drop: float, dest: Path) -> Path:
    """PNG of metric vs max-batch latency, one labelled point per candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    try:
        xs = np.array([r["latency_ms_max_batch"] for r in rows])
        ys = np.array([r["value"] for r in rows])
        colors = ["tab:green" if r["passed"] else "tab:red" for r in rows]
        ax.scatter(xs, ys, c=colors, s=[120 if r["candidate"] == chosen else 50 for r in rows])
        for i, (r, x, y) in enumerate(zip(rows, xs, ys, strict=True)):
            offset = (5, 6) if i % 2 == 0 else (5, -12)  # alternate so neighbours do not overlap
            ax.annotate(r["candidate"], (x, y), textcoords="offset points", xytext=offset, fontsize=8)
        ax.set_xlabel("latency at max batch (ms, median)")
        ax.set_ylabel(rows[0]["metric"] if rows else "metric")
        ax.set_title(f"accuracy vs latency (budget: drop <= {max_drop:g}; green = within)")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(dest)
    finally:
        plt.close(fig)
    return dest
