"""The dynamic batcher on its own: gathering, compatibility, scatter, failure isolation."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from core.errors import InvalidInputError, KilnError, UnavailableError
from server.batching import Batcher, BatchPolicy

Arrays = dict[str, np.ndarray]


class RecordingModel:
    """y = 2x; records the batch sizes it saw; optionally slow or failing."""

    def __init__(self, delay_s: float = 0.0, fail_when: int | None = None) -> None:
        self.batches: list[int] = []
        self.delay_s, self.fail_when = delay_s, fail_when
        self._lock = threading.Lock()

    def __call__(self, inputs: Arrays) -> Arrays:
        with self._lock:
            self.batches.append(int(inputs["x"].shape[0]))
        time.sleep(self.delay_s)
        if self.fail_when is not None and inputs["x"].shape[0] == self.fail_when:
            raise InvalidInputError("model refused this batch")
        return {"y": inputs["x"] * 2}


def run_requests(model: RecordingModel, policy: BatchPolicy, requests: list[Arrays], instances: int = 1) -> list:
    async def scenario() -> list:
        executions: list[int] = []
        with ThreadPoolExecutor(instances) as executor:
            batcher = Batcher(model, executor, instances, policy, lambda size, *_: executions.append(size))
            results = await asyncio.gather(*(batcher.submit(r) for r in requests), return_exceptions=True)
            await batcher.close()
        return list(results)

    return asyncio.run(scenario())


DYNAMIC = BatchPolicy(max_batch_size=8, dynamic=True, preferred=(8,), max_queue_delay_ns=50_000_000)


def test_requests_are_gathered_and_scattered_in_order() -> None:
    model = RecordingModel(delay_s=0.01)
    requests = [{"x": np.full((1 + i % 2, 3), float(i), np.float32)} for i in range(6)]
    results = run_requests(model, DYNAMIC, requests)
    for request, (outputs, timing) in zip(requests, results, strict=True):
        np.testing.assert_array_equal(outputs["y"], request["x"] * 2)
        assert timing.batch_size >= outputs["y"].shape[0]
    assert sum(model.batches) == 9 and len(model.batches) < 6


def test_max_batch_size_is_never_exceeded() -> None:
    model = RecordingModel(delay_s=0.005)
    results = run_requests(model, DYNAMIC, [{"x": np.ones((3, 3), np.float32)} for _ in range(7)])
    assert all(not isinstance(r, BaseException) for r in results)
    assert max(model.batches) <= 8 and sum(model.batches) == 21


def test_different_shapes_are_never_concatenated() -> None:
    model = RecordingModel(delay_s=0.005)
    requests = [{"x": np.ones((1, 3 + i % 2), np.float32)} for i in range(6)]
    results = run_requests(model, DYNAMIC, requests)
    for request, (outputs, _) in zip(requests, results, strict=True):
        assert outputs["y"].shape == request["x"].shape


def test_without_dynamic_batching_each_request_runs_alone() -> None:
    model = RecordingModel(delay_s=0.002)
    policy = BatchPolicy(max_batch_size=8, dynamic=False)
    run_requests(model, policy, [{"x": np.ones((2, 3), np.float32)} for _ in range(5)])
    assert model.batches == [2, 2, 2, 2, 2]


def test_a_failing_batch_fails_only_its_own_requests() -> None:
    model = RecordingModel(fail_when=5)
    policy = BatchPolicy(max_batch_size=8, dynamic=False)
    results = run_requests(model, policy, [{"x": np.ones((n, 3), np.float32)} for n in (1, 5, 2)])
    assert isinstance(results[1], InvalidInputError)
    assert results[0][0]["y"].shape == (1, 3) and results[2][0]["y"].shape == (2, 3)


def test_non_batch_output_is_a_clear_error() -> None:
    def bad(inputs: Arrays) -> Arrays:
        time.sleep(0.01)
        return {"y": np.zeros((1,), np.float32)}

    async def scenario() -> list:
        with ThreadPoolExecutor(1) as executor:
            batcher = Batcher(bad, executor, 1, DYNAMIC, lambda *_: None)
            first = asyncio.ensure_future(batcher.submit({"x": np.ones((1, 3), np.float32)}))
            await asyncio.sleep(0)
            rest = [batcher.submit({"x": np.ones((1, 3), np.float32)}) for _ in range(3)]
            results = await asyncio.gather(first, *rest, return_exceptions=True)
            await batcher.close()
        return list(results)

    results = asyncio.run(scenario())
    errors = [r for r in results if isinstance(r, KilnError)]
    assert errors and "not the batch axis" in str(errors[0])


def test_closed_batcher_refuses_new_requests() -> None:
    async def scenario() -> None:
        with ThreadPoolExecutor(1) as executor:
            batcher = Batcher(RecordingModel(), executor, 1, DYNAMIC, lambda *_: None)
            await batcher.close()
            await batcher.submit({"x": np.ones((1, 3), np.float32)})

    with pytest.raises(UnavailableError, match="unloading"):
        asyncio.run(scenario())


def test_policy_from_config_target() -> None:
    assert BatchPolicy(max_batch_size=32, dynamic=True, preferred=(16, 32)).target == 32
    assert BatchPolicy(max_batch_size=8, dynamic=True, preferred=(16,)).target == 8


def test_fast_model_runs_inline_even_when_the_executor_is_slow() -> None:
    """The run-time average that decides inline vs executor must not include the thread hop."""
    policy = BatchPolicy(max_batch_size=8, dynamic=False)
    request = {"x": np.ones((1, 3), np.float32)}

    async def scenario() -> float:
        with ThreadPoolExecutor(1) as executor:
            batcher = Batcher(RecordingModel(), executor, 1, policy, lambda *_: None, inline_below_ns=20_000_000)
            executor.submit(time.sleep, 0.1)  # the first run waits 100 ms for the busy executor (> 20 ms)
            await batcher.submit(request)
            executor.submit(time.sleep, 1.0)  # busy again: a second run through it would wait 1 s
            started = time.perf_counter()
            await batcher.submit(request)
            elapsed = time.perf_counter() - started
            await batcher.close()
        return elapsed

    assert asyncio.run(scenario()) < 0.5
