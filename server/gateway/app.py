"""Start a gateway in-process: data plane (gRPC), admin API (HTTP), plugins.

``start_gateway(config, ...) -> GatewayHandle``; ``handle.stop()`` (or ``with``) shuts it down.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from core.errors import InvalidInputError, NotFoundError, PermissionDeniedError, UnavailableError
from server.gateway.admin import AdminApp, AdminServer, register_builtin
from server.gateway.config import GatewayConfig, load_config, parse_config
from server.gateway.envoy.access_log import EnvoyMetrics
from server.gateway.envoy.choice import choose_data_plane
from server.gateway.envoy.plane import EnvoyOptions, EnvoyPlane
from server.gateway.forward import Forwarder
from server.gateway.guard import Admission, IdleReaper, QuietLog
from server.gateway.health import HealthReport, ThreadHealth
from server.gateway.metrics import GatewayCollector, GatewayMetrics
from server.gateway.resilience import OutlierDetector, ReadinessProber
from server.gateway.serve_aio import serve_aio
from server.gateway.serve_threads import ThreadHandlers, serve_threads
from server.gateway.shadow import ShadowSender
from server.gateway.state import StateStore
from server.gateway.stream_metrics import StreamCollector, StreamMetrics
from server.gateway.table import RouteTable
from server.gateway.upstreams import UpstreamPool, channel_options, server_credentials

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# Modules with ``attach(gateway: GatewayHandle) -> Callable[[], None] | None``, attached on start.
PLUGIN_MODULES: tuple[str, ...] = ("server.rollout.plugin",)


@dataclass
class GatewayHandle:
    """A running gateway. ``routes``/``metrics``/``admin`` are the live objects."""

    config: GatewayConfig
    host: str
    port: int
    admin_host: str
    admin_port: int
    routes: RouteTable
    metrics: GatewayMetrics
    health: OutlierDetector
    admin: AdminApp
    registry: CollectorRegistry
    state_path: Path | None
    _stops: list[Callable[[], None]] = field(default_factory=list, repr=False)
    data_plane: str = "python"  # "envoy" or "python": what carries the requests
    envoy: EnvoyPlane | None = None  # the Envoy data plane's controller, when data_plane == "envoy"
    data_plane_note: str = ""  # why this data plane (e.g. the reason "auto" fell back to python)
    streams: StreamMetrics | None = None  # TTFT/ITL of streamed (token) requests, per variant

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def admin_url(self) -> str:
        scheme = "https" if self.config.admin.tls else "http"
        return f"{scheme}://{self.admin_host}:{self.admin_port}"

    def stop(self) -> None:
        """Stop plugins, admin, data plane (in-flight RPCs get a short grace), channels."""
        while self._stops:
            stop = self._stops.pop()
            try:
                stop()
            except Exception:
                logger.exception("error while stopping the gateway")

    def __enter__(self) -> GatewayHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def resolve_config(config: GatewayConfig | Mapping[str, Any] | Path | str) -> GatewayConfig:
    if isinstance(config, GatewayConfig):
        return config
    if isinstance(config, Path | str):
        return load_config(Path(config))
    return parse_config(config)


def admin_token(config: GatewayConfig) -> str | None:
    """The bearer token the config names (file or env var); None when it names none."""
    settings = config.admin
    if settings.token_file is not None:
        try:
            token = Path(settings.token_file).read_text(encoding="utf-8").strip()
        except OSError as err:
            raise NotFoundError(f"cannot read admin token file {str(settings.token_file)!r}: {err.strerror}") from err
        if not token:
            raise InvalidInputError(f"admin token file {str(settings.token_file)!r} is empty")
        return token
    if settings.token_env is not None:
        token = os.environ.get(settings.token_env, "").strip()
        if not token:
            raise InvalidInputError(
                f"admin.token_env names {settings.token_env!r}, which is unset or empty; export the token"
            )
        return token
    return None


def start_gateway(
    config: GatewayConfig | Mapping[str, Any] | Path | str,
    *,
    host: str = LOOPBACK,
    port: int = 8000,
    admin_host: str = LOOPBACK,
    admin_port: int = 8080,
    state_path: Path | None = None,
    insecure_admin: bool = False,
    admin_token_value: str | None = None,
    plugins: Sequence[str] | None = None,
    data_plane: str = "python",
    envoy_binary: Path | None = None,
    envoy_workers: int = 1,
    envoy_dir: Path | None = None,
    envoy_admin: str | None = None,
) -> GatewayHandle:
    """Start the gateway; ports 0 pick free ones. Routes come from ``state_path`` when it exists.

    ``data_plane``: "envoy" (Envoy carries requests, Kiln configures it), "python" (Kiln's own gRPC
    data plane) or "auto" (Envoy where its binary works, else python; the reason is logged).
    ``envoy_dir``: where Envoy's bootstrap, xDS files and logs go (default: a temporary directory);
    with ``envoy_admin`` ("127.0.0.1:9901") Kiln does not start Envoy but configures one running
    beside it from that shared directory (deploy/: the official Envoy image as a second container).
    """
    cfg = resolve_config(config)
    plane, binary, why = choose_data_plane(data_plane, envoy_binary)
    if data_plane == "auto" and plane == "python":
        logger.warning("%s", why)
    if envoy_workers < 1:
        raise InvalidInputError(f"envoy_workers must be >= 1, got {envoy_workers}")
    token = admin_token_value or admin_token(cfg)
    if token is None and not (insecure_admin and admin_host == LOOPBACK):
        raise PermissionDeniedError(
            f"the admin API has no token (set admin.token_file or admin.token_env in the config); "
            f"without one it only starts bound to {LOOPBACK} with --insecure-admin (got {admin_host!r})"
        )
    store = StateStore(state_path) if state_path is not None else None
    restored = store.load(cfg.upstreams) if store is not None else None
    table = RouteTable(restored if restored is not None else cfg.routes, cfg.upstreams,
                       persist=store.save if store else None)  # fmt: skip
    if store is not None and restored is None:
        store.save(cfg.routes)
    metrics = (EnvoyMetrics if plane == "envoy" else GatewayMetrics)(cfg.metrics.window_s, cfg.metrics.max_samples)
    res = cfg.resilience
    health = OutlierDetector(list(cfg.upstreams), res.failures_to_eject, res.base_ejection_s, res.max_ejection_s)
    pool = UpstreamPool(cfg.upstreams, cfg.server.max_message_bytes)  # sync: thread mode and shadows
    shadow = ShadowSender(metrics, cfg.shadow.max_in_flight, cfg.shadow.workers)
    streams = StreamMetrics(cfg.metrics.max_samples)
    forwarder = Forwarder(cfg, table, metrics, health, shadow, pool, streams, admin_token=token)
    report = HealthReport(table, health)
    prober = ReadinessProber(health, lambda upstream: pool[upstream].unary("ServerReady"))
    stops: list[Callable[[], None]] = [pool.close, shadow.close, prober.stop]
    try:
        envoy = None
        if binary is not None and isinstance(metrics, EnvoyMetrics):
            python = _stream_handlers(cfg, forwarder, pool, stops)  # what Envoy hands back to Kiln
            options = EnvoyOptions(binary, envoy_workers, envoy_dir, envoy_admin)
            envoy = EnvoyPlane(cfg, table, metrics, options, host, port, python, health,
                               [python.control_handler()], ThreadHealth(report, python.admission))  # fmt: skip
            stops.append(envoy.stop)
            bound = envoy.start()
        else:
            stop_grpc, bound = _serve_grpc(cfg, forwarder, pool, host, port, report)
            stops.append(stop_grpc)
        registry = CollectorRegistry(auto_describe=True)
        registry.register(GatewayCollector(metrics))
        registry.register(StreamCollector(streams))
        app = AdminApp(token)
        register_builtin(app, table, metrics, health, registry)
        admin = AdminServer(app, admin_host, admin_port, cfg.admin.tls)
        stops.append(admin.stop)
    except BaseException:
        for stop in reversed(stops):
            stop()
        raise
    handle = GatewayHandle(cfg, host, bound, admin_host, admin.port, table, metrics, health, app, registry,
                           Path(state_path) if state_path else None, stops, plane, envoy, why, streams)  # fmt: skip
    for module in PLUGIN_MODULES if plugins is None else plugins:
        stop = importlib.import_module(module).attach(handle)
        if stop is not None:
            stops.append(stop)
    logger.info("gateway serving gRPC on %s:%d (%s data plane), admin on %s", host, bound, plane, handle.admin_url)
    return handle


def _stream_handlers(
    cfg: GatewayConfig, core: Forwarder, pool: UpstreamPool, stops: list[Callable[[], None]]
) -> ThreadHandlers:
    """The Python plane's stream handler, behind its own admission limits and idle reaper, for the
    streams the Envoy plane hands over (Envoy cannot rewrite a stream's body)."""
    settings = cfg.server
    reaper = IdleReaper(settings.stream_idle_timeout_s)
    stops.append(reaper.stop)
    admission = Admission(settings.threads, settings.max_streams, settings.max_in_flight_bytes)
    quiet = QuietLog(logging.getLogger("server.gateway.data_plane"))
    return ThreadHandlers(core, pool, cfg, admission, reaper, quiet)


def _serve_grpc(
    cfg: GatewayConfig, core: Forwarder, pool: UpstreamPool, host: str, port: int, report: HealthReport
) -> tuple[Callable[[], None], int]:
    address = f"{host}:{port}"
    credentials = server_credentials(cfg.server.tls) if cfg.server.tls is not None else None
    options = [*channel_options(cfg.server.max_message_bytes), ("grpc.so_reuseport", 0)]
    quiet = QuietLog(logging.getLogger("server.gateway.data_plane"))
    try:
        if cfg.server.mode == "aio":
            stop, bound = serve_aio(cfg, core, address, credentials, options, report, quiet)
        else:
            stop, bound = serve_threads(cfg, core, pool, address, credentials, options, report, quiet)
    except RuntimeError as err:
        raise UnavailableError(f"gateway cannot listen on {address}: {err}; pick another --port") from err
    if bound == 0:
        stop()
        raise UnavailableError(f"gateway cannot listen on {address}; the port is taken or the host is not local")
    return stop, bound
