"""Build one TensorRT plan from a prepared ONNX file, through Polygraphy's TensorRT loaders.

Every decision (profiles, pool size, optimization level, compatibility, INT8 mode) arrives made
in a ``PlanSettings`` (``builders/tensorrt_plan.py``, tested on the CPU). This module only hands
it to NVIDIA's own tested loaders (``NetworkFromOnnxPath`` -> ``CreateConfig`` with a
``Profile`` and the timing cache -> ``EngineBytesFromNetwork``), for TensorRT 10 and 11:

* strongly typed network: precision comes from the ONNX graph (FP16-converted, or Q/DQ with
  Kiln's scales), the TensorRT 11 way;
* TensorRT 10 only, ``int8_mode="calibrator"``: FP32 ONNX + the INT8 builder flag + a calibrator
  that serves Kiln's calibration cache and never asks for data.

``tensorrt`` and ``polygraphy.backend.trt`` are imported inside functions only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from core.atomic_file import write_atomic
from core.errors import InvalidInputError, KilnError, MissingDependencyError
from runtime.machine import INSTALL_HINT
from runtime.tensorrt.plan import HARDWARE_COMPAT, PlanSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineBuild:
    plan: Path
    layers: Path
    seconds: float
    tensorrt_version: str


def require_tensorrt() -> tuple[ModuleType, ModuleType]:
    """``tensorrt`` and ``polygraphy.backend.trt``, or MissingDependencyError naming what to install."""
    try:
        import tensorrt
    except (ImportError, OSError) as err:
        raise MissingDependencyError(f"TensorRT is not importable here ({err}); {INSTALL_HINT}") from err
    try:
        from polygraphy.backend import trt as polygraphy_trt
    except (ImportError, OSError) as err:
        raise MissingDependencyError(f"Polygraphy is not importable here ({err}); {INSTALL_HINT}") from err
    return tensorrt, polygraphy_trt


def select_device(device: int) -> None:
    """Make GPU ``device`` current for this thread (CUDA runtime, as loaded by Polygraphy)."""
    if device == 0:
        return  # the runtime's default device
    from polygraphy import cuda

    status = cuda.wrapper().handle.cudaSetDevice(int(device))
    if status != 0:
        raise KilnError(f"cudaSetDevice({device}) failed with CUDA error {status}; is GPU {device} visible?")


def build_engine(
    onnx_path: Path,
    settings: PlanSettings,
    out_dir: Path,
    *,
    plan_name: str = "model.plan",
    device: int = 0,
    calibration_cache: bytes | None = None,
) -> EngineBuild:
    """Parse ``onnx_path``, build and save ``plan_name`` and its layer JSON into ``out_dir``."""
    trt, ptrt = require_tensorrt()
    select_device(device)
    start = time.perf_counter_ns()
    network = ptrt.NetworkFromOnnxPath(str(onnx_path), strongly_typed=settings.strongly_typed)
    config = ptrt.CreateConfig(**config_arguments(trt, ptrt, settings, calibration_cache))
    timing_cache = str(settings.timing_cache) if settings.timing_cache is not None else None
    if settings.timing_cache is not None:
        settings.timing_cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        serialized = ptrt.EngineBytesFromNetwork(network, config=config, save_timing_cache=timing_cache)()
    except Exception as err:  # Polygraphy reports parser and builder failures as its own exceptions
        raise KilnError(
            f"TensorRT {trt.__version__} could not build a plan from {str(onnx_path)!r} (precision "
            f"{settings.precision}): {err}. Check the ops against TensorRT's ONNX support, or try --precision "
            "fp32, a larger --workspace-mb, wider --shapes, or --target ort"
        ) from err
    seconds = (time.perf_counter_ns() - start) / 1e9
    plan = out_dir / plan_name
    write_atomic(plan, bytes(serialized))
    layers = out_dir / (Path(plan_name).stem + ".layers.json")
    write_atomic(layers, layer_json(trt, ptrt, serialized).encode())
    logger.info("built %s in %.1f s with TensorRT %s", plan, seconds, trt.__version__)
    return EngineBuild(plan, layers, seconds, str(trt.__version__))


def config_arguments(
    trt: ModuleType, ptrt: ModuleType, settings: PlanSettings, calibration_cache: bytes | None
) -> dict[str, Any]:
    """``CreateConfig`` keyword arguments for ``settings`` (documented Polygraphy names)."""
    profile = ptrt.Profile()
    for shape in settings.profiles:
        profile.add(shape.name, min=shape.min, opt=shape.opt, max=shape.max)
    arguments: dict[str, Any] = {
        "profiles": [profile],
        "memory_pool_limits": {trt.MemoryPoolType.WORKSPACE: settings.workspace_mb << 20},
        "builder_optimization_level": settings.opt_level,
        "profiling_verbosity": trt.ProfilingVerbosity.DETAILED,  # layer JSON names tactics and precisions
    }
    if settings.timing_cache is not None and settings.timing_cache.is_file():
        arguments["load_timing_cache"] = str(settings.timing_cache)
    if settings.hardware_compat != "none":
        arguments["hardware_compatibility_level"] = getattr(
            trt.HardwareCompatibilityLevel, HARDWARE_COMPAT[settings.hardware_compat]
        )
    if settings.version_compat:
        arguments["version_compatible"] = True
    if not settings.strongly_typed:
        arguments.update(calibrator_arguments(trt, ptrt, calibration_cache))
    return arguments


def calibrator_arguments(trt: ModuleType, ptrt: ModuleType, cache: bytes | None) -> dict[str, Any]:
    """TensorRT 10 implicit INT8: the INT8 flag and a calibrator that only serves Kiln's cache."""
    if cache is None:
        raise InvalidInputError("--trt-int8 calibrator needs Kiln's calibration cache; pass --calib DATA")
    if not hasattr(trt, "IInt8EntropyCalibrator2"):
        raise InvalidInputError(
            f"TensorRT {trt.__version__} has no INT8 calibrators; use --trt-int8 qdq (explicit quantization)"
        )
    return {"int8": True, "calibrator": _cache_calibrator(trt, cache)}


def _cache_calibrator(trt: ModuleType, cache: bytes) -> Any:
    class KilnCacheCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[name-defined,misc]
        """Serves Kiln's entropy scales; asking for data means the cache was refused."""

        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._cache = cache

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list[str]) -> None:
            logger.error("TensorRT asked for calibration data: Kiln's cache was not accepted (version header?)")
            return None

        def read_calibration_cache(self) -> bytes:
            return self._cache

        def write_calibration_cache(self, cache: Any) -> None:
            return None

    return KilnCacheCalibrator()


def layer_json(trt: ModuleType, ptrt: ModuleType, serialized: Any) -> str:
    """The engine inspector's per-layer JSON (names, precisions, tactics)."""
    engine = ptrt.engine_from_bytes(serialized)
    if engine is None:
        raise KilnError("TensorRT built a plan it cannot deserialize; see the TensorRT log above")
    inspector = engine.create_engine_inspector()
    return str(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
