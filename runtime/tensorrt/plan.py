"""What a TensorRT plan is and whether it runs here: its build settings and the plan choice per GPU.

``PlanSettings``/``ShapeProfile`` are what ``builders.tensorrt_plan`` decides and ``engine`` turns
into TensorRT calls; ``select_plan`` reads a published version's ``kiln.json`` record and picks
the plan file for this GPU, or refuses with the versions and GPUs built for vs here. Pure: nothing
here imports tensorrt.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import IncompatibleEngineError, InvalidInputError, MissingDependencyError, RepositoryError
from runtime.layout import MANIFEST_NAME
from runtime.machine import INSTALL_HINT, GpuInfo, MachineInfo

logger = logging.getLogger(__name__)

PLAN_PRECISIONS = ("fp32", "fp16", "int8")
# --hardware-compat values -> TensorRT's HardwareCompatibilityLevel names.
HARDWARE_COMPAT = {"none": "NONE", "ampere_plus": "AMPERE_PLUS", "same_cc": "SAME_COMPUTE_CAPABILITY"}
INT8_MODES = ("qdq", "calibrator")  # explicit Q/DQ (TensorRT 10 and 11) or TensorRT 10's calibrator
# (built major, runtime major) pairs TensorRT documents for version-compatible plans across majors.
CROSS_MAJOR_COMPATIBLE = {(8, 10), (10, 11)}


@dataclass(frozen=True)
class ShapeProfile:
    """One input's optimization profile: min <= opt <= max on every axis."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def describe(self) -> str:
        def dims(shape: tuple[int, ...]) -> str:
            return "x".join(str(d) for d in shape)

        return f"{self.name}:{dims(self.min)},{dims(self.opt)},{dims(self.max)}"


@dataclass(frozen=True)
class PlanSettings:
    """How to build one plan (made by ``builders.tensorrt_plan.make_settings``; defaults live in
    ``builders.request.TensorRTOptions``)."""

    precision: str
    profiles: tuple[ShapeProfile, ...]
    workspace_mb: int
    opt_level: int
    hardware_compat: str
    version_compat: bool
    int8_mode: str
    timing_cache: Path | None

    @property
    def strongly_typed(self) -> bool:
        """Precision comes from the ONNX graph, except in TensorRT 10's calibrator mode."""
        return not (self.precision == "int8" and self.int8_mode == "calibrator")


def _trt_section(manifest: Mapping[str, Any]) -> dict[str, Any]:
    section = (manifest.get("build") or {}).get("tensorrt")
    if not isinstance(section, dict) or not section.get("plans") or not section.get("version"):
        raise IncompatibleEngineError(
            f"kiln.json of {manifest.get('model')!r} version {manifest.get('version')} has no TensorRT build "
            "record (build.tensorrt.version and plans); rebuild it with kiln build --target tensorrt"
        )
    return section


def versions_compatible(built: str, here: str, version_compat: bool) -> bool:
    """Same TensorRT version, or a version-compatible plan on the same or a documented later major."""
    if built == here:
        return True
    if not version_compat:
        return False
    b, h = _version_tuple(built), _version_tuple(here)
    if b[0] == h[0]:
        return h >= b
    return (b[0], h[0]) in CROSS_MAJOR_COMPATIBLE


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:4]) or (0,)


def _gpu_fits(plan: Mapping[str, Any], gpu: GpuInfo, hardware_compat: str) -> bool:
    if hardware_compat == "ampere_plus":
        return gpu.compute_capability is not None and gpu.compute_capability >= (8, 0)
    if hardware_compat == "same_cc":
        return plan.get("compute_capability") == gpu.cc
    return plan.get("gpu") == gpu.name and plan.get("compute_capability") == gpu.cc


def select_plan(manifest: Mapping[str, Any], machine: MachineInfo, device: int = 0) -> str:
    """The plan file to load on GPU ``device`` here; IncompatibleEngineError naming built-for vs here."""
    section = _trt_section(manifest)
    if machine.tensorrt_version is None or not machine.gpus:
        absent = (("TensorRT", machine.tensorrt_version is None), ("a GPU", not machine.gpus))
        missing = [name for name, gone in absent if gone]
        raise MissingDependencyError(
            f"plan {manifest.get('model')!r} needs {' and '.join(missing)}, absent on this machine; {INSTALL_HINT}"
        )
    if not 0 <= device < len(machine.gpus):
        raise InvalidInputError(f"GPU {device} does not exist; this machine has {len(machine.gpus)} GPU(s)")
    gpu = machine.gpus[device]
    built_version = str(section["version"])
    plans = [p for p in section["plans"] if isinstance(p, dict)]
    built_for = "; ".join(f"{p.get('gpu')} (cc {p.get('compute_capability')})" for p in plans)
    here = f"TensorRT {machine.tensorrt_version} on {gpu.name} (cc {gpu.cc})"
    if not versions_compatible(built_version, machine.tensorrt_version, bool(section.get("version_compat"))):
        raise IncompatibleEngineError(
            f"plan {manifest.get('model')!r} version {manifest.get('version')} was built with TensorRT "
            f"{built_version} for {built_for}; this machine has {here}. Rebuild it here with "
            "kiln build --target tensorrt (or build with version compatibility)"
        )
    hardware_compat = str(section.get("hardware_compat") or "none")
    for plan in sorted(plans, key=lambda p: p.get("compute_capability") != gpu.cc):
        if _gpu_fits(plan, gpu, hardware_compat):
            return str(plan["file"])
    raise IncompatibleEngineError(
        f"plan {manifest.get('model')!r} version {manifest.get('version')} was built with TensorRT "
        f"{built_version} for {built_for} (hardware compatibility {hardware_compat}); this machine has {here}. "
        "Rebuild it on this GPU with kiln build --target tensorrt, or build with --hardware-compat ampere_plus"
    )


def check_plan_compatible(manifest: Mapping[str, Any], machine: MachineInfo, device: int = 0) -> None:
    """Raise IncompatibleEngineError (or MissingDependencyError) unless a plan in ``manifest`` runs here."""
    select_plan(manifest, machine, device)


def plan_for_here(path: Path, machine: MachineInfo, device: int = 0) -> Path:
    """The plan file of ``path``'s version for GPU ``device``, after refusing a plan built for another
    TensorRT or GPU (from the version's ``kiln.json``; without one, ``path`` unchecked)."""
    record = path.parent / MANIFEST_NAME
    if not record.is_file():
        logger.warning("%s has no %s: cannot check TensorRT version and GPU before loading", path, MANIFEST_NAME)
        return path
    try:
        manifest = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RepositoryError(f"{record} is unreadable ({err}); republish this version") from err
    return path.parent / select_plan(manifest, machine, device)
