"""The gateway's state file: its routes, written atomically on every change, read on start.

Format (JSON): ``{"format": 1, "routes": {<public>: <route>}}``. A write goes to a temporary file
in the same directory, is fsynced, then renamed over the old file, so a crash leaves either the
old or the new state, never a torn one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.atomic_file import write_atomic
from core.errors import InvalidInputError, RepositoryError
from server.gateway.config import Route, Upstream, parse_route, route_to_dict

logger = logging.getLogger(__name__)
FORMAT = 1


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (temp file, fsync, rename, fsync dir)."""
    path = Path(path)
    text = json.dumps(data, indent=2, sort_keys=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text.encode("utf-8"))
    except OSError as err:
        raise RepositoryError(f"cannot write state file {str(path)!r}: {err.strerror}; check the directory") from err


class StateStore:
    """Routes persisted in one JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def save(self, routes: Mapping[str, Route]) -> None:
        data = {"format": FORMAT, "routes": {name: route_to_dict(r) for name, r in sorted(routes.items())}}
        write_json_atomic(self.path, data)

    def load(self, upstreams: Mapping[str, Upstream]) -> dict[str, Route] | None:
        """Routes from the file, validated against ``upstreams``; None when there is no file yet."""
        if not self.path.exists():
            return None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise InvalidInputError(
                f"state file {str(self.path)!r} is unreadable ({err}); fix or delete it to start from the config"
            ) from err
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("routes"), dict):
            raise InvalidInputError(
                f"state file {str(self.path)!r} is not a format-{FORMAT} Kiln gateway state; "
                "delete it to start from the config"
            )
        try:
            routes = {name: parse_route(name, route, upstreams) for name, route in data["routes"].items()}
        except InvalidInputError as err:
            raise InvalidInputError(
                f"state file {str(self.path)!r} no longer matches the config: {err}; "
                "fix the config's upstreams or delete the state file"
            ) from err
        logger.info("restored %d routes from %s", len(routes), self.path)
        return routes
