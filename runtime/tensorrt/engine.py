"""Build one TensorRT plan from a prepared ONNX file: the only builder code that imports tensorrt.

Every decision (profiles, pool size, optimization level, compatibility, INT8 mode) arrives made
in a ``PlanSettings`` (``builders/tensorrt_plan.py``, tested on the CPU); this module translates
it into documented TensorRT 10/11 Python calls and nothing more:

* strongly typed network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``): precision comes
  from the ONNX graph (FP16-converted, or Q/DQ with Kiln's scales) — the TensorRT 11 way;
* TensorRT 10 only, ``int8_mode="calibrator"``: FP32 ONNX + ``BuilderFlag.INT8`` + a calibrator
  that serves Kiln's calibration cache and never asks for data.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

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


def require_tensorrt() -> ModuleType:
    """The tensorrt module, or MissingDependencyError naming what to install."""
    try:
        import tensorrt
    except (ImportError, OSError) as err:
        raise MissingDependencyError(f"TensorRT is not importable here ({err}); {INSTALL_HINT}") from err
    return tensorrt


@contextmanager
def cuda_device(device: int) -> Iterator[None]:
    """Make GPU ``device``'s primary context current while TensorRT builds on it."""
    try:
        import pycuda.driver as cuda
    except (ImportError, OSError) as err:
        raise MissingDependencyError(f"pycuda is not importable here ({err}); {INSTALL_HINT}") from err
    cuda.init()
    context = cuda.Device(device).retain_primary_context()
    context.push()
    try:
        yield
    finally:
        context.pop()


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
    trt = require_tensorrt()
    with cuda_device(device):
        start = time.perf_counter_ns()
        trt_logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(trt_logger)
        network = builder.create_network(_network_flags(trt, settings))
        _parse(trt, network, trt_logger, onnx_path)
        config = _config(trt, builder, settings, calibration_cache)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise KilnError(
                f"TensorRT {trt.__version__} could not build a plan from {str(onnx_path)!r} "
                f"(precision {settings.precision}); the TensorRT log above says why. Try --precision fp32, "
                "a larger --workspace-mb, or wider --shapes"
            )
        seconds = (time.perf_counter_ns() - start) / 1e9
        if settings.timing_cache is not None:
            _save_timing_cache(config, settings.timing_cache)
        plan = out_dir / plan_name
        plan.write_bytes(memoryview(serialized))
        layers = out_dir / (Path(plan_name).stem + ".layers.json")
        layers.write_text(_layer_json(trt, trt_logger, serialized))
    logger.info("built %s in %.1f s with TensorRT %s", plan, seconds, trt.__version__)
    return EngineBuild(plan, layers, seconds, str(trt.__version__))


def _network_flags(trt: ModuleType, settings: PlanSettings) -> int:
    if not settings.strongly_typed:
        return 0
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)  # TensorRT 11 may drop the flag: always strongly typed


def _parse(trt: ModuleType, network: Any, trt_logger: Any, onnx_path: Path) -> None:
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        problems = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InvalidInputError(
            f"TensorRT's ONNX parser rejected {str(onnx_path)!r}: {problems or 'no details'}; check the ops "
            "against TensorRT's ONNX operator support, or build --target ort"
        )


def _config(trt: ModuleType, builder: Any, settings: PlanSettings, calibration_cache: bytes | None) -> Any:
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    config.builder_optimization_level = settings.opt_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer JSON names tactics and precisions
    profile = builder.create_optimization_profile()
    for shape in settings.profiles:
        profile.set_shape(shape.name, shape.min, shape.opt, shape.max)
    config.add_optimization_profile(profile)
    if settings.hardware_compat != "none":
        config.hardware_compatibility_level = getattr(
            trt.HardwareCompatibilityLevel, HARDWARE_COMPAT[settings.hardware_compat]
        )
    if settings.version_compat:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if settings.timing_cache is not None:
        data = settings.timing_cache.read_bytes() if settings.timing_cache.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(data), False)
    if not settings.strongly_typed:
        _use_calibrator(trt, config, profile, calibration_cache)
    return config


def _use_calibrator(trt: ModuleType, config: Any, profile: Any, cache: bytes | None) -> None:
    """TensorRT 10 implicit INT8: the INT8 flag and a calibrator that only serves Kiln's cache."""
    if cache is None:
        raise InvalidInputError("--trt-int8 calibrator needs Kiln's calibration cache; pass --calib DATA")
    if not hasattr(trt, "IInt8EntropyCalibrator2") or not hasattr(trt.BuilderFlag, "INT8"):
        raise InvalidInputError(
            f"TensorRT {trt.__version__} has no INT8 calibrators; use --trt-int8 qdq (explicit quantization)"
        )
    config.set_flag(trt.BuilderFlag.INT8)
    config.int8_calibrator = _cache_calibrator(trt, cache)
    config.set_calibration_profile(profile)


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


def _save_timing_cache(config: Any, path: Path) -> None:
    """Write the (possibly grown) timing cache atomically so the next build reuses it."""
    cache = config.get_timing_cache()
    if cache is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(memoryview(cache.serialize()))
    os.replace(tmp, path)


def _layer_json(trt: ModuleType, trt_logger: Any, serialized: Any) -> str:
    """The engine inspector's per-layer JSON (names, precisions, tactics)."""
    runtime = trt.Runtime(trt_logger)
    engine = runtime.deserialize_cuda_engine(serialized)
    if engine is None:
        raise KilnError("TensorRT built a plan it cannot deserialize; see the TensorRT log above")
    inspector = engine.create_engine_inspector()
    return str(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
