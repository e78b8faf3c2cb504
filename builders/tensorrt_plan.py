"""Every build decision about a TensorRT plan, made on the CPU: profiles, settings, file names, manifest.

``runtime.tensorrt.engine`` only translates a ``PlanSettings`` into TensorRT calls; whether a
published plan runs on a machine is ``runtime.tensorrt.plan.select_plan``. Nothing here imports
tensorrt.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from builders.request import TensorRTOptions
from builders.tensors import TensorSpec
from core.errors import InvalidInputError, MissingDependencyError
from runtime.machine import GpuInfo, trt_major
from runtime.tensorrt.plan import PLAN_PRECISIONS, PlanSettings, ShapeProfile

TIMING_CACHE = Path(".kiln-cache") / "trt-timing.cache"
_CC = re.compile(r"^\d+\.\d+$")


def parse_dims(text: str, where: str) -> tuple[int, ...]:
    parts = text.strip().lower().split("x")
    if not text.strip() or not all(p.isdigit() for p in parts):
        raise InvalidInputError(f"{where}: shape {text!r} is not like 1x3x224x224 (positive integers joined by x)")
    dims = tuple(int(p) for p in parts)
    if any(d < 1 for d in dims):
        raise InvalidInputError(f"{where}: shape {text!r} has a zero dimension; every dimension must be >= 1")
    return dims


def parse_shapes(specs: Iterable[str]) -> dict[str, ShapeProfile]:
    """Profiles from ``--shapes name:min,opt,max`` strings, e.g. ``input:1x1x8x8,8x1x8x8,32x1x8x8``.

    A spec with one shape (``name:4x3x8x8``) is a fixed shape (min = opt = max). Several specs may
    be given in one string separated by spaces or ``;``.
    """
    result: dict[str, ShapeProfile] = {}
    for chunk in specs:
        for spec in re.split(r"[;\s]+", chunk.strip()):
            if not spec:
                continue
            name, sep, shapes = spec.rpartition(":")
            if not sep or not name:
                raise InvalidInputError(f"--shapes {spec!r} is not like name:min,opt,max (e.g. input:1x3,8x3,32x3)")
            where = f"--shapes {spec!r}"
            parts = [parse_dims(s, where) for s in shapes.split(",")]
            if len(parts) == 1:
                parts = parts * 3
            if len(parts) != 3:
                raise InvalidInputError(f"{where} gives {len(parts)} shapes; give min,opt,max (or one fixed shape)")
            if name in result:
                raise InvalidInputError(f"--shapes names input {name!r} twice; give one profile per input")
            result[name] = check_profile(ShapeProfile(name, parts[0], parts[1], parts[2]))
    return result


def check_profile(profile: ShapeProfile) -> ShapeProfile:
    if not len(profile.min) == len(profile.opt) == len(profile.max):
        raise InvalidInputError(f"profile {profile.describe()}: min, opt and max have different ranks")
    for axis, (lo, mid, hi) in enumerate(zip(profile.min, profile.opt, profile.max, strict=True)):
        if not lo <= mid <= hi:
            raise InvalidInputError(
                f"profile {profile.describe()}: axis {axis} needs min <= opt <= max, got {lo}, {mid}, {hi}"
            )
    return profile


def derive_profiles(
    inputs: Sequence[TensorSpec], max_batch: int, given: Mapping[str, ShapeProfile] | None = None
) -> tuple[ShapeProfile, ...]:
    """One profile per input: the given one (checked against the model), else from the batch axis.

    Default: batch axis min 1, opt ``max_batch // 2`` (the size dynamic batching tends to form),
    max ``max_batch``; other axes must be static, or named in ``--shapes``.
    """
    given = dict(given or {})
    names = [spec.name for spec in inputs]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise InvalidInputError(f"--shapes names {unknown}, which the model does not have; its inputs are {names}")
    profiles = []
    for spec in inputs:
        if spec.name in given:
            profiles.append(_check_against_model(given[spec.name], spec, max_batch))
        else:
            profiles.append(_default_profile(spec, max_batch))
    return tuple(profiles)


def _check_against_model(profile: ShapeProfile, spec: TensorSpec, max_batch: int) -> ShapeProfile:
    model = spec.numeric_shape
    if len(profile.min) != len(model):
        raise InvalidInputError(
            f"--shapes {profile.describe()} has rank {len(profile.min)}; input {spec.describe()} has rank {len(model)}"
        )
    for axis, dim in enumerate(model):
        if dim >= 0 and not profile.min[axis] == profile.opt[axis] == profile.max[axis] == dim:
            raise InvalidInputError(
                f"--shapes {profile.describe()}: axis {axis} of input {spec.describe()} is fixed at {dim}"
            )
    if max_batch > 0 and profile.max[0] > max_batch:
        raise InvalidInputError(
            f"--shapes {profile.describe()}: batch max {profile.max[0]} exceeds --max-batch {max_batch}; "
            "raise --max-batch or lower the profile"
        )
    return profile


def _default_profile(spec: TensorSpec, max_batch: int) -> ShapeProfile:
    model = spec.numeric_shape
    dynamic = [axis for axis, dim in enumerate(model) if dim < 0 and not (axis == 0 and max_batch > 0)]
    if dynamic:
        raise InvalidInputError(
            f"input {spec.describe()} has dynamic axes {dynamic} besides the batch axis; declare their range "
            f"with --shapes NAME:MIN,OPT,MAX, e.g. --shapes {spec.name}:{_example(model, max_batch)}"
        )
    if max_batch <= 0:
        shape = tuple(model)
        return ShapeProfile(spec.name, shape, shape, shape)
    rest = tuple(model[1:])
    return ShapeProfile(spec.name, (1, *rest), (max(1, max_batch // 2), *rest), (max_batch, *rest))


def _example(model: tuple[int, ...], max_batch: int) -> str:
    def dims(batch: int, free: int) -> str:
        picked = (batch if i == 0 and max_batch > 0 else (d if d >= 0 else free) for i, d in enumerate(model))
        return "x".join(str(d) for d in picked)

    return f"{dims(1, 1)},{dims(max(1, max_batch // 2), 64)},{dims(max(1, max_batch), 128)}"


def make_settings(
    precision: str,
    profiles: tuple[ShapeProfile, ...],
    options: TensorRTOptions,
    *,
    timing_cache: Path | None = None,
    tensorrt_version: str | None = None,
) -> PlanSettings:
    """PlanSettings for one precision; ``options`` were checked when made, this checks what needs the
    precision, the profiles or the TensorRT version."""
    if precision not in PLAN_PRECISIONS:
        raise InvalidInputError(f"a plan's precision must be one of {list(PLAN_PRECISIONS)}, got {precision!r}")
    major = trt_major(tensorrt_version)
    if options.int8_mode == "calibrator" and major is not None and major >= 11:
        raise InvalidInputError(
            f"TensorRT {tensorrt_version} removed INT8 calibrators; use explicit Q/DQ (int8 mode 'qdq')"
        )
    if not profiles:
        raise InvalidInputError("a plan needs at least one input profile")
    return PlanSettings(
        precision,
        profiles,
        options.workspace_mb,
        options.opt_level,
        options.hardware_compat,
        options.version_compat,
        options.int8_mode,
        timing_cache,
    )


def timing_cache_path(repo: Path) -> Path:
    """The timing cache kept beside the model repository and reused by every build."""
    return repo.resolve().parent / TIMING_CACHE


# ---------------------------------------------------------------- manifest and config


def plan_filenames(targets: Sequence[GpuInfo]) -> dict[str, str]:
    """compute capability -> plan file: ``model.plan`` for the first GPU kind (Triton's default file),
    ``model_cc8.9.plan`` for each further kind."""
    names: dict[str, str] = {}
    for gpu in targets:
        if not _CC.match(gpu.cc):
            raise InvalidInputError(f"GPU {gpu.index} ({gpu.name}) has compute capability {gpu.cc!r}, not like 8.0")
        names.setdefault(gpu.cc, "model.plan" if not names else f"model_cc{gpu.cc}.plan")
    return names


def build_targets(gpus: Sequence[GpuInfo]) -> tuple[GpuInfo, ...]:
    """The GPUs to build on: the first of each distinct compute capability."""
    seen: dict[str, GpuInfo] = {}
    for gpu in gpus:
        if gpu.compute_capability is None:
            raise MissingDependencyError(
                f"GPU {gpu.index} ({gpu.name}) reports no compute capability; update the NVIDIA driver"
            )
        seen.setdefault(gpu.cc, gpu)
    return tuple(seen.values())


def cc_model_filenames(plans: Mapping[str, str]) -> dict[str, str]:
    """Triton's ``cc_model_filenames`` (compute capability -> plan file) when there are several plans."""
    for cc in plans:
        if not _CC.match(cc):
            raise InvalidInputError(f"compute capability {cc!r} is not like 8.0")
    if len(set(plans.values())) != len(plans):
        raise InvalidInputError(f"two compute capabilities share one plan file: {dict(plans)}")
    return dict(sorted(plans.items())) if len(plans) > 1 else {}


@dataclass(frozen=True)
class BuiltPlan:
    """One plan as built: where, for which GPU, how long it took."""

    file: str
    gpu: str
    compute_capability: str
    build_seconds: float
    layers_file: str | None = None


def plan_manifest(tensorrt_version: str, settings: PlanSettings, plans: Sequence[BuiltPlan]) -> dict[str, Any]:
    """The ``build.tensorrt`` section of kiln.json: enough to refuse a plan on the wrong machine."""
    return {
        "version": tensorrt_version,
        "precision": settings.precision,
        "strongly_typed": settings.strongly_typed,
        "int8_mode": settings.int8_mode if settings.precision == "int8" else None,
        "profiles": [
            {"name": p.name, "min": list(p.min), "opt": list(p.opt), "max": list(p.max)} for p in settings.profiles
        ],
        "workspace_mb": settings.workspace_mb,
        "opt_level": settings.opt_level,
        "hardware_compat": settings.hardware_compat,
        "version_compat": settings.version_compat,
        "plans": [asdict(p) for p in plans],
        "build_seconds": round(sum(p.build_seconds for p in plans), 3),
    }


def plan_tools(tensorrt_version: str, plans: Sequence[BuiltPlan]) -> dict[str, str]:
    """Entries for kiln.json ``tools``: TensorRT version, GPU names and compute capabilities."""
    return {
        "tensorrt": tensorrt_version,
        "gpu": ", ".join(sorted({p.gpu for p in plans})),
        "compute_capability": ", ".join(sorted({p.compute_capability for p in plans})),
    }
