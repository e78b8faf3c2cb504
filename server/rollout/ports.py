"""What the rollout controller needs from its surroundings (Protocols) and the in-memory store.

``RouteControl`` reads and atomically replaces one route (gateway JSON shape, see
``server.rollout.routes``). ``MetricsSource`` starts a fresh window for a route (``mark``) and
reads what baseline and candidate did since (``read``). ``Store`` persists rollout records.
``VersionControl`` loads and retires model versions on upstreams.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from core.errors import NotFoundError
from server.rollout.analysis import Measurements
from server.rollout.store import StoredRollout


class RouteControl(Protocol):
    def get_route(self, public: str) -> dict[str, Any]:
        """The route's JSON form; NotFoundError when it does not exist."""
        ...

    def put_route(self, public: str, route: Mapping[str, Any], reason: str) -> None:
        """Replace the route atomically (validated whole; refused whole when bad)."""
        ...

    def all_routes(self) -> dict[str, dict[str, Any]]:
        """Every route, by public name (to know which versions any route still points at)."""
        ...


class VersionControl(Protocol):
    """Loading and retiring model versions on upstreams (``server.rollout.versions``)."""

    def ensure_serving(self, upstream: str, model: str, version: str, timeout_s: float) -> dict[str, Any]:
        """Return once ``upstream`` serves ``model`` ``version`` (loading it where allowed); raise naming it."""
        ...

    def retire(self, upstream: str, model: str, version: str) -> dict[str, Any]:
        """Stop ``upstream`` serving ``model`` ``version`` and keep its other versions."""
        ...


class MetricsSource(Protocol):
    def mark(self, route: str) -> None:
        """Start a new window for ``route``: later reads count only traffic after this call."""
        ...

    def read(self, route: str, baseline: str, candidate: str) -> Measurements:
        """Baseline, candidate and shadow-comparison figures since the last mark."""
        ...


class Store(Protocol):
    def save(self, record: StoredRollout) -> None: ...

    def load(self, route: str) -> StoredRollout: ...

    def routes(self) -> list[str]: ...

    def quarantine(self, route: str) -> Path | None: ...


class MemoryStore:
    """A Store that keeps records in memory (a gateway without a state path)."""

    def __init__(self) -> None:
        self._records: dict[str, StoredRollout] = {}

    def save(self, record: StoredRollout) -> None:
        self._records[record.state.route] = record

    def load(self, route: str) -> StoredRollout:
        try:
            return self._records[route]
        except KeyError as err:
            raise NotFoundError(f"no rollout recorded for route {route!r}") from err

    def routes(self) -> list[str]:
        return sorted(self._records)

    def quarantine(self, route: str) -> Path | None:
        self._records.pop(route, None)
        return None
