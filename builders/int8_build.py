"""INT8 and automatic-precision builds for ONNX Runtime: calibrate, quantize, validate, gate, publish.

The data, calibration and Q/DQ steps are the shared preparation in ``builders.prepare``, which the
TensorRT builder (``builders.tensorrt_build``) uses too; the artifact here is the Q/DQ ONNX itself.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx

from builders.auto import search_precision
from builders.bias_correction import apply as apply_bias_correction
from builders.bias_correction import bias_corrections
from builders.calibrate import Calibration
from builders.dynamic_quant import search_dynamic
from builders.equalization import equalize
from builders.inspection import ModelInfo
from builders.memory_budget import validation_batch
from builders.model_config import ARTIFACTS
from builders.op_speed import SLOWER_ABOVE, compute_nodes, depthwise_nodes, slow_nodes
from builders.prepare import (
    BuildData,
    PreparedOnnx,
    cache_root,
    kept_float_nodes,
    load_build_data,
    op_speed_ratios,
    prepare_onnx,
    run_calibrations,
)
from builders.publish import publish_artifact
from builders.quantize import prepare_model
from builders.repository import Published
from builders.request import BuildRequest, BuildResult, Int8Options
from builders.smoothquant_search import search_smoothquant
from builders.validate import SPEED_TIE, Validation, check_gate, report_markdown, validate
from core.errors import AccuracyGateError, InvalidInputError

logger = logging.getLogger(__name__)

REPORT_FILE = "report.md"


def build_quantized(
    request: BuildRequest,
    model: onnx.ModelProto,
    info: ModelInfo,
    batch: int,
    *,
    warnings: Sequence[str] = (),
) -> BuildResult:
    """``--precision int8`` (or ``auto``): calibrate, quantize, validate, gate, publish."""
    opts = request.int8
    if request.target != "ort":
        raise InvalidInputError(
            f"build_quantized makes ONNX Runtime artifacts; --target {request.target} has its own builder"
        )
    kept_float_nodes(model, opts.keep_float)  # an unknown --keep-float name is refused before any work
    data = load_build_data(request, info, opts)
    notes = [*warnings, *data.warnings]
    if opts.mode == "dynamic":
        return _build_dynamic(request, model, info, batch, data, notes)
    if opts.smoothquant:
        return _build_smoothquant(request, model, info, batch, data, notes)
    if request.precision == "int8":
        _refuse_if_every_op_is_slower(request, model)
    calib_info = info
    if opts.equalize:
        model, pairs = equalize(model)
        notes.append(f"cross-layer equalization rescaled {pairs} conv pair(s) (FP32 function unchanged)")
        calib_info = replace(info, sha256=hashlib.sha256(f"{info.sha256}-equalized".encode()).hexdigest())
    with tempfile.TemporaryDirectory(prefix="kiln-int8-") as tmp:
        workdir = Path(tmp)
        calibrations = run_calibrations(request, model, calib_info, opts, data.calibration)
        first = next(iter(calibrations.values()))
        opts = replace(opts, eval_batch=validation_batch(first.bytes_per_sample, opts.calib_memory))
        source = model  # SmoothQuant and dynamic INT8 start from the FP32 model, never the bias-corrected one
        calibration, model, choice, float_depthwise = choose_calibration(
            request, model, calibrations, data, opts, workdir
        )
        notes += [f"tensor {n!r} stays in float: {r}" for n, r in calibration.skipped.items()]
        if request.precision == "auto":
            chosen, validation, extra_files, details = search_precision(
                request, model, data, calibration, opts, batch, workdir, source
            )
        else:
            chosen = prepare_onnx(request, model, "int8", workdir, calibration=calibration,
                                  exclude_nodes=float_depthwise)  # fmt: skip
            if float_depthwise:
                notes.append(f"{len(float_depthwise)} depthwise convolution(s) kept in float: measured closer "
                             "to FP32 than in int8 (build.quantization.calibration_choice in kiln.json)")  # fmt: skip
            validation = validate(request.model, chosen.path, data.evaluation, opts.gate, batch)
            extra_files, details = {}, {}
        if choice:
            chosen = replace(chosen, details={**chosen.details, "calibration_choice": choice})
        notes += list(chosen.notes)
        report = workdir / REPORT_FILE
        report.write_text(_report(request, chosen, validation, data, details))
        gate = _gate_record(validation, opts)
        if not validation.passed and not opts.skip_gate:
            check_gate(validation, request.precision, opts.calib_method, _keep_rejected_report(request, opts, report))
        if request.precision == "int8":
            check_speed(validation, opts, _keep_rejected_report(request, opts, report))
        if not validation.passed:
            notes.append(f"accuracy gate FAILED and was overridden: {gate['message']}")
        artifact = _artifact(chosen, workdir)
        files = {REPORT_FILE: report, **extra_files}
        if chosen.calibration is not None:
            files.update(chosen.calibration.files)
        published = _publish(request, info, artifact, batch, chosen, validation, gate, files, data, details)
    return BuildResult(published, info, tuple(notes), {"validation": validation.to_dict(), **details})


def _build_dynamic(request: BuildRequest, model: onnx.ModelProto, info: ModelInfo, batch: int, data: BuildData,
                   notes: list[str]) -> BuildResult:  # fmt: skip
    """``--int8-mode dynamic``: no calibration; the weight layers whose error is worst go back to float
    one at a time until the gate passes (at most ``MAX_FLOAT_LAYERS``)."""
    opts = request.int8
    with tempfile.TemporaryDirectory(prefix="kiln-int8-dynamic-") as tmp:
        workdir = Path(tmp)
        found = search_dynamic(request.model, model, data.evaluation, opts.gate, workdir)
        validation = validate(request.model, found.chosen.path, data.evaluation, opts.gate, batch)
        details = {**found.chosen.details, "steps": list(found.tried)}
        chosen = PreparedOnnx(found.chosen.path, "int8", request.target, None, found.chosen.notes, details)
        notes += list(chosen.notes)
        if found.chosen.float_layers:
            notes.append(f"kept {len(found.chosen.float_layers)} layer(s) in float to meet the gate: "
                         f"{', '.join(found.chosen.float_layers)}")  # fmt: skip
        published = _gate_and_publish(request, info, batch, chosen, validation, data, notes, workdir, "dynamic")
    return BuildResult(published, info, tuple(notes), {"validation": validation.to_dict(), "dynamic": details})


def _build_smoothquant(request: BuildRequest, model: onnx.ModelProto, info: ModelInfo, batch: int, data: BuildData,
                       notes: list[str]) -> BuildResult:  # fmt: skip
    """``--smoothquant``: one absmax pass over the calibration data, alpha searched on a slice of it
    (``builders.smoothquant_search``); the best candidate is gated on the evaluation data."""
    opts = request.int8
    with tempfile.TemporaryDirectory(prefix="kiln-int8-smoothquant-") as tmp:
        workdir = Path(tmp)
        chosen = search_smoothquant(request.model, model, data.calibration, opts.gate, opts.calib_batch, workdir)
        details = chosen.details
        validation = validate(request.model, chosen.path, data.evaluation, opts.gate, batch)
        notes += list(chosen.notes)
        published = _gate_and_publish(request, info, batch, chosen, validation, data, notes, workdir, "static")
    return BuildResult(published, info, tuple(notes), {"validation": validation.to_dict(), "smoothquant": details})


def _gate_and_publish(request: BuildRequest, info: ModelInfo, batch: int, chosen: PreparedOnnx,
                      validation: Validation, data: BuildData, notes: list[str], workdir: Path,
                      mode: str) -> Published:  # fmt: skip
    """The end of a one-candidate build (dynamic, SmoothQuant): report, accuracy gate (refused, or the
    override noted), speed check, publish."""
    opts = request.int8
    report = workdir / REPORT_FILE
    report.write_text(_report(request, chosen, validation, data, {}))
    gate = _gate_record(validation, opts)
    if not validation.passed and not opts.skip_gate:
        check_gate(validation, request.precision, None, _keep_rejected_report(request, opts, report), mode)
    check_speed(validation, opts, _keep_rejected_report(request, opts, report))
    if not validation.passed:
        notes.append(f"accuracy gate FAILED and was overridden: {gate['message']}")
    artifact = _artifact(chosen, workdir)
    return _publish(request, info, artifact, batch, chosen, validation, gate, {REPORT_FILE: report}, data, {})


def _keep_rejected_report(request: BuildRequest, opts: Int8Options, report: Path) -> Path:
    """Copy a refused candidate's report outside the repository (nothing is published)."""
    dest = cache_root(request, opts).parent / "reports" / f"{request.triton_name}-rejected.md"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(report.read_text())
    return dest


def _artifact(chosen: PreparedOnnx, workdir: Path) -> Path:
    final = workdir / "artifact" / ARTIFACTS["ort"]
    final.parent.mkdir()
    chosen.path.replace(final)
    return final


def _gate_record(validation: Validation, opts: Int8Options) -> dict[str, Any]:
    record: dict[str, Any] = {
        "metric": validation.metric,
        "max_drop": validation.max_drop,
        "drop": validation.drop,
        "passed": validation.passed,
        "overridden": bool(opts.skip_gate and not validation.passed),
    }
    if not validation.passed:
        record["message"] = (
            f"{validation.metric} drop {validation.drop:.4f} exceeds the {validation.max_drop:.4f} budget "
            f"by {validation.drop - validation.max_drop:.4f}"
        )
    return record


def _publish(request: BuildRequest, info: ModelInfo, artifact: Path, batch: int, chosen: PreparedOnnx,
             validation: Validation, gate: dict[str, Any], files: dict[str, Path], data: BuildData,
             details: dict[str, Any]) -> Published:  # fmt: skip
    calibration = chosen.calibration.manifest() if chosen.calibration is not None else None
    build_extra = {
        "selected_precision": chosen.precision,
        "placement": request.target,
        "quantization": chosen.details,
        "prepare_notes": list(chosen.notes),
        **({"auto": details} if details else {}),
    }
    validation_dict = {**validation.to_dict(), "gate": gate, "eval_source": data.eval_source, "report": REPORT_FILE}
    return publish_artifact(
        request, info, artifact, batch,
        build_extra=build_extra, calibration=calibration, validation=validation_dict, extra_files=files,
    )  # fmt: skip


SLOWER_THAN_FP32 = 0.95  # a speedup below this at every measured batch size is "slower than FP32"


def check_speed(validation: Validation, opts: Int8Options, report: Path | None = None) -> None:
    """The speed half of the gate: an INT8 candidate slower than FP32 at every batch size is not
    published unless the user insists (``--allow-slower``)."""
    rows = validation.latency_ms
    if opts.allow_slower or not rows or any(r.get("speedup", 0.0) >= SLOWER_THAN_FP32 for r in rows.values()):
        return
    measured = ", ".join(f"batch {b}: {r['speedup']:.2f}x" for b, r in rows.items())
    raise AccuracyGateError(
        f"speed gate: this INT8 candidate is slower than FP32 on this CPU ({measured} FP32's speed, interleaved "
        f"medians); nothing was published. Use --precision fp32 (or --precision auto, which publishes the fastest "
        f"candidate within budget), or --allow-slower to publish it anyway"
        + (f". Report: {report}" if report is not None else "")
    )


def _refuse_if_every_op_is_slower(request: BuildRequest, model: onnx.ModelProto) -> None:
    """Refuse before any calibration when every quantizable op of the model is slower in INT8 here."""
    if request.int8.allow_slower:
        return
    prepared = prepare_model(model).model
    compute = compute_nodes(prepared)
    ratios = op_speed_ratios(request)
    slow = slow_nodes(prepared, ratios)
    if compute and all(n in slow for n in compute):
        measured = ", ".join(f"{p} {r:.2f}x" for p, r in sorted(ratios.items()) if r > SLOWER_ABOVE)
        raise AccuracyGateError(
            f"speed gate: every quantizable op of this model ({len(compute)} ops) runs slower in INT8 than in FP32 "
            f"on this CPU (INT8/FP32 latency measured here: {measured}); nothing was published. "
            "Use --precision fp32, or --allow-slower to build INT8 anyway"
        )


def choose_calibration(
    request: BuildRequest,
    model: onnx.ModelProto,
    calibrations: dict[str, Calibration],
    data: BuildData,
    opts: Int8Options,
    workdir: Path,
) -> tuple[Calibration, onnx.ModelProto, list[dict[str, Any]], tuple[str, ...]]:
    """The calibration, FP32 model to quantize and depthwise placement whose INT8 is closest to FP32.

    Each calibration (``--calib-method auto``: several) is quantized and validated without latency
    (gate metric, then MSE); the best one once more with bias correction (``builders.bias_correction``,
    measured on the calibration data), kept only if it is closer still. The rows say what each
    variant scored. With one calibration and no choice to make, nothing is validated.

    Depthwise convolutions (plain ``--precision int8`` only; ``auto`` chooses float layers itself):
    every calibration is also tried with them kept in float. A depthwise convolution mixes no
    channels, so one per-tensor activation scale serves channels whose ranges differ by orders of
    magnitude (BatchNorm folded into each), and its quantized output, which ONNX Runtime's integer
    kernel needs, carries that error into every later layer. Whether that matters is measured on the
    model, never assumed; models without depthwise convolutions cost nothing here. Returns the
    depthwise nodes to keep in float (empty: none).
    """
    depthwise = tuple(depthwise_nodes(prepare_model(model).model)) if request.precision == "int8" else ()
    placements: dict[str, tuple[str, ...]] = {"": ()}
    if depthwise:
        placements[", depthwise float"] = depthwise
    if len(calibrations) == 1 and len(placements) == 1:
        return next(iter(calibrations.values())), model, [], ()
    rows: list[dict[str, Any]] = []

    def score(label: str, candidate: onnx.ModelProto, calibration: Calibration, excluded: tuple[str, ...],
              method: str) -> dict[str, Any]:  # fmt: skip
        prepared = prepare_onnx(request, candidate, "int8", workdir, calibration=calibration, exclude_nodes=excluded)
        check = validate(request.model, prepared.path, data.evaluation, opts.gate, 1, latency=False)
        prepared.path.unlink()
        row = {"method": label, "metric": check.metric, "drop": check.drop, "mse": check.metrics["mse"],
               "passed": check.passed, "float_depthwise": len(excluded), "_method": method}  # fmt: skip
        logger.info("calibration %s: %s drop %.5f, mse %.3g", label, check.metric, check.drop, check.metrics["mse"])
        rows.append(row)
        return row

    for method, calibration in calibrations.items():
        for suffix, excluded in placements.items():
            score(method + suffix, model, calibration, excluded, method)
    best = min(rows, key=lambda r: (r["drop"], r["mse"]))
    calibration = calibrations[best["_method"]]
    excluded = depthwise if best["float_depthwise"] else ()
    corrected = apply_bias_correction(model, bias_corrections(model, calibration.ranges, data.calibration))
    suffix = ", depthwise float" if excluded else ""
    fixed = score(f"{best['_method']} + bias correction{suffix}", corrected, calibration, excluded, best["_method"])
    for row in rows:
        del row["_method"]
    if (fixed["drop"], fixed["mse"]) < (best["drop"], best["mse"]):
        fixed["chosen"] = True
        return calibration, corrected, rows, excluded
    best["chosen"] = True
    return calibration, model, rows, excluded


def summarize_by_reason(reasons: dict[str, str], shown: int = 3) -> str:
    """``12 tensor(s): 9 no calibrated range (a, b, c, ...); 3 ...`` -- the full list is in kiln.json."""
    groups: dict[str, list[str]] = {}
    for name, reason in sorted(reasons.items()):
        groups.setdefault(reason, []).append(name)
    parts = [
        f"{len(names)} {reason} ({', '.join(names[:shown])}{', ...' if len(names) > shown else ''})"
        for reason, names in sorted(groups.items(), key=lambda kv: -len(kv[1]))
    ]
    return f"{len(reasons)} tensor(s): " + "; ".join(parts) + " -- full list in kiln.json (build.quantization)"


def _report(request: BuildRequest, chosen: PreparedOnnx, validation: Validation, data: BuildData,
            details: dict[str, Any]) -> str:  # fmt: skip
    cal = chosen.calibration
    facts: dict[str, Any] = {
        "model": f"{request.model} -> {request.triton_name}",
        "selected precision": chosen.precision,
        "evaluation data": data.eval_source,
    }
    if details.get("chosen"):
        passed = sum(1 for r in details["candidates"] if r["passed"])
        facts["auto chose"] = (
            f"{details['chosen']} ({details['chosen_method']}): the fastest of {passed} candidate(s) within budget, "
            f"of {len(details['candidates'])} tried; speedups within {SPEED_TIE:.0%} of the fastest count as a tie, "
            "won by the later, safer candidate (table below)"
        )
    choice = chosen.details.get("calibration_choice", [])
    if choice:
        facts["calibration method (auto)"] = ", ".join(
            f"{r['method']} {r['metric']} drop {r['drop']:.4f}{' (chosen)' if r.get('chosen') else ''}" for r in choice
        )
    if cal is not None:
        facts["calibration"] = (
            f"{cal.method}, {cal.samples} samples, {len(cal.ranges)} tensors, "
            f"{'reused' if cal.reused else 'computed'}, batches of {cal.batch_size or '?'} under --calib-memory"
        )
    reasons = chosen.details.get("float_reasons", {})
    if reasons:
        facts["float tensors"] = summarize_by_reason(reasons)
    if chosen.details.get("mode") == "dynamic":
        kept = chosen.details.get("float_layers", [])
        facts["INT8 mode"] = (
            f"dynamic ({chosen.details['scheme']}); {chosen.details['quantized_layers']} layer(s) quantized, "
            f"{len(kept)} kept in float{': ' + ', '.join(kept) if kept else ''}"
        )
    if chosen.details.get("method") == "smoothquant":
        facts["INT8 mode"] = (
            f"static, SmoothQuant alpha {chosen.details['alpha']} ("
            + ", ".join(f"{r['alpha']}: {r['metric']} drop {r['drop']:.4f}" for r in chosen.details["alpha_search"])
            + f" on calibration data); {chosen.details['quantized_activations']} MatMul/Gemm input(s) quantized; "
            + (
                "attention score/context MatMuls in int8 (within budget)"
                if chosen.details["attention_int8"]["kept"]
                else "attention score/context MatMuls kept float"
            )
        )
    if "format" in chosen.details:
        facts["ORT integer format"] = f"{chosen.details['format']} ({chosen.details['format_reason']})"
    if request.target == "tensorrt":
        facts["note"] = "validated with ONNX Runtime on the Q/DQ ONNX; TensorRT's kernels can differ slightly"
    tried = None if chosen.details.get("mode") == "dynamic" else request.int8.calib_method
    text = report_markdown(f"Kiln validation: {request.triton_name}", validation, facts, calib_method=tried,
                           mode=request.int8.mode)  # fmt: skip
    if details.get("table_markdown"):
        text += "\n## Precision trade-off (--precision auto)\n\n" + details["table_markdown"]
        text += f"\n![accuracy vs latency]({details.get('plot', 'tradeoff.png')})\n"
    return text
