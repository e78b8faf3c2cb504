"""Dynamic batching: gather compatible requests, run the model once, scatter the results.

One ``Batcher`` per served model version, on the server's event loop. Each instance of the model
is one worker thread; the batcher forms a batch only when an instance is free, so requests that
arrive while every instance is busy are batched together. A batch is dispatched as soon as it
reaches a preferred size (or max_batch_size), or when its oldest request has waited
``max_queue_delay``. One deliberate difference from Triton: when the model is idle and the previous
batch held a single request (low load), a lone request is dispatched at once instead of waiting
out the delay, so batching costs a single client nothing; under load the delay applies as usual.
Only requests whose inputs agree on names, dtypes and non-batch dims are concatenated;
requests are validated before they get here, so a bad one never joins a batch.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from core.errors import KilnError, UnavailableError

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int  # 0: the model has no batch axis, every request runs alone
    dynamic: bool
    preferred: tuple[int, ...] = ()
    max_queue_delay_ns: int = 0

    @classmethod
    def from_config(cls, config: mc.ModelConfig, *, dynamic: bool | None = None) -> BatchPolicy:
        """The policy config.pbtxt asks for (``dynamic`` overrides, for benchmarks)."""
        enabled = config.HasField("dynamic_batching") if dynamic is None else dynamic
        batching = config.dynamic_batching
        return cls(
            max_batch_size=int(config.max_batch_size),
            dynamic=bool(enabled and config.max_batch_size > 0),
            preferred=tuple(int(s) for s in batching.preferred_batch_size),
            max_queue_delay_ns=int(batching.max_queue_delay_microseconds) * 1000,
        )

    @property
    def target(self) -> int:
        """Dispatch without waiting once a batch holds this many samples."""
        fitting = [s for s in self.preferred if s <= self.max_batch_size]
        return max(fitting) if fitting else self.max_batch_size


@dataclass(frozen=True)
class Timing:
    """How one request was served: its wait in the queue and its batch's compute phases."""

    queue_ns: int
    compute_ns: tuple[int, int, int]  # input (concatenate), infer, output (scatter)
    batch_size: int


@dataclass(eq=False)  # identity: compared when removed from the queue
class _Pending:
    inputs: Arrays
    samples: int
    key: tuple[object, ...]
    future: asyncio.Future[tuple[Arrays, Timing]]
    enqueued_ns: int


RunFn = Callable[[Arrays], Arrays]
ExecutionHook = Callable[[int, int, int, int], None]  # batch size, input/infer/output ns
INLINE_BELOW_NS = 200_000  # runs faster than this on average skip the worker thread


class Batcher:
    """Queue, batch and run requests of one model version on ``instances`` worker threads.

    Without dynamic batching (or at low load) a request runs alone as soon as an instance is free
    (FIFO). A model whose runs take under ``inline_below_ns`` on average (the run alone, measured on
    the thread that runs it) runs on the event loop thread itself: the thread hop would cost more
    than the run.
    """

    def __init__(
        self,
        run: RunFn,
        executor: Executor,
        instances: int,
        policy: BatchPolicy,
        on_execution: ExecutionHook,
        *,
        inline_below_ns: int = INLINE_BELOW_NS,
    ) -> None:
        self._run = run
        self._executor = executor
        self._policy = policy
        self._on_execution = on_execution
        self._inline_below_ns = inline_below_ns
        self._slots = asyncio.Semaphore(instances)
        self._pending: collections.deque[_Pending] = collections.deque()
        self._arrived = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._closed = False
        self._running = 0  # executions in progress
        self._last_batch_requests = 0
        self._run_ns_avg: float | None = None  # moving average of one model run
        self.outstanding = 0  # requests submitted and not yet answered
        self._loop_task = asyncio.get_running_loop().create_task(self._dispatch_forever()) if policy.dynamic else None

    async def submit(self, inputs: Arrays) -> tuple[Arrays, Timing]:
        """Run one validated request (batched with others when allowed); returns its own outputs."""
        if self._closed:
            raise UnavailableError("the model is unloading; retry once ModelReady is true again")
        samples = _samples(inputs) if self._policy.max_batch_size > 0 else 1
        future: asyncio.Future[tuple[Arrays, Timing]] = asyncio.get_running_loop().create_future()
        item = _Pending(inputs, samples, self._key(inputs), future, time.perf_counter_ns())
        self.outstanding += 1
        try:
            if not self._policy.dynamic or self._idle_at_low_load():
                async with self._slots:
                    self._last_batch_requests = 1
                    return (await self._compute([item]))[0]
            self._pending.append(item)
            self._arrived.set()
            return await future
        finally:
            self.outstanding -= 1

    @property
    def busy(self) -> bool:
        return bool(self.outstanding or self._pending or self._running)

    async def close(self) -> None:
        """Finish what is queued and running, then stop; later submits are refused."""
        self._closed = True
        while self.busy:
            await asyncio.sleep(0.005)
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass

    def _idle_at_low_load(self) -> bool:
        return not self._pending and not self._slots.locked() and not self._running and self._last_batch_requests <= 1

    def _key(self, inputs: Arrays) -> tuple[object, ...]:
        if self._policy.max_batch_size == 0 or not self._policy.dynamic:
            return (id(inputs),)  # never combined
        return tuple(sorted((name, arr.dtype.str, arr.shape[1:]) for name, arr in inputs.items()))

    async def _dispatch_forever(self) -> None:
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            await self._slots.acquire()
            try:
                batch = await self._gather()
            except Exception as err:  # a bug here must fail the queued requests, not hang them
                logger.exception("dynamic batcher failed while gathering")
                self._fail_pending(KilnError(f"dynamic batcher failed: {err}"))
                batch = []
            if not batch:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _gather(self) -> list[_Pending]:
        while True:
            batch = self._compatible()
            if not batch:
                return []
            size = sum(p.samples for p in batch)
            waited = time.perf_counter_ns() - batch[0].enqueued_ns
            remaining = self._policy.max_queue_delay_ns - waited
            low_load = not self._running and self._last_batch_requests <= 1 and len(self._pending) == 1
            if size >= self._policy.target or size in self._policy.preferred or remaining <= 0 or low_load:
                for item in batch:
                    self._pending.remove(item)
                self._last_batch_requests = len(batch)
                return batch
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining / 1e9)
            except asyncio.TimeoutError:
                pass

    def _fail_pending(self, err: KilnError) -> None:
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(err)

    def _compatible(self) -> list[_Pending]:
        """Oldest live request plus the later ones that fit with it (FIFO, up to max batch)."""
        while self._pending and self._pending[0].future.done():  # caller gone (cancelled)
            self._pending.popleft()
        if not self._pending:
            return []
        head = self._pending[0]
        batch, size = [head], head.samples
        for item in list(self._pending)[1:]:
            if item.key == head.key and not item.future.done() and size + item.samples <= self._policy.max_batch_size:
                batch.append(item)
                size += item.samples
        return batch

    async def _execute(self, batch: list[_Pending]) -> None:
        """Run a gathered batch and resolve each request's future (the slot is held by the caller)."""
        try:
            results = await self._compute(batch)
        except Exception as err:  # the whole batch failed; each caller gets the domain error
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(err)
            return
        finally:
            self._slots.release()
        for item, result in zip(batch, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)

    async def _compute(self, batch: list[_Pending]) -> list[tuple[Arrays, Timing]]:
        self._running += 1
        started = time.perf_counter_ns()
        try:
            merged = batch[0].inputs if len(batch) == 1 else _concatenate(batch)
            concatenated = time.perf_counter_ns()
            outputs = await self._call(merged)
            ran = time.perf_counter_ns()
            parts = [outputs] if len(batch) == 1 else _scatter(outputs, batch)
            done = time.perf_counter_ns()
        except KilnError:
            raise
        except Exception as err:
            raise KilnError(f"inference failed: {err}") from err
        finally:
            self._running -= 1
        size = sum(p.samples for p in batch)
        compute = (concatenated - started, ran - concatenated, done - ran)
        self._on_execution(size, *compute)
        return [
            (part, Timing(started - item.enqueued_ns, compute, size)) for item, part in zip(batch, parts, strict=True)
        ]

    async def _call(self, merged: Arrays) -> Arrays:
        if self._run_ns_avg is not None and self._run_ns_avg < self._inline_below_ns:
            outputs, elapsed = self._timed_run(merged)
        else:
            outputs, elapsed = await asyncio.get_running_loop().run_in_executor(self._executor, self._timed_run, merged)
        self._run_ns_avg = elapsed if self._run_ns_avg is None else 0.9 * self._run_ns_avg + 0.1 * elapsed
        return outputs

    def _timed_run(self, merged: Arrays) -> tuple[Arrays, int]:
        """The model's outputs and its run time alone: the thread hop must not count, or a busy
        executor (whose hop alone can exceed ``inline_below_ns``) would keep a fast model off the loop."""
        started = time.perf_counter_ns()
        outputs = self._run(merged)
        return outputs, time.perf_counter_ns() - started


def _samples(inputs: Arrays) -> int:
    first = next(iter(inputs.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def _concatenate(batch: list[_Pending]) -> Arrays:
    return {name: np.concatenate([p.inputs[name] for p in batch]) for name in batch[0].inputs}


def _scatter(outputs: Arrays, batch: list[_Pending]) -> list[Arrays]:
    total = sum(p.samples for p in batch)
    for name, arr in outputs.items():
        if arr.ndim == 0 or arr.shape[0] != total:
            raise KilnError(
                f"output {name!r} has shape {list(arr.shape)} for a batch of {total}: its first axis is not "
                "the batch axis, so it cannot be split per request; set max_batch_size: 0 for this model"
            )
    parts, offset = [], 0
    for item in batch:
        parts.append({name: arr[offset : offset + item.samples] for name, arr in outputs.items()})
        offset += item.samples
    return parts
