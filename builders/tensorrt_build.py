"""``kiln build --target tensorrt``: prepare ONNX on the CPU, build plans on the GPU, validate, publish.

CPU steps come from ``builders/prepare.py`` (calibration, Q/DQ with TensorRT placement, FP16
conversion); decisions from ``builders/tensorrt_plan.py``; the GPU step from
``runtime.tensorrt.engine.build_engine``. Validation reuses ``builders/validate.py`` with the
runtime's TensorRT runner (the one serving uses) in place of an ONNX Runtime session, so gates and
latency work identically on a GPU. One plan is built per distinct compute capability present
(``cc_model_filenames``). Nothing here imports TensorRT.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx

from builders.calib_data import ImagePreprocess, load_dataset
from builders.calibrate import Calibration, calibration_table
from builders.calibration_file import to_trt_cache
from builders.hardware import UNSUPPORTED, support_matrix
from builders.inspection import ModelInfo
from builders.model_config import ServingOptions
from builders.prepare import BuildData, PreparedOnnx, load_build_data, prepare_onnx, run_calibration
from builders.publish import publish_artifact
from builders.repository import Published
from builders.request import BuildRequest, BuildResult, Int8Options
from builders.tensorrt_plan import (
    BuiltPlan,
    PlanSettings,
    build_targets,
    cc_model_filenames,
    derive_profiles,
    make_settings,
    parse_shapes,
    plan_filenames,
    plan_manifest,
    plan_tools,
    timing_cache_path,
)
from builders.validate import (
    Validation,
    attention_mask_input,
    batch_masks,
    check_gate,
    choose_fastest,
    compare,
    latency_batches,
    make_runner,
    measure_latency,
    metric_drop,
    predict,
    with_speedup,
)
from core.errors import InvalidInputError, KilnError
from runtime.machine import MachineInfo
from runtime.runner import Runner

logger = logging.getLogger(__name__)

RunnerFactory = Callable[[Path], Runner]  # plan path -> the runtime's TensorRT runner (a fake in tests)
EngineBuilder = Callable[..., Any]  # engine.build_engine's signature, returning an EngineBuild


@dataclass(frozen=True)
class PlanCandidate:
    """The plans built for one precision, and their validation once run."""

    precision: str
    plans: tuple[BuiltPlan, ...]
    directory: Path
    settings: PlanSettings
    prepared: PreparedOnnx
    validation: Validation | None


def plan_settings(
    request: BuildRequest, info: ModelInfo, batch: int, precision: str, machine: MachineInfo
) -> PlanSettings:
    """The PlanSettings for one precision from the request's TensorRT options (checked, no I/O)."""
    profiles = derive_profiles(info.inputs, batch, parse_shapes(request.tensorrt.shapes))
    return make_settings(
        precision,
        profiles,
        request.tensorrt,
        timing_cache=timing_cache_path(request.repo),
        tensorrt_version=machine.tensorrt_version,
    )


def candidate_precisions(request: BuildRequest, machine: MachineInfo) -> list[str]:
    """``auto``: INT8, FP16, FP32 in that order, minus what this GPU cannot run; else the one asked."""
    if request.precision != "auto":
        return [request.precision]
    matrix = support_matrix(machine)
    return [p for p in ("int8", "fp16", "fp32") if matrix[("tensorrt", p)].status != UNSUPPORTED]


def build_tensorrt(
    request: BuildRequest,
    model: onnx.ModelProto,
    info: ModelInfo,
    batch: int,
    machine: MachineInfo,
    warnings: Sequence[str] = (),
    *,
    runner_factory: RunnerFactory | None = None,
    engine_builder: EngineBuilder | None = None,
) -> BuildResult:
    """Build, validate and publish TensorRT plan(s) for ``request``.

    ``runner_factory`` and ``engine_builder`` default to the real TensorRT ones; tests pass fakes
    (the only fakes Kiln's tests use are for the GPU).
    """
    precisions = candidate_precisions(request, machine)
    for precision in precisions:  # every flag checked before any work
        plan_settings(request, info, batch, precision, machine)
    targets = build_targets(machine.gpus)
    int8 = request.int8
    needs_data = request.precision in ("int8", "auto") or int8.has_data
    data = _build_data(request, info, int8) if needs_data else None
    notes = list(warnings)
    if data is None:
        notes.append("plan not validated against FP32: pass --eval DATA (or --calib DATA) to gate accuracy")
    factory = runner_factory or _default_runner(machine)
    with tempfile.TemporaryDirectory(prefix="kiln-trt-") as tmp:
        workdir = Path(tmp)
        calibration = None
        if "int8" in precisions and data is not None:
            calibration = run_calibration(request, model, info, int8, data.calibration)
        candidates = []
        for precision in precisions:
            settings = plan_settings(request, info, batch, precision, machine)
            try:
                candidate = _build_candidate(
                    request, model, precision, settings, calibration, targets, machine, workdir, engine_builder
                )
                candidates.append(_validated(candidate, request, data, int8, batch, factory))
            except KilnError as err:
                if request.precision != "auto" or (precision == precisions[-1] and not candidates):
                    raise
                notes.append(f"--precision auto: the {precision} candidate failed and was skipped: {err}")
        chosen = _choose(candidates, request.precision)
        if chosen.validation is not None and not chosen.validation.passed:
            if not int8.skip_gate:
                check_gate(chosen.validation, request.precision, int8.calib_method if calibration else None)
            notes.append("accuracy gate FAILED and was overridden (--skip-gate); see kiln.json validation")
        published = _publish(request, info, batch, chosen, candidates, machine)
    report = {"tensorrt": published.manifest["build"]["tensorrt"]}
    if chosen.validation is not None:
        report["validation"] = chosen.validation.to_dict()
    return BuildResult(published, info, tuple(notes), report)


def _build_data(request: BuildRequest, info: ModelInfo, int8: Int8Options) -> BuildData:
    """Calibration + held-out data; FP32/FP16 with only ``--eval`` need no calibration data."""
    if int8.calib is None and int8.eval is not None and request.precision in ("fp32", "fp16"):
        evaluation = load_dataset(int8.eval, info.inputs, preprocess=ImagePreprocess.parse(int8.preprocess))
        return BuildData(evaluation, evaluation, str(int8.eval))
    return load_build_data(request, info, int8)


def _build_candidate(
    request: BuildRequest,
    model: onnx.ModelProto,
    precision: str,
    settings: PlanSettings,
    calibration: Calibration | None,
    targets: Sequence[Any],
    machine: MachineInfo,
    workdir: Path,
    engine_builder: EngineBuilder | None,
) -> PlanCandidate:
    from runtime.tensorrt.engine import build_engine  # imports nothing of TensorRT until called

    make_plan = engine_builder or build_engine
    directory = workdir / precision
    directory.mkdir()
    cache = None
    if settings.strongly_typed:
        prepared = prepare_onnx(request, model, precision, directory, calibration=calibration)
    else:  # TensorRT 10 calibrator: the FP32 source (tensor names as calibrated) + Kiln's cache
        if calibration is None:
            raise InvalidInputError("--trt-int8 calibrator needs calibration data; pass --calib DATA")
        prepared = PreparedOnnx(request.model, precision, "tensorrt", calibration)
        cache = to_trt_cache(calibration_table(calibration), machine.tensorrt_version)
    plans = []
    for gpu, filename in zip(targets, plan_filenames(targets).values(), strict=True):
        built = make_plan(
            prepared.path, settings, directory, plan_name=filename, device=gpu.index, calibration_cache=cache
        )
        plans.append(BuiltPlan(filename, gpu.name, gpu.cc, round(built.seconds, 3), built.layers.name))
    return PlanCandidate(precision, tuple(plans), directory, settings, prepared, None)


def _validated(
    candidate: PlanCandidate,
    request: BuildRequest,
    data: BuildData | None,
    int8: Int8Options,
    batch: int,
    factory: RunnerFactory,
) -> PlanCandidate:
    """Run the device-0 plan against ONNX Runtime FP32 on held-out data (metrics and latency)."""
    if data is None:
        return candidate
    gate = int8.gate
    mask = attention_mask_input(data.evaluation)
    metric = gate.resolved_metric(data.evaluation.has_labels, mask is not None)
    reference = make_runner(request.model)
    runner = factory(candidate.directory / candidate.plans[0].file)
    try:
        ref_out, labels = predict(reference, data.evaluation, gate.batch_size)
        cand_out, _ = predict(runner, data.evaluation, gate.batch_size)
        metrics = compare(ref_out, cand_out, labels, batch_masks(data.evaluation, gate.batch_size, mask))
        timings = measure_latency(
            {"reference": reference, "candidate": runner}, latency_batches(data.evaluation, batch), gate.repeats
        )
    finally:
        runner.close()
        reference.close()
    latency = {size: with_speedup(row["reference"], row["candidate"]) for size, row in timings.items()}
    validation = Validation(
        metric, gate.max_drop, metric_drop(metrics, metric), metrics, latency, len(data.evaluation),
        data.evaluation.sha256, {"eval_source": data.eval_source, "runner": "tensorrt"},
    )  # fmt: skip
    return replace(candidate, validation=validation)


def _choose(candidates: Sequence[PlanCandidate], requested: str) -> PlanCandidate:
    """The asked precision; for ``auto`` the fastest within budget (``validate.choose_fastest``)."""
    if requested != "auto" or len(candidates) == 1:
        return candidates[0]
    return candidates[choose_fastest([c.validation for c in candidates])]


def _publish(
    request: BuildRequest,
    info: ModelInfo,
    batch: int,
    chosen: PlanCandidate,
    candidates: Sequence[PlanCandidate],
    machine: MachineInfo,
) -> Published:
    version = machine.tensorrt_version or "unknown"
    files = {p.file: chosen.directory / p.file for p in chosen.plans[1:]}
    files.update({p.layers_file: chosen.directory / p.layers_file for p in chosen.plans if p.layers_file})
    calibration = chosen.prepared.calibration
    if calibration is not None:
        files.update(calibration.files)
    serving = ServingOptions(
        max_batch_size=batch,
        instances=request.instances,
        kind="KIND_GPU",
        cc_model_filenames=cc_model_filenames({p.compute_capability: p.file for p in chosen.plans}),
    )
    build_extra: dict[str, Any] = {
        "selected_precision": chosen.precision,
        "tensorrt": plan_manifest(version, chosen.settings, chosen.plans),
    }
    if request.precision == "auto":
        build_extra["auto"] = [
            {"precision": c.precision, **(c.validation.to_dict() if c.validation else {})} for c in candidates
        ]
    return publish_artifact(
        request,
        info,
        chosen.directory / chosen.plans[0].file,
        batch,
        build_extra=build_extra,
        calibration=calibration.manifest() if calibration is not None else None,
        validation=chosen.validation.to_dict() if chosen.validation is not None else None,
        extra_files=files,
        serving=serving,
        tools=plan_tools(version, chosen.plans),
    )


def _default_runner(machine: MachineInfo) -> RunnerFactory:
    def factory(plan: Path) -> Runner:
        from runtime.tensorrt.runner import TensorRTRunner

        return TensorRTRunner(plan, machine=machine, check_manifest=False)

    return factory
