"""The gateway's data plane on grpc's thread-pool server (one thread per RPC in flight)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NoReturn

import grpc

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

Unary = Callable[[bytes, grpc.ServicerContext], bytes]


def _abort(context: grpc.ServicerContext, err: RpcAbort) -> NoReturn:
    if err.metadata:
        context.set_trailing_metadata(err.metadata)
    context.abort(err.code, err.details)
    raise RuntimeError("grpc context.abort returned")  # pragma: no cover - abort always raises


class ThreadHandlers:
    """Bytes-in/bytes-out handlers over sync upstream channels."""

    def __init__(self, core: Forwarder, pool: UpstreamPool) -> None:
        self._core = core
        self._pool = pool

    def model_infer(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        core = self._core
        try:
            decision = core.decide(request, context.invocation_metadata(), time.perf_counter_ns())
        except RpcAbort as err:
            _abort(context, err)
        while True:
            sent = time.perf_counter_ns()
            try:
                call = self._pool[decision.upstream].unary("ModelInfer")
                response = call(
                    decision.body, timeout=timeout_of(context.time_remaining()), metadata=decision.forwarded
                )
                break
            except grpc.RpcError as err:
                code, details = err.code(), err.details()  # type: ignore[attr-defined]
                retry = core.failed(decision, code, details, sent)
                if retry is None:
                    _abort(context, core.abort_of(decision, code, details))
                decision = retry
        metadata, suffix = core.succeeded(decision, sent, request, response)
        if metadata:
            context.set_trailing_metadata(metadata)
        return response + suffix

    def model_stream_infer(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        first = next(requests, None)
        if first is None:
            return
        try:
            decision = self._core.decide(first, context.invocation_metadata(), time.perf_counter_ns())
        except RpcAbort as err:
            _abort(context, err)
        if decision.live is not None:
            context.send_initial_metadata(self._core.response_metadata(decision))
        suffix = decision.body[len(first) :]
        meter = self._core.stream_meter(decision)  # TTFT/ITL per request id; every message stays on this variant

        def upstream_requests() -> Iterator[bytes]:
            meter.sent(first)
            yield decision.body
            for message in requests:
                meter.sent(message)
                yield message + suffix

        call = self._pool[decision.upstream].stream("ModelStreamInfer")
        ended = "CANCELLED"
        try:
            responses = call(
                upstream_requests(), timeout=timeout_of(context.time_remaining()), metadata=decision.forwarded
            )
            for response in responses:
                meter.received(response)
                yield response
            ended = "OK"
        except grpc.RpcError as err:
            ended = err.code().name  # type: ignore[attr-defined]
            _abort(context, RpcAbort(err.code(), err.details()))  # type: ignore[attr-defined]
        finally:
            meter.finish(ended)

    def model_method(self, method: str) -> Unary:
        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                upstream, body, public = self._core.model_target(method, request)
            except RpcAbort as err:
                _abort(context, err)
            return rename_response(method, self._call(upstream, method, body, context), public)

        return handle

    def passthrough(self, method: str) -> Unary:
        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                upstream = self._core.default_upstream(method)
            except RpcAbort as err:
                _abort(context, err)
            return self._call(upstream, method, request, context)

        return handle

    def _call(self, upstream: str, method: str, body: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            return self._pool[upstream].unary(method)(body, timeout=timeout_of(context.time_remaining()))
        except grpc.RpcError as err:
            _abort(context, RpcAbort(err.code(), err.details()))  # type: ignore[attr-defined]

    def generic_handler(self) -> grpc.GenericRpcHandler:
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        for method, streaming in service_methods():
            if method == "ModelInfer":
                handlers[method] = grpc.unary_unary_rpc_method_handler(self.model_infer)
            elif streaming:
                handlers[method] = grpc.stream_stream_rpc_method_handler(self.model_stream_infer)
            elif method in LOCAL_METHODS:
                answer = local_answer(method)
                handlers[method] = grpc.unary_unary_rpc_method_handler(lambda request, context, a=answer: a)
            elif method in MODEL_METHODS:
                handlers[method] = grpc.unary_unary_rpc_method_handler(self.model_method(method))
            else:
                handlers[method] = grpc.unary_unary_rpc_method_handler(self.passthrough(method))
        return grpc.method_handlers_generic_handler(SERVICE, handlers)


def serve_threads(
    config: GatewayConfig,
    core: Forwarder,
    pool: UpstreamPool,
    address: str,
    credentials: grpc.ServerCredentials | None,
    options: list[tuple[str, object]],
) -> tuple[Callable[[], None], int]:
    """Start the thread-pool server; returns (stop, bound port)."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers=config.server.threads, thread_name_prefix="kiln-gw"),
        handlers=[ThreadHandlers(core, pool).generic_handler()],
        options=options,
    )
    bound = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    server.start()
    return (lambda: server.stop(grace=1.0).wait(5)), bound
