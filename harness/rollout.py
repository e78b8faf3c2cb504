"""Helpers for the rollout integration tests: a model repository with good and bad candidates,
a delay hook for the embedded server, and a bounded closed-loop load generator."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from tritonclient import grpc as triton

from builders.examples import example_model_path
from builders.pipeline import build_model
from builders.request import BuildRequest
from runtime.runner import Runner, RunnerSpec, create_runner
from server.app import ServerHandle, start_server
from server.bench.workers import WorkerLoad

SLOW_DELAY_S = 0.04


def flipped_model(path: Path) -> Path:
    """The example model with its logits negated: answers (argmax) disagree almost always."""
    model = onnx.load(str(example_model_path()))
    graph = model.graph
    out = graph.output[0].name
    for node in graph.node:
        node.output[:] = [f"{o}_pre" if o == out else o for o in node.output]
    graph.node.append(helper.make_node("Neg", [f"{out}_pre"], [out]))
    onnx.save(model, str(path))
    return path


def narrow_model(path: Path) -> Path:
    """A model expecting [N,1,4,4] inputs: the gateway's 8x8 requests fail with INVALID_ARGUMENT."""
    weights = helper.make_tensor("w", TensorProto.FLOAT, [16, 10], np.ones(160, np.float32).tolist())
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["logits"]),
        ],
        "narrow",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def build_repository(root: Path) -> Path:
    """digits-fp32-ort (baseline), next-fp32-ort (the same model rebuilt), slow-, flipped-, narrow-fp32-ort."""
    repo = root / "repo"
    example = example_model_path()
    sources = [
        ("digits", example),
        ("next", example),
        ("slow", example),
        ("flipped", flipped_model(root / "flipped.onnx")),
        ("narrow", narrow_model(root / "narrow.onnx")),
    ]
    for name, source in sources:
        build_model(BuildRequest(model=source, name=name, precision="fp32", target="ort", repo=repo))
    return repo


class _Delayed:
    def __init__(self, inner: Runner, delay_s: float) -> None:
        self._inner, self._delay_s = inner, delay_s

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(self._delay_s)
        return self._inner.run(inputs)

    def close(self) -> None:
        self._inner.close()


def delaying_runner_factory(spec: RunnerSpec) -> Runner:
    """The server's runner factory, with injected latency for models named ``slow-*``."""
    runner = create_runner(spec)
    return _Delayed(runner, SLOW_DELAY_S) if spec.model.startswith("slow") else runner


@dataclass
class LoadResult:
    """(start, end, ok) of every request, on the time.perf_counter_ns() clock in seconds."""

    calls: list[tuple[float, float, bool]] = field(default_factory=list)

    def errors(self) -> int:
        return sum(1 for _, _, ok in self.calls if not ok)


class Load(WorkerLoad):
    """Closed-loop load on a gateway model from ``threads`` clients; stops by itself after ``max_s``."""

    def __init__(self, address: str, model: str, threads: int = 2, max_s: float = 30.0) -> None:
        super().__init__(threads, max_s, join_s=10)
        self.address, self.model = address, model
        self.result = LoadResult()

    def _run(self, index: int) -> None:
        data = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
        client = triton.InferenceServerClient(self.address)
        tensor = triton.InferInput("input", [1, 1, 8, 8], "FP32")
        tensor.set_data_from_numpy(data)
        try:
            while self.running():
                began = time.perf_counter_ns() / 1e9
                try:
                    client.infer(self.model, [tensor], client_timeout=10.0)
                    ok = True
                except triton.InferenceServerException:
                    ok = False
                with self._lock:
                    self.result.calls.append((began, time.perf_counter_ns() / 1e9, ok))
        finally:
            client.close()


def serve_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """An embedded server with the rollout test models (for a module-scoped fixture)."""
    repo = build_repository(tmp_path_factory.mktemp("rollout-repo"))
    with start_server(repo, port=0, runner_factory=delaying_runner_factory) as server:
        yield server


def gateway_config(server: ServerHandle) -> dict[str, object]:
    """Route ``digits``: variant ``fp32`` at 100 %."""
    return {
        "upstreams": {"local": {"address": server.url}},
        "routes": {
            "digits": {"variants": [{"name": "fp32", "upstream": "local", "model": "digits-fp32-ort", "weight": 100}]}
        },
        "metrics": {"window_s": 30},
    }
