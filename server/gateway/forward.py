"""The data plane's decisions, independent of the gRPC flavour that carries them.

``Forwarder`` decides, for request bytes and metadata, which upstream gets which bytes
(``decide``), what happens after a failure (``failed``: record, eject, maybe a retry decision)
and after a success (``succeeded``: record, shadow, response metadata). The thin transports in
``serve_threads.py`` (grpc thread-pool server) and ``serve_aio.py`` (grpc.aio) only move bytes.

The hot path: read the model name from the bytes, pick a variant, append the variant's model
name/version to the request bytes (protobuf keeps the last value), call the upstream with the
client's remaining deadline, append the public model name to the response bytes, and say
``kiln-variant`` in the trailing metadata. Tensors are never decoded here.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc
from tritonclient.grpc import service_pb2

from core.errors import InvalidInputError, NotFoundError
from server.gateway.config import GatewayConfig
from server.gateway.control import (
    Metadata,
    RpcAbort,
    bearer_token,
    check_credential,
    client_details,
    control_upstream,
    is_admin,
    shown,
)
from server.gateway.metrics import GatewayMetrics
from server.gateway.resilience import OutlierDetector
from server.gateway.routing import PIN_HEADER, choose_pinned, choose_sticky, choose_variant, choose_weighted
from server.gateway.shadow import ShadowSender
from server.gateway.stream_metrics import StreamMetrics
from server.gateway.streams import StreamMeter, StreamTarget, TokenReplayer
from server.gateway.table import LiveRoute, RouteTable
from server.gateway.upstreams import UpstreamPool
from server.gateway.wire import encode_string_field, name_version_suffix, read_model_name, read_name_version

PASSTHROUGH_ROUTE = "(passthrough)"
MODEL_METHODS = ("ModelReady", "ModelMetadata", "ModelConfig", "ModelStatistics")
LOCAL_METHODS = ("ServerLive", "ServerReady", "ServerMetadata")
NO_DEADLINE_S = 1e6  # time_remaining() above this means the client set no deadline
_DROP_METADATA = ("kiln-", "grpc-", ":", "user-agent", "authorization")  # never pass the admin token on
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@dataclass(frozen=True)
class Decision:
    """Where one request goes: ``body`` to ``upstream``, recorded as (``route``, ``variant``)."""

    route: str
    variant: str
    upstream: str
    body: bytes
    live: LiveRoute | None  # None: an unrouted model passed through to the default upstream
    index: int
    pin: str | None
    forwarded: Metadata | None
    start: int
    retried: bool = False


def forwarded_metadata(metadata: Sequence[Any]) -> Metadata | None:
    kept = tuple((m[0], m[1]) for m in metadata if not m[0].startswith(_DROP_METADATA))
    return kept or None


def timeout_of(remaining: float | None) -> float | None:
    return None if remaining is None or remaining > NO_DEADLINE_S else max(remaining, 0.001)


class Forwarder:
    """Routing, retry, measurement and shadow decisions for every request of one gateway."""

    def __init__(
        self,
        config: GatewayConfig,
        table: RouteTable,
        metrics: GatewayMetrics,
        health: OutlierDetector,
        shadow: ShadowSender,
        shadow_pool: UpstreamPool,
        streams: StreamMetrics | None = None,
        admin_token: str | None = None,
    ) -> None:
        self._config = config
        self._table = table
        self._metrics = metrics
        self._health = health
        self._shadow = shadow
        self._shadow_pool = shadow_pool
        self.streams = streams if streams is not None else StreamMetrics(config.metrics.max_samples)
        self._replayer = TokenReplayer(self.streams, shadow, shadow_pool)
        self._retry = config.resilience.retry_on_baseline
        self._random = random.random
        self._metadata: dict[tuple[str, str], Metadata] = {}
        self._admin_token = admin_token.encode() if admin_token else None

    # ---- ModelInfer / ModelStreamInfer --------------------------------------------------------
    def decide(self, request: bytes, metadata: Sequence[Any], start: int, masked: bool = True) -> Decision:
        """The variant and bytes for one request (``metadata``: (key, value) pairs)."""
        try:
            public, version = read_name_version(request)
        except InvalidInputError as err:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from err
        live = self._table.snapshot.routes.get(public)
        if live is None:
            upstream = self.unrouted_upstream(public)
            return Decision(PASSTHROUGH_ROUTE, upstream, upstream, request, None, -1, None,
                            forwarded_metadata(metadata), start)  # fmt: skip
        pin = key = None
        sticky = live.sticky_header
        for item in metadata:
            if item[0] == PIN_HEADER:
                pin = str(item[1])
            elif item[0] == sticky:
                key = item[1].encode() if isinstance(item[1], str) else item[1]
        allowed = self._allowed(live) if masked and self._health.any_ejected else None
        if pin is None and not version:
            index = choose_variant(live.options, draw=self._random(), key=key, allowed=allowed).index
        else:
            index = self._chosen(live, pin, version, key, allowed, metadata)
            pin = live.route.variants[index].name  # a chosen version is a pin too: never retried elsewhere
        variant = live.route.variants[index]
        return Decision(public, variant.name, variant.upstream, request + live.request_suffixes[index], live, index,
                        pin, forwarded_metadata(metadata), start)  # fmt: skip

    def _chosen(self, live: LiveRoute, pin: str | None, version: str, key: bytes | None,
                allowed: list[bool] | None, metadata: Sequence[Any]) -> int:  # fmt: skip
        """The variant a ``kiln-variant`` pin or a client's ``model_version`` asks for, if it may have it."""
        variants = live.route.variants
        if pin is not None:
            try:
                index = choose_pinned(live.options, pin)
            except NotFoundError as err:
                raise RpcAbort(grpc.StatusCode.NOT_FOUND, str(err)) from err
            if version and variants[index].version != version:
                raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{PIN_HEADER} pins {shown(pin)}, which serves model_version "
                               f"{variants[index].version or '(the upstream default)'!r}, but the request asks for "
                               f"model_version {shown(version)}; send one or the other")  # fmt: skip
            self._check_pinnable(live, [index], metadata, f"{PIN_HEADER} {shown(pin)}")
            return index
        matching = [i for i, v in enumerate(variants) if v.version == version]
        if not matching:
            offered = sorted({v.version for v in variants if v.version})
            raise RpcAbort(grpc.StatusCode.NOT_FOUND,
                           f"route {live.public!r} does not serve model_version {shown(version)} (its variants pin "
                           f"versions {offered}); send an empty model_version to let the gateway choose")  # fmt: skip
        self._check_pinnable(live, matching, metadata, f"model_version {shown(version)}")
        open_ = [i for i in matching if variants[i].weight > 0] or matching
        mask = [i in open_ and (allowed is None or allowed[i]) for i in range(len(variants))]
        if not any(mask):  # every one of them is ejected: try them anyway
            mask = [i in open_ for i in range(len(variants))]
        if key is not None:
            return choose_sticky(live.options, key, mask)
        return choose_weighted(live.options, self._random(), mask)

    def _check_pinnable(self, live: LiveRoute, indices: list[int], metadata: Sequence[Any], what: str) -> None:
        """Clients may pin only variants with weight > 0 unless the route says ``pinning: any`` or they are admin."""
        variants = live.route.variants
        if live.route.pinning == "any" or any(variants[i].weight > 0 for i in indices):
            return
        if is_admin(metadata, self._admin_token):
            return
        names = [variants[i].name for i in indices]
        open_ = [v.name for v in variants if v.weight > 0]
        if bearer_token(metadata) is not None:
            check_credential(metadata, self._admin_token, f"{what} (variants {names} at weight 0)")
        raise RpcAbort(grpc.StatusCode.PERMISSION_DENIED,
                       f"{what} selects variant(s) {names} of route {live.public!r}, which have weight 0 "
                       f"(a candidate or shadow); clients may pin {open_}. Pinning it needs the admin credential "
                       f"('authorization: Bearer <token>') or the route's 'pinning: any'")  # fmt: skip

    def unrouted_upstream(self, public: str) -> str:
        upstream = self._config.default_upstream
        if self._config.unknown_models != "passthrough" or upstream is None:
            routed = sorted(self._table.snapshot.routes)
            raise RpcAbort(
                grpc.StatusCode.NOT_FOUND,
                f"model {shown(public)} is not routed by this gateway; routed models are {routed}",
            )
        return upstream

    def succeeded(self, decision: Decision, sent: int, request: bytes, response: bytes) -> tuple[Metadata, bytes]:
        """Record a success, maybe send a shadow copy; returns (trailing metadata, response suffix)."""
        done = time.perf_counter_ns()
        self._health.record_success(decision.upstream)
        self._metrics.record(decision.route, decision.variant, "OK", done - sent, done - decision.start)
        live = decision.live
        if live is None:
            return (), b""
        shadow = live.shadow_index
        if shadow is not None and shadow != decision.index and self._random() < live.shadow_fraction:
            self._send_shadow(live, shadow, request, response)
        return self.response_metadata(decision), live.response_suffix

    def stream_meter(self, decision: Decision) -> StreamMeter:
        """Times one ModelStreamInfer call's token responses (TTFT, ITL) and samples greedy replays."""
        target = StreamTarget(decision.route, decision.variant, decision.live, decision.index)
        return StreamMeter(target, self._metrics, self.streams, self._replayer, self._random)

    def failed(self, decision: Decision, code: grpc.StatusCode, details: str, sent: int) -> Decision | None:
        """Record a failure; on UNAVAILABLE eject the upstream and return a retry decision (once)."""
        done = time.perf_counter_ns()
        self._metrics.record(decision.route, decision.variant, code.name, done - sent, done - decision.start)
        if code != _UNAVAILABLE:
            return None
        self._health.record_failure(decision.upstream, details)
        live = decision.live
        if live is None or decision.retried or decision.pin is not None or not self._retry:
            return None
        index = self._retry_index(live, decision.index)
        if index is None:
            return None
        variant = live.route.variants[index]
        body = decision.body[: -len(live.request_suffixes[decision.index])] + live.request_suffixes[index]
        return replace(decision, variant=variant.name, upstream=variant.upstream, body=body, index=index, retried=True)

    def abort_of(self, decision: Decision, code: grpc.StatusCode, details: str) -> RpcAbort:
        return RpcAbort(code, client_details(details), self.response_metadata(decision) if decision.live else ())

    def response_metadata(self, decision: Decision) -> Metadata:
        key = (decision.route, decision.variant)
        cached = self._metadata.get(key)
        if cached is None:
            cached = self._metadata[key] = (("kiln-variant", decision.variant), ("kiln-model", decision.route))
        return cached

    def _retry_index(self, live: LiveRoute, failed: int) -> int | None:
        """The baseline, or when the baseline failed, the heaviest other healthy variant."""
        ejected = self._health.ejected_set()
        variants = live.route.variants
        others = sorted((i for i in range(1, len(variants)) if i != failed), key=lambda i: -variants[i].weight)
        for index in ([0] if failed != 0 else []) + others:
            if variants[index].upstream not in ejected:
                return index
        return None

    def _allowed(self, live: LiveRoute) -> list[bool] | None:
        ejected = self._health.ejected_set()
        if not ejected:
            return None
        allowed = [v.upstream not in ejected for v in live.route.variants]
        return allowed if any(allowed) else None  # all ejected: use them all rather than fail

    def _send_shadow(self, live: LiveRoute, index: int, request: bytes, served: bytes) -> None:
        variant = live.route.variants[index]
        body = request + live.request_suffixes[index]
        call = self._shadow_pool[variant.upstream].unary("ModelInfer")
        self._shadow.submit(live.public, variant.name, lambda: call(body, timeout=30.0), served)

    # ---- model-scoped control methods: answered by the baseline under the public name --------
    def model_target(self, method: str, request: bytes) -> tuple[str, bytes, str | None]:
        """(upstream, request bytes, public name to put in the answer or None) for ``method``."""
        try:
            public = read_model_name(request)
        except InvalidInputError as err:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from err
        live = self._table.snapshot.routes.get(public) if public else None
        if live is None:
            return self.default_upstream(method, public), request, None
        baseline = live.route.baseline
        return baseline.upstream, request + name_version_suffix(baseline.model, baseline.version), public

    def default_upstream(self, method: str, public: str = "") -> str:
        upstream = self._config.default_upstream
        if public and self._config.unknown_models != "passthrough":
            upstream = None
        if upstream is None:
            code = grpc.StatusCode.NOT_FOUND if public else grpc.StatusCode.UNIMPLEMENTED
            what = f"model {shown(public)} is not routed by this gateway" if public else f"{method} has no upstream"
            raise RpcAbort(code, f"{what}; routed models are {sorted(self._table.snapshot.routes)}")
        return upstream

    def control_target(self, method: str, metadata: Sequence[Any]) -> str:
        """The upstream a control RPC goes to, if it is enabled there and the caller is admin."""
        config = self._config
        return control_upstream(method, metadata, config.upstreams, config.default_upstream, self._admin_token)


def upstream_abort(err: grpc.RpcError) -> RpcAbort:
    """An upstream's error as the client gets it: same code, details without addresses or paths."""
    return RpcAbort(err.code(), client_details(err.details()))  # type: ignore[attr-defined]


def rename_response(method: str, response: bytes, public: str | None) -> bytes:
    """Make a model-scoped answer name the public model."""
    if public is None:
        return response
    if method == "ModelMetadata":
        return response + encode_string_field(1, public)
    if method == "ModelConfig":
        parsed = service_pb2.ModelConfigResponse.FromString(response)
        parsed.config.name = public
        return parsed.SerializeToString()
    return response


def local_answer(method: str) -> bytes:
    """What the gateway itself answers for server-scoped health and metadata calls."""
    if method == "ServerLive":
        return service_pb2.ServerLiveResponse(live=True).SerializeToString()
    if method == "ServerReady":
        return service_pb2.ServerReadyResponse(ready=True).SerializeToString()
    return service_pb2.ServerMetadataResponse(name="kiln-gateway", version="0.1.0").SerializeToString()


def service_methods() -> list[tuple[str, bool]]:
    """(method name, is bidirectional stream) for every GRPCInferenceService method."""
    service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    return [(m.name, m.client_streaming) for m in service.methods]
