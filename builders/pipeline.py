"""A build: inspect -> (calibrate -> quantize) -> build -> (validate) -> publish.

``build_model`` is what ``kiln build`` runs; each step lives in its own module and this one only
orders them. FP32 and FP16 for the ONNX Runtime target are here; INT8 and TensorRT extend it.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from builders.convert import convert_fp16, optimize_fp32
from builders.errors import InvalidInputError
from builders.hardware import check_build, probe_machine
from builders.inspection import ModelInfo, describe_model, load_model, max_batch_size
from builders.manifest import build_manifest
from builders.model_config import ARTIFACTS, ServingOptions, render_config
from builders.publish import Published, publish_version
from builders.repository import check_model_name

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8", "auto")
TARGETS = ("ort", "tensorrt")
MAX_INSTANCES = 128  # instance_group count; beyond this a typo exhausts the serving machine's memory


@dataclass(frozen=True)
class BuildRequest:
    """Everything ``kiln build`` was asked to do, validated by ``check_request``."""

    model: Path
    name: str
    precision: str = "fp32"
    target: str = "ort"
    repo: Path = Path("model_repository")
    max_batch: int | None = None
    instances: int = 1
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def triton_name(self) -> str:
        """One Triton model per (model, precision, target), e.g. ``digits-fp16-ort``."""
        return f"{self.name}-{self.precision}-{self.target}"


@dataclass(frozen=True)
class BuildResult:
    published: Published | None
    info: ModelInfo
    warnings: tuple[str, ...] = ()
    report: dict[str, Any] = field(default_factory=dict)


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
    if request.instances > MAX_INSTANCES:
        raise InvalidInputError(
            f"--instances {request.instances} is over {MAX_INSTANCES}; each instance is a full copy of the model "
            "(a session or execution context) on the serving machine"
        )
    shapes = tuple(request.options.get("shapes") or ())
    if shapes and request.target != "tensorrt":
        raise InvalidInputError(
            f"--shapes sets TensorRT optimization profiles; it applies to --target tensorrt only "
            f"(got --target {request.target}); drop it"
        )
    if shapes:  # the syntax is checked on any machine, before TensorRT is looked for
        from builders.tensorrt_plan import parse_shapes

        parse_shapes(shapes)


def build_model(request: BuildRequest) -> BuildResult:
    """Run the pipeline for one request and publish the result."""
    check_request(request)
    machine = probe_machine(accelerators=request.target == "tensorrt")
    hardware_warnings = check_build(machine, request.target, request.precision)  # refuse before any work
    model = load_model(request.model)
    info = describe_model(model, request.model)
    batch = max_batch_size(info, request.max_batch)
    # ---- TensorRT branch (issue 4): all of it lives in builders/tensorrt/build.py
    if request.target == "tensorrt":
        from builders.tensorrt.build import build_tensorrt

        return build_tensorrt(request, model, info, batch, machine, hardware_warnings)
    # ---- end TensorRT branch
    # ---- INT8 / auto branch (issue 3): all of it lives in builders/int8_build.py
    if request.precision in ("int8", "auto"):
        from builders.int8_build import build_quantized

        return build_quantized(request, model, info, batch, warnings=hardware_warnings)
    # ---- end INT8 / auto branch
    if request.target != "ort" or request.precision not in ("fp32", "fp16"):
        raise InvalidInputError(
            f"--precision {request.precision} --target {request.target} is not available in this build "
            "of Kiln yet; use --precision fp32 or fp16 with --target ort"
        )
    warnings: list[str] = list(hardware_warnings)
    with tempfile.TemporaryDirectory(prefix="kiln-build-") as tmp:
        artifact = Path(tmp) / ARTIFACTS["ort"]
        if request.precision == "fp32":
            optimize_fp32(request.model, artifact)
        else:  # check_build already warned that FP16 on a CPU is for size, not speed
            fp32 = optimize_fp32(request.model, Path(tmp) / "fp32.onnx")
            onnx.save(convert_fp16(onnx.load(str(fp32))), str(artifact))
        published = publish_artifact(request, info, artifact, batch, build_extra={})
    return BuildResult(published, info, tuple(warnings))


def publish_artifact(
    request: BuildRequest,
    info: ModelInfo,
    artifact: Path,
    batch: int,
    *,
    build_extra: dict[str, Any],
    calibration: dict[str, Any] | None = None,
    validation: dict[str, Any] | None = None,
    extra_files: dict[str, Path] | None = None,
    serving: ServingOptions | None = None,
    tools: dict[str, str] | None = None,
) -> Published:
    """Render config and manifest for an artifact and publish it as a new version."""
    serving = serving or ServingOptions(
        max_batch_size=batch,
        instances=request.instances,
        kind="KIND_GPU" if request.target == "tensorrt" else "KIND_CPU",
    )
    config = render_config(request.triton_name, request.target, info.inputs, info.outputs, serving)
    manifest = build_manifest(
        model_name=request.triton_name,
        source_path=request.model,
        source_sha256=info.sha256,
        precision=request.precision,
        target=request.target,
        artifact=artifact.name,
        files={},
        build={"max_batch_size": batch, "instances": request.instances, **build_extra},
        calibration=calibration,
        validation=validation,
        tools=tools,
    )
    files = {artifact.name: artifact, **(extra_files or {})}
    return publish_version(request.repo, request.triton_name, files, config, manifest)
