"""Routes shared by several gateway replicas through one watched file.

The file holds ``{"version": n, "routes": {public: route JSON}}``. One writer (the rollout
controller, via ``SharedRouteFile`` as its ``RouteControl``) replaces it atomically (temp file,
fsync, ``os.replace``) under an advisory lock and bumps ``version``; every replica runs a
``RouteFileWatcher`` that polls the file's content hash and, on change, applies the whole route
set to its own gateway in one atomic ``RouteTable`` change. A Kubernetes ConfigMap mounted as a
volume is the same thing: the kubelet swaps the mounted file atomically (see deploy/README.md).

A file that cannot be read or validated is ignored (the replica keeps its current routes) and
reported in ``last_error`` and the log, never half-applied.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from core.errors import ConflictError, InvalidInputError, KilnError, NotFoundError
from server.gateway.table import RouteChange, RouteTable
from server.rollout.store import write_atomic

logger = logging.getLogger(__name__)

ApplyRoutes = Callable[[dict[str, dict[str, Any]], int], None]


def parse_routes_document(raw: bytes, source: str) -> tuple[int, dict[str, dict[str, Any]]]:
    """Validate the shape of a shared routes document; returns (version, routes)."""
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise InvalidInputError(f"shared routes {source} is not JSON: {err}") from err
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("routes"), dict)
        or not isinstance(data.get("version"), int)
    ):
        raise InvalidInputError(
            f'shared routes {source} must be {{"version": int, "routes": {{...}}}}; got keys '
            f"{sorted(data) if isinstance(data, dict) else type(data).__name__}"
        )
    return data["version"], {str(k): dict(v) for k, v in data["routes"].items()}


class SharedRouteFile:
    """Read and atomically rewrite the shared routes file; usable as a rollout ``RouteControl``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def read(self) -> tuple[int, dict[str, dict[str, Any]]]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return 0, {}
        return parse_routes_document(raw, repr(str(self.path)))

    def write(self, routes: Mapping[str, Mapping[str, Any]], expected_version: int | None = None) -> int:
        """Replace every route at once; returns the new version."""
        with self._locked():
            version, _ = self.read()
            if expected_version is not None and expected_version != version:
                raise ConflictError(
                    f"shared routes {str(self.path)!r} are at version {version}, not {expected_version}; "
                    "re-read and retry"
                )
            document = {"version": version + 1, "routes": {k: dict(v) for k, v in routes.items()}}
            write_atomic(self.path, json.dumps(document, indent=1, sort_keys=True).encode("utf-8"))
            return version + 1

    def get_route(self, public: str) -> dict[str, Any]:
        _, routes = self.read()
        if public not in routes:
            raise NotFoundError(f"route {public!r} is not in {str(self.path)!r}; it has {sorted(routes)}")
        return routes[public]

    def all_routes(self) -> dict[str, dict[str, Any]]:
        return self.read()[1]

    def put_route(self, public: str, route: Mapping[str, Any], reason: str) -> None:
        with self._locked():
            version, routes = self.read()
            routes[public] = dict(route)
            document = {"version": version + 1, "routes": routes}
            write_atomic(self.path, json.dumps(document, indent=1, sort_keys=True).encode("utf-8"))
        logger.info("shared routes v%d: route %s replaced (%s)", version + 1, public, reason)


class RouteFileWatcher:
    """Polls a routes file and hands every new content to ``apply`` (one replica's side)."""

    def __init__(self, path: Path, apply: ApplyRoutes, interval_s: float = 0.5) -> None:
        self.path = Path(path)
        self._apply = apply
        self.interval_s = interval_s
        self._digest: str | None = None
        self.applied_version: int | None = None
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> bool:
        """Apply the file if its content changed; True when something was applied."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return False
        digest = hashlib.sha256(raw).hexdigest()
        if digest == self._digest:
            return False
        self._digest = digest
        try:
            version, routes = parse_routes_document(raw, repr(str(self.path)))
        except KilnError as err:  # bad content: reported once, until the file changes again
            self.last_error = str(err)
            logger.warning("ignoring shared routes %s: %s; keeping the current routes", self.path, err)
            return False
        try:
            self._apply(routes, version)
        except KilnError as err:  # refused or unreachable: retried at the next poll
            self._digest = None
            self.last_error = str(err)
            logger.warning("cannot apply shared routes %s v%d: %s; will retry", self.path, version, err)
            return False
        self.applied_version, self.last_error = version, None
        return True

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="kiln-route-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def _loop(self) -> None:
        self.poll_once()
        while not self._stop.wait(self.interval_s):
            self.poll_once()


def table_applier(table: RouteTable) -> ApplyRoutes:
    """``apply`` for a gateway ``RouteTable``: the file's routes become the table's, in one change."""

    def apply(routes: dict[str, dict[str, Any]], version: int) -> None:
        gone = tuple(sorted(set(table.snapshot.routes) - set(routes)))
        table.apply(RouteChange(put=routes, remove=gone, reason=f"shared routes v{version}"), actor="route-file")

    return apply
