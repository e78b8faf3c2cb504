"""Drive a KServe v2 gRPC endpoint with pre-serialized ModelInfer requests and time every one.

Closed loop: N workers, each sends its next request when the previous answer arrives. Open loop:
sends follow a Poisson schedule at R requests/s whatever the server does, and latency is measured
from the *scheduled* send time, so a server that falls behind shows its queueing. The client's own
lateness (asyncio timers wake up to ~1 ms late, epoll has millisecond resolution) is included and
reported separately as ``send_lag_us_p50/max``. Requests are
serialized once up front and responses are not parsed, so the client costs one gRPC call per
request. Its ceiling is measured by ``benchmarks/bench_overhead.py`` against a bare gRPC echo
server: about 4,500 requests/s at concurrency 32 on the 2-core development machine, with client and
server sharing the cores (so the client alone goes further); ``kiln serve`` peaks near 3,000 there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from builders.calib_data import NPZ_HOW, read_npz
from builders.tensors import numpy_dtype_from_kserve
from core.errors import InvalidInputError, NotFoundError, UnavailableError
from server.bench.stats import BenchResult, LoadPoint, StopRule, make_point
from server.codec import to_raw

logger = logging.getLogger(__name__)

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
DISTINCT_REQUESTS = 16
BACKLOG = "CLIENT_BACKLOG"  # open loop: an arrival found max_in_flight requests outstanding
VARIANT_KEY = "kiln-variant"  # trailing metadata the Kiln gateway sets on every response
Send = Callable[[bytes], Awaitable[str]]  # returns the serving variant ("" when not tracked)
PointHook = Callable[[LoadPoint], None]


@dataclass(frozen=True)
class BenchConfig:
    """One bench run: a sweep over concurrencies (closed loop) or rates (open loop)."""

    url: str
    model: str
    version: str = ""
    concurrency: tuple[int, ...] = (1,)
    rates: tuple[float, ...] = ()  # non-empty: open loop at each rate instead
    duration_s: float | None = 5.0  # per load level; ignored when ``requests`` is set
    requests: int | None = None
    batch: int = 1
    data: Path | None = None
    warmup_s: float = 1.0
    timeout_s: float = 30.0
    seed: int = 0
    max_message_bytes: int = 256 * 2**20
    max_in_flight: int = 4096  # open loop only
    by_variant: bool = False  # read ``kiln-variant`` from each response's trailing metadata
    variant: str = ""  # pin every request to this gateway variant (``kiln-variant`` request header)

    def check(self) -> None:
        if self.rates and any(r <= 0 for r in self.rates):
            raise InvalidInputError(f"--rate values must be > 0, got {list(self.rates)}")
        if not self.rates and (not self.concurrency or any(c < 1 for c in self.concurrency)):
            raise InvalidInputError(f"--concurrency values must be >= 1, got {list(self.concurrency)}")
        if self.requests is None and (self.duration_s is None or self.duration_s <= 0):
            raise InvalidInputError(f"--duration must be > 0 seconds, got {self.duration_s}")
        if self.requests is not None and self.requests < 1:
            raise InvalidInputError(f"--requests must be >= 1, got {self.requests}")
        if self.max_in_flight < 1:
            raise InvalidInputError(f"--max-in-flight must be >= 1, got {self.max_in_flight}")
        if self.batch < 1:
            raise InvalidInputError(f"--batch must be >= 1, got {self.batch}")
        if self.warmup_s < 0:
            raise InvalidInputError(f"--warmup must be >= 0, got {self.warmup_s}")


def run_bench(config: BenchConfig, on_point: PointHook | None = None) -> BenchResult:
    """Run a bench from synchronous code (it owns its own event loop); ``on_point`` sees each level."""
    return asyncio.run(bench(config, on_point))


async def bench(config: BenchConfig, on_point: PointHook | None = None) -> BenchResult:
    """Run a bench on the current event loop; one LoadPoint per concurrency or rate."""
    config.check()
    async with grpc.aio.insecure_channel(config.url, options=grpc_options(config)) as channel:
        payloads = await prepare_payloads(channel, config)
        send = make_send(channel, config)
        points: list[LoadPoint] = []
        mode = "rate" if config.rates else "concurrency"
        loads: Sequence[float] = config.rates or config.concurrency
        for load in loads:
            points.append(await run_level(send, payloads, config, mode, load, config.duration_s, config.requests))
            if on_point is not None:
                on_point(points[-1])
    settings = {
        "duration_s": config.duration_s,
        "requests": config.requests,
        "warmup_s": config.warmup_s,
        "data": str(config.data) if config.data else None,
    }
    return BenchResult(config.url, config.model, config.version, config.batch, tuple(points), settings)


def grpc_options(config: BenchConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
    ]


def make_send(channel: grpc.aio.Channel, config: BenchConfig) -> Send:
    """One ModelInfer call with pre-serialized bytes; returns the serving variant when tracked."""
    call = channel.unary_unary(INFER_METHOD, request_serializer=None, response_deserializer=None)
    metadata = ((VARIANT_KEY, config.variant),) if config.variant else None

    async def send(payload: bytes) -> str:
        if not config.by_variant:
            await call(payload, timeout=config.timeout_s, metadata=metadata)
            return ""
        pending = call(payload, timeout=config.timeout_s, metadata=metadata)
        await pending
        return _variant(await pending.trailing_metadata())

    return send


async def run_level(
    send: Send,
    payloads: list[bytes],
    config: BenchConfig,
    mode: str,
    load: float,
    duration_s: float | None,
    requests: int | None = None,
    stop: StopRule | None = None,
) -> LoadPoint:
    """One load level: ``config.warmup_s`` of warm-up at the same load (not measured), then the level.

    ``stop``: end the level (and its warm-up) early once it has certainly broken the SLO.
    """
    if config.warmup_s > 0:
        warm = await _level(send, payloads, config, mode, load, config.warmup_s, None, stop)
        if warm.stopped_early:
            return replace(warm, stopped_early=f"in warm-up: {warm.stopped_early}")
    return await _level(send, payloads, config, mode, load, duration_s, requests, stop)


async def _level(
    send: Send,
    payloads: list[bytes],
    config: BenchConfig,
    mode: str,
    load: float,
    seconds: float | None,
    requests: int | None,
    stop: StopRule | None,
) -> LoadPoint:
    if mode == "rate":
        rng = np.random.default_rng(config.seed)
        return await open_loop(send, payloads, float(load), seconds, requests, rng, config.max_in_flight, stop)
    return await closed_loop(send, payloads, int(load), seconds, requests, stop)


async def closed_loop(
    send: Send,
    payloads: list[bytes],
    concurrency: int,
    duration_s: float | None,
    requests: int | None,
    stop: StopRule | None = None,
) -> LoadPoint:
    """``concurrency`` requests always in flight, until ``requests`` are done, time is up or ``stop`` fires."""
    tally = _Tally(stop)
    issued = 0
    start = time.perf_counter_ns()
    end = start + int((duration_s or 0) * 1e9)
    lags: list[int] = []
    watch = asyncio.get_running_loop().create_task(_loop_lag(lags))

    async def worker(offset: int) -> None:
        nonlocal issued
        index = offset
        while True:
            if requests is not None:
                if issued >= requests:
                    return
                issued += 1
            elif time.perf_counter_ns() >= end:
                return
            if tally.broken(0):
                return
            sent = time.perf_counter_ns()
            code, variant, detail = await _timed_call(send, payloads[index % len(payloads)])
            tally.add(code, variant, time.perf_counter_ns() - sent, detail)
            index += concurrency

    try:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    finally:
        watch.cancel()
    return tally.point("concurrency", concurrency, time.perf_counter_ns() - start, loop_lags_ns=lags)


async def _loop_lag(lags: list[int], period_ns: int = 5_000_000) -> None:
    """How late this event loop wakes from a 5 ms sleep: the client's own load (until cancelled)."""
    while True:
        due = time.perf_counter_ns() + period_ns
        await asyncio.sleep(period_ns / 1e9)
        lags.append(max(0, time.perf_counter_ns() - due))


async def open_loop(
    send: Send,
    payloads: list[bytes],
    rate: float,
    duration_s: float | None,
    requests: int | None,
    rng: np.random.Generator,
    max_in_flight: int = 4096,
    stop: StopRule | None = None,
) -> LoadPoint:
    """Poisson arrivals at ``rate``/s; each latency counts from its scheduled send time.

    At most ``max_in_flight`` requests are outstanding: an arrival beyond that is not sent and
    counts as ``CLIENT_BACKLOG`` (the endpoint is not keeping up with the offered rate), so a
    mistyped rate cannot exhaust the client's memory and the overload is visible, not hidden.
    With ``stop``, sending ends (and the outstanding requests are awaited) once the level has
    certainly broken the SLO; requests still waiting longer than the SLO count as slow.
    """
    tally = _Tally(stop)
    tasks: dict[asyncio.Task[None], int] = {}  # outstanding request -> its scheduled send time
    lags: list[int] = []
    start = time.perf_counter_ns()
    horizon = start + int((duration_s or 0) * 1e9)
    scheduled = float(start)
    count = 0

    async def one(payload: bytes, due: int) -> None:
        code, variant, detail = await _timed_call(send, payload)
        tally.add(code, variant, time.perf_counter_ns() - due, detail)

    last_due = start
    while (count < requests) if requests is not None else (scheduled < horizon):
        due = last_due = int(scheduled)
        delay = due - time.perf_counter_ns()
        if delay > 0:
            await asyncio.sleep(delay / 1e9)
        lags.append(time.perf_counter_ns() - due)
        if stop is not None and count % 16 == 0 and tally.broken(_waiting(tasks, stop.slow_ns)):
            break
        if len(tasks) >= max_in_flight:
            tally.add(BACKLOG, "", 0, f"{max_in_flight} requests already in flight; arrival not sent")
            count += 1
            scheduled += rng.exponential(1e9 / rate)
            continue
        task = asyncio.get_running_loop().create_task(one(payloads[count % len(payloads)], due))
        tasks[task] = due
        task.add_done_callback(lambda done: tasks.pop(done, None))
        count += 1
        scheduled += rng.exponential(1e9 / rate)
    # how fast the client got through its schedule: the offered rate when it kept up, less when it fell behind
    sent_rps = rate * max(last_due - start, 0) / max(time.perf_counter_ns() - start, 1)
    if tasks:
        await asyncio.gather(*tasks)
    return tally.point("rate", rate, time.perf_counter_ns() - start, lags, sent_rps=sent_rps)


def _waiting(tasks: dict[asyncio.Task[None], int], slow_ns: int) -> int:
    """Outstanding requests already waiting longer than ``slow_ns`` since their scheduled time."""
    now = time.perf_counter_ns()
    return sum(1 for due in tasks.values() if now - due > slow_ns)


async def _timed_call(send: Send, payload: bytes) -> tuple[str, str, str]:
    """(status code name, serving variant, the server's error message or "")."""
    try:
        variant = await send(payload)
    except grpc.aio.AioRpcError as err:
        return err.code().name, "", err.details() or ""
    return "OK", variant, ""


def _variant(metadata: grpc.aio.Metadata | None) -> str:
    for key, value in metadata or ():
        if key == VARIANT_KEY:
            return value if isinstance(value, str) else value.decode()
    return ""


class _Tally:
    """Latencies of successful requests (overall and per variant) and errors by status code."""

    def __init__(self, stop: StopRule | None = None) -> None:
        self.latencies: list[int] = []
        self.errors: Counter[str] = Counter()
        self.error_examples: dict[str, str] = {}
        self.by_variant: dict[str, list[int]] = {}
        self.stop = stop
        self.slow = 0  # successful requests slower than stop.slow_ns
        self.stopped = ""

    def broken(self, waiting_slow: int) -> bool:
        """Has the level certainly broken the SLO (``waiting_slow``: outstanding requests already slow)?"""
        if self.stop is None:
            return False
        errors = sum(self.errors.values())
        if self.slow + waiting_slow > self.stop.max_slow:
            self.stopped = f"{self.slow + waiting_slow} requests over {self.stop.slow_ns / 1e6:g} ms"
        elif errors > self.stop.max_errors:
            self.stopped = f"{errors} errors"
        return bool(self.stopped)

    def add(self, code: str, variant: str, latency_ns: int, detail: str = "") -> None:
        if code != "OK":
            self.errors[code] += 1
            self.error_examples.setdefault(code, detail)
            return
        self.latencies.append(latency_ns)
        if self.stop is not None and latency_ns > self.stop.slow_ns:
            self.slow += 1
        if variant:
            self.by_variant.setdefault(variant, []).append(latency_ns)

    def point(
        self,
        mode: str,
        load: float,
        duration_ns: int,
        send_lags_ns: list[int] | None = None,
        *,
        sent_rps: float = 0.0,
        loop_lags_ns: list[int] | None = None,
    ) -> LoadPoint:
        point = make_point(
            mode,
            load,
            self.latencies,
            dict(self.errors),
            duration_ns,
            send_lags_ns,
            self.by_variant,
            sent_rps=sent_rps,
            loop_lags_ns=loop_lags_ns,
            stopped_early=self.stopped,
        )
        return replace(point, error_examples=dict(sorted(self.error_examples.items())))


async def prepare_payloads(channel: grpc.aio.Channel, config: BenchConfig) -> list[bytes]:
    """Serialized ModelInfer requests built from the model's metadata and --data (or random)."""
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    try:
        meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name=config.model, version=config.version))
    except grpc.aio.AioRpcError as err:
        if err.code() is grpc.StatusCode.NOT_FOUND:
            raise NotFoundError(
                f"{config.url} has no model {config.model!r} version {config.version!r}: {err.details()}"
            ) from err
        raise UnavailableError(
            f"cannot read metadata of model {config.model!r} from {config.url}: {err.code().name} {err.details()}; "
            "is the server up and the model loaded?"
        ) from err
    data = _load_data(config.data, list(meta.inputs)) if config.data else None
    rng = np.random.default_rng(config.seed)
    payloads = []
    for index in range(DISTINCT_REQUESTS):
        request = pb.ModelInferRequest(model_name=config.model, model_version=config.version, id=f"bench-{index}")
        for tensor in meta.inputs:
            shape = _concrete_shape(list(tensor.shape), config.batch)
            arr = _rows(data[tensor.name], index, shape) if data else _random(tensor.datatype, shape, rng)
            request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(arr.shape))
            request.raw_input_contents.append(to_raw(arr))
        payloads.append(request.SerializeToString())
    return payloads


def _concrete_shape(shape: list[int], batch: int) -> tuple[int, ...]:
    return tuple((batch if i == 0 else 1) if d < 0 else d for i, d in enumerate(shape))


def _random(datatype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if datatype == "BYTES":
        arr = np.empty(shape, dtype=object)
        arr.fill(b"kiln")
        return arr
    dtype = numpy_dtype_from_kserve(datatype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    return rng.integers(0, 10, shape).astype(dtype)


def _load_data(path: Path, inputs: list[pb.ModelMetadataResponse.TensorMetadata]) -> dict[str, np.ndarray]:
    """The --data arrays, one per model input, checked against the model's metadata."""
    if not path.is_file():
        raise NotFoundError(f"--data {str(path)!r} does not exist; pass an .npz with one array per input name")
    data = read_npz(path, f"--data {str(path)!r}")
    names = [t.name for t in inputs]
    missing = [n for n in names if n not in data]
    if missing:
        raise InvalidInputError(
            f"--data {str(path)!r} has keys {sorted(data)}; the model needs inputs {missing}; {NPZ_HOW}"
        )
    for tensor in inputs:
        _check_rows(path, tensor, data[tensor.name])
    return {n: data[n] for n in names}


def _check_rows(path: Path, tensor: pb.ModelMetadataResponse.TensorMetadata, arr: np.ndarray) -> None:
    where = f"--data {str(path)!r}: input {tensor.name!r}"
    expected = list(tensor.shape)
    shown = "[" + ",".join(str(d) for d in arr.shape) + "]"
    wanted = "[" + ",".join(str(d) for d in expected) + "]"
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise InvalidInputError(f"{where} has shape {shown}; it needs at least one row (batch axis first)")
    if tensor.datatype != "BYTES" and arr.dtype != numpy_dtype_from_kserve(tensor.datatype):
        raise InvalidInputError(
            f"{where} has dtype {arr.dtype}; the model expects {tensor.datatype} "
            f"(convert with array.astype(numpy.{numpy_dtype_from_kserve(tensor.datatype)}))"
        )
    fixed = [(a, d) for a, d in enumerate(expected) if a > 0 and d >= 0]
    if arr.ndim != len(expected) or any(arr.shape[a] != d for a, d in fixed):
        raise InvalidInputError(f"{where} has shape {shown}; the model expects {wanted} (rows first)")


def _rows(arr: np.ndarray, index: int, shape: tuple[int, ...]) -> np.ndarray:
    """Rows ``index*batch ...`` of the data (wrapping), shaped like the request's first axis."""
    count = shape[0] if shape else 1
    picks = [(index * count + k) % arr.shape[0] for k in range(count)]
    return np.ascontiguousarray(arr[picks])
