"""Load a decoupled (token-streaming) model over ModelStreamInfer and time every token.

Counted as GenAI-Perf counts them, per request: time to first token (TTFT = first response with a
token - sent), inter-token latency (ITL = (last token response - sent - TTFT) / (tokens - 1)),
end-to-end latency (last response - sent) and output tokens/s (tokens / end-to-end); per load
level: percentiles of each, output tokens/s over the level, and the client's own send lag (open
loop: how late each send was against its Poisson schedule; closed loop: zero). Each request is
its own gRPC stream, so the gateway's ``kiln-variant`` metadata names its variant.
"""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from core.errors import InvalidInputError, UnavailableError
from server.bench.stats import PERCENTILES
from server.codec import to_raw

VARIANT_KEY = "kiln-variant"
FINAL = "triton_final_response"
DEFAULT_PROMPTS = (
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "List three uses of copper.",
    "What is the capital of France?",
    "Describe a sunrise in one paragraph.",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
    "Summarize the plot of Hamlet.",
)
METRICS = ("ttft_ms", "itl_ms", "e2e_ms", "tokens_per_s")


@dataclass(frozen=True)
class StreamBenchConfig:
    """One stream bench: a sweep over concurrencies (closed loop) or request rates (open loop)."""

    url: str
    model: str
    version: str = ""
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    max_tokens: int = 32
    concurrency: tuple[int, ...] = (1,)
    rates: tuple[float, ...] = ()
    requests: int | None = None  # per level; None: run for duration_s
    duration_s: float = 10.0
    warmup_requests: int = 1
    timeout_s: float = 120.0
    seed: int = 0

    def check(self) -> None:
        if not self.prompts or any(not p for p in self.prompts):
            raise InvalidInputError("a stream bench needs at least one non-empty prompt")
        if self.max_tokens < 1:
            raise InvalidInputError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if self.rates and any(r <= 0 for r in self.rates):
            raise InvalidInputError(f"--rate values must be > 0, got {list(self.rates)}")
        if not self.rates and (not self.concurrency or any(c < 1 for c in self.concurrency)):
            raise InvalidInputError(f"--concurrency values must be >= 1, got {list(self.concurrency)}")
        if self.requests is not None and self.requests < 1:
            raise InvalidInputError(f"--requests must be >= 1, got {self.requests}")
        if self.requests is None and self.duration_s <= 0:
            raise InvalidInputError(f"--duration must be > 0 seconds, got {self.duration_s}")


@dataclass(frozen=True)
class StreamTiming:
    """One request: nanosecond times relative to its (scheduled) send."""

    ttft_ns: int
    last_ns: int
    tokens: int
    variant: str = ""

    @property
    def itl_ns(self) -> float:
        return (self.last_ns - self.ttft_ns) / (self.tokens - 1) if self.tokens > 1 else 0.0


@dataclass(frozen=True)
class StreamPoint:
    mode: str
    load: float
    ok: int
    errors: dict[str, int]
    duration_s: float
    output_tokens_per_s: float
    requests_per_s: float
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    tokens_per_s: dict[str, float]  # per request
    mean_tokens: float
    send_lag_us_p50: float = 0.0
    send_lag_us_max: float = 0.0
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    error_examples: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StreamBenchResult:
    url: str
    model: str
    points: tuple[StreamPoint, ...]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "model": self.model,
            "settings": self.settings,
            "points": [asdict(p) for p in self.points],
        }

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        names = [n for n, _ in PERCENTILES]
        writer.writerow(
            ["mode", "load", "variant", "ok", "errors", "output_tokens_per_s", "send_lag_us_p50"]
            + [f"{m}_{n}" for m in METRICS for n in names]
        )
        for p in self.points:
            rows: list[tuple[str, dict[str, Any]]] = [("", asdict(p)), *sorted(p.variants.items())]
            for variant, d in rows:
                errors = ";".join(f"{k}={v}" for k, v in sorted(p.errors.items())) if not variant else ""
                writer.writerow(
                    [
                        p.mode,
                        p.load,
                        variant,
                        d["ok"],
                        errors,
                        f"{d['output_tokens_per_s']:.1f}",
                        f"{p.send_lag_us_p50:.0f}",
                    ]
                    + [f"{d[m].get(n, float('nan')):.3f}" for m in METRICS for n in names]
                )
        return out.getvalue()


def summarize_ms(values_ns: Sequence[float]) -> dict[str, float]:
    if not values_ns:
        return {name: float("nan") for name in [n for n, _ in PERCENTILES] + ["mean"]}
    arr = np.asarray(values_ns, dtype=np.float64) / 1e6
    result = {name: float(np.percentile(arr, q)) for name, q in PERCENTILES}
    result["mean"] = float(arr.mean())
    return result


def summarize_timings(timings: Sequence[StreamTiming], duration_s: float) -> dict[str, Any]:
    """Percentiles of TTFT, ITL, end-to-end and per-request tokens/s (ms; tokens/s unscaled)."""
    rates = [t.tokens / (t.last_ns / 1e9) for t in timings if t.last_ns > 0]
    multi = [t.itl_ns for t in timings if t.tokens > 1]
    tokens = sum(t.tokens for t in timings)
    return {
        "ok": len(timings),
        "output_tokens_per_s": tokens / duration_s if duration_s > 0 else 0.0,
        "ttft_ms": summarize_ms([t.ttft_ns for t in timings]),
        "itl_ms": summarize_ms(multi),
        "e2e_ms": summarize_ms([t.last_ns for t in timings]),
        "tokens_per_s": {k: v * 1e6 for k, v in summarize_ms(rates).items()},
        "mean_tokens": tokens / len(timings) if timings else 0.0,
    }


def make_stream_point(
    mode: str,
    load: float,
    timings: Sequence[StreamTiming],
    errors: Counter[str],
    examples: dict[str, str],
    duration_ns: int,
    send_lags_ns: Sequence[int],
) -> StreamPoint:
    duration_s = max(duration_ns, 1) / 1e9
    summary = summarize_timings(timings, duration_s)
    variants = {
        name: summarize_timings([t for t in timings if t.variant == name], duration_s)
        for name in sorted({t.variant for t in timings if t.variant})
    }
    return StreamPoint(
        mode=mode,
        load=load,
        errors=dict(sorted(errors.items())),
        duration_s=duration_s,
        requests_per_s=len(timings) / duration_s,
        send_lag_us_p50=float(np.percentile(send_lags_ns, 50)) / 1e3 if send_lags_ns else 0.0,
        send_lag_us_max=max(send_lags_ns) / 1e3 if send_lags_ns else 0.0,
        variants=variants,
        error_examples=examples,
        **summary,
    )


def make_requests(config: StreamBenchConfig) -> list[pb.ModelInferRequest]:
    """One request per prompt: ``text_input``, ``max_tokens``, ``stream`` true."""
    requests = []
    for index, prompt in enumerate(config.prompts):
        request = pb.ModelInferRequest(model_name=config.model, model_version=config.version, id=f"bench-{index}")
        for name, datatype, arr in (
            ("text_input", "BYTES", np.array([prompt.encode("utf-8")], dtype=object)),
            ("max_tokens", "INT32", np.array([config.max_tokens], np.int32)),
            ("stream", "BOOL", np.array([True])),
        ):
            request.inputs.add(name=name, datatype=datatype, shape=[1])
            request.raw_input_contents.append(to_raw(arr))
        requests.append(request)
    return requests


class _Level:
    """What one load level collects."""

    def __init__(self) -> None:
        self.timings: list[StreamTiming] = []
        self.errors: Counter[str] = Counter()
        self.examples: dict[str, str] = {}
        self.lags: list[int] = []

    def fail(self, code: str, message: str) -> None:
        self.errors[code] += 1
        self.examples.setdefault(code, message[:300])


async def one_stream(
    stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest, sent_ns: int, timeout_s: float, level: _Level
) -> None:
    """Send one request on its own stream and time its token responses from ``sent_ns``."""
    first = last = 0
    tokens = 0
    call = stub.ModelStreamInfer(iter([request]), timeout=timeout_s)
    try:
        async for response in call:
            now = time.perf_counter_ns()
            if response.error_message:
                code = response.error_message.split(":", 1)[0]
                level.fail(code if code.isupper() else "ERROR", response.error_message)
                call.cancel()
                return
            got = _token_count(response.infer_response)
            if got:
                tokens += got
                first = first or now
                last = now
            if response.infer_response.parameters[FINAL].bool_param:
                break
        variant = dict((await call.initial_metadata()) or ()).get(VARIANT_KEY, "")  # the gateway names it first
        variant = variant or dict((await call.trailing_metadata()) or ()).get(VARIANT_KEY, "")
    except grpc.aio.AioRpcError as err:
        level.fail(err.code().name, err.details() or "")
        return
    finally:
        call.cancel()
    if tokens == 0:
        level.fail("NO_TOKENS", "the stream ended without a token")
        return
    level.timings.append(StreamTiming(first - sent_ns, last - sent_ns, tokens, str(variant)))


def _token_count(response: pb.ModelInferResponse) -> int:
    for index, tensor in enumerate(response.outputs):
        if tensor.name == "output_ids":
            return int(np.prod(tensor.shape)) if index < len(response.raw_output_contents) else 0
    return 0


async def stream_bench(
    config: StreamBenchConfig, on_point: Callable[[StreamPoint], None] | None = None
) -> StreamBenchResult:
    config.check()
    requests = make_requests(config)
    async with grpc.aio.insecure_channel(config.url) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout=10)
        except asyncio.TimeoutError as err:
            raise UnavailableError(f"no gRPC server answers at {config.url!r}; start one with 'kiln serve'") from err
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        if config.warmup_requests:
            await _closed(stub, requests, config, 1, config.warmup_requests, None)
        points: list[StreamPoint] = []
        for load in config.rates or config.concurrency:
            if config.rates:
                points.append(await _open(stub, requests, config, float(load)))
            else:
                points.append(await _closed(stub, requests, config, int(load), config.requests, config.duration_s))
            if on_point is not None:
                on_point(points[-1])
    settings = {"max_tokens": config.max_tokens, "prompts": len(config.prompts), "requests": config.requests}
    return StreamBenchResult(config.url, config.model, tuple(points), settings)


def time_each_request(config: StreamBenchConfig) -> list[StreamTiming]:
    """Send each prompt once, one at a time, and return every request's timing (for benchmarks that
    compare against an in-process floor); a refused request raises with its message."""

    async def run() -> list[StreamTiming]:
        level = _Level()
        async with grpc.aio.insecure_channel(config.url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for request in make_requests(config):
                await one_stream(stub, request, time.perf_counter_ns(), config.timeout_s, level)
        if level.errors:
            raise UnavailableError(f"stream requests to {config.model!r} failed: {level.examples}")
        return level.timings

    config.check()
    return asyncio.run(run())


def run_stream_bench(
    config: StreamBenchConfig, on_point: Callable[[StreamPoint], None] | None = None
) -> StreamBenchResult:
    """Run from synchronous code (owns its event loop)."""
    return asyncio.run(stream_bench(config, on_point))


async def _closed(
    stub: pb_grpc.GRPCInferenceServiceStub,
    requests: list[pb.ModelInferRequest],
    config: StreamBenchConfig,
    concurrency: int,
    count: int | None,
    duration_s: float | None,
) -> StreamPoint:
    level = _Level()
    cycle = itertools.cycle(requests)
    start = time.perf_counter_ns()
    end = start + int((duration_s or 0) * 1e9)
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while (issued < count) if count is not None else time.perf_counter_ns() < end:
            issued += 1
            await one_stream(stub, next(cycle), time.perf_counter_ns(), config.timeout_s, level)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return make_stream_point(
        "concurrency", concurrency, level.timings, level.errors, level.examples, time.perf_counter_ns() - start, []
    )


async def _open(
    stub: pb_grpc.GRPCInferenceServiceStub, requests: list[pb.ModelInferRequest], config: StreamBenchConfig, rate: float
) -> StreamPoint:
    level = _Level()
    rng = np.random.default_rng(config.seed)
    total = config.requests or max(1, int(rate * config.duration_s))
    start = time.perf_counter_ns()
    scheduled = start + np.cumsum(rng.exponential(1e9 / rate, size=total)).astype(np.int64)
    tasks = []
    for index, at in enumerate(scheduled):
        delay = (int(at) - time.perf_counter_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        level.lags.append(max(0, time.perf_counter_ns() - int(at)))
        request = requests[index % len(requests)]
        tasks.append(asyncio.ensure_future(one_stream(stub, request, int(at), config.timeout_s, level)))
    await asyncio.gather(*tasks)
    return make_stream_point(
        "rate", rate, level.timings, level.errors, level.examples, time.perf_counter_ns() - start, level.lags
    )


def plot_stream_result(result: StreamBenchResult, path: Path) -> Path:
    """TTFT and ITL (p50 and p99) against load, one line per gateway variant when there are several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(result.points, key=lambda p: p.load)
    loads = [p.load for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    series: list[tuple[str, list[dict[str, Any]]]] = [("all", [asdict(p) for p in points])]
    names = sorted({v for p in points for v in p.variants})
    series += [(v, [p.variants.get(v, summarize_timings([], 1.0)) for p in points]) for v in names]
    for ax, metric, title in ((axes[0], "ttft_ms", "time to first token"), (axes[1], "itl_ms", "inter-token latency")):
        for label, rows in series:
            for pct, style in (("p50", "-"), ("p99", "--")):
                ax.plot(loads, [r[metric][pct] for r in rows], style, marker="o", label=f"{label} {pct}")
        ax.set_title(title)
        ax.set_xlabel("concurrency" if points and points[0].mode == "concurrency" else "requests/s")
        ax.set_ylabel("ms")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result.model} at {result.url}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
