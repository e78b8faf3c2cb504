"""The gateway's data plane on grpc.aio: one event loop thread, no thread hand-off per RPC."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2_grpc

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
    upstream_abort,
)
from server.gateway.guard import Admission, QuietLog
from server.gateway.health import AioHealth, HealthReport
from server.gateway.upstreams import SERVICE, UpstreamPool

logger = logging.getLogger(__name__)
AsyncUnary = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]


async def _abort(context: grpc.aio.ServicerContext, err: RpcAbort) -> NoReturn:
    if err.metadata:
        context.set_trailing_metadata(err.metadata)
    await context.abort(err.code, err.details)
    raise RuntimeError("grpc context.abort returned")  # pragma: no cover - abort always raises


class AioHandlers:
    """Bytes-in/bytes-out coroutine handlers over grpc.aio upstream channels (limits: see serve_threads)."""

    def __init__(self, core: Forwarder, pool: UpstreamPool, config: GatewayConfig, admission: Admission,
                 quiet: QuietLog) -> None:  # fmt: skip
        self._core = core
        self._pool = pool
        self._admission = admission
        self._quiet = quiet
        self._cap_s = config.server.upstream_timeout_s
        self._idle_s = config.server.stream_idle_timeout_s
        self.reaped = 0

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = timeout_of(context.time_remaining())
        return self._cap_s if remaining is None else min(remaining, self._cap_s)

    def guarded(self, method: str, handler: AsyncUnary) -> AsyncUnary:
        """``handler`` behind an admission slot; an unexpected error becomes a short INTERNAL."""
        admission, quiet = self._admission, self._quiet

        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            size = len(request)
            try:
                admission.enter(size=size)
            except RpcAbort as err:
                await _abort(context, err)
            try:
                return await handler(request, context)
            except RpcAbort as err:
                await _abort(context, err)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as err:
                quiet.warning(f"bug:{method}", "gateway %s failed: %s: %s", method, type(err).__name__, err)
                await context.abort(grpc.StatusCode.INTERNAL, f"the gateway failed handling {method} "
                                    f"({type(err).__name__}); see the gateway log")  # fmt: skip
            finally:
                admission.leave(size=size)
            raise RuntimeError("unreachable")  # pragma: no cover

        return handle

    async def model_infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        core = self._core
        decision = core.decide(request, context.invocation_metadata() or (), time.perf_counter_ns())
        while True:
            sent = time.perf_counter_ns()
            try:
                call = self._pool[decision.upstream].unary("ModelInfer")
                response = await call(decision.body, timeout=self._timeout(context), metadata=decision.forwarded)
                break
            except grpc.RpcError as err:
                code, details = err.code(), err.details()  # type: ignore[attr-defined]
                retry = core.failed(decision, code, details, sent)
                if retry is None:
                    raise core.abort_of(decision, code, details) from None
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
        try:
            self._admission.enter(stream=True)
        except RpcAbort as err:
            await _abort(context, err)
        try:
            async for response in self._stream(requests, context):
                yield response
        except RpcAbort as err:
            await _abort(context, err)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except grpc.RpcError as err:
            await _abort(context, upstream_abort(err))
        except Exception as err:
            self._quiet.warning("bug:ModelStreamInfer", "gateway ModelStreamInfer failed: %s: %s",
                                type(err).__name__, err)  # fmt: skip
            await context.abort(grpc.StatusCode.INTERNAL, f"the gateway failed handling ModelStreamInfer "
                                f"({type(err).__name__}); see the gateway log")  # fmt: skip
        finally:
            self._admission.leave(stream=True)

    def _idle(self) -> RpcAbort:
        self.reaped += 1
        return RpcAbort(grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"stream idle for {self._idle_s:g} s (no message either way; server.stream_idle_timeout_s); "
                        "send messages more often or open a new stream")  # fmt: skip

    async def _stream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        iterator = requests.__aiter__()
        try:
            first = await asyncio.wait_for(iterator.__anext__(), self._idle_s)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise self._idle() from None
        decision = self._core.decide(first, context.invocation_metadata() or (), time.perf_counter_ns())
        if decision.live is not None:
            await context.send_initial_metadata(self._core.response_metadata(decision))
        suffix = decision.body[len(first) :]
        loop = asyncio.get_running_loop()
        last = [loop.time()]
        meter = self._core.stream_meter(decision)  # TTFT/ITL per request id; every message stays on this variant

        async def upstream_requests() -> AsyncIterator[bytes]:
            meter.sent(first)
            yield decision.body
            async for message in iterator:
                last[0] = loop.time()
                meter.sent(message)
                yield message + suffix

        call: Any = self._pool[decision.upstream].stream("ModelStreamInfer")(
            upstream_requests(), timeout=timeout_of(context.time_remaining()), metadata=decision.forwarded
        )
        expired = asyncio.Event()

        async def watchdog() -> None:
            step = min(1.0, self._idle_s / 4)
            while loop.time() - last[0] <= self._idle_s:
                await asyncio.sleep(step)
            expired.set()
            call.cancel()

        dog = asyncio.ensure_future(watchdog())
        ended = "CANCELLED"
        try:
            async for response in call:
                last[0] = loop.time()
                meter.received(response)
                yield response
            ended = "OK"
        except (asyncio.CancelledError, grpc.RpcError) as err:
            if isinstance(err, grpc.RpcError):
                ended = err.code().name  # type: ignore[attr-defined]
            if expired.is_set():
                ended = "DEADLINE_EXCEEDED"
                raise self._idle() from None
            raise
        finally:
            dog.cancel()
            meter.finish(ended)
        if expired.is_set():
            raise self._idle()

    def model_method(self, method: str) -> AsyncUnary:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            upstream, body, public = self._core.model_target(method, request)
            return rename_response(method, await self._call(upstream, method, body, context), public)

        return handle

    def control(self, method: str) -> AsyncUnary:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            upstream = self._core.control_target(method, context.invocation_metadata() or ())
            logger.info("control RPC %s forwarded to upstream %s for %s", method, upstream, context.peer())
            return await self._call(upstream, method, request, context)

        return handle

    async def _call(self, upstream: str, method: str, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await self._pool[upstream].unary(method)(body, timeout=self._timeout(context))  # type: ignore[no-any-return]
        except grpc.RpcError as err:
            raise upstream_abort(err) from None

    def generic_handler(self) -> grpc.GenericRpcHandler:
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        for method, streaming in service_methods():
            if method == "ModelInfer":
                handlers[method] = grpc.unary_unary_rpc_method_handler(self.guarded(method, self.model_infer))
            elif streaming:
                handlers[method] = grpc.stream_stream_rpc_method_handler(self.model_stream_infer)
            elif method in LOCAL_METHODS:
                handlers[method] = grpc.unary_unary_rpc_method_handler(_constant(local_answer(method)))
            elif method in MODEL_METHODS:
                handlers[method] = grpc.unary_unary_rpc_method_handler(self.guarded(method, self.model_method(method)))
            else:
                handlers[method] = grpc.unary_unary_rpc_method_handler(self.guarded(method, self.control(method)))
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
    report: HealthReport,
    quiet: QuietLog,
) -> tuple[Callable[[], None], int]:
    """Start a grpc.aio server on its own event-loop thread; returns (stop, bound port)."""
    loop = new_event_loop(config.server.event_loop)
    thread = threading.Thread(target=loop.run_forever, name="kiln-gw-aio", daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, UpstreamPool, int]:
        pool = UpstreamPool(config.upstreams, config.server.max_message_bytes, aio=True)
        admission = Admission(config.server.threads, config.server.max_streams, config.server.max_in_flight_bytes)
        handlers = AioHandlers(core, pool, config, admission, quiet)
        server = grpc.aio.server(handlers=[handlers.generic_handler()], options=options)
        health_pb2_grpc.add_HealthServicer_to_server(AioHealth(report), server)
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
        report.stopping = True
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
