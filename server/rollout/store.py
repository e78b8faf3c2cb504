"""Rollout state and event log, persisted atomically: one JSON file per route.

Each write goes to a temporary file in the same directory, is fsynced, then ``os.replace``d over
the old one (and the directory fsynced), so a reader sees the old record or the new one, never
half of either. The event log lives inside the same file, so state and events never disagree.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.atomic_file import write_atomic
from core.errors import KilnError, NotFoundError, RepositoryError
from server.rollout.machine import RolloutState
from server.rollout.plan import RolloutPlan, plan_from_mapping

logger = logging.getLogger(__name__)

FORMAT = 1
_SUFFIX = ".rollout.json"


@dataclass(frozen=True)
class StoredRollout:
    """What is persisted for one route. ``plan`` is None only for a state restored after corruption."""

    state: RolloutState
    plan: RolloutPlan | None
    events: tuple[dict[str, Any], ...] = ()
    previous: dict[str, Any] | None = None  # what the baseline served (a version rollout retires it)
    retire: dict[str, Any] | None = None  # how retiring it went

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "route": self.state.route,
            "plan": self.plan.to_dict() if self.plan else None,
            "state": self.state.to_dict(),
            "events": list(self.events),
            "previous": self.previous,
            "retire": self.retire,
        }


def _file_name(route: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", lambda m: f"%{ord(m.group()):02X}", route) + _SUFFIX


def _route_of(name: str) -> str:
    return re.sub(r"%([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), name[: -len(_SUFFIX)])


def parse_record(data: Any) -> StoredRollout:
    """Rebuild a record from its JSON form; raises ValueError/KeyError/TypeError when malformed."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"not a format-{FORMAT} rollout record")
    state = RolloutState.from_dict(data["state"])
    plan = plan_from_mapping(data["plan"], "in the state file") if data.get("plan") is not None else None
    events = tuple(dict(e) for e in data.get("events", []))
    return StoredRollout(
        state=state, plan=plan, events=events, previous=data.get("previous"), retire=data.get("retire")
    )


class RolloutStore:
    """A directory of rollout records, one per route."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RepositoryError(
                f"cannot create rollout state directory {str(self.directory)!r}: {err}; choose a writable path"
            ) from err

    def path(self, route: str) -> Path:
        return self.directory / _file_name(route)

    def save(self, record: StoredRollout) -> None:
        text = json.dumps(record.to_dict(), indent=1, sort_keys=True)
        try:
            write_atomic(self.path(record.state.route), text.encode("utf-8"))
        except OSError as err:
            raise RepositoryError(
                f"cannot write rollout state {str(self.path(record.state.route))!r}: {err}; check disk space "
                "and permissions"
            ) from err

    def load(self, route: str) -> StoredRollout:
        """The record of ``route``; NotFoundError when none, RepositoryError when unreadable."""
        path = self.path(route)
        try:
            raw = path.read_bytes()
        except FileNotFoundError as err:
            raise NotFoundError(f"no rollout recorded for route {route!r} in {str(self.directory)!r}") from err
        except OSError as err:
            raise RepositoryError(f"cannot read rollout state {str(path)!r}: {err}") from err
        try:
            return parse_record(json.loads(raw))
        except (ValueError, KeyError, TypeError, KilnError) as err:  # KilnError: plan no longer valid
            raise RepositoryError(f"rollout state {str(path)!r} is unreadable: {err}") from err

    def routes(self) -> list[str]:
        return sorted(_route_of(p.name) for p in self.directory.glob(f"*{_SUFFIX}"))

    def quarantine(self, route: str) -> Path | None:
        """Move an unreadable record aside (kept for inspection); returns its new path."""
        path = self.path(route)
        if not path.exists():
            return None
        target = path.with_name(path.name + ".corrupt")
        os.replace(path, target)
        logger.warning("moved unreadable rollout state %s to %s", path, target)
        return target
