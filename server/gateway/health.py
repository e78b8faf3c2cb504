"""``grpc.health.v1.Health`` for the gateway: overall ("") and per public route.

* ``""`` and ``inference.GRPCInferenceService``: SERVING while the data plane runs, NOT_SERVING
  once it is stopping (so a load balancer drains it). This is what a Kubernetes ``grpc`` readiness
  probe asks.
* ``<public model name>``: SERVING while at least one variant with weight > 0 sits on an upstream
  that is not ejected, NOT_SERVING otherwise; an unknown name is NOT_FOUND (Check) or
  SERVICE_UNKNOWN (Watch), as the health protocol says.

Health calls take no data-plane slot (``guard.Admission``), so they are answered while the data
plane is at its limit. ``Watch`` polls once per second and sends each change.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.gateway.control import RpcAbort
from server.gateway.guard import Admission
from server.gateway.resilience import OutlierDetector
from server.gateway.table import RouteTable
from server.gateway.upstreams import SERVICE

_Status = health_pb2.HealthCheckResponse
OVERALL = ("", SERVICE)
WATCH_POLL_S = 1.0


class HealthReport:
    """The serving status of the gateway and of each route, computed when asked."""

    def __init__(self, table: RouteTable, health: OutlierDetector) -> None:
        self._table = table
        self._health = health
        self.stopping = False

    def status(self, service: str) -> int | None:
        """A ``HealthCheckResponse.ServingStatus`` for ``service``; None when it is unknown."""
        if service in OVERALL:
            return _Status.NOT_SERVING if self.stopping else _Status.SERVING
        live = self._table.snapshot.routes.get(service)
        if live is None:
            return None
        if self.stopping:
            return _Status.NOT_SERVING
        ejected = self._health.ejected_set() if self._health.any_ejected else frozenset()
        up = any(v.weight > 0 and v.upstream not in ejected for v in live.route.variants)
        return _Status.SERVING if up else _Status.NOT_SERVING

    def unknown(self, service: str) -> str:
        routed = sorted(self._table.snapshot.routes)
        return f"health service {service[:60]!r} is unknown; ask '' (the gateway) or a routed model {routed}"


class ThreadHealth(health_pb2_grpc.HealthServicer):
    """Check answers at once; each Watch holds a thread, so it takes a stream slot of ``admission``."""

    def __init__(self, report: HealthReport, admission: Admission) -> None:
        self._report = report
        self._admission = admission

    def Check(self, request: Any, context: grpc.ServicerContext) -> Any:
        status = self._report.status(request.service)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND, self._report.unknown(request.service))
        return _Status(status=status)

    def Watch(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            self._admission.enter(stream=True)
        except RpcAbort as err:
            context.abort(err.code, err.details)
        try:
            last = None
            while context.is_active():
                status = self._report.status(request.service)
                status = _Status.SERVICE_UNKNOWN if status is None else status
                if status != last:
                    last = status
                    yield _Status(status=status)
                time.sleep(WATCH_POLL_S)
        finally:
            self._admission.leave(stream=True)


class AioHealth(health_pb2_grpc.HealthServicer):
    def __init__(self, report: HealthReport) -> None:
        self._report = report

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        status = self._report.status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, self._report.unknown(request.service))
        return _Status(status=status)

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        last = None
        while True:
            status = self._report.status(request.service)
            status = _Status.SERVICE_UNKNOWN if status is None else status
            if status != last:
                last = status
                yield _Status(status=status)
            await asyncio.sleep(WATCH_POLL_S)
