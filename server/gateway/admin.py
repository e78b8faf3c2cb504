"""The admin API: HTTP/JSON on its own port (stdlib ``http.server`` in a thread), bearer token.

Built-in endpoints read routes and stats, change routes atomically (through ``RouteTable``), and
export Prometheus text. Other components add endpoints with ``AdminApp.register``; they get the
same token check and error mapping. A KilnError from any handler becomes ``{"error": message}``
with the status from ``HTTP_STATUS``.
"""

from __future__ import annotations

import hmac
import json
import logging
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from core import errors
from server.gateway.config import ServerTls
from server.gateway.metrics import GatewayMetrics
from server.gateway.resilience import OutlierDetector
from server.gateway.table import RouteChange, RouteTable

logger = logging.getLogger(__name__)

HTTP_STATUS: dict[type[errors.KilnError], int] = {
    errors.KilnError: 500,
    errors.InvalidInputError: 400,
    errors.PermissionDeniedError: 403,
    errors.NotFoundError: 404,
    errors.ConflictError: 409,
    errors.UnavailableError: 503,
    errors.ResourceExhaustedError: 429,
}
MAX_BODY_BYTES = 1 << 20


@dataclass(frozen=True)
class AdminRequest:
    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON ({} when empty); InvalidInputError when it is not JSON."""
        if not self.body.strip():
            return {}
        try:
            return json.loads(self.body)
        except ValueError as err:
            raise errors.InvalidInputError(f"{self.method} {self.path}: body is not valid JSON ({err})") from err


@dataclass(frozen=True)
class AdminResponse:
    status: int = 200
    body: Any = field(default_factory=dict)  # JSON-able, or str/bytes with content_type
    content_type: str = "application/json"

    def encoded(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str) and self.content_type != "application/json":
            return self.body.encode()
        return json.dumps(self.body, indent=2, sort_keys=True, default=str).encode()


Handler = Callable[[AdminRequest], AdminResponse]


def http_status(err: errors.KilnError) -> int:
    for cls in type(err).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]  # type: ignore[index]
    return 500


class AdminApp:
    """Endpoint table + token check; served by ``AdminServer``."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None
        self._exact: dict[tuple[str, str], Handler] = {}
        self._prefixes: list[tuple[str, str, Handler]] = []
        self._lock = threading.Lock()

    def register(self, method: str, path: str, handler: Handler, prefix: bool = False) -> None:
        """Serve ``method path`` (or every path starting with ``path`` when ``prefix``) with ``handler``."""
        with self._lock:
            if prefix:
                self._prefixes.append((method.upper(), path, handler))
                self._prefixes.sort(key=lambda item: -len(item[1]))  # longest prefix wins
            else:
                self._exact[(method.upper(), path)] = handler

    def handle(self, request: AdminRequest) -> AdminResponse:
        try:
            self._authorize(request)
            return self._find(request.method, request.path)(request)
        except errors.KilnError as err:
            return AdminResponse(http_status(err), {"error": str(err)})

    def _authorize(self, request: AdminRequest) -> None:
        if self._token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._token):
            raise errors.PermissionDeniedError(
                "admin API needs 'Authorization: Bearer <token>' with the configured token"
            )

    def _find(self, method: str, path: str) -> Handler:
        with self._lock:
            handler = self._exact.get((method, path))
            if handler is not None:
                return handler
            for m, prefix, candidate in self._prefixes:
                if m == method and path.startswith(prefix):
                    return candidate
            known = sorted({p for _, p in self._exact} | {p + "*" for _, p, _ in self._prefixes})
        raise errors.NotFoundError(f"no admin endpoint {method} {path}; endpoints are {known}")


def _request_handler(app: AdminApp) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                response = AdminResponse(413, {"error": f"body of {length} bytes exceeds {MAX_BODY_BYTES}"})
            else:
                request = AdminRequest(
                    self.command, url.path.rstrip("/") or "/", dict(parse_qsl(url.query)),
                    {k.lower(): v for k, v in self.headers.items()}, self.rfile.read(length) if length else b"",
                )  # fmt: skip
                try:
                    response = app.handle(request)
                except Exception as err:  # a handler bug must not kill the admin thread
                    logger.exception("admin handler for %s %s failed", self.command, url.path)
                    response = AdminResponse(500, {"error": f"internal error: {type(err).__name__}: {err}"})
            payload = response.encoded()
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = _serve

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("admin %s " + format, self.address_string(), *args)

    return _Handler


class AdminServer:
    """``ThreadingHTTPServer`` running ``app`` in a daemon thread."""

    def __init__(self, app: AdminApp, host: str, port: int, tls: ServerTls | None = None) -> None:
        self._server = ThreadingHTTPServer((host, port), _request_handler(app))
        self._server.daemon_threads = True
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls.cert), str(tls.key))
            if tls.client_ca is not None:
                context.load_verify_locations(str(tls.client_ca))
                context.verify_mode = ssl.CERT_REQUIRED
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="kiln-admin", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def register_builtin(app: AdminApp, table: RouteTable, metrics: GatewayMetrics, health: OutlierDetector,
                     registry: CollectorRegistry) -> None:  # fmt: skip
    """The routes, stats and metrics endpoints."""

    def get_routes(request: AdminRequest) -> AdminResponse:
        return AdminResponse(200, table.snapshot.to_dict())

    def put_routes(request: AdminRequest) -> AdminResponse:
        body = _object(request)
        routes = body.get("routes")
        if not isinstance(routes, dict):
            raise errors.InvalidInputError('PUT /routes needs {"routes": {<model>: <route>, ...}}')
        current = table.snapshot
        change = RouteChange(
            put=routes, remove=tuple(n for n in current.routes if n not in routes),
            reason=str(body.get("reason", "admin PUT /routes")), expected_version=_expected_version(body),
        )  # fmt: skip
        return AdminResponse(200, table.apply(change, actor=_actor(request)).to_dict())

    def one_route(request: AdminRequest) -> AdminResponse:
        rest = request.path.removeprefix("/routes/")
        public, _, action = rest.partition("/")
        actor = _actor(request)
        if request.method == "GET" and not action:
            return AdminResponse(200, {"name": public, "route": table.snapshot.to_dict()["routes"].get(public)
                                       or _missing(table, public)})  # fmt: skip
        if request.method == "PUT" and not action:
            body = _object(request)
            reason = str(body.pop("reason", f"admin PUT {request.path}"))
            snap = table.apply(RouteChange(put={public: body}, reason=reason), actor=actor)
            return AdminResponse(200, snap.to_dict())
        if request.method == "DELETE" and not action:
            snap = table.apply(RouteChange(remove=(public,), reason=f"admin DELETE {request.path}"), actor=actor)
            return AdminResponse(200, snap.to_dict())
        if request.method == "POST" and action == "weights":
            body = _object(request)
            weights = body.get("weights")
            if not isinstance(weights, dict) or not all(isinstance(v, int | float) for v in weights.values()):
                raise errors.InvalidInputError('POST /routes/<model>/weights needs {"weights": {<variant>: <number>}}')
            change = RouteChange(weights={public: weights}, reason=str(body.get("reason", "admin weights")),
                                 expected_version=_expected_version(body))  # fmt: skip
            return AdminResponse(200, table.apply(change, actor=actor).to_dict())
        raise errors.NotFoundError(f"no admin endpoint {request.method} {request.path}")

    def get_stats(request: AdminRequest) -> AdminResponse:
        window = float(request.query["window_s"]) if "window_s" in request.query else None
        return AdminResponse(200, stats(table, metrics, health, window))

    def get_metrics(request: AdminRequest) -> AdminResponse:
        return AdminResponse(200, generate_latest(registry), CONTENT_TYPE_LATEST)

    app.register("GET", "/routes", get_routes)
    app.register("PUT", "/routes", put_routes)
    for method in ("GET", "PUT", "DELETE", "POST"):
        app.register(method, "/routes/", one_route, prefix=True)
    app.register("GET", "/stats", get_stats)
    app.register("GET", "/metrics", get_metrics)


def stats(
    table: RouteTable, metrics: GatewayMetrics, health: OutlierDetector, window_s: float | None
) -> dict[str, Any]:
    """The ``/stats`` document: per route and variant, a window and cumulative figures."""
    snapshot = table.snapshot
    routes: dict[str, Any] = {}
    for public, live in sorted(snapshot.routes.items()):
        variants = {}
        for variant in live.route.variants:
            variants[variant.name] = {
                "weight": variant.weight, "upstream": variant.upstream, "model": variant.model,
                "version": variant.version,
                "window": metrics.window(public, variant.name, window_s).to_dict(),
                "cumulative": metrics.cumulative(public, variant.name).to_dict(),
            }  # fmt: skip
        routes[public] = {"baseline": live.route.baseline.name, "variants": variants}
    others = [
        {"route": r, "variant": v, "cumulative": metrics.cumulative(r, v).to_dict()}
        for r, v in metrics.keys()
        if r not in snapshot.routes or v not in snapshot.routes[r].options.names
    ]
    return {
        "routes_version": snapshot.version,
        "window_s": metrics.window_s if window_s is None else window_s,
        "routes": routes,
        "other": others,
        "upstreams": [h.__dict__ for h in health.health()],
    }


def _object(request: AdminRequest) -> dict[str, Any]:
    body = request.json()
    if not isinstance(body, dict):
        raise errors.InvalidInputError(f"{request.method} {request.path}: body must be a JSON object")
    return body


def _expected_version(body: dict[str, Any]) -> int | None:
    value = body.get("expected_version")
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise errors.InvalidInputError(f"expected_version must be an integer routes version, got {value!r}")
    return value


def _actor(request: AdminRequest) -> str:
    return f"admin ({request.headers.get('user-agent', 'unknown client')})"


def _missing(table: RouteTable, public: str) -> Any:
    table.route(public)  # raises NotFoundError naming the routes
    return None
