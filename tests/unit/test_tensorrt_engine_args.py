"""The translation of PlanSettings into Polygraphy's CreateConfig arguments, without TensorRT.

``tensorrt`` and ``polygraphy.backend.trt`` are stood in for by tiny namespaces carrying only the
names the translation reads, so a wrong keyword or a dropped setting fails here on any machine.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from builders.request import TensorRTOptions
from builders.tensorrt_plan import derive_profiles, make_settings
from builders.tensors import TensorSpec
from core.errors import InvalidInputError
from runtime.tensorrt.engine import calibrator_arguments, config_arguments

INPUT = TensorSpec("input", "float32", ("batch", 1, 8, 8))


class FakeProfile(dict):
    def add(self, name: str, min: Any, opt: Any, max: Any) -> FakeProfile:
        self[name] = (tuple(min), tuple(opt), tuple(max))
        return self


TRT = SimpleNamespace(
    MemoryPoolType=SimpleNamespace(WORKSPACE="workspace"),
    ProfilingVerbosity=SimpleNamespace(DETAILED="detailed"),
    HardwareCompatibilityLevel=SimpleNamespace(AMPERE_PLUS="ampere+", SAME_COMPUTE_CAPABILITY="same-cc"),
    __version__="10.3.0",
)
PTRT = SimpleNamespace(Profile=FakeProfile)


def settings(tmp_path: Path, **options: Any) -> Any:
    return make_settings(
        "fp16", derive_profiles((INPUT,), 16), TensorRTOptions(**options), timing_cache=tmp_path / "t.cache"
    )


def test_profiles_pool_level_and_timing_cache(tmp_path: Path) -> None:
    (tmp_path / "t.cache").write_bytes(b"cache")
    args = config_arguments(TRT, PTRT, settings(tmp_path, workspace_mb=256, opt_level=5), None)
    assert args["profiles"] == [{"input": ((1, 1, 8, 8), (8, 1, 8, 8), (16, 1, 8, 8))}]
    assert args["memory_pool_limits"] == {"workspace": 256 << 20}
    assert args["builder_optimization_level"] == 5
    assert args["load_timing_cache"] == str(tmp_path / "t.cache")
    assert "hardware_compatibility_level" not in args and "version_compatible" not in args and "int8" not in args


def test_missing_timing_cache_is_not_loaded_and_compatibility_flags_pass_through(tmp_path: Path) -> None:
    args = config_arguments(TRT, PTRT, settings(tmp_path, hardware_compat="ampere_plus", version_compat=True), None)
    assert "load_timing_cache" not in args
    assert args["hardware_compatibility_level"] == "ampere+" and args["version_compatible"] is True


def test_calibrator_mode_needs_a_cache_and_calibrator_classes() -> None:
    with pytest.raises(InvalidInputError, match="needs Kiln's calibration cache"):
        calibrator_arguments(TRT, PTRT, None)
    with pytest.raises(InvalidInputError, match="has no INT8 calibrators"):
        calibrator_arguments(TRT, PTRT, b"TRT-10030-EntropyCalibration2\n")
