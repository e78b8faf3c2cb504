"""What a build was asked to do: the request, its typed options and its result.

Pure data at the bottom of ``builders``: every other build module may import this one, and it
imports no build step. Each default lives here once (the CLI reads its defaults from these
classes); values are checked when an object is made, so a bad flag fails before any work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builders.inspection import ModelInfo
from builders.memory_budget import DEFAULT_CALIB_MEMORY
from builders.repository import Published
from builders.thresholds import DEFAULT_PERCENTILE, METHODS
from builders.validate import DEFAULT_MAX_DROP, METRICS, GateSettings
from core.errors import InvalidInputError
from runtime.tensorrt.plan import HARDWARE_COMPAT, INT8_MODES

PRECISIONS = ("fp32", "fp16", "int8", "auto")
INT8_QUANT_MODES = ("static", "dynamic")
CALIB_METHODS = (*METHODS, "auto")
TARGETS = ("ort", "tensorrt")
MAX_INSTANCES = 128  # instance_group count; beyond this a typo exhausts the serving machine's memory
DEFAULT_REPO = Path("model_repository")
DEFAULT_MAX_NEW_TOKENS = 512  # a decoder's bound on max_tokens per request


@dataclass(frozen=True)
class Int8Options:
    """Calibration, evaluation and gate settings of INT8 and ``auto`` builds (and of gated plans)."""

    calib: Path | None = None
    calib_method: str = "auto"  # a threshold method, or auto: each one tried and validated, the best kept
    percentile: float = DEFAULT_PERCENTILE
    eval: Path | None = None
    max_drop: float = DEFAULT_MAX_DROP
    metric: str | None = None
    skip_gate: bool = False
    amax_scale: float = 1.0  # != 1 only to demonstrate the gate (a deliberately bad calibration)
    cache_dir: Path | None = None
    preprocess: str | None = None
    calib_batch: int = 32  # the largest calibration batch; --calib-memory may choose a smaller one
    calib_memory: int = DEFAULT_CALIB_MEMORY  # bytes of activations one calibration/validation batch may hold
    repeats: int = 30
    eval_fraction: float = 0.3
    eval_batch: int = 64  # samples per validation run; int8 builds lower it to fit --calib-memory
    mode: str = "static"  # "static": calibrated activation ranges; "dynamic": ranges per run (ORT only)
    allow_slower: bool = False  # quantize ops measured slower in INT8, and publish an INT8 slower than FP32
    equalize: bool = False  # cross-layer equalization of conv pairs before calibration
    keep_float: tuple[str, ...] = ()  # "first", "last" (compute layers) and/or node names left in float
    smoothquant: bool = False  # static INT8 for transformers: SmoothQuant, Q/DQ on weight MatMul/Gemm inputs only

    def __post_init__(self) -> None:
        if self.calib_method not in CALIB_METHODS:
            raise InvalidInputError(f"--calib-method must be one of {list(CALIB_METHODS)}, got {self.calib_method!r}")
        if self.mode not in INT8_QUANT_MODES:
            raise InvalidInputError(f"--int8-mode must be one of {list(INT8_QUANT_MODES)}, got {self.mode!r}")
        if self.metric is not None and self.metric not in METRICS:
            raise InvalidInputError(f"--metric must be one of {list(METRICS)}, got {self.metric!r}")
        if not math.isfinite(self.max_drop) or self.max_drop < 0:
            raise InvalidInputError(f"--max-accuracy-drop must be a number >= 0, got {self.max_drop}")
        if not (math.isfinite(self.amax_scale) and self.amax_scale > 0):
            raise InvalidInputError(f"amax scale must be > 0, got {self.amax_scale}")
        if not 0 < self.eval_fraction < 1:
            raise InvalidInputError(f"eval fraction must be in (0, 1), got {self.eval_fraction}")
        if self.calib_memory < 1 << 20:
            raise InvalidInputError(f"--calib-memory must be at least 1 MiB, got {self.calib_memory} bytes")
        if self.smoothquant and self.mode == "dynamic":
            raise InvalidInputError(
                "--smoothquant is a static INT8 method (calibrated activation scales); drop --int8-mode dynamic "
                "or drop --smoothquant"
            )
        if self.calib_batch < 1 or self.repeats < 1:
            raise InvalidInputError(
                f"calibration batch and latency repeats must be >= 1, got {self.calib_batch} and {self.repeats}"
            )

    @property
    def gate(self) -> GateSettings:
        return GateSettings(
            metric=self.metric, max_drop=self.max_drop, repeats=self.repeats, batch_size=self.eval_batch
        )

    @property
    def has_data(self) -> bool:
        """Whether calibration or evaluation data was given (a gated FP32/FP16 plan needs only --eval)."""
        return self.calib is not None or self.eval is not None


@dataclass(frozen=True)
class TensorRTOptions:
    """``--target tensorrt`` settings; the plan-level checks that need the TensorRT version are in
    ``builders.tensorrt_plan.make_settings``."""

    shapes: tuple[str, ...] = ()
    workspace_mb: int = 1024
    opt_level: int = 3
    hardware_compat: str = "none"
    version_compat: bool = False
    int8_mode: str = "qdq"

    def __post_init__(self) -> None:
        if self.workspace_mb < 16:
            raise InvalidInputError(f"--workspace-mb must be >= 16, got {self.workspace_mb}")
        if not 0 <= self.opt_level <= 5:
            raise InvalidInputError(
                f"--opt-level must be 0..5 (TensorRT builder optimization level), got {self.opt_level}"
            )
        if self.hardware_compat not in HARDWARE_COMPAT:
            raise InvalidInputError(
                f"--hardware-compat must be one of {list(HARDWARE_COMPAT)}, got {self.hardware_compat!r}"
            )
        if self.int8_mode not in INT8_MODES:
            raise InvalidInputError(f"int8 mode must be one of {list(INT8_MODES)}, got {self.int8_mode!r}")


@dataclass(frozen=True)
class DecoderOptions:
    """``kiln build --decoder`` settings."""

    tokenizer: Path | None = None  # a tokenizer.json; None: byte-level (token id = UTF-8 byte)
    max_context: int | None = None  # None: the ONNX metadata max_position_embeddings
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop_token_ids: tuple[int, ...] = ()
    check_tokens: int = 16  # tokens generated per check prompt when comparing candidate and source

    def __post_init__(self) -> None:
        if self.max_context is not None and self.max_context < 2:
            raise InvalidInputError(f"--max-context must be >= 2 tokens, got {self.max_context}")
        if self.max_new_tokens < 1:
            raise InvalidInputError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.tokenizer is not None and not self.tokenizer.is_file():
            raise InvalidInputError(f"--tokenizer {str(self.tokenizer)!r} is not a file; give a tokenizer.json")


@dataclass(frozen=True)
class BuildRequest:
    """Everything ``kiln build`` was asked to do; ``builders.pipeline.check_request`` validates it."""

    model: Path
    name: str
    precision: str = "fp32"
    target: str = "ort"
    repo: Path = DEFAULT_REPO
    max_batch: int | None = None
    instances: int = 1
    int8: Int8Options = field(default_factory=Int8Options)
    tensorrt: TensorRTOptions = field(default_factory=TensorRTOptions)
    keep_versions: str | None = None  # --keep-versions for a new model (None: 2, or an existing model's own)
    decoder: DecoderOptions | None = None  # a decoder with KV cache, served token by token

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
