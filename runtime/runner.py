"""What every serving backend provides: ``run`` a batch of named arrays, ``close`` when unloaded.

``create_runner`` picks the backend for a config platform. TensorRT is imported only inside it, so
a machine without TensorRT still serves ONNX models; a plan then fails to load with one clear error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from core.errors import InvalidInputError, MissingDependencyError
from runtime.layout import ORT_PLATFORM, TENSORRT_PLATFORM

DEFAULT_INTRA_OP_THREADS = 1  # per instance; serving and validation both use it, so latencies agree


class Runner(Protocol):
    """One model instance: thread-confined, called by one worker thread at a time."""

    output_names: tuple[str, ...]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class RunnerSpec:
    """Everything a backend needs to create one instance of one model version."""

    model: str
    version: int
    platform: str
    artifact: Path
    intra_op_threads: int = DEFAULT_INTRA_OP_THREADS
    instance_index: int = 0


RunnerFactory = Callable[[RunnerSpec], Runner]


def create_runner(spec: RunnerSpec) -> Runner:
    """The backend for ``spec.platform``: ONNX Runtime, or TensorRT when it is installed."""
    if spec.platform == ORT_PLATFORM:
        from runtime.onnxruntime import OrtRunner

        return OrtRunner(spec.artifact, intra_op_threads=spec.intra_op_threads, model=spec.model)
    if spec.platform == TENSORRT_PLATFORM:
        return _tensorrt_runner(spec)
    raise InvalidInputError(
        f"model {spec.model!r} has platform {spec.platform!r}; kiln serve runs "
        f"{ORT_PLATFORM!r} and {TENSORRT_PLATFORM!r} (serve other platforms with Triton)"
    )


def _tensorrt_runner(spec: RunnerSpec) -> Runner:
    try:
        from runtime.tensorrt import runner as trt_backend
    except ImportError as err:
        raise MissingDependencyError(
            f"model {spec.model!r} version {spec.version} is a TensorRT plan and this Kiln has no TensorRT "
            f"backend ({err}); on a CUDA host run: pip install 'kiln-serve[tensorrt]'"
        ) from err
    return trt_backend.TensorRTRunner(spec.artifact, model=spec.model)
