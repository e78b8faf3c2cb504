"""The gateway's data plane on grpc's thread-pool server (one thread per RPC in flight).

Limits (``guard.py``): every data-plane RPC takes an ``Admission`` slot or is refused at once with
RESOURCE_EXHAUSTED; the pool has ``HEALTH_THREADS`` threads beyond the slots, so health checks
and refusals always find one; idle streams are ended by the ``IdleReaper``; unary calls without a
client deadline get ``server.upstream_timeout_s``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2_grpc

from server.gateway.config import CONTROL_METHODS, GatewayConfig
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
from server.gateway.guard import Admission, IdleReaper, QuietLog, StreamWatch
from server.gateway.health import HealthReport, ThreadHealth
from server.gateway.upstreams import SERVICE, UpstreamPool

logger = logging.getLogger(__name__)
Unary = Callable[[bytes, grpc.ServicerContext], bytes]
HEALTH_THREADS = 8  # threads beyond server.threads: health checks and fast refusals
QUEUE_SLACK = 64  # RPCs beyond the pool that may wait for a thread before gRPC refuses them


def _abort(context: grpc.ServicerContext, err: RpcAbort) -> NoReturn:
    if err.metadata:
        context.set_trailing_metadata(err.metadata)
    context.abort(err.code, err.details)
    raise RuntimeError("grpc context.abort returned")  # pragma: no cover - abort always raises


class ThreadHandlers:
    """Bytes-in/bytes-out handlers over sync upstream channels."""

    def __init__(self, core: Forwarder, pool: UpstreamPool, config: GatewayConfig, admission: Admission,
                 reaper: IdleReaper, quiet: QuietLog) -> None:  # fmt: skip
        self._core = core
        self._pool = pool
        self._admission = admission
        self._reaper = reaper
        self._quiet = quiet
        self._cap_s = config.server.upstream_timeout_s

    def _timeout(self, context: grpc.ServicerContext) -> float:
        remaining = timeout_of(context.time_remaining())
        return self._cap_s if remaining is None else min(remaining, self._cap_s)

    def guarded(self, method: str, handler: Unary) -> Unary:
        """``handler`` behind an admission slot; an unexpected error becomes a short INTERNAL."""
        admission, quiet = self._admission, self._quiet

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            size = len(request)
            try:
                admission.enter(size=size)
            except RpcAbort as err:
                _abort(context, err)
            try:
                return handler(request, context)
            except RpcAbort as err:
                _abort(context, err)
            except Exception as err:
                if type(err) is Exception and not str(err):  # context.abort's own exception
                    raise
                quiet.warning(f"bug:{method}", "gateway %s failed: %s: %s", method, type(err).__name__, err)
                context.abort(grpc.StatusCode.INTERNAL, f"the gateway failed handling {method} "
                              f"({type(err).__name__}); see the gateway log")  # fmt: skip
            finally:
                admission.leave(size=size)
            raise RuntimeError("unreachable")  # pragma: no cover

        return handle

    def model_infer(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        core = self._core
        decision = core.decide(request, context.invocation_metadata(), time.perf_counter_ns())
        while True:
            sent = time.perf_counter_ns()
            try:
                call = self._pool[decision.upstream].unary("ModelInfer")
                response = call(decision.body, timeout=self._timeout(context), metadata=decision.forwarded)
                break
            except grpc.RpcError as err:
                code, details = err.code(), err.details()  # type: ignore[attr-defined]
                retry = core.failed(decision, code, details, sent)
                if retry is None:
                    raise core.abort_of(decision, code, details) from None
                decision = retry
        metadata, suffix = core.succeeded(decision, sent, request, response)
        if metadata:
            context.set_trailing_metadata(metadata)
        return response + suffix

    def model_stream_infer(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        try:
            self._admission.enter(stream=True)
        except RpcAbort as err:
            _abort(context, err)
        watch = self._reaper.watch(context)
        try:
            yield from self._stream(requests, context, watch)
        except RpcAbort as err:
            _abort(context, err)
        except grpc.RpcError as err:  # the client went away, or the reaper ended the stream
            if not watch.expired and context.is_active():
                _abort(context, upstream_abort(err))
        except Exception as err:
            if type(err) is Exception and not str(err):  # context.abort's own exception
                raise
            self._quiet.warning("bug:ModelStreamInfer", "gateway ModelStreamInfer failed: %s: %s",
                                type(err).__name__, err)  # fmt: skip
            context.abort(grpc.StatusCode.INTERNAL, f"the gateway failed handling ModelStreamInfer "
                          f"({type(err).__name__}); see the gateway log")  # fmt: skip
        finally:
            self._reaper.forget(watch)
            watch.cancel_upstream()
            self._admission.leave(stream=True)

    def _stream(self, requests: Iterator[bytes], context: grpc.ServicerContext, watch: StreamWatch) -> Iterator[bytes]:
        first = next(requests, None)
        if first is None:
            return
        watch.touch()
        decision = self._core.decide(first, context.invocation_metadata(), time.perf_counter_ns())
        if decision.live is not None:
            context.send_initial_metadata(self._core.response_metadata(decision))
        suffix = decision.body[len(first) :]
        meter = self._core.stream_meter(decision)  # TTFT/ITL per request id; every message stays on this variant

        def upstream_requests() -> Iterator[bytes]:
            meter.sent(first)
            yield decision.body
            for message in requests:
                watch.touch()
                meter.sent(message)
                yield message + suffix

        stub = self._pool[decision.upstream].stream("ModelStreamInfer")
        ended = "CANCELLED"
        try:
            call: Any = stub(
                upstream_requests(), timeout=timeout_of(context.time_remaining()), metadata=decision.forwarded
            )
            watch.upstream = call
            for response in call:
                watch.touch()
                meter.received(response)
                yield response
            ended = "OK"
        except grpc.RpcError as err:  # model_stream_infer answers it (scrubbed), or the reaper ended the stream
            ended = err.code().name  # type: ignore[attr-defined]
            raise
        finally:
            meter.finish(ended)

    def model_method(self, method: str) -> Unary:
        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            upstream, body, public = self._core.model_target(method, request)
            return rename_response(method, self._call(upstream, method, body, context), public)

        return handle

    def control(self, method: str) -> Unary:
        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            upstream = self._core.control_target(method, context.invocation_metadata())
            logger.info("control RPC %s forwarded to upstream %s for %s", method, upstream, context.peer())
            return self._call(upstream, method, request, context)

        return handle

    def _call(self, upstream: str, method: str, body: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            return self._pool[upstream].unary(method)(body, timeout=self._timeout(context))  # type: ignore[no-any-return]
        except grpc.RpcError as err:
            raise upstream_abort(err) from None

    def control_handler(self) -> grpc.GenericRpcHandler:
        """The control RPCs alone (refused unless enabled and authenticated), for the Envoy plane's local server."""
        handlers = {m: grpc.unary_unary_rpc_method_handler(self.guarded(m, self.control(m))) for m in CONTROL_METHODS}
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    @property
    def admission(self) -> Admission:
        return self._admission

    def generic_handler(self) -> grpc.GenericRpcHandler:
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        for method, streaming in service_methods():
            if method == "ModelInfer":
                handlers[method] = grpc.unary_unary_rpc_method_handler(self.guarded(method, self.model_infer))
            elif streaming:
                handlers[method] = grpc.stream_stream_rpc_method_handler(self.model_stream_infer)
            elif method in LOCAL_METHODS:
                answer = local_answer(method)
                handlers[method] = grpc.unary_unary_rpc_method_handler(lambda request, context, a=answer: a)
            elif method in MODEL_METHODS:
                handlers[method] = grpc.unary_unary_rpc_method_handler(self.guarded(method, self.model_method(method)))
            else:
                handlers[method] = grpc.unary_unary_rpc_method_handler(self.guarded(method, self.control(method)))
        return grpc.method_handlers_generic_handler(SERVICE, handlers)


def serve_threads(
    config: GatewayConfig,
    core: Forwarder,
    pool: UpstreamPool,
    address: str,
    credentials: grpc.ServerCredentials | None,
    options: list[tuple[str, object]],
    report: HealthReport,
    quiet: QuietLog,
) -> tuple[Callable[[], None], int]:
    """Start the thread-pool server; returns (stop, bound port)."""
    settings = config.server
    admission = Admission(settings.threads, settings.max_streams, settings.max_in_flight_bytes)
    reaper = IdleReaper(settings.stream_idle_timeout_s)
    workers = settings.threads + HEALTH_THREADS
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kiln-gw"),
        handlers=[ThreadHandlers(core, pool, config, admission, reaper, quiet).generic_handler()],
        options=options,
        maximum_concurrent_rpcs=workers + QUEUE_SLACK,
    )
    health_pb2_grpc.add_HealthServicer_to_server(ThreadHealth(report, admission), server)
    bound = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    server.start()

    def stop() -> None:
        report.stopping = True
        server.stop(grace=1.0).wait(5)
        reaper.stop()

    return stop, bound
