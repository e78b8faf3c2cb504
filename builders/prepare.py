"""The shared preparation step of every target: data, calibration, and the ONNX to build from.

``prepare_onnx`` returns the ONNX model an engine is built from: the Q/DQ ONNX with the target's
placement for INT8, the FP16 or FP32 ONNX otherwise. For ``--target ort`` that ONNX is the
artifact (``builders.int8_build``); the TensorRT builder (``builders.tensorrt_build``) turns it
into a plan.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx

from builders.calib_data import Dataset, ImagePreprocess, load_dataset
from builders.calibrate import Calibration, CalibrationSettings, calibrate_each, scale_ranges, write_calibration
from builders.convert import convert_fp16, optimize_fp32
from builders.inspection import ModelInfo
from builders.op_speed import compute_nodes, load_or_measure, slow_nodes
from builders.quantize import choose_ort_format, cpu_flags, prepare_model, quantize_model, save_model
from builders.request import BuildRequest, Int8Options
from core.errors import InvalidInputError

logger = logging.getLogger(__name__)

AUTO_METHODS = ("entropy", "percentile", "minmax")


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
    """Calibration data and held-out evaluation data (a disjoint split when --eval is absent).

    Dynamic INT8 needs no calibration: --eval alone is enough (the calibration part is then empty).
    """
    if opts.calib is None and opts.mode == "dynamic" and opts.eval is not None:
        evaluation = load_dataset(opts.eval, info.inputs, preprocess=ImagePreprocess.parse(opts.preprocess))
        return BuildData(evaluation, evaluation, str(opts.eval))
    if opts.calib is None and opts.mode == "dynamic":
        raise InvalidInputError(
            "--int8-mode dynamic needs no calibration but held-out data for the accuracy gate: pass --eval DATA.npz "
            "(or --calib DATA.npz, of which a disjoint 30% is held out)"
        )
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


def calibration_methods(request: BuildRequest, opts: Int8Options) -> tuple[str, ...]:
    """The threshold methods to calibrate: ``auto`` tries all three on the ORT target (each validated,
    the best kept); TensorRT builds use its own convention, entropy."""
    if opts.calib_method != "auto":
        return (opts.calib_method,)
    return ("entropy",) if request.target == "tensorrt" else AUTO_METHODS


def run_calibrations(request: BuildRequest, model: onnx.ModelProto, info: ModelInfo, opts: Int8Options,
                     data: Dataset) -> dict[str, Calibration]:  # fmt: skip
    """One calibration per method of ``calibration_methods``, from one pass over the data."""
    settings = CalibrationSettings("entropy", opts.percentile, opts.calib_batch, memory=opts.calib_memory)
    methods = calibration_methods(request, opts)
    results = calibrate_each(model, info.sha256, data, settings, methods, cache_root(request, opts))
    return {method: _scaled(result, opts) for method, result in results.items()}


def run_calibration(request: BuildRequest, model: onnx.ModelProto, info: ModelInfo, opts: Int8Options,
                    data: Dataset) -> Calibration:  # fmt: skip
    """The calibration of the first method (TensorRT builds: the only one)."""
    return next(iter(run_calibrations(request, model, info, opts, data).values()))


def _scaled(result: Calibration, opts: Int8Options) -> Calibration:
    if opts.amax_scale == 1.0:
        return result
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
    slow = measured_slow_nodes(request, model) if request.target == "ort" else {}
    asked = kept_float_nodes(model, request.int8.keep_float)
    excluded = list(dict.fromkeys([*exclude_nodes, *asked, *slow]))
    quantized = quantize_model(model, calibration.ranges, request.target, exclude_nodes=excluded, ort_format=fmt)
    for name, reason in quantized.skipped.items():
        logger.info("tensor %r stays in float: %s", name, reason)
    kept_float = {f"node {n}": r for n, r in slow.items()} | {f"node {n}": r for n, r in asked.items()}
    return PreparedOnnx(
        save_model(quantized.model, dest),
        precision,
        request.target,
        calibration,
        quantized.notes,
        {
            **quantized.details,
            "float_tensors": sorted({**calibration.skipped, **quantized.skipped}),
            "float_reasons": {**calibration.skipped, **quantized.skipped, **kept_float},
            "slower_in_int8": sorted(slow),
        },
    )


def kept_float_nodes(model: onnx.ModelProto, keep: Sequence[str]) -> dict[str, str]:
    """node -> reason for ``--keep-float``: ``first``/``last`` compute layer (Conv/Gemm/MatMul with constant
    weights, in graph order) and node names; an unknown name is refused, naming the choices."""
    if not keep:
        return {}
    prepared = prepare_model(model).model
    compute = compute_nodes(prepared)
    names = {n.name for n in prepared.graph.node}
    chosen: dict[str, str] = {}
    for item in keep:
        if item in ("first", "last") and compute:
            chosen[compute[0] if item == "first" else compute[-1]] = f"kept float (--keep-float {item})"
        elif item in names:
            chosen[item] = "kept float (--keep-float)"
        else:
            raise InvalidInputError(
                f"--keep-float {item!r} is neither first, last nor a node of this model; compute nodes are "
                f"{compute[:8]}{' ...' if len(compute) > 8 else ''} (see kiln inspect)"
            )
    return chosen


def op_speed_ratios(request: BuildRequest) -> dict[str, float]:
    """INT8/FP32 latency per op pattern on this CPU (measured once per ISA, cached beside the repository)."""
    fmt = choose_ort_format(cpu_flags())
    return load_or_measure(cache_root(request, request.int8).parent / "op-speed", cpu_flags(), fmt.name)


def measured_slow_nodes(request: BuildRequest, model: onnx.ModelProto) -> dict[str, str]:
    """Nodes (named as the placement names them) whose pattern runs slower in INT8 on this CPU;
    none when the user insists (``--allow-slower``)."""
    if request.int8.allow_slower:
        return {}
    return slow_nodes(prepare_model(model).model, op_speed_ratios(request))
