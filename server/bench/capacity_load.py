"""The capacity search (``server/bench/capacity.py``) driven against a live KServe v2 endpoint.

One event loop and one gRPC channel serve the whole search; each level is warmed up at its own
load (not measured) and then measured for the duration the search asks for. Every run of a level
gets its own Poisson seed, so the confirming repeats are independent samples.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import replace

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from server.bench.capacity import CapacityResult, RunHook, SearchSettings, Slo, Step, find_capacity
from server.bench.loadgen import BenchConfig, Send, grpc_options, make_send, prepare_payloads, run_level
from server.bench.stats import LoadPoint


class _Endpoint:
    """The channel, the prepared requests and the versions the endpoint reports for the model."""

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.channel: grpc.aio.Channel | None = None
        self.payloads: list[bytes] = []
        self.send: Send | None = None
        self.versions: tuple[str, ...] = ()

    async def open(self) -> None:
        self.channel = grpc.aio.insecure_channel(self.config.url, options=grpc_options(self.config))
        self.payloads = await prepare_payloads(self.channel, self.config)
        stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name=self.config.model, version=self.config.version))
        self.versions = tuple(meta.versions)
        self.send = make_send(self.channel, self.config)

    async def level(self, step: Step, seed: int) -> LoadPoint:
        if self.send is None or step.load is None:
            raise RuntimeError("endpoint used before open(), or asked for no level")
        config = replace(self.config, seed=self.config.seed + seed)
        return await run_level(self.send, self.payloads, config, step.mode, step.load, step.duration_s, stop=step.stop)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()


def search_endpoint(
    config: BenchConfig, slo: Slo, settings: SearchSettings, on_run: RunHook | None = None
) -> tuple[CapacityResult, tuple[str, ...]]:
    """Find the capacity of ``config.model`` at ``config.url``; also the versions it reports ready."""
    slo.check()
    settings.check()
    config = replace(config, warmup_s=settings.warmup_s, rates=(), concurrency=(1,), requests=None)
    config.check()
    endpoint = _Endpoint(config)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(endpoint.open())
        runs = itertools.count()

        def measure(step: Step) -> LoadPoint:
            return loop.run_until_complete(endpoint.level(step, next(runs)))

        return find_capacity(measure, slo, settings, on_run), endpoint.versions
    finally:
        loop.run_until_complete(endpoint.close())
        loop.close()
