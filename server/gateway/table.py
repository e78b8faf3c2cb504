"""The live route table: an immutable snapshot swapped atomically on every validated change.

The data plane reads ``RouteTable.snapshot`` once per request (one attribute read, no lock), so a
request sees either the old routes or the new ones, never a mix. Writers go through ``apply``:
the whole change is validated first (a bad change is refused whole), then persisted (when a state
store is attached), then swapped in, then logged and announced to listeners.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from core.errors import ConflictError, InvalidInputError, NotFoundError
from server.gateway.config import Route, Upstream, parse_route, route_to_dict
from server.gateway.routing import WeightedSet
from server.gateway.wire import encode_string_field, name_version_suffix

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiveRoute:
    """A route compiled for the hot path."""

    public: str
    route: Route
    options: WeightedSet
    request_suffixes: tuple[bytes, ...]  # per variant: appended to requests (model, version)
    response_suffix: bytes  # appended to responses: model_name = the public name
    sticky_header: str | None
    shadow_index: int | None
    shadow_fraction: float

    @classmethod
    def compile(cls, public: str, route: Route) -> LiveRoute:
        names = [v.name for v in route.variants]
        shadow_index = names.index(route.shadow.variant) if route.shadow else None
        return cls(
            public=public,
            route=route,
            options=WeightedSet.build(names, [v.weight for v in route.variants]),
            request_suffixes=tuple(name_version_suffix(v.model, v.version) for v in route.variants),
            response_suffix=encode_string_field(1, public),
            sticky_header=route.sticky_header,
            shadow_index=shadow_index,
            shadow_fraction=route.shadow.percent / 100.0 if route.shadow else 0.0,
        )


@dataclass(frozen=True)
class RoutesSnapshot:
    version: int  # increases by one with every applied change
    routes: Mapping[str, LiveRoute]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "routes": {name: route_to_dict(live.route) for name, live in sorted(self.routes.items())},
        }


@dataclass(frozen=True)
class RouteChange:
    """One atomic change. Applied in this order: ``remove``, ``put``, ``weights``."""

    put: Mapping[str, Route | Mapping[str, Any]] = field(default_factory=dict)  # add or replace
    remove: tuple[str, ...] = ()
    weights: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # route -> variant -> weight
    reason: str = ""  # logged with the change
    expected_version: int | None = None  # refuse (ConflictError) if the table moved on


Persist = Callable[[Mapping[str, Route]], None]
Check = Callable[[Mapping[str, Route]], None]  # raises (a KilnError) to refuse a change before it applies
Listener = Callable[[RoutesSnapshot, RouteChange], None]


class RouteTable:
    """Live routes of one gateway; ``apply`` is the only way to change them."""

    def __init__(
        self, routes: Mapping[str, Route], upstreams: Mapping[str, Upstream], persist: Persist | None = None
    ) -> None:
        self._upstreams = dict(upstreams)
        self._persist = persist
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._checks: list[Check] = []
        self.snapshot = RoutesSnapshot(0, _compile(routes))

    @property
    def upstreams(self) -> Mapping[str, Upstream]:
        return MappingProxyType(self._upstreams)

    def route(self, public: str) -> Route:
        live = self.snapshot.routes.get(public)
        if live is None:
            raise NotFoundError(f"route {public!r} does not exist; routes are {sorted(self.snapshot.routes)}")
        return live.route

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(snapshot, change)`` after every applied change (in the writer's thread)."""
        with self._lock:
            self._listeners.append(listener)

    def add_check(self, check: Check) -> None:
        """Call ``check(routes)`` on every validated change before it is persisted and swapped in."""
        with self._lock:
            self._checks.append(check)

    def apply(self, change: RouteChange, actor: str = "api") -> RoutesSnapshot:
        """Validate, persist, swap in and log ``change``; raises and changes nothing if any part is bad."""
        with self._lock:
            current = self.snapshot
            if change.expected_version is not None and change.expected_version != current.version:
                raise ConflictError(
                    f"routes changed since version {change.expected_version} (now {current.version}); "
                    "read them again and retry"
                )
            routes = self._validated(current, change)
            for check in self._checks:
                check(routes)
            if self._persist is not None:
                self._persist(routes)
            updated = RoutesSnapshot(current.version + 1, _compile(routes))
            self.snapshot = updated
            listeners = list(self._listeners)
        logger.info(
            "routes v%d applied by %s (%s): put=%s remove=%s weights=%s",
            updated.version, actor, change.reason or "no reason given",
            sorted(change.put), list(change.remove), {k: dict(v) for k, v in change.weights.items()},
        )  # fmt: skip
        for listener in listeners:
            listener(updated, change)
        return updated

    def replace_route(self, public: str, route: Route | Mapping[str, Any], reason: str = "") -> RoutesSnapshot:
        return self.apply(RouteChange(put={public: route}, reason=reason))

    def set_weights(self, public: str, weights: Mapping[str, float], reason: str = "") -> RoutesSnapshot:
        return self.apply(RouteChange(weights={public: weights}, reason=reason))

    def remove_route(self, public: str, reason: str = "") -> RoutesSnapshot:
        return self.apply(RouteChange(remove=(public,), reason=reason))

    def _validated(self, current: RoutesSnapshot, change: RouteChange) -> dict[str, Route]:
        routes = {name: live.route for name, live in current.routes.items()}
        for public in change.remove:
            if public not in routes:
                raise NotFoundError(f"cannot remove route {public!r}: it does not exist; routes are {sorted(routes)}")
            del routes[public]
        for public, route in change.put.items():
            data = route_to_dict(route) if isinstance(route, Route) else route
            routes[public] = parse_route(public, data, self._upstreams)
        for public, weights in change.weights.items():
            if public not in routes:
                raise NotFoundError(
                    f"cannot set weights of route {public!r}: it does not exist; routes are {sorted(routes)}"
                )
            routes[public] = _reweighted(public, routes[public], weights, self._upstreams)
        return routes


def _reweighted(public: str, route: Route, weights: Mapping[str, float], upstreams: Mapping[str, Upstream]) -> Route:
    names = [v.name for v in route.variants]
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise InvalidInputError(f"route {public!r} has no variants {unknown}; its variants are {names}")
    bad = {name: weight for name, weight in weights.items() if isinstance(weight, bool)}
    if bad:
        raise InvalidInputError(f"route {public!r}: weights must be numbers, got {bad}")
    data = route_to_dict(route)
    for variant in data["variants"]:
        if variant["name"] in weights:
            variant["weight"] = float(weights[variant["name"]])
    return parse_route(public, data, upstreams)


def _compile(routes: Mapping[str, Route]) -> Mapping[str, LiveRoute]:
    return MappingProxyType({name: LiveRoute.compile(name, route) for name, route in routes.items()})
