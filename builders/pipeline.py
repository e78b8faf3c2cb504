"""A build: inspect -> (calibrate -> quantize) -> build -> (validate) -> publish.

``build_model`` is what ``kiln build`` runs. This module only checks the request and dispatches:
FP32/FP16 for ONNX Runtime here, INT8 and ``auto`` for ONNX Runtime in ``builders.int8_build``,
every TensorRT build in ``builders.tensorrt_build``. Each step lives in its own module below it.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx

from builders.convert import convert_fp16, optimize_fp32
from builders.decoder_build import build_decoder, is_decoder
from builders.hardware import check_build
from builders.inspection import ModelInfo, describe_model, load_model, max_batch_size
from builders.int8_build import build_quantized
from builders.model_config import ARTIFACTS, parse_keep_versions
from builders.publish import publish_artifact
from builders.repository import check_model_name
from builders.request import MAX_INSTANCES, PRECISIONS, TARGETS, BuildRequest, BuildResult, DecoderOptions
from builders.tensorrt_build import build_tensorrt
from builders.tensorrt_plan import parse_shapes
from builders.version_policy import decide_policy
from core.errors import InvalidInputError
from runtime.machine import probe_machine

logger = logging.getLogger(__name__)


def check_request(request: BuildRequest) -> None:
    """Refuse a bad request before any work is done."""
    if request.precision not in PRECISIONS:
        raise InvalidInputError(f"unknown precision {request.precision!r}; choose one of {list(PRECISIONS)}")
    if request.target not in TARGETS:
        raise InvalidInputError(f"unknown target {request.target!r}; choose one of {list(TARGETS)}")
    check_model_name(request.name)
    check_model_name(request.triton_name)
    if request.instances < 1:
        raise InvalidInputError(f"--instances must be >= 1, got {request.instances}")
    if request.keep_versions is not None:
        parse_keep_versions(request.keep_versions)
    if request.instances > MAX_INSTANCES:
        raise InvalidInputError(
            f"--instances {request.instances} is over {MAX_INSTANCES}; each instance is a full copy of the model "
            "(a session or execution context) on the serving machine"
        )
    if request.int8.mode == "dynamic" and request.target == "tensorrt":
        raise InvalidInputError(
            "--int8-mode dynamic is not available for --target tensorrt: TensorRT has no dynamic quantization, "
            "its INT8 engines need every activation's scale fixed at build time. Use --int8-mode static (the "
            "default) with --calib DATA for TensorRT, or --target ort for dynamic INT8"
        )
    if request.int8.smoothquant and (request.target != "ort" or request.precision != "int8"):
        raise InvalidInputError(
            f"--smoothquant applies to --precision int8 --target ort (got --precision {request.precision} "
            f"--target {request.target}); --precision auto tries it by itself on transformer graphs, and the TensorRT "
            "placement does not use it yet"
        )
    if request.int8.mode == "dynamic" and request.precision not in ("int8", "auto"):
        raise InvalidInputError(
            f"--int8-mode dynamic applies to --precision int8 or auto, not {request.precision}; drop it"
        )
    shapes = request.tensorrt.shapes
    if shapes and request.target != "tensorrt":
        raise InvalidInputError(
            f"--shapes sets TensorRT optimization profiles; it applies to --target tensorrt only "
            f"(got --target {request.target}); drop it"
        )
    parse_shapes(shapes)  # the syntax is checked on any machine, before TensorRT is looked for


def build_model(request: BuildRequest) -> BuildResult:
    """Run the pipeline for one request and publish the result."""
    check_request(request)
    machine = probe_machine(accelerators=request.target == "tensorrt")
    hardware_warnings = check_build(machine, request.target, request.precision)  # refuse before any work
    hardware_warnings += decide_policy(request.repo, request.triton_name, request.keep_versions).warnings
    model = load_model(request.model)
    info = describe_model(model, request.model)
    if request.decoder is not None or is_decoder(model):
        return _build_decoder(request, info, hardware_warnings)
    batch = max_batch_size(info, request.max_batch)
    if request.target == "tensorrt":
        return build_tensorrt(request, model, info, batch, machine, hardware_warnings)
    if request.precision in ("int8", "auto"):
        return build_quantized(request, model, info, batch, warnings=hardware_warnings)
    with tempfile.TemporaryDirectory(prefix="kiln-build-") as tmp:
        artifact = Path(tmp) / ARTIFACTS["ort"]
        if request.precision == "fp32":
            optimize_fp32(request.model, artifact)
        else:  # check_build already warned that FP16 on a CPU is for size, not speed
            fp32 = optimize_fp32(request.model, Path(tmp) / "fp32.onnx")
            onnx.save(convert_fp16(onnx.load(str(fp32))), str(artifact))
        published = publish_artifact(request, info, artifact, batch, build_extra={})
    return BuildResult(published, info, tuple(hardware_warnings))


def _build_decoder(request: BuildRequest, info: ModelInfo, warnings: list[str]) -> BuildResult:
    if request.target != "ort":
        raise InvalidInputError(
            f"decoders build for --target ort only (got {request.target!r}); TensorRT decoders are not supported yet"
        )
    published, check = build_decoder(
        request.model,
        info,
        name=request.triton_name,
        precision=request.precision,
        repo=request.repo,
        instances=request.instances,
        options=request.decoder or DecoderOptions(),
    )
    return BuildResult(published, info, tuple(warnings), {"token_agreement": check})
