"""Envoy configuration from the gateway config and the live routes: pure functions, plain dicts.

Every object is built in code (``dict``/``list`` literals filled from typed values) and dumped as
JSON by the caller; nothing is pasted into text templates. The pieces:

* one **cluster per (route, variant)**: the upstream's address, HTTP/2, and upstream filters that
  rewrite the model name/version for that variant (Lua, unary calls), put the public name in the
  answer and add ``kiln-variant``/``kiln-model`` trailers; one plain cluster per upstream for
  pass-through traffic (``default_upstream``);
* one **route configuration**: per public model, pins (``kiln-variant``) first, then the model
  control methods (answered by the baseline), then ``weighted_clusters`` whose weights are runtime
  keys (``runtime_key(route)``) so a weight change is one admin call; sticky routes hash a header;
  shadows mirror a runtime fraction to the shadow variant's cluster. Unknown model names get
  NOT_FOUND and unreadable bodies INVALID_ARGUMENT, both as gRPC statuses from Envoy itself;
* the **bootstrap**: one listener (HTTP/2, gRPC field extraction of ``model_name``, the Lua filter
  that turns it into a header, router), admin on 127.0.0.1, an access log with microsecond
  durations (Envoy's own latency histograms count whole milliseconds), and either the routes
  inline (``static=True``: what ``envoy --mode validate`` checks) or file-based xDS (CDS + RDS
  files in a watched directory, replaced by atomic rename).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.gateway.config import CONTROL_METHODS as UPSTREAM_CONTROL_METHODS
from server.gateway.config import ClientTls, GatewayConfig, ResilienceSettings, Route, ServerTls, Upstream
from server.gateway.envoy.lua import EXTRACTION_NAMESPACE, MODEL_HEADER, ROUTE_SCRIPT, VERSION_HEADER, rewrite_script
from server.gateway.routing import PIN_HEADER

SERVICE = "inference.GRPCInferenceService"
PREFIX = f"/{SERVICE}/"
STREAM_METHOD = "ModelStreamInfer"
CONTROL_METHODS = ("ModelMetadata", "ModelReady", "ModelConfig", "ModelStatistics")
SERVER_METHODS = ("ServerLive", "ServerReady", "ServerMetadata")
HEALTH_PREFIX = "/grpc.health.v1.Health/"
ROUTE_CONFIG = "kiln"
LOCAL_CLUSTER = "kiln:local"
DELEGATED_SERVICE = "kiln.delegated.GRPCInferenceService"  # Kiln's local server: the Python data plane
LISTENER = "kiln"
STAT_PREFIX = "kiln"
WEIGHT_UNITS = 100  # Envoy weights are integers: 1 % = 100 units, so 0.01 % steps survive
ACCESS_LOG_FORMAT = (
    "%UPSTREAM_CLUSTER% %GRPC_STATUS_NUMBER% %COMMON_DURATION(DS_RX_BEG:DS_TX_END:us)% "
    "%COMMON_DURATION(US_TX_BEG:US_RX_END:us)% %COMMON_DURATION(US_TX_BEG:DS_TX_END:us)% %REQ(:PATH)% "
    "%UPSTREAM_REQUEST_ATTEMPT_COUNT% %TRAILER(KILN-VARIANT)% %RESP(KILN-VARIANT)% %RESPONSE_FLAGS% "
    "%REQ(GRPC-TIMEOUT)% %DURATION%\n"
)
# Envoy histogram buckets (ms) for its own per-cluster stats (the access log carries microseconds).
HISTOGRAM_BUCKETS_MS = (0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 25, 50, 100, 250, 500, 1000, 5000)
_TYPE = "type.googleapis.com/envoy."
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_GRPC_CODES = {"OK": 0, "INVALID_ARGUMENT": 3, "NOT_FOUND": 5, "UNIMPLEMENTED": 12, "UNAVAILABLE": 14}


@dataclass(frozen=True)
class Layout:
    """Where the rendered Envoy listens and keeps its files."""

    host: str
    port: int  # 0 = any free port (read back from the admin API)
    admin_port: int  # 0 = any free port (Envoy writes it to ``admin_address_path``)
    directory: Path  # descriptor set, xDS files, access log
    tls: ServerTls | None = None
    max_message_bytes: int = 256 * 2**20

    @property
    def descriptor_path(self) -> Path:
        return self.directory / "kserve_descriptor.pb"

    @property
    def cds_path(self) -> Path:
        return self.directory / "xds" / "cds.json"

    @property
    def rds_path(self) -> Path:
        return self.directory / "xds" / "rds.json"

    @property
    def access_log_path(self) -> Path:
        return self.directory / "access.log"

    @property
    def admin_address_path(self) -> Path:
        return self.directory / "admin_address"


def cluster_name(route: str, variant: str) -> str:
    """``route/variant``: '/' never occurs in a route or variant name, so the pair reads back."""
    return f"{route}/{variant}"


def upstream_cluster_name(upstream: str) -> str:
    return f"upstream:{upstream}"


def runtime_prefix(route: str) -> str:
    return f"kiln.weights.{route}"


def runtime_weights(routes: Mapping[str, Route], ejected: frozenset[str] = frozenset()) -> dict[str, int]:
    """Runtime key -> integer weight for every variant (each route's weights sum to 10,000). A
    variant whose upstream is ``ejected`` gets 0 and its share goes to the baseline (or, when the
    baseline is the one ejected, the heaviest healthy variant); all ejected: weights unchanged."""
    out: dict[str, int] = {}
    for public, route in routes.items():
        units = weight_units(route)
        healthy = [v.upstream not in ejected for v in route.variants]
        if not all(healthy) and any(healthy):
            heir = 0 if healthy[0] else max((i for i, ok in enumerate(healthy) if ok), key=lambda i: units[i])
            for index, ok in enumerate(healthy):
                if not ok:
                    units[heir] += units[index]
                    units[index] = 0
        for variant, weight in zip(route.variants, units, strict=True):
            out[f"{runtime_prefix(public)}.{cluster_name(public, variant.name)}"] = weight
    return out


def shadow_runtime_key(route: str) -> str:
    return f"kiln.shadow.{route}"


def weight_units(route: Route) -> list[int]:
    """Weights as integers summing to exactly 100 * WEIGHT_UNITS (rounding goes to the heaviest)."""
    units = [round(v.weight * WEIGHT_UNITS) for v in route.variants]
    units[units.index(max(units))] += 100 * WEIGHT_UNITS - sum(units)
    return units


def shadow_runtime(routes: Mapping[str, Route]) -> dict[str, int]:
    """Runtime key -> mirrored fraction in millionths for every route with a shadow."""
    return {shadow_runtime_key(p): round(r.shadow.percent * 10_000) for p, r in routes.items() if r.shadow}


def _typed(kind: str, **fields: Any) -> dict[str, Any]:
    return {"@type": _TYPE + kind, **fields}


def _socket_address(address: str) -> dict[str, Any]:
    host, _, port = address.rpartition(":")
    return {"socket_address": {"address": host.strip("[]"), "port_value": int(port)}}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _data_source(path: Path | None) -> dict[str, Any] | None:
    return {"filename": str(Path(path).resolve())} if path is not None else None


def upstream_tls_socket(tls: ClientTls, host: str) -> dict[str, Any]:
    context: dict[str, Any] = {}
    if tls.ca is not None:
        context["validation_context"] = {"trusted_ca": _data_source(tls.ca)}
    if tls.cert is not None and tls.key is not None:
        context["tls_certificates"] = [
            {"certificate_chain": _data_source(tls.cert), "private_key": _data_source(tls.key)}
        ]
    upstream = {"common_tls_context": context, "sni": tls.server_name or host.strip("[]")}
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": _typed("extensions.transport_sockets.tls.v3.UpstreamTlsContext", **upstream),
    }


def downstream_tls_socket(tls: ServerTls) -> dict[str, Any]:
    context: dict[str, Any] = {
        "tls_certificates": [{"certificate_chain": _data_source(tls.cert), "private_key": _data_source(tls.key)}],
        "alpn_protocols": ["h2"],
    }
    fields: dict[str, Any] = {"common_tls_context": context}
    if tls.client_ca is not None:
        context["validation_context"] = {"trusted_ca": _data_source(tls.client_ca)}
        fields["require_client_certificate"] = True
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": _typed("extensions.transport_sockets.tls.v3.DownstreamTlsContext", **fields),
    }


def _trailers(pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """``pairs`` in the response trailers (unary answers, as the Python plane) and headers (a
    stream's initial metadata; an error's trailers-only answer)."""
    appends = [
        {"append": {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}} for k, v in pairs
    ]
    return {"response_trailers_mutations": appends, "response_mutations": appends}


def _cluster(
    name: str, upstream: Upstream, max_message_bytes: int, http_filters: list[dict[str, Any]] | None
) -> dict[str, Any]:
    host = upstream.address.rpartition(":")[0]
    options: dict[str, Any] = {
        "explicit_http_config": {"http2_protocol_options": {"max_concurrent_streams": 1024}},
    }
    if http_filters:
        options["http_filters"] = [
            *http_filters,
            {"name": "envoy.filters.http.upstream_codec",
             "typed_config": _typed("extensions.filters.http.upstream_codec.v3.UpstreamCodec")},
        ]  # fmt: skip
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if _is_ip(host) else "STRICT_DNS",
        "connect_timeout": "2s",
        "per_connection_buffer_limit_bytes": max_message_bytes,
        "circuit_breakers": {
            "thresholds": [
                {"max_connections": 1024, "max_pending_requests": 100_000, "max_requests": 100_000, "max_retries": 1024}
            ]
        },
        "typed_extension_protocol_options": {_HTTP_OPTIONS: _typed(_HTTP_OPTIONS.removeprefix("envoy."), **options)},
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket_address(upstream.address)}}]}],
        },
    }
    if upstream.tls is not None:
        cluster["transport_socket"] = upstream_tls_socket(upstream.tls, host)
    return cluster


def outlier_detection(resilience: ResilienceSettings) -> dict[str, Any]:
    """Eject a variant's upstream after ``failures_to_eject`` consecutive failures, for a growing time."""
    failures = resilience.failures_to_eject
    return {
        "consecutive_5xx": failures,
        "consecutive_gateway_failure": failures,
        "consecutive_local_origin_failure": failures,
        "split_external_local_origin_errors": True,
        "enforcing_consecutive_5xx": 100,
        "enforcing_consecutive_gateway_failure": 100,
        "enforcing_consecutive_local_origin_failure": 100,
        "enforcing_success_rate": 0,
        "interval": _duration(min(resilience.base_ejection_s, 1.0)),
        "base_ejection_time": _duration(resilience.base_ejection_s),
        "max_ejection_time": _duration(resilience.max_ejection_s),
        "max_ejection_percent": 100,
    }


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def variant_cluster(public: str, route: Route, variant: str, upstreams: Mapping[str, Upstream],
                    max_message_bytes: int) -> dict[str, Any]:  # fmt: skip
    v = route.variant(variant)
    filters = [
        {"name": "kiln.rewrite",
         "typed_config": _typed("extensions.filters.http.lua.v3.Lua",
                                default_source_code={"inline_string": rewrite_script(v.model, v.version, public)})},
        {"name": "kiln.trailers",
         "typed_config": _typed("extensions.filters.http.header_mutation.v3.HeaderMutation",
                                mutations=_trailers([("kiln-variant", v.name), ("kiln-model", public)]))},
    ]  # fmt: skip
    return _cluster(cluster_name(public, v.name), upstreams[v.upstream], max_message_bytes, filters)


def render_clusters(
    config: GatewayConfig, routes: Mapping[str, Route], max_message_bytes: int, local_address: str
) -> list[dict[str, Any]]:
    """Every cluster: one per (route, variant), one per upstream, and Kiln's local server."""
    clusters = []
    for public, route in sorted(routes.items()):
        for v in route.variants:
            cluster = variant_cluster(public, route, v.name, config.upstreams, max_message_bytes)
            cluster["outlier_detection"] = outlier_detection(config.resilience)
            clusters.append(cluster)
    clusters += [
        _cluster(upstream_cluster_name(name), upstream, max_message_bytes, None)
        for name, upstream in sorted(config.upstreams.items())
    ]
    clusters.append(local_cluster(local_address))
    return clusters


def _grpc_error(code: str, message: str) -> dict[str, Any]:
    """A route action answering with a gRPC status (HTTP 200, trailers-only)."""
    headers = [("content-type", "application/grpc"), ("grpc-status", str(_GRPC_CODES[code])), ("grpc-message", message)]
    return {
        "direct_response": {"status": 200},
        "response_headers_to_add": [
            {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"} for k, v in headers
        ],
    }


def _escape(text: str) -> str:
    """Literal text inside an Envoy header value, where '%' starts a formatter command."""
    return text.replace("%", "%%")


def _header(name: str, exact: str | None = None, present: bool = False) -> dict[str, Any]:
    if present:
        return {"name": name, "present_match": True}
    return {"name": name, "string_match": {"exact": exact}}


def _grpc_route_action(cluster: Any) -> dict[str, Any]:
    action: dict[str, Any] = cluster
    # No route timeout of its own: the client's grpc-timeout is the deadline (and is forwarded).
    action["timeout"] = "0s"
    action["max_stream_duration"] = {"grpc_timeout_header_max": "0s"}
    return action


def _delegated(name: str, headers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Route entries sending ModelInfer/ModelStreamInfer to the Python data plane on Kiln's local
    server (its ``DELEGATED_SERVICE``), for the cases whose rules live there."""
    return [
        {
            "name": f"{name}:{method}",
            "match": {"path": PREFIX + method, "headers": headers},
            "route": _grpc_route_action({"cluster": LOCAL_CLUSTER, "prefix_rewrite": f"/{DELEGATED_SERVICE}/{method}"}),
        }
        for method in ("ModelInfer", STREAM_METHOD)
    ]


def streams_via_kiln(public: str, route: Route) -> bool:
    """True when a variant's upstream model name/version differs from the public name: Envoy's Lua
    cannot rewrite the messages of a bidirectional stream, so Kiln's Python stream proxy beside
    Envoy serves ModelStreamInfer for that route (unary calls stay on Envoy)."""
    return any(v.model != public or v.version for v in route.variants)


def public_routes(public: str, route: Route) -> list[dict[str, Any]]:
    """The route entries of one public model, most specific first."""
    model = _header(MODEL_HEADER, public)
    entries: list[dict[str, Any]] = []
    if streams_via_kiln(public, route):
        entries.append({
            "name": f"{public}:{STREAM_METHOD}",
            "match": {"path": PREFIX + STREAM_METHOD, "headers": [model]},
            "route": _grpc_route_action({"cluster": LOCAL_CLUSTER}),
        })  # fmt: skip
    # a client's model_version chooses among the variants (and may need the admin credential): the
    # Python data plane's rules, served beside Envoy
    entries += _delegated(f"{public}:version", [model, _header(VERSION_HEADER, present=True)])
    for v in route.variants:
        pin = [model, _header(PIN_HEADER, v.name)]
        if v.weight == 0 and route.pinning != "any":  # a closed variant: only with the admin credential
            entries += _delegated(f"{public}:pin:{v.name}", pin)
        entries.append({
            "name": f"{public}:pin:{v.name}",
            "match": {"prefix": PREFIX, "headers": pin},
            "route": _grpc_route_action({"cluster": cluster_name(public, v.name)}),
        })  # fmt: skip
    names = [v.name for v in route.variants]
    pinned_unknown = _grpc_error(
        "NOT_FOUND",
        _escape(f"{PIN_HEADER} pins variant '")
        + f"%REQ({PIN_HEADER})%"
        + _escape(f"', which this route does not have; route {public!r} has variants {names}"),
    )
    entries.append({"name": f"{public}:pin:unknown",
                    "match": {"prefix": PREFIX, "headers": [model, _header(PIN_HEADER, present=True)]},
                    **pinned_unknown})  # fmt: skip
    for method in CONTROL_METHODS:
        entries.append({
            "name": f"{public}:{method}",
            "match": {"path": PREFIX + method, "headers": [model]},
            "route": _grpc_route_action({"cluster": cluster_name(public, route.baseline.name)}),
        })  # fmt: skip
    weighted: dict[str, Any] = {
        "runtime_key_prefix": runtime_prefix(public),
        "clusters": [
            {"name": cluster_name(public, v.name), "weight": units}
            for v, units in zip(route.variants, weight_units(route), strict=True)
        ],
    }
    action: dict[str, Any] = {"weighted_clusters": weighted}
    if route.sticky_header is not None:
        weighted["use_hash_policy"] = True
        action["hash_policy"] = [{"header": {"header_name": route.sticky_header}}]
    if route.shadow is not None:
        action["request_mirror_policies"] = [{
            "cluster": LOCAL_CLUSTER,  # Kiln's comparator asks baseline and shadow (local.py)
            "runtime_fraction": {
                "default_value": {"numerator": round(route.shadow.percent * 10_000), "denominator": "MILLION"},
                "runtime_key": shadow_runtime_key(public),
            },
        }]  # fmt: skip
    entries.append({"name": f"{public}:split", "match": {"prefix": PREFIX, "headers": [model]},
                    "route": _grpc_route_action(action)})  # fmt: skip
    return entries


def render_route_config(config: GatewayConfig, routes: Mapping[str, Route]) -> dict[str, Any]:
    # First: grpc.health.v1 and the repository/shared-memory/trace/log control RPCs go to Kiln's local
    # server, which answers health and applies the control rules (enabled per upstream + admin token).
    entries: list[dict[str, Any]] = [
        {"name": "health", "match": {"prefix": HEALTH_PREFIX}, "route": _grpc_route_action({"cluster": LOCAL_CLUSTER})}
    ]
    local = _grpc_route_action({"cluster": LOCAL_CLUSTER})
    for method in UPSTREAM_CONTROL_METHODS:
        entries.append({"name": f"control:{method}", "match": {"path": PREFIX + method}, "route": local})
    for public, route in sorted(routes.items()):
        entries.extend(public_routes(public, route))
    routed = sorted(routes)
    passthrough = config.unknown_models == "passthrough" and config.default_upstream is not None
    if passthrough:
        default = {"cluster": upstream_cluster_name(str(config.default_upstream))}
        match = {"prefix": PREFIX, "headers": [_header(MODEL_HEADER, present=True)]}
        entries.append({"name": "passthrough", "match": match, "route": _grpc_route_action(dict(default))})
    else:
        entries.append({
            "name": "unknown-model",
            "match": {"prefix": PREFIX, "headers": [_header(MODEL_HEADER, present=True)]},
            **_grpc_error("NOT_FOUND", _escape("model '") + f"%REQ({MODEL_HEADER})%"
                          + _escape(f"' is not routed by this gateway; routed models are {routed}")),
        })  # fmt: skip
    for method in ("ModelInfer", STREAM_METHOD):
        entries.append({
            "name": f"unreadable:{method}",
            "match": {"path": PREFIX + method},
            **_grpc_error("INVALID_ARGUMENT", _escape(
                "the gateway could not read model_name from the request body (not a serialized "
                "ModelInferRequest, or a compressed message); send a KServe v2 ModelInferRequest")),
        })  # fmt: skip
    if config.default_upstream is not None:
        default = {"cluster": upstream_cluster_name(config.default_upstream)}
        entries.append({"name": "default-upstream", "match": {"prefix": PREFIX}, "route": _grpc_route_action(default)})
    else:
        for method in SERVER_METHODS:
            entries.append({"name": f"local:{method}", "match": {"path": PREFIX + method},
                            "route": _grpc_route_action({"cluster": LOCAL_CLUSTER})})  # fmt: skip
        entries.append({
            "name": "unimplemented",
            "match": {"prefix": "/"},
            **_grpc_error("UNIMPLEMENTED", _escape("this method has no default_upstream; routed models are ")
                          + _escape(str(routed))),
        })  # fmt: skip
    return {
        "name": ROUTE_CONFIG,
        "virtual_hosts": [{"name": "kiln", "domains": ["*"], "routes": entries}],
        "request_headers_to_remove": [],
    }


def local_cluster(address: str) -> dict[str, Any]:
    """Kiln's own small gRPC server (ServerLive/Ready/Metadata answered by the gateway itself)."""
    return _cluster(LOCAL_CLUSTER, Upstream(address=address), 4 * 2**20, None)


def _http_filters(descriptor: Path) -> list[dict[str, Any]]:
    fields: dict[str, Any] = {"model_name": {}, "model_version": {}}
    extraction: dict[str, Any] = {f"{SERVICE}.{m}": {"request_field_extractions": fields}
                                  for m in ("ModelInfer", STREAM_METHOD)}  # fmt: skip
    extraction.update({f"{SERVICE}.{m}": {"request_field_extractions": {"name": {}}} for m in CONTROL_METHODS})
    return [
        {"name": EXTRACTION_NAMESPACE,
         "typed_config": _typed("extensions.filters.http.grpc_field_extraction.v3.GrpcFieldExtractionConfig",
                                descriptor_set={"filename": str(descriptor)}, extractions_by_method=extraction)},
        {"name": "kiln.route",
         "typed_config": _typed("extensions.filters.http.lua.v3.Lua",
                                default_source_code={"inline_string": ROUTE_SCRIPT})},
        {"name": "envoy.filters.http.router", "typed_config": _typed("extensions.filters.http.router.v3.Router")},
    ]  # fmt: skip


def _path_source(path: Path) -> dict[str, Any]:
    return {
        "path_config_source": {"path": str(path), "watched_directory": {"path": str(path.parent)}},
        "resource_api_version": "V3",
    }


def render_listener(layout: Layout, route_config: dict[str, Any] | None) -> dict[str, Any]:
    """The data-plane listener; ``route_config`` inline, or None for RDS from ``layout.rds_path``."""
    window = min(layout.max_message_bytes + 2**20, 2**31 - 1)
    manager: dict[str, Any] = {
        "stat_prefix": STAT_PREFIX,
        "codec_type": "AUTO",
        # the stream window bounds what a filter may buffer (the field extraction holds the first
        # message): one message up to max_message_bytes; a larger one gets FAILED_PRECONDITION
        "http2_protocol_options": {"max_concurrent_streams": 1024, "initial_stream_window_size": window,
                                   "initial_connection_window_size": window},
        "stream_idle_timeout": "0s",
        "request_timeout": "0s",
        "http_filters": _http_filters(layout.descriptor_path),
        "access_log": [{
            "name": "envoy.access_loggers.file",
            "typed_config": _typed("extensions.access_loggers.file.v3.FileAccessLog",
                                   path=str(layout.access_log_path),
                                   log_format={"text_format_source": {"inline_string": ACCESS_LOG_FORMAT}}),
        }],
    }  # fmt: skip
    if route_config is not None:
        manager["route_config"] = route_config
    else:
        manager["rds"] = {"route_config_name": ROUTE_CONFIG, "config_source": _path_source(layout.rds_path)}
    chain: dict[str, Any] = {
        "filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": _typed("extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                   **manager),
        }],
    }  # fmt: skip
    if layout.tls is not None:
        chain["transport_socket"] = downstream_tls_socket(layout.tls)
    return {
        "name": LISTENER,
        "address": _socket_address(f"{layout.host}:{layout.port}"),
        "per_connection_buffer_limit_bytes": window,
        "filter_chains": [chain],
    }


def render_bootstrap(
    layout: Layout, clusters: list[dict[str, Any]] | None = None, route_config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The bootstrap: static resources when ``clusters``/``route_config`` are given, else file-based xDS."""
    bootstrap: dict[str, Any] = {
        "node": {"id": "kiln-gateway", "cluster": "kiln"},
        "admin": {"address": _socket_address(f"127.0.0.1:{layout.admin_port}")},
        "layered_runtime": {"layers": [{"name": "static", "static_layer": {}}, {"name": "admin", "admin_layer": {}}]},
        "stats_config": {
            "histogram_bucket_settings": [{"match": {"prefix": "cluster."}, "buckets": list(HISTOGRAM_BUCKETS_MS)}]
        },
        "static_resources": {"listeners": [render_listener(layout, route_config)]},
    }
    if clusters is not None:
        bootstrap["static_resources"]["clusters"] = clusters
    else:
        bootstrap["dynamic_resources"] = {"cds_config": _path_source(layout.cds_path)}
    return bootstrap


def discovery_response(kind: str, version: str, resources: list[dict[str, Any]]) -> dict[str, Any]:
    """A file-based xDS document (``kind``: 'cluster.v3.Cluster' or 'route.v3.RouteConfiguration')."""
    return {"version_info": version, "resources": [_typed(f"config.{kind}", **r) for r in resources]}
