"""Helpers for server tests: tiny real ONNX models, plain Triton repositories, and runner fakes.

The fakes wrap real ONNX Runtime runners (through ``RunnerFactory``, the server's injection point)
to add a known latency, block a load until released, or fail every k-th run.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from builders.model_config import ServingOptions, config_text, render_config
from builders.tensors import TensorSpec
from core.errors import InvalidInputError
from runtime.runner import Runner, RunnerSpec, create_runner

PAIR_SPECS = (
    (TensorSpec("x", "float32", (-1, 4)),),
    (TensorSpec("y", "float32", (-1, 4)), TensorSpec("z", "float32", (-1, 4))),
)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def make_pair_model(path: Path, offset: float = 1.0) -> Path:
    """x float32 [batch,4] -> y = x, z = x + offset (two outputs, to test requested outputs)."""
    nodes = [
        helper.make_node("Identity", ["x"], ["y"]),
        helper.make_node("Add", ["x", "c"], ["z"]),
    ]
    const = helper.make_tensor("c", TensorProto.FLOAT, [1], [offset])
    graph = helper.make_graph(
        nodes,
        "pair",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4]),
        ],
        [const],
    )
    return _save(graph, path)


def make_identity_model(path: Path, width: int = 16) -> Path:
    """The trivial model for overhead and ceiling measurements: y = x, float32 [batch,width]."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
    )
    return _save(graph, path)


def make_string_model(path: Path) -> Path:
    """BYTES in, BYTES out: s string [2] -> t = s (no batch axis)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"])],
        "words",
        [helper.make_tensor_value_info("s", TensorProto.STRING, [2])],
        [helper.make_tensor_value_info("t", TensorProto.STRING, [2])],
    )
    return _save(graph, path)


def write_model(
    repo: Path,
    name: str,
    versions: dict[int, Path],
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    options: ServingOptions,
    *,
    target: str = "ort",
) -> Path:
    """A plain Triton model directory (no kiln.json), as any Triton user would write it."""
    model_dir = repo / name
    model_dir.mkdir(parents=True, exist_ok=True)
    config = render_config(name, target, inputs, outputs, options)
    (model_dir / "config.pbtxt").write_text(config_text(config))
    for version, artifact in versions.items():
        (model_dir / str(version)).mkdir(exist_ok=True)
        shutil.copyfile(artifact, model_dir / str(version) / config.default_model_filename)
    return model_dir


class _DelayedRunner:
    def __init__(self, inner: Runner, delay_s: float, fail_every: int, lock: threading.Lock, counter: list[int]):
        self._inner, self._delay_s, self._fail_every = inner, delay_s, fail_every
        self._lock, self._counter = lock, counter

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            self._counter[0] += 1
            self._counter[1] += 1
            self._counter[2] = max(self._counter[2], self._counter[1])
            n = self._counter[0]
        try:
            time.sleep(self._delay_s)
            if self._fail_every and n % self._fail_every == 0:
                raise InvalidInputError(f"injected failure on run {n}")
            return self._inner.run(inputs)
        finally:
            with self._lock:
                self._counter[1] -= 1

    def close(self) -> None:
        self._inner.close()


class DelayFactory:
    """Real runners plus ``delay_s`` per run; optionally every ``fail_every``-th run fails."""

    def __init__(self, delay_s: float, *, fail_every: int = 0) -> None:
        self.delay_s, self.fail_every = delay_s, fail_every
        self._lock = threading.Lock()
        self._counter = [0, 0, 0]  # runs, running now, most running at once
        self.specs: list[RunnerSpec] = []

    @property
    def runs(self) -> int:
        return self._counter[0]

    @property
    def most_concurrent(self) -> int:
        return self._counter[2]

    def __call__(self, spec: RunnerSpec) -> Runner:
        self.specs.append(spec)
        return _DelayedRunner(create_runner(spec), self.delay_s, self.fail_every, self._lock, self._counter)


class BlockingFactory:
    """Loading a model named in ``blocked`` waits until ``release`` (to observe the LOADING state)."""

    def __init__(self, blocked: set[str]) -> None:
        self.blocked = blocked
        self.started = threading.Event()
        self._release = threading.Event()

    def release(self) -> None:
        self._release.set()

    def __call__(self, spec: RunnerSpec) -> Runner:
        if spec.model in self.blocked:
            self.started.set()
            self._release.wait(timeout=30)
        return create_runner(spec)
