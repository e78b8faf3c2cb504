"""The TensorRT runner: a published plan behind Kiln's ``Runner`` contract, on Polygraphy's ``TrtRunner``.

Used by ``kiln serve`` on a GPU host without Triton and by ``kiln build --target tensorrt`` to
validate the plans it built, so the latency validated is the latency served. Engine
deserialization, execution context, device buffers and CUDA streams are Polygraphy's tested code
(NVIDIA's); Kiln adds the checks around it: the plan's ``kiln.json`` against this machine
(TensorRT version, GPU) before loading, the plan file chosen for this GPU's compute capability,
inputs within the plan's profile, and errors that say what to do.

``tensorrt`` and ``polygraphy.backend.trt`` are imported inside functions only: this module imports
on any machine, and constructing a runner without them raises MissingDependencyError.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import InvalidInputError, KilnError, RepositoryError
from runtime.machine import MachineInfo, probe_machine
from runtime.tensorrt.engine import require_tensorrt, select_device
from runtime.tensorrt.plan import plan_for_here

logger = logging.getLogger(__name__)


class TensorRTRunner:
    """``run(inputs) -> outputs`` over one TensorRT execution context; ``close()`` frees the GPU."""

    def __init__(
        self,
        path: Path,
        *,
        device: int = 0,
        machine: MachineInfo | None = None,
        model: str = "",
        check_manifest: bool = True,
        probe: Callable[[], MachineInfo] = probe_machine,
    ) -> None:
        self.model = model or path.parent.parent.name
        plan_path = plan_for_here(path, machine or probe(), device) if check_manifest else path
        trt, ptrt = require_tensorrt()
        select_device(device)
        try:
            data = plan_path.read_bytes()
        except OSError as err:
            raise RepositoryError(f"model {self.model!r}: cannot read the plan {plan_path.name!r} ({err})") from err
        engine = ptrt.engine_from_bytes(data)
        if engine is None:
            raise RepositoryError(
                f"model {self.model!r}: TensorRT {trt.__version__} cannot deserialize {plan_path.name!r} "
                "(built by another TensorRT version or for another GPU?); rebuild it here with kiln build"
            )
        self._engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = tuple(n for n in names if is_input[n])
        self.output_names = tuple(n for n in names if not is_input[n])
        self._runner: Any = ptrt.TrtRunner(engine, name=f"kiln-{self.model}")
        self._runner.activate()
        self._closed = False

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Execute once on this runner's stream; every output comes back as a host array."""
        if self._closed:
            raise KilnError(f"model {self.model!r}: its TensorRT runner was closed; load the model again")
        missing = sorted(set(self.input_names) - set(inputs))
        if missing:
            raise InvalidInputError(f"model {self.model!r} needs inputs {missing}; got {sorted(inputs)}")
        for name in self.input_names:
            self._check_profile(name, tuple(int(d) for d in inputs[name].shape))
        try:
            outputs = self._runner.infer({n: inputs[n] for n in self.input_names}, check_inputs=True)
        except Exception as err:  # Polygraphy raises its own errors for bad shapes/dtypes and CUDA failures
            raise KilnError(f"model {self.model!r}: TensorRT execution failed: {err}") from err
        return {name: np.asarray(outputs[name]) for name in self.output_names}

    def _check_profile(self, name: str, shape: tuple[int, ...]) -> None:
        low, _, high = (tuple(int(d) for d in s) for s in self._engine.get_tensor_profile_shape(name, 0))
        if len(shape) != len(low) or any(not lo <= d <= hi for d, lo, hi in zip(shape, low, high, strict=True)):
            raise InvalidInputError(
                f"model {self.model!r}: input {name!r} shape {list(shape)} is outside the plan's profile "
                f"(min {list(low)}, max {list(high)}); rebuild with wider --shapes"
            )

    def close(self) -> None:
        """Free the execution context and device memory; the runner cannot run afterwards."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._runner.deactivate()
        self._runner = None
        self._engine = None
