"""A small client for Envoy's admin API (bound to 127.0.0.1 only)."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping

from core.errors import UnavailableError


class EnvoyAdmin:
    def __init__(self, address: str, timeout_s: float = 5.0) -> None:
        self.address = address  # "127.0.0.1:PORT"
        self._timeout = timeout_s

    def _call(self, method: str, path: str) -> str:
        request = urllib.request.Request(f"http://{self.address}{path}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                return str(response.read().decode("utf-8", "replace"))
        except urllib.error.HTTPError as err:
            body = err.read().decode("utf-8", "replace").strip()
            raise UnavailableError(f"Envoy admin {method} {path} answered {err.code}: {body[:200]}") from err
        except (OSError, urllib.error.URLError) as err:
            raise UnavailableError(f"Envoy admin at {self.address} is unreachable ({method} {path}): {err}") from err

    def get(self, path: str) -> str:
        return self._call("GET", path)

    def post(self, path: str) -> str:
        return self._call("POST", path)

    def set_runtime(self, values: Mapping[str, int | str]) -> None:
        """One ``/runtime_modify`` call: every key changes together, effective for the next request."""
        if values:
            self.post("/runtime_modify?" + urllib.parse.urlencode({k: str(v) for k, v in values.items()}))

    def stats(self, pattern: str) -> dict[str, str]:
        """Counters, gauges and text readouts whose names match the regex ``pattern``."""
        text = self.get("/stats?filter=" + urllib.parse.quote(pattern))
        out: dict[str, str] = {}
        for line in text.splitlines():
            name, sep, value = line.partition(": ")
            if sep:
                out[name] = value.strip().strip('"')
        return out

    def ready(self) -> bool:
        try:
            return self.get("/ready").strip() == "LIVE"
        except UnavailableError:
            return False
