"""Rollouts across several gateway replicas (see deploy/README.md).

* ``start_controller``: one rollout controller outside the gateways. It reads the SLO figures
  from Prometheus (summed over every replica), writes weights to the shared routes file, keeps
  its state in ``state_dir`` and serves the same ``/rollouts`` admin API as a gateway does.
* ``start_route_sync``: the per-replica side. It watches the shared routes file and replaces the
  gateway's routes through its admin API (``PUT /routes``: all routes in one atomic change).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.gateway.admin import AdminApp, AdminServer
from server.gateway.client import AdminClient
from server.rollout.admin import register_endpoints
from server.rollout.controller import RolloutController
from server.rollout.shared_store import RouteFileWatcher, SharedRouteFile
from server.rollout.sources import PrometheusSource
from server.rollout.store import RolloutStore

logger = logging.getLogger(__name__)


@dataclass
class StandaloneController:
    controller: RolloutController
    admin_url: str
    _stops: tuple[Callable[[], None], ...]

    def stop(self) -> None:
        for stop in self._stops:
            stop()

    def __enter__(self) -> StandaloneController:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_controller(
    routes_file: Path,
    prometheus_url: str,
    state_dir: Path,
    *,
    admin_host: str = "127.0.0.1",
    admin_port: int = 8081,
    token: str | None = None,
    tick_s: float = 1.0,
) -> StandaloneController:
    """A controller over Prometheus + the shared routes file, with its own /rollouts admin API."""
    controller = RolloutController(
        SharedRouteFile(routes_file), PrometheusSource(prometheus_url), RolloutStore(state_dir), tick_s=tick_s
    )
    controller.recover_all()
    app = AdminApp(token)
    register_endpoints(app, controller)
    server = AdminServer(app, admin_host, admin_port)
    controller.start_background()
    logger.info(
        "rollout controller: routes %s, metrics %s, admin on %s:%d",
        routes_file,
        prometheus_url,
        admin_host,
        server.port,
    )
    return StandaloneController(controller, f"http://{admin_host}:{server.port}", (controller.stop, server.stop))


def admin_applier(admin: AdminClient) -> Callable[[dict[str, dict[str, Any]], int], None]:
    """Apply a routes document to one gateway: ``PUT /routes`` replaces all routes atomically."""

    def apply(routes: dict[str, dict[str, Any]], version: int) -> None:
        admin.put("/routes", {"routes": routes, "reason": f"shared routes v{version}"})

    return apply


def start_route_sync(routes_file: Path, admin: AdminClient, interval_s: float = 0.5) -> RouteFileWatcher:
    """Keep one gateway's routes equal to the shared file (returns the running watcher; ``stop`` it)."""
    watcher = RouteFileWatcher(routes_file, admin_applier(admin), interval_s)
    watcher.start()
    return watcher
