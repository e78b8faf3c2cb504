"""INT8 and automatic-precision builds for ONNX Runtime: calibrate, quantize, validate, gate, publish.

The data, calibration and Q/DQ steps are the shared preparation in ``builders.prepare``, which the
TensorRT builder (``builders.tensorrt_build``) uses too; the artifact here is the Q/DQ ONNX itself.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx

from builders.auto import search_precision
from builders.inspection import ModelInfo
from builders.memory_budget import validation_batch
from builders.model_config import ARTIFACTS
from builders.prepare import BuildData, PreparedOnnx, cache_root, load_build_data, prepare_onnx, run_calibration
from builders.publish import publish_artifact
from builders.repository import Published
from builders.request import BuildRequest, BuildResult, Int8Options
from builders.validate import Validation, check_gate, report_markdown, validate
from core.errors import InvalidInputError

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
    data = load_build_data(request, info, opts)
    notes = [*warnings, *data.warnings]
    with tempfile.TemporaryDirectory(prefix="kiln-int8-") as tmp:
        workdir = Path(tmp)
        calibration = run_calibration(request, model, info, opts, data.calibration)
        opts = replace(opts, eval_batch=validation_batch(calibration.bytes_per_sample, opts.calib_memory))
        notes += [f"tensor {n!r} stays in float: {r}" for n, r in calibration.skipped.items()]
        if request.precision == "auto":
            chosen, validation, extra_files, details = search_precision(
                request, model, data, calibration, opts, batch, workdir
            )
        else:
            chosen = prepare_onnx(request, model, "int8", workdir, calibration=calibration)
            validation = validate(request.model, chosen.path, data.evaluation, opts.gate, batch)
            extra_files, details = {}, {}
        notes += list(chosen.notes)
        report = workdir / REPORT_FILE
        report.write_text(_report(request, chosen, validation, data, details))
        gate = _gate_record(validation, opts)
        if not validation.passed and not opts.skip_gate:
            check_gate(validation, request.precision, opts.calib_method, _keep_rejected_report(request, opts, report))
        if not validation.passed:
            notes.append(f"accuracy gate FAILED and was overridden: {gate['message']}")
        artifact = _artifact(chosen, workdir)
        files = {REPORT_FILE: report, **extra_files}
        if chosen.calibration is not None:
            files.update(chosen.calibration.files)
        published = _publish(request, info, artifact, batch, chosen, validation, gate, files, data, details)
    return BuildResult(published, info, tuple(notes), {"validation": validation.to_dict(), **details})


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


def _report(request: BuildRequest, chosen: PreparedOnnx, validation: Validation, data: BuildData,
            details: dict[str, Any]) -> str:  # fmt: skip
    cal = chosen.calibration
    facts: dict[str, Any] = {
        "model": f"{request.model} -> {request.triton_name}",
        "selected precision": chosen.precision,
        "evaluation data": data.eval_source,
    }
    if cal is not None:
        facts["calibration"] = (
            f"{cal.method}, {cal.samples} samples, {len(cal.ranges)} tensors, "
            f"{'reused' if cal.reused else 'computed'}; float tensors: {chosen.details.get('float_tensors', [])}"
        )
    if "format" in chosen.details:
        facts["ORT integer format"] = f"{chosen.details['format']} ({chosen.details['format_reason']})"
    if request.target == "tensorrt":
        facts["note"] = "validated with ONNX Runtime on the Q/DQ ONNX; TensorRT's kernels can differ slightly"
    text = report_markdown(f"Kiln validation: {request.triton_name}", validation, facts)
    if details.get("table_markdown"):
        text += "\n## Precision trade-off (--precision auto)\n\n" + details["table_markdown"]
        text += f"\n![accuracy vs latency]({details.get('plot', 'tradeoff.png')})\n"
    return text
