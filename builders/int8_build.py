"""INT8 and automatic-precision builds: data -> calibrate -> quantize -> validate -> gate -> publish.

``prepare_onnx`` is the seam for every target: it returns the ONNX model to build an engine
from (the Q/DQ ONNX with the target's placement for INT8, the FP16/FP32 ONNX otherwise). For
``--target ort`` that ONNX is the artifact; the TensorRT builder turns it into a plan and passes
a ``make_artifact`` callback to ``build_quantized``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from builders.calib_data import Dataset, ImagePreprocess, load_dataset
from builders.calibrate import Calibration, CalibrationSettings, calibrate, scale_ranges, write_calibration
from builders.convert import convert_fp16, optimize_fp32
from builders.errors import InvalidInputError
from builders.inspection import ModelInfo
from builders.model_config import ARTIFACTS
from builders.quantize import choose_ort_format, cpu_flags, quantize_model, save_model
from builders.thresholds import DEFAULT_PERCENTILE
from builders.validate import DEFAULT_MAX_DROP, GateSettings, Validation, check_gate, report_markdown, validate

if TYPE_CHECKING:
    from builders.pipeline import BuildRequest, BuildResult

logger = logging.getLogger(__name__)

REPORT_FILE = "report.md"
MakeArtifact = Callable[["PreparedOnnx", Path], Path]


@dataclass(frozen=True)
class Int8Options:
    """The INT8/auto part of ``BuildRequest.options``, checked once."""

    calib: Path | None = None
    calib_method: str = "entropy"
    percentile: float = DEFAULT_PERCENTILE
    eval: Path | None = None
    max_drop: float = DEFAULT_MAX_DROP
    metric: str | None = None
    skip_gate: bool = False
    amax_scale: float = 1.0  # != 1 only to demonstrate the gate (a deliberately bad calibration)
    cache_dir: Path | None = None
    preprocess: str | None = None
    calib_batch: int = 32
    repeats: int = 30
    eval_fraction: float = 0.3

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Int8Options:
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in options.items() if k in known and v is not None}
        for key in ("calib", "eval", "cache_dir"):
            if key in values:
                values[key] = Path(values[key])
        opts = cls(**values)
        if not math.isfinite(opts.max_drop) or opts.max_drop < 0:
            raise InvalidInputError(f"--max-accuracy-drop must be a number >= 0, got {opts.max_drop}")
        if not (math.isfinite(opts.amax_scale) and opts.amax_scale > 0):
            raise InvalidInputError(f"amax scale must be > 0, got {opts.amax_scale}")
        if not 0 < opts.eval_fraction < 1:
            raise InvalidInputError(f"eval fraction must be in (0, 1), got {opts.eval_fraction}")
        return opts

    @property
    def gate(self) -> GateSettings:
        return GateSettings(metric=self.metric, max_drop=self.max_drop, repeats=self.repeats)


@dataclass(frozen=True)
class BuildData:
    calibration: Dataset
    evaluation: Dataset
    eval_source: str
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class PreparedOnnx:
    """The ONNX an engine is built from, and how it was made."""

    path: Path
    precision: str
    target: str
    calibration: Calibration | None = None
    notes: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)


def load_build_data(request: BuildRequest, info: ModelInfo, opts: Int8Options) -> BuildData:
    """Calibration data and held-out evaluation data (a disjoint split when --eval is absent)."""
    if opts.calib is None:
        raise InvalidInputError(
            f"--precision {request.precision} needs calibration data: pass --calib DATA.npz "
            "(arrays keyed by input name, batch first) or a directory of .npz files or images"
        )
    prep = ImagePreprocess.parse(opts.preprocess)
    calib = load_dataset(opts.calib, info.inputs, preprocess=prep)
    if opts.eval is not None:
        evaluation = load_dataset(opts.eval, info.inputs, preprocess=prep)
        same = (
            ("--eval holds the same samples as --calib: the accuracy gate is optimistic; use held-out data",)
            if evaluation.sha256 == calib.sha256
            else ()
        )
        return BuildData(calib, evaluation, str(opts.eval), same)
    calib_part, eval_part = calib.split(opts.eval_fraction)
    return BuildData(calib_part, eval_part, f"held-out {opts.eval_fraction:.0%} of {opts.calib}")


def cache_root(request: BuildRequest, opts: Int8Options) -> Path:
    """Where calibrations are cached: --cache-dir, else .kiln-cache/calib beside the repository."""
    if opts.cache_dir is not None:
        return opts.cache_dir
    return request.repo.resolve().parent / ".kiln-cache" / "calib"


def run_calibration(request: BuildRequest, model: onnx.ModelProto, info: ModelInfo, opts: Int8Options,
                    data: Dataset) -> Calibration:  # fmt: skip
    settings = CalibrationSettings(opts.calib_method, opts.percentile, opts.calib_batch)
    result = calibrate(model, info.sha256, data, settings, cache_root(request, opts))
    if opts.amax_scale != 1.0:
        logger.warning("every calibrated amax is scaled by %g: this calibration is deliberately wrong", opts.amax_scale)
        extra = {**result.extra, "amax_scale": opts.amax_scale}
        directory = result.directory.with_name(f"{result.directory.name}-amax-x{opts.amax_scale:g}")
        ranges = scale_ranges(result.ranges, opts.amax_scale)
        result = replace(result, ranges=ranges, extra=extra, directory=directory, reused=False)
        write_calibration(result)  # the published calibration files show the amax actually used
    return result


def prepare_onnx(
    request: BuildRequest,
    model: onnx.ModelProto,
    precision: str,
    workdir: Path,
    *,
    calibration: Calibration | None = None,
    exclude_nodes: Sequence[str] = (),
) -> PreparedOnnx:
    """The ONNX to build from for ``request.target`` at ``precision`` ("int8", "fp16" or "fp32")."""
    dest = workdir / f"{precision}-{len(exclude_nodes)}-{request.target}.onnx"
    if precision == "fp32":
        return PreparedOnnx(optimize_fp32(request.model, dest), precision, request.target)
    if precision == "fp16":
        fp32 = optimize_fp32(request.model, workdir / "fp32-for-fp16.onnx")
        return PreparedOnnx(save_model(convert_fp16(onnx.load(str(fp32))), dest), precision, request.target)
    if precision != "int8" or calibration is None:
        raise InvalidInputError(f"cannot prepare {precision!r} ONNX (int8 needs a calibration)")
    fmt = choose_ort_format(cpu_flags())
    quantized = quantize_model(model, calibration.ranges, request.target, exclude_nodes=exclude_nodes, ort_format=fmt)
    for name, reason in quantized.skipped.items():
        logger.info("tensor %r stays in float: %s", name, reason)
    return PreparedOnnx(
        save_model(quantized.model, dest),
        precision,
        request.target,
        calibration,
        quantized.notes,
        {**quantized.details, "float_tensors": sorted({**calibration.skipped, **quantized.skipped})},
    )


def build_quantized(
    request: BuildRequest,
    model: onnx.ModelProto,
    info: ModelInfo,
    batch: int,
    *,
    warnings: Sequence[str] = (),
    make_artifact: MakeArtifact | None = None,
) -> BuildResult:
    """``--precision int8`` (or ``auto``): calibrate, quantize, validate, gate, publish."""
    import tempfile

    from builders.pipeline import BuildResult

    opts = Int8Options.from_options(request.options)
    if request.target != "ort" and make_artifact is None:
        raise InvalidInputError(f"--target {request.target} needs its engine builder; it was not given")
    data = load_build_data(request, info, opts)
    notes = [*warnings, *data.warnings]
    with tempfile.TemporaryDirectory(prefix="kiln-int8-") as tmp:
        workdir = Path(tmp)
        calibration = run_calibration(request, model, info, opts, data.calibration)
        notes += [f"tensor {n!r} stays in float: {r}" for n, r in calibration.skipped.items()]
        if request.precision == "auto":
            from builders.auto import search_precision

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
        artifact = _artifact(chosen, workdir, make_artifact)
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


def _artifact(chosen: PreparedOnnx, workdir: Path, make_artifact: MakeArtifact | None) -> Path:
    if make_artifact is not None:
        return make_artifact(chosen, workdir)
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
             details: dict[str, Any]) -> Any:  # fmt: skip
    from builders.pipeline import publish_artifact

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
