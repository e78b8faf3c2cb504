"""``kiln.json``: how a published engine was made, and the checksums that prove it unchanged."""

from __future__ import annotations

import datetime as dt
import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from builders import __version__
from builders.inspection import file_sha256
from core.errors import RepositoryError
from runtime.layout import MANIFEST_NAME

FORMAT_VERSION = 1


def tool_versions(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Versions of Kiln and the libraries that shape an engine."""
    versions = {"kiln": __version__, "python": platform.python_version()}
    for dist in ("onnx", "onnxruntime", "numpy", "tritonclient", "protobuf"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    versions["platform"] = f"{sys.platform}-{platform.machine()}"
    versions.update(extra or {})
    return versions


def file_checksums(directory: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in a version directory except the manifest itself."""
    result: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME:
            rel = path.relative_to(directory).as_posix()
            result[rel] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    return result


def build_manifest(
    *,
    model_name: str,
    source_path: Path,
    source_sha256: str,
    precision: str,
    target: str,
    artifact: str,
    files: dict[str, dict[str, Any]],
    build: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
    validation: dict[str, Any] | None = None,
    tools: dict[str, str] | None = None,
    replaces: int | None = None,
) -> dict[str, Any]:
    """The manifest dict; ``version`` is filled in by publish once it is allocated.

    ``replaces``: the version that was the newest when this one was built (None for the first).
    """
    return {
        "format": FORMAT_VERSION,
        "model": model_name,
        "version": None,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": str(source_path), "sha256": source_sha256},
        "precision": precision,
        "target": target,
        "artifact": artifact,
        "tools": tool_versions(tools),
        "build": build or {},
        "calibration": calibration,
        "validation": validation,
        "files": files,
        "replaces": replaces,
    }


def read_manifest(version_dir: Path) -> dict[str, Any]:
    """Load a version's kiln.json, with a clear error when absent or corrupt."""
    path = version_dir / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise RepositoryError(f"{path} is missing; this version was not published by Kiln") from err
    except (OSError, json.JSONDecodeError) as err:
        raise RepositoryError(f"{path} is unreadable ({err}); republish this version") from err
    if not isinstance(data, dict):
        raise RepositoryError(f"{path} is not a JSON object; republish this version")
    return data
