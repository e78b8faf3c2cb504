"""The rollout endpoints of the gateway's admin API (HTTP/JSON, same bearer token).

| method & path | body | effect |
|---|---|---|
| `GET /rollouts` | | `{"rollouts": [status, ...]}` |
| `POST /rollouts` | plan JSON | start; 201 + status |
| `GET /rollouts/<route>` | | status: phase, step, weights, each SLO measured vs limit |
| `GET /rollouts/<route>/events?since=N` | | `{"events": [...]}` (seq > N) |
| `POST /rollouts/<route>/<pause\\|resume\\|abort\\|promote>` | `{"expect_version": n}`? | command; status |
| `POST /rollouts/<route>/retire` | | retire the promoted rollout's previous version; 409 while a route points at it |
"""

from __future__ import annotations

from typing import Any

from core.errors import InvalidInputError, NotFoundError
from server.gateway.admin import AdminApp, AdminRequest, AdminResponse
from server.rollout.controller import RolloutController
from server.rollout.machine import Command
from server.rollout.plan import plan_from_mapping

PREFIX = "/rollouts/"


def _int(value: Any, what: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError) as err:
        raise InvalidInputError(f"{what} must be an integer, got {value!r}") from err


def register_endpoints(app: AdminApp, controller: RolloutController) -> None:
    """Add the /rollouts endpoints to a gateway's admin app."""

    def list_rollouts(request: AdminRequest) -> AdminResponse:
        return AdminResponse(200, {"rollouts": [controller.status(r) for r in controller.routes()]})

    def start_rollout(request: AdminRequest) -> AdminResponse:
        plan = plan_from_mapping(request.json(), "in POST /rollouts")
        return AdminResponse(201, controller.start(plan))

    def read_one(request: AdminRequest) -> AdminResponse:
        route, _, what = request.path.removeprefix(PREFIX).partition("/")
        if not what:
            return AdminResponse(200, controller.status(route))
        if what == "events":
            since = _int(request.query.get("since"), "since") or 0
            return AdminResponse(200, {"route": route, "events": controller.events(route, since)})
        raise NotFoundError(f"no admin endpoint GET {request.path}; try {PREFIX}<route> or {PREFIX}<route>/events")

    def act_on_one(request: AdminRequest) -> AdminResponse:
        route, _, verb = request.path.removeprefix(PREFIX).partition("/")
        if verb == "retire":
            return AdminResponse(200, controller.retire(route))
        try:
            cmd = Command(verb)
        except ValueError as err:
            raise NotFoundError(
                f"no rollout command {verb!r} in POST {request.path}; commands are {[c.value for c in Command]}"
            ) from err
        body = request.json()
        expect = _int(body.get("expect_version") if isinstance(body, dict) else None, "expect_version")
        return AdminResponse(200, controller.command(route, cmd, expect))

    app.register("GET", "/rollouts", list_rollouts)
    app.register("POST", "/rollouts", start_rollout)
    app.register("GET", PREFIX, read_one, prefix=True)
    app.register("POST", PREFIX, act_on_one, prefix=True)
