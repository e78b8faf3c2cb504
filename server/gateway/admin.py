"""The admin API: HTTP/JSON on its own port (stdlib ``http.server`` in a thread), bearer token.

Hardened for a hostile network (each limit has a test in tests/integration/test_gateway_hostile.py):
the token and the endpoint are checked from the headers *before* any body byte is read (401/404
and the connection closed, body unread); ``Content-Length`` must be plain digits within
``MAX_BODY_BYTES`` (400/413; chunked bodies 411); every socket read/write has a timeout
(``SOCKET_TIMEOUT_S``: slow or silent clients are dropped); at most ``MAX_CONNECTIONS`` connections
are served at once (more get 503 at once); TLS handshakes run in the connection's thread, not the
accept loop; the listen backlog is ``BACKLOG``; a handler bug answers 500 without internal text.

Built-in endpoints read routes and stats, change routes atomically (through ``RouteTable``), and
export Prometheus text. Other components add endpoints with ``AdminApp.register``; they get the
same token check and error mapping. A KilnError from any handler becomes ``{"error": message}``
with the status from ``HTTP_STATUS``.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
import ssl
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from core import errors
from server.gateway.config import ServerTls
from server.gateway.guard import QuietLog
from server.gateway.metrics import GatewayMetrics
from server.gateway.resilience import OutlierDetector
from server.gateway.table import RouteChange, RouteTable

logger = logging.getLogger(__name__)

HTTP_STATUS: dict[type[errors.KilnError], int] = {
    errors.KilnError: 500,
    errors.InvalidInputError: 400,
    errors.UnauthenticatedError: 401,
    errors.PermissionDeniedError: 403,
    errors.NotFoundError: 404,
    errors.ConflictError: 409,
    errors.UnavailableError: 503,
    errors.ResourceExhaustedError: 429,
}
MAX_BODY_BYTES = 1 << 20
MAX_JSON_DEPTH = 32
SOCKET_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 16
BACKLOG = 128
_DIGITS = re.compile(r"^[0-9]{1,12}$")


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
            value = json.loads(self.body)
        except ValueError as err:
            raise errors.InvalidInputError(f"{self.method} {self.path}: body is not valid JSON ({err})") from err
        except RecursionError as err:
            raise errors.InvalidInputError(
                f"{self.method} {self.path}: body nests deeper than {MAX_JSON_DEPTH} levels"
            ) from err
        if _depth(value) > MAX_JSON_DEPTH:
            raise errors.InvalidInputError(f"{self.method} {self.path}: body nests deeper than {MAX_JSON_DEPTH} levels")
        return value


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (iterative: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth > MAX_JSON_DEPTH:
                return depth
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


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
            return self.route(request.method, request.path, request.headers)(request)
        except errors.KilnError as err:
            return error_response(err)

    def route(self, method: str, path: str, headers: Mapping[str, str]) -> Handler:
        """The handler for a request, from its headers alone: token first, then the endpoint."""
        self.authorize(headers)
        return self._find(method, path)

    def authorize(self, headers: Mapping[str, str]) -> None:
        """UnauthenticatedError (401) unless ``headers`` carry the configured bearer token."""
        if self._token is None:
            return
        given = headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("utf-8", "replace"), self._token):
            what = "has no Authorization header" if not given else "carries a wrong token"
            raise errors.UnauthenticatedError(
                f"the request {what}; the admin API needs 'Authorization: Bearer <token>' with the configured token"
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


def error_response(err: errors.KilnError) -> AdminResponse:
    return AdminResponse(http_status(err), {"error": str(err)})


def content_length(headers: Any) -> int:
    """The body length a request declares: plain digits within MAX_BODY_BYTES, else a KilnError."""
    values = headers.get_all("Content-Length") or []
    if headers.get("Transfer-Encoding"):
        raise _LengthRequired("chunked or other Transfer-Encoding bodies are not accepted; send Content-Length")
    if not values:
        return 0
    if len(values) > 1 or not _DIGITS.match(values[0].strip()):
        shown = values if len(values) > 1 else values[0]
        raise errors.InvalidInputError(f"Content-Length {shown!r} is not one non-negative integer")
    length = int(values[0])
    if length > MAX_BODY_BYTES:
        raise _TooLarge(f"body of {length} bytes exceeds the admin API's limit of {MAX_BODY_BYTES} bytes")
    return length


class _LengthRequired(errors.InvalidInputError):
    status = 411


class _TooLarge(errors.ResourceExhaustedError):
    status = 413


def _request_handler(app: AdminApp, quiet: QuietLog) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = SOCKET_TIMEOUT_S  # every read and write on the connection (slowloris, stalled readers)

        def setup(self) -> None:
            super().setup()
            if isinstance(self.connection, ssl.SSLSocket):
                self.connection.do_handshake()  # under the timeout, in this connection's thread

        def _serve(self) -> None:
            url = urlsplit(self.path)
            path = url.path.rstrip("/") or "/"
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                handler = app.route(self.command, path, headers)  # token and endpoint before the body
                length = content_length(self.headers)
                try:
                    body = self.rfile.read(length) if length else b""
                except OSError:  # the body stalled past the socket timeout, or the client left
                    self.close_connection = True
                    return
                if len(body) != length:
                    raise errors.InvalidInputError(f"body ended after {len(body)} of {length} bytes")
                request = AdminRequest(self.command, path, dict(parse_qsl(url.query)), headers, body)
                response = handler(request)
            except errors.KilnError as err:
                response = error_response(err)
                response = AdminResponse(getattr(err, "status", response.status), response.body)
                self.close_connection = True  # the body may be unread: never parse it as a request
            except Exception as err:  # a handler bug must not kill the admin thread nor leak internals
                quiet.warning(f"admin:{type(err).__name__}", "admin handler for %s %s failed: %s: %s",
                              self.command, path, type(err).__name__, err)  # fmt: skip
                response = AdminResponse(500, {"error": "internal error in the admin API; see the gateway log"})
            self._send(response)

        def _send(self, response: AdminResponse) -> None:
            payload = response.encoded()
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(payload)))
            if response.status == 401:
                self.send_header("WWW-Authenticate", 'Bearer realm="kiln-admin"')
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = _serve

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("admin %s " + format, self.address_string(), *args)

        def log_error(self, format: str, *args: Any) -> None:  # malformed request lines, timeouts
            logger.debug("admin %s " + format, self.address_string(), *args)

    return _Handler


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with a connection cap, a real backlog and TLS handshakes off the accept loop."""

    request_queue_size = BACKLOG
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], quiet: QuietLog) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._quiet = quiet
        self.refused = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self._quiet.warning("admin:busy", "admin API refused a connection: %d connections open", MAX_CONNECTIONS)
            _refuse_busy(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:  # no traceback per bad connection
        self._quiet.warning("admin:connection", "admin API connection from %s failed: %s",
                            client_address[0], sys.exc_info()[1])  # fmt: skip


def _refuse_busy(sock: Any) -> None:
    body = json.dumps({"error": f"admin API busy: {MAX_CONNECTIONS} connections open; retry shortly"}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Retry-After: 1\r\nConnection: close\r\n\r\n").encode()  # fmt: skip
    try:
        sock.settimeout(0.2)
        sock.sendall(head + body)
    except (OSError, ValueError):
        pass


class AdminServer:
    """The hardened ``ThreadingHTTPServer`` running ``app`` in a daemon thread."""

    def __init__(self, app: AdminApp, host: str, port: int, tls: ServerTls | None = None) -> None:
        quiet = QuietLog(logger)
        self._server = _Server((host, port), _request_handler(app, quiet), quiet)
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls.cert), str(tls.key))
            if tls.client_ca is not None:
                context.load_verify_locations(str(tls.client_ca))
                context.verify_mode = ssl.CERT_REQUIRED
            # the handshake happens on the connection's first read, in its own thread, under its timeout
            self._server.socket = context.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="kiln-admin", daemon=True)
        self._thread.start()

    @property
    def refused(self) -> int:
        return self._server.refused

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
            if not isinstance(weights, dict) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in weights.values()
            ):
                raise errors.InvalidInputError('POST /routes/<model>/weights needs {"weights": {<variant>: <number>}}')
            change = RouteChange(weights={public: weights}, reason=str(body.get("reason", "admin weights")),
                                 expected_version=_expected_version(body))  # fmt: skip
            return AdminResponse(200, table.apply(change, actor=actor).to_dict())
        raise errors.NotFoundError(f"no admin endpoint {request.method} {request.path}")

    def get_stats(request: AdminRequest) -> AdminResponse:
        return AdminResponse(200, stats(table, metrics, health, _window(request.query.get("window_s"))))

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


def _window(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        window = float(value)
    except ValueError:
        window = math.nan
    if not math.isfinite(window) or window <= 0:
        raise errors.InvalidInputError(f"window_s must be a positive number of seconds, got {value!r}")
    return window


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
