"""The gateway's data plane on grpc.aio: one event loop thread, no thread hand-off per RPC."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc

from core.errors import MissingDependencyError
from server.gateway.config import GatewayConfig
from server.gateway.forward import (
    LOCAL_METHODS,
    MODEL_METHODS,
    Forwarder,
    RpcAbort,
    local_answer,
    rename_response,
    service_methods,
    timeout_of,
)
from server.gateway.upstreams import SERVICE, UpstreamPool

AsyncUnary = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]


async def _abort(context: grpc.aio.ServicerContext, err: RpcAbort) -> NoReturn:
    if err.metadata:
        context.set_trailing_metadata(err.metadata)
    await context.abort(err.code, err.details)
    raise RuntimeError("grpc context.abort returned")  # pragma: no cover - abort always raises


class AioHandlers:
    """Bytes-in/bytes-out coroutine handlers over grpc.aio upstream channels."""

    def __init__(self, core: Forwarder, pool: UpstreamPool) -> None:
        self._core = core
        self._pool = pool

    async def model_infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        core = self._core
        try:
            decision = core.decide(request, context.invocation_metadata() or (), time.perf_counter_ns())
        except RpcAbort as err:
            await _abort(context, err)
        while True:
            sent = time.perf_counter_ns()
            try:
                call = self._pool[decision.upstream].unary("ModelInfer")
                timeout = timeout_of(context.time_remaining())
                response = await call(decision.body, timeout=timeout, metadata=decision.forwarded)
                break
            except grpc.RpcError as err:
                code, details = err.code(), err.details()  # type: ignore[attr-defined]
                retry = core.failed(decision, code, details, sent)
                if retry is None:
                    await _abort(context, core.abort_of(decision, code, details))
                decision = retry
            except asyncio.CancelledError:  # the client went away or its deadline passed
                remaining = context.time_remaining()
                expired = remaining is not None and remaining <= 0.0
                code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
                core.failed(decision, code, "cancelled by the client", sent)
                raise
        metadata, suffix = core.succeeded(decision, sent, request, response)
        if metadata:
            context.set_trailing_metadata(metadata)
        return response + suffix

    async def model_stream_infer(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        iterator = requests.__aiter__()
        try:
            first = await iterator.__anext__()
        except StopAsyncIteration:
            return
        try:
            decision = self._core.decide(first, context.invocation_metadata() or (), time.perf_counter_ns())
        except RpcAbort as err:
            await _abort(context, err)
        if decision.live is not None:
            await context.send_initial_metadata(self._core.response_metadata(decision))
        suffix = decision.body[len(first) :]
        meter = self._core.stream_meter(decision)  # TTFT/ITL per request id; every message stays on this variant

        async def upstream_requests() -> AsyncIterator[bytes]:
            meter.sent(first)
            yield decision.body
            async for message in iterator:
                meter.sent(message)
                yield message + suffix

        call = self._pool[decision.upstream].stream("ModelStreamInfer")
        ended = "CANCELLED"
        try:
            responses: Any = call(upstream_requests(), timeout=timeout_of(context.time_remaining()),
                                  metadata=decision.forwarded)  # fmt: skip
            async for response in responses:
                meter.received(response)
                yield response
            ended = "OK"
        except grpc.RpcError as err:
            ended = err.code().name  # type: ignore[attr-defined]
            await _abort(context, RpcAbort(err.code(), err.details()))  # type: ignore[attr-defined]
        finally:
            meter.finish(ended)

    def model_method(self, method: str) -> AsyncUnary:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                upstream, body, public = self._core.model_target(method, request)
            except RpcAbort as err:
                await _abort(context, err)
            return rename_response(method, await self._call(upstream, method, body, context), public)

        return handle

    def passthrough(self, method: str) -> AsyncUnary:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                upstream = self._core.default_upstream(method)
            except RpcAbort as err:
                await _abort(context, err)
            return await self._call(upstream, method, request, context)

        return handle

    async def _call(self, upstream: str, method: str, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await self._pool[upstream].unary(method)(body, timeout=timeout_of(context.time_remaining()))
        except grpc.RpcError as err:
            await _abort(context, RpcAbort(err.code(), err.details()))  # type: ignore[attr-defined]

    def generic_handler(self) -> grpc.GenericRpcHandler:
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        for method, streaming in service_methods():
            if method == "ModelInfer":
                handlers[method] = grpc.unary_unary_rpc_method_handler(self.model_infer)
            elif streaming:
                handlers[method] = grpc.stream_stream_rpc_method_handler(self.model_stream_infer)
            elif method in LOCAL_METHODS:
                handlers[method] = grpc.unary_unary_rpc_method_handler(_constant(local_answer(method)))
            elif method in MODEL_METHODS:
                handlers[method] = grpc.unary_unary_rpc_method_handler(self.model_method(method))
            else:
                handlers[method] = grpc.unary_unary_rpc_method_handler(self.passthrough(method))
        return grpc.method_handlers_generic_handler(SERVICE, handlers)


def _constant(answer: bytes) -> AsyncUnary:
    async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return answer

    return handle


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    """The data plane's loop: asyncio's, or uvloop's (``server.event_loop: uvloop``, needs ``uvloop``)."""
    if kind != "uvloop":
        return asyncio.new_event_loop()
    try:
        import uvloop
    except ImportError as err:
        raise MissingDependencyError(
            "server.event_loop is 'uvloop' but the uvloop package is not installed; "
            "run `pip install uvloop` or set server.event_loop: asyncio"
        ) from err
    return uvloop.new_event_loop()


def serve_aio(
    config: GatewayConfig,
    core: Forwarder,
    address: str,
    credentials: grpc.ServerCredentials | None,
    options: list[tuple[str, object]],
) -> tuple[Callable[[], None], int]:
    """Start a grpc.aio server on its own event-loop thread; returns (stop, bound port)."""
    loop = new_event_loop(config.server.event_loop)
    thread = threading.Thread(target=loop.run_forever, name="kiln-gw-aio", daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, UpstreamPool, int]:
        pool = UpstreamPool(config.upstreams, config.server.max_message_bytes, aio=True)
        server = grpc.aio.server(handlers=[AioHandlers(core, pool).generic_handler()], options=options)
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
        await server.start()
        return server, pool, bound

    try:
        server, pool, bound = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        raise

    async def shutdown() -> None:
        await server.stop(1.0)
        await pool.aclose()

    def stop() -> None:
        if not thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()

    return stop, bound
