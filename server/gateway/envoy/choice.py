"""Which data plane a gateway runs on: ``envoy``, ``python`` or ``auto`` (Envoy where it works)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from core.errors import InvalidInputError, MissingDependencyError
from server.gateway.envoy.binary import EnvoyBinary, find_envoy

DataPlane = Literal["envoy", "python", "auto"]
DATA_PLANES = ("envoy", "python", "auto")


def choose_data_plane(requested: str, binary_path: Path | None = None) -> tuple[str, EnvoyBinary | None, str]:
    """(plane, Envoy binary or None, why): ``auto`` falls back to python with the reason; an explicit
    ``envoy`` without a working binary raises MissingDependencyError."""
    if requested not in DATA_PLANES:
        raise InvalidInputError(f"data plane {requested!r} is not one of {list(DATA_PLANES)}")
    if requested == "python":
        return "python", None, "requested"
    try:
        binary = find_envoy(binary_path)
    except MissingDependencyError as err:
        if requested == "envoy":
            raise MissingDependencyError(f"--data-plane envoy: {err}") from err
        return "python", None, f"Envoy is not usable here ({err}); serving on the Python data plane"
    return "envoy", binary, f"Envoy {binary.version} ({binary.path})"
