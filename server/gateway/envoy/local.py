"""Kiln's own small gRPC server beside Envoy: health answers and the shadow comparator.

* ``grpc.health.v1.Health`` (the data-plane port's readiness for Kubernetes probes) and
  ``ServerLive``/``ServerReady``/``ServerMetadata`` are answered by the gateway itself (as on the
  Python data plane) when no ``default_upstream`` is configured; Envoy routes them here.
* **Shadow comparator**: Envoy mirrors a fraction of a route's ModelInfer calls here and discards
  what comes back, so agreement is measured on Kiln's side: for each mirrored request the
  comparator asks the route's baseline (the candidate when the baseline is the shadow, as in a canary
  step's sampling) and its shadow variant (on the ShadowSender's bounded
  pool) and records the comparison under the shadow variant, exactly like the Python data plane.
  Extra load per mirrored request: one more baseline inference, one shadow inference, and one
  Python gRPC server leg plus two client legs, all off the client's path (the mirror is
  fire-and-forget for Envoy). Copies beyond ``shadow.max_in_flight`` are dropped and counted.
* **The Python data plane's rules** (``ThreadHandlers``): ``ModelStreamInfer`` of a route whose
  model name must change (Envoy cannot rewrite a stream's messages), and, under the
  ``kiln.delegated.GRPCInferenceService`` name, requests that name a ``model_version`` or pin a
  variant at weight 0 (admin credential, ``pinning``) are served here (``render._delegated``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import HealthServicer

from core.errors import UnavailableError
from server.gateway.envoy.lua import MODEL_HEADER
from server.gateway.envoy.render import DELEGATED_SERVICE
from server.gateway.forward import local_answer
from server.gateway.metrics import GatewayMetrics
from server.gateway.serve_threads import ThreadHandlers
from server.gateway.shadow import ShadowSender
from server.gateway.table import LiveRoute, RouteTable
from server.gateway.upstreams import SERVICE, UpstreamPool

logger = logging.getLogger(__name__)


class Comparator:
    """Receives mirrored requests (public model name in ``x-kiln-model``) and compares answers."""

    def __init__(
        self, table: RouteTable, pool: UpstreamPool, shadow: ShadowSender, metrics: GatewayMetrics, max_in_flight: int
    ) -> None:
        self._table = table
        self._pool = pool
        self._shadow = shadow
        self._metrics = metrics
        self._slots = threading.BoundedSemaphore(max_in_flight)

    def mirrored(self, request: bytes, metadata: Sequence[tuple[str, Any]]) -> None:
        public = next((str(v) for k, v in metadata if k == MODEL_HEADER), None)
        live = self._table.snapshot.routes.get(public) if public else None
        if live is None or live.shadow_index is None or live.route.shadow is None:
            return
        if not self._slots.acquire(blocking=False):
            self._metrics.record_shadow_dropped(live.public, live.route.variants[live.shadow_index].name)
            return
        try:
            self._compare(live, live.shadow_index, request)
        finally:
            self._slots.release()

    def _compare(self, live: LiveRoute, shadow_index: int, request: bytes) -> None:
        """The shadow variant's answer against the reference's: the baseline, or when the baseline is
        the shadow (a canary step samples the baseline against the served candidate), the heaviest
        other variant. Recorded under the shadow variant, as on the Python data plane."""
        variants = live.route.variants
        others = [i for i in range(len(variants)) if i != shadow_index]
        if not others:
            return
        reference = 0 if shadow_index != 0 else max(others, key=lambda i: variants[i].weight)
        shadow = variants[shadow_index]
        try:
            call = self._pool[variants[reference].upstream].unary("ModelInfer")
            served = call(request + live.request_suffixes[reference], timeout=30.0)
        except grpc.RpcError as err:
            logger.debug("reference call for the shadow comparison of %s failed: %s", live.public, err)
            self._metrics.record_shadow(live.public, shadow.name, None)
            return
        body = request + live.request_suffixes[shadow_index]
        shadow_call = self._pool[shadow.upstream].unary("ModelInfer")
        self._shadow.submit(live.public, shadow.name, lambda: shadow_call(body, timeout=30.0), served)


def _handlers(comparator: Comparator, python: ThreadHandlers | None) -> list[grpc.GenericRpcHandler]:
    def answer(method: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        payload = local_answer(method)
        return lambda request, context: payload

    def mirrored(request: bytes, context: grpc.ServicerContext) -> bytes:
        comparator.mirrored(request, context.invocation_metadata())
        return b""

    identity = {"request_deserializer": None, "response_serializer": None}
    methods = {m: grpc.unary_unary_rpc_method_handler(answer(m), **identity)
               for m in ("ServerLive", "ServerReady", "ServerMetadata")}  # fmt: skip
    methods["ModelInfer"] = grpc.unary_unary_rpc_method_handler(mirrored, **identity)
    if python is None:
        return [grpc.method_handlers_generic_handler(SERVICE, methods)]
    methods["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(python.model_stream_infer, **identity)
    delegated = {  # requests Envoy hands to the Python data plane (render._delegated)
        "ModelInfer": grpc.unary_unary_rpc_method_handler(python.guarded("ModelInfer", python.model_infer), **identity),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(python.model_stream_infer, **identity),
    }
    return [
        grpc.method_handlers_generic_handler(SERVICE, methods),
        grpc.method_handlers_generic_handler(DELEGATED_SERVICE, delegated),
    ]


def start_local_server(
    comparator: Comparator,
    python: ThreadHandlers | None,
    threads: int,
    extra: Sequence[grpc.GenericRpcHandler] = (),
    health: Any = None,
) -> tuple[Callable[[], None], str]:
    """Serve on 127.0.0.1 (a free port); returns (stop, "127.0.0.1:PORT"). An open stream holds a thread.

    ``extra``: more handlers (the Python plane's control RPCs, which Envoy routes here so the same
    rules apply); ``health``: a ``grpc.health.v1`` servicer (Envoy routes the Health service here).
    """  # fmt: skip
    server = grpc.server(
        ThreadPoolExecutor(max_workers=threads + 8, thread_name_prefix="kiln-envoy-local"),
        handlers=[*_handlers(comparator, python), *extra],
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 256 * 2**20)],
    )
    if health is None:  # grpc.health.v1 for the data-plane port (Kubernetes gRPC probes)
        health = HealthServicer()
        health.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    if port == 0:
        raise UnavailableError("the gateway's local gRPC server could not bind a port on 127.0.0.1")
    server.start()
    return (lambda: server.stop(grace=0.5).wait()), f"127.0.0.1:{port}"
