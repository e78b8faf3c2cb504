"""Embedded TensorRT runner for ``kiln serve`` on a GPU host without Triton.

With ``engine``, the only code importing tensorrt and pycuda, and only inside functions: this module
imports on any machine, and constructing a runner without them raises MissingDependencyError.

One runner = one model instance: a deserialized engine, its own execution context, CUDA stream,
device buffers and pinned host buffers (grown on demand), ``set_input_shape`` for dynamic shapes,
async copies, and optionally one CUDA graph per input-shape signature (``cuda-python`` needed).
Before loading, the plan's ``kiln.json`` is checked against this machine (TensorRT version, GPU),
and the plan built for this GPU's compute capability is chosen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from core.errors import InvalidInputError, KilnError, MissingDependencyError, RepositoryError
from runtime.machine import INSTALL_HINT, MachineInfo, probe_machine
from runtime.tensorrt.plan import plan_for_here

logger = logging.getLogger(__name__)

Shapes = tuple[tuple[str, tuple[int, ...]], ...]


def _import_gpu_stack() -> tuple[ModuleType, ModuleType]:
    try:
        import tensorrt
    except (ImportError, OSError) as err:
        raise MissingDependencyError(f"TensorRT is not importable here ({err}); {INSTALL_HINT}") from err
    try:
        import pycuda.driver as cuda
    except (ImportError, OSError) as err:
        raise MissingDependencyError(f"pycuda is not importable here ({err}); {INSTALL_HINT}") from err
    return tensorrt, cuda


def _cudart() -> Any | None:
    """cuda-python's runtime bindings (for CUDA graphs), or None."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6 layout
        except ImportError:
            return None
    return runtime


class TensorRTRunner:
    """``run(inputs) -> outputs`` over one TensorRT execution context; ``close()`` frees the GPU."""

    def __init__(
        self,
        path: Path,
        *,
        device: int = 0,
        cuda_graphs: bool = False,
        machine: MachineInfo | None = None,
        model: str = "",
        check_manifest: bool = True,
        probe: Callable[[], MachineInfo] = probe_machine,
    ) -> None:
        self.model = model or path.parent.parent.name
        plan_path = plan_for_here(path, machine or probe(), device) if check_manifest else path
        trt, cuda = _import_gpu_stack()
        self._trt, self._cuda = trt, cuda
        cuda.init()
        self._context_gpu = cuda.Device(device).retain_primary_context()
        self._context_gpu.push()
        try:
            self._load(plan_path, cuda_graphs)
        finally:
            self._context_gpu.pop()

    def _load(self, plan_path: Path, cuda_graphs: bool) -> None:
        trt = self._trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        try:
            data = plan_path.read_bytes()
        except OSError as err:
            raise RepositoryError(f"model {self.model!r}: cannot read {str(plan_path)!r} ({err})") from err
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            raise RepositoryError(
                f"model {self.model!r}: TensorRT {trt.__version__} cannot deserialize {str(plan_path)!r} "
                "(built by another TensorRT version or for another GPU?); rebuild it here with kiln build"
            )
        self._context = self._engine.create_execution_context()
        self._stream = self._cuda.Stream()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = tuple(n for n in names if is_input[n])
        self.output_names = tuple(n for n in names if not is_input[n])
        self._dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        self._device: dict[str, Any] = {}
        self._capacity: dict[str, int] = {}
        self._pinned: dict[str, np.ndarray] = {}
        self._host: dict[str, np.ndarray] = {}
        self._cudart = _cudart() if cuda_graphs else None
        if cuda_graphs and self._cudart is None:
            logger.warning("CUDA graphs need cuda-python (pip install cuda-python); running without them")
        self._graphs: dict[Shapes, Any] = {}
        self._closed = False

    # ---------------------------------------------------------------- running

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy inputs in, execute, copy every output back (synchronous for the caller)."""
        if self._closed:
            raise KilnError(f"model {self.model!r}: its TensorRT runner was closed; load the model again")
        missing = sorted(set(self.input_names) - set(inputs))
        if missing:
            raise InvalidInputError(f"model {self.model!r} needs inputs {missing}; got {sorted(inputs)}")
        self._context_gpu.push()
        try:
            shapes = self._set_shapes(inputs)
            self._bind(inputs)
            for name in self.input_names:
                self._cuda.memcpy_htod_async(self._device[name], self._host[name], self._stream)
            self._execute(shapes)
            for name in self.output_names:
                self._cuda.memcpy_dtoh_async(self._host[name], self._device[name], self._stream)
            self._stream.synchronize()
            return {name: self._host[name].copy() for name in self.output_names}
        finally:
            self._context_gpu.pop()

    def _set_shapes(self, inputs: dict[str, np.ndarray]) -> Shapes:
        shapes = []
        for name in self.input_names:
            shape = tuple(int(d) for d in inputs[name].shape)
            if not self._context.set_input_shape(name, shape):
                profile = self._engine.get_tensor_profile_shape(name, 0)
                raise InvalidInputError(
                    f"model {self.model!r}: input {name!r} shape {list(shape)} is outside the plan's profile "
                    f"(min {list(profile[0])}, max {list(profile[2])}); rebuild with wider --shapes"
                )
            shapes.append((name, shape))
        return tuple(shapes)

    def _bind(self, inputs: dict[str, np.ndarray]) -> None:
        """Size pinned host and device buffers for these shapes, fill inputs, set tensor addresses."""
        for name in (*self.input_names, *self.output_names):
            shape = tuple(self._context.get_tensor_shape(name))
            if name in inputs:
                shape = tuple(inputs[name].shape)
            self._ensure(name, shape)
            if name in inputs:
                self._host[name][...] = inputs[name]
            self._context.set_tensor_address(name, int(self._device[name]))

    def _ensure(self, name: str, shape: tuple[int, ...]) -> None:
        """Grow (never shrink) the device and pinned buffers; the host view takes this shape."""
        dtype = self._dtypes[name]
        count = int(np.prod(shape, dtype=np.int64))
        if self._capacity.get(name, -1) < count:
            old = self._device.pop(name, None)
            if old is not None:
                old.free()
            self._device[name] = self._cuda.mem_alloc(max(1, count) * dtype.itemsize)
            self._pinned[name] = self._cuda.pagelocked_empty(max(1, count), dtype)
            self._capacity[name] = count
            self._graphs.clear()  # captured graphs hold the old addresses
        self._host[name] = self._pinned[name][:count].reshape(shape)

    def _execute(self, shapes: Shapes) -> None:
        handle = self._stream.handle
        rt = self._cudart
        if rt is None:
            if not self._context.execute_async_v3(handle):
                raise KilnError(f"model {self.model!r}: TensorRT execution failed; see the TensorRT log")
            return
        graph = self._graphs.get(shapes)
        if graph is None:
            graph = self._capture(rt, handle)
            self._graphs[shapes] = graph
        _check(rt.cudaGraphLaunch(graph, handle), "cudaGraphLaunch")

    def _capture(self, rt: Any, handle: int) -> Any:
        """Capture one enqueue into a CUDA graph (after a plain run that settles shape-dependent state)."""
        self._context.execute_async_v3(handle)
        self._stream.synchronize()
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        _check(rt.cudaStreamBeginCapture(handle, mode), "cudaStreamBeginCapture")
        self._context.execute_async_v3(handle)
        graph = _check(rt.cudaStreamEndCapture(handle), "cudaStreamEndCapture")
        return _check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")

    def close(self) -> None:
        """Free device buffers and TensorRT objects; the runner cannot run afterwards."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._context_gpu.push()
        try:
            for buffer in self._device.values():
                buffer.free()
            self._device.clear()
            self._graphs.clear()
            self._context = None
            self._engine = None
        finally:
            self._context_gpu.pop()  # the primary context itself stays for other instances on this GPU


def _check(result: Any, call: str) -> Any:
    """cuda-python returns (error, value...) tuples; raise on a non-zero error."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        raise KilnError(f"{call} failed with CUDA error {int(error)}; run without CUDA graphs")
    return values[0] if values else None
