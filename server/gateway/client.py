"""A small client for the gateway's admin API (used by ``kiln routes`` and other CLI groups)."""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from core import errors

DEFAULT_ADMIN_URL = "http://127.0.0.1:8080"
DEFAULT_TOKEN_ENV = "KILN_ADMIN_TOKEN"
_BY_STATUS: dict[int, type[errors.KilnError]] = {
    400: errors.InvalidInputError,
    401: errors.UnauthenticatedError,
    403: errors.PermissionDeniedError,
    404: errors.NotFoundError,
    409: errors.ConflictError,
    429: errors.ResourceExhaustedError,
    503: errors.UnavailableError,
}


def read_token(token_file: Path | None, token_env: str | None = DEFAULT_TOKEN_ENV) -> str | None:
    """The admin token from ``token_file`` if given, else from the environment variable (or None)."""
    if token_file is not None:
        try:
            return Path(token_file).read_text(encoding="utf-8").strip() or None
        except OSError as err:
            raise errors.NotFoundError(f"cannot read token file {str(token_file)!r}: {err.strerror}") from err
    return os.environ.get(token_env, "").strip() or None if token_env else None


class AdminClient:
    """JSON over HTTP(S) with ``Authorization: Bearer``; HTTP errors become Kiln errors."""

    def __init__(self, url: str = DEFAULT_ADMIN_URL, token: str | None = None, ca_file: Path | None = None) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self._context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None

    def request(self, method: str, path: str, body: Any = None, timeout_s: float = 10.0) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        request.add_header("User-Agent", "kiln-cli")
        if self._token:
            request.add_header("Authorization", f"Bearer {self._token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s, context=self._context) as response:
                payload = response.read()
                kind = response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            raise _error(method, path, err) from err
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise errors.UnavailableError(
                f"cannot reach the gateway admin API at {self.url} ({reason}); is `kiln gateway` running?"
            ) from err
        return json.loads(payload) if "json" in kind else payload.decode()

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, body)

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)


def _error(method: str, path: str, err: urllib.error.HTTPError) -> errors.KilnError:
    try:
        message = json.loads(err.read()).get("error", "")
    except ValueError:
        message = ""
    cls = _BY_STATUS.get(err.code, errors.KilnError)
    return cls(f"admin API {method} {path} answered {err.code}: {message or err.reason}")
