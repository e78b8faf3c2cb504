"""Attach the rollout controller to a running gateway (``server.gateway.app.PLUGIN_MODULES``).

``attach(gateway)`` builds a controller over the gateway's own route table and metrics windows,
keeps rollout state next to the gateway's state file (in memory when it has none), resumes any
persisted rollout, registers the /rollouts admin endpoints and starts the ticking thread; the
returned callable stops it. ``controller_for(gateway)`` finds the controller of a gateway.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from core.errors import NotFoundError
from server.gateway.app import GatewayHandle
from server.gateway.config import route_to_dict
from server.gateway.table import RouteTable
from server.rollout.admin import register_endpoints
from server.rollout.controller import RolloutController
from server.rollout.ports import MemoryStore, Store
from server.rollout.sources import LocalMetricsSource
from server.rollout.store import RolloutStore
from server.rollout.versions import GrpcVersionControl

TICK_S = 0.1
_CONTROLLERS: dict[int, RolloutController] = {}


class TableRouteControl:
    """RouteControl over one gateway's ``RouteTable`` (atomic, validated, persisted swaps)."""

    def __init__(self, table: RouteTable) -> None:
        self._table = table

    def get_route(self, public: str) -> dict[str, Any]:
        return route_to_dict(self._table.route(public))

    def put_route(self, public: str, route: Mapping[str, Any], reason: str) -> None:
        self._table.replace_route(public, dict(route), reason=reason)

    def all_routes(self) -> dict[str, dict[str, Any]]:
        return {name: route_to_dict(live.route) for name, live in self._table.snapshot.routes.items()}


def rollout_state_dir(state_path: Path) -> Path:
    """Where rollouts persist for a gateway whose routes persist in ``state_path``."""
    return state_path.with_name(state_path.stem + ".rollouts")


def attach(gateway: GatewayHandle) -> Callable[[], None]:
    store: Store = RolloutStore(rollout_state_dir(gateway.state_path)) if gateway.state_path else MemoryStore()
    versions = GrpcVersionControl(lambda: gateway.routes.upstreams)
    source = LocalMetricsSource(gateway.metrics, streams=gateway.streams)
    controller = RolloutController(TableRouteControl(gateway.routes), source, store, tick_s=TICK_S, versions=versions)
    controller.recover_all()
    register_endpoints(gateway.admin, controller)
    controller.start_background()
    _CONTROLLERS[id(gateway)] = controller

    def stop() -> None:
        controller.stop()
        _CONTROLLERS.pop(id(gateway), None)

    return stop


def controller_for(gateway: GatewayHandle) -> RolloutController:
    """The rollout controller attached to ``gateway``."""
    controller = _CONTROLLERS.get(id(gateway))
    if controller is None:
        raise NotFoundError(
            "this gateway has no rollout controller; start it with plugins including 'server.rollout.plugin'"
        )
    return controller
