"""Dynamic batching and the LOADING state, with runners that add a known latency or block."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from tritonclient.utils import InferenceServerException

from builders.model_config import ServingOptions
from harness.serve import PAIR_SPECS, BlockingFactory, DelayFactory, make_pair_model, write_model
from server.app import ServerHandle, start_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("batching") / "repo"
    pair = make_pair_model(tmp_path_factory.mktemp("onnx") / "pair.onnx", offset=1.0)
    options = ServingOptions(max_batch_size=16, preferred_batch_sizes=(16,), max_queue_delay_us=20_000)
    write_model(root, "pair", {1: pair}, *PAIR_SPECS, options)
    return root


@pytest.fixture(scope="module")
def delayed(repo: Path) -> Iterator[tuple[ServerHandle, DelayFactory]]:
    factory = DelayFactory(0.02)
    handle = start_server(repo, runner_factory=factory)
    yield handle, factory
    handle.stop()


def test_dynamic_batching_batches_and_scatters(delayed: tuple[ServerHandle, DelayFactory], repo: Path) -> None:
    handle, factory = delayed
    xs = [np.full((1 + i % 3, 4), float(i), np.float32) for i in range(16)]

    async def scenario() -> list[np.ndarray]:
        async with tca.InferenceServerClient(handle.url) as client:

            async def one(x: np.ndarray) -> np.ndarray:
                tensor = tca.InferInput("x", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                result = await client.infer("pair", [tensor])
                return result.as_numpy("z")

            return list(await asyncio.gather(*(one(x) for x in xs)))

    runs_before = factory.runs
    outputs = asyncio.run(scenario())
    session = ort.InferenceSession(str(repo / "pair" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    for x, z in zip(xs, outputs, strict=True):
        np.testing.assert_array_equal(z, session.run(["z"], {"x": x})[0])
    with tc.InferenceServerClient(handle.url) as client:
        stats = client.get_inference_statistics("pair").model_stats[0]
    samples = sum(x.shape[0] for x in xs)
    assert stats.inference_count == samples
    assert stats.execution_count == factory.runs - runs_before
    assert stats.execution_count <= 6  # 32 samples in batches of <= 16, plus stragglers
    assert max(b.batch_size for b in stats.batch_stats) > 3


def test_different_shapes_are_not_batched_together(delayed: tuple[ServerHandle, DelayFactory]) -> None:
    handle, _ = delayed
    with tc.InferenceServerClient(handle.url) as client:
        before = client.get_inference_statistics("pair").model_stats[0].execution_count
    results: list[np.ndarray] = []

    def call(x: np.ndarray) -> None:
        with tc.InferenceServerClient(handle.url) as c:
            tensor = tc.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            results.append(c.infer("pair", [tensor]).as_numpy("y"))

    bad = np.zeros((2, 5), np.float32)  # rejected before batching, never disturbs the others
    threads = [threading.Thread(target=call, args=(np.full((2, 4), i, np.float32),)) for i in range(4)]
    for t in threads:
        t.start()
    with pytest.raises(InferenceServerException) as excinfo, tc.InferenceServerClient(handle.url) as c:
        tensor = tc.InferInput("x", [2, 5], "FP32")
        tensor.set_data_from_numpy(bad)
        c.infer("pair", [tensor])
    for t in threads:
        t.join(timeout=10)
    assert "INVALID_ARGUMENT" in str(excinfo.value.status())
    assert sorted(float(r[0, 0]) for r in results) == [0.0, 1.0, 2.0, 3.0]
    with tc.InferenceServerClient(handle.url) as client:
        after = client.get_inference_statistics("pair").model_stats[0]
    assert after.execution_count - before >= 1


def test_loading_model_is_unavailable(repo: Path) -> None:
    factory = BlockingFactory({"pair"})
    handle = start_server(repo, models=[], runner_factory=factory, model_control_mode="explicit")
    try:
        errors: list[BaseException] = []

        def load() -> None:
            try:
                with tc.InferenceServerClient(handle.url) as c:
                    c.load_model("pair")
            except BaseException as err:  # reported below
                errors.append(err)

        loader = threading.Thread(target=load)
        loader.start()
        assert factory.started.wait(timeout=10)
        with tc.InferenceServerClient(handle.url) as client:
            assert not client.is_model_ready("pair")
            tensor = tc.InferInput("x", [1, 4], "FP32")
            tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
            with pytest.raises(InferenceServerException) as excinfo:
                client.infer("pair", [tensor])
            assert "UNAVAILABLE" in str(excinfo.value.status()) and "loading" in excinfo.value.message()
            index = {m.name: m.state for m in client.get_model_repository_index().models}
            assert index["pair"] == "LOADING"
            factory.release()
            loader.join(timeout=30)
            assert errors == []
            assert client.is_model_ready("pair")
            np.testing.assert_array_equal(client.infer("pair", [tensor]).as_numpy("z"), np.full((1, 4), 2.0))
    finally:
        factory.release()
        handle.stop()


def test_instance_group_count_runs_instances_in_parallel(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    pair = make_pair_model(tmp_path / "pair.onnx")
    write_model(
        root, "pair2", {1: pair}, *PAIR_SPECS, ServingOptions(max_batch_size=8, instances=2, dynamic_batching=False)
    )
    factory = DelayFactory(0.2)
    with start_server(root, runner_factory=factory) as handle:
        assert [s.instance_index for s in factory.specs] == [0, 1]

        def call() -> None:
            with tc.InferenceServerClient(handle.url) as c:
                tensor = tc.InferInput("x", [1, 4], "FP32")
                tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
                c.infer("pair2", [tensor])

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
    assert factory.runs == 4 and factory.most_concurrent == 2
