"""Who may do what through the gateway: control RPCs, pinning, and the error text clients see.

* Control RPCs (``config.CONTROL_METHODS``: repository load/unload/index, shared memory, trace and
  log settings) change or reveal an upstream's state, so the gateway forwards one only when the
  upstream it goes to lists it in ``control_rpcs`` and the call carries the admin token as
  ``authorization: Bearer <token>`` metadata. The upstream is ``kiln-upstream: <name>`` when given,
  else ``default_upstream``. No token: UNAUTHENTICATED; not enabled: PERMISSION_DENIED.
* Pinning a variant (``kiln-variant``, or a ``model_version`` only that variant serves) that the
  route does not open to clients (weight 0, e.g. a shadow-only candidate) needs the same token,
  unless the route says ``pinning: any``.
* ``client_details`` strips upstream addresses and absolute paths from error text passed on.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from server.gateway.config import Upstream

UPSTREAM_HEADER = "kiln-upstream"
AUTH_HEADER = "authorization"
_PEER = re.compile(
    r"(?:ipv4|ipv6|dns|unix|unix-abstract):[^\s,;'\"]+"  # gRPC's peer strings
    r"|\[[0-9A-Fa-f:.]+\](?::\d+)?"  # [v6]:port
    r"|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"  # v4[:port]
    r"|\b[A-Za-z][A-Za-z0-9-]*(?:\.[A-Za-z0-9-]+)*:\d{2,5}\b"  # host:port
)
_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s'\",:;()\[\]{}]+/)+[^\s'\",:;()\[\]{}]*")
_MAX_DETAILS = 500


Metadata = tuple[tuple[str, str], ...]


class RpcAbort(Exception):
    """Raised by the data plane's core; the transport turns it into ``context.abort(code, details)``."""

    def __init__(self, code: grpc.StatusCode, details: str, metadata: Metadata = ()) -> None:
        super().__init__(details)
        self.code, self.details, self.metadata = code, details, metadata


def bearer_token(metadata: Sequence[Any]) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry (None when absent)."""
    for item in metadata:
        if item[0] == AUTH_HEADER:
            value = item[1].decode("latin-1") if isinstance(item[1], bytes) else str(item[1])
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


def is_admin(metadata: Sequence[Any], token: bytes | None) -> bool:
    """True when the call carries the gateway's admin token (never when none is configured)."""
    given = bearer_token(metadata)
    return token is not None and given is not None and hmac.compare_digest(given.encode("utf-8", "replace"), token)


def check_credential(metadata: Sequence[Any], token: bytes | None, what: str) -> None:
    """Raise UNAUTHENTICATED unless the call carries the admin token."""
    if is_admin(metadata, token):
        return
    given = bearer_token(metadata)
    if token is None:
        reason = "this gateway has no admin token configured (admin.token_file or admin.token_env)"
    elif given is None:
        reason = f"send metadata '{AUTH_HEADER}: Bearer <admin token>'"
    else:
        reason = f"the '{AUTH_HEADER}' metadata does not carry the admin token"
    raise RpcAbort(grpc.StatusCode.UNAUTHENTICATED, f"{what} needs the gateway's admin credential; {reason}")


def control_upstream(
    method: str,
    metadata: Sequence[Any],
    upstreams: Mapping[str, Upstream],
    default: str | None,
    token: bytes | None,
) -> str:
    """The upstream a control RPC may go to, or RpcAbort saying why not."""
    named = next((str(m[1])[:200] for m in metadata if m[0] == UPSTREAM_HEADER), None)
    upstream = named or default
    if upstream is None:
        raise RpcAbort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{method} is a control RPC and this gateway has no default_upstream; "
            f"name one with '{UPSTREAM_HEADER}: <upstream>' metadata",
        )
    settings = upstreams.get(upstream)
    if settings is None:
        raise RpcAbort(
            grpc.StatusCode.NOT_FOUND,
            f"{UPSTREAM_HEADER} {shown(upstream)} is not an upstream; upstreams are {sorted(upstreams)}",
        )
    if method not in settings.control_rpcs:
        raise RpcAbort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{method} is a control RPC, refused for upstream {upstream!r}: enable it with "
            f"upstreams.{upstream}.control_rpcs: [{method}] in the gateway config and send the admin token",
        )
    check_credential(metadata, token, method)
    return upstream


def shown(value: str, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: a client's value quoted back, never 5 KB of it."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value)} characters)"


def client_details(details: str | None) -> str:
    """Upstream error text fit for a client: no addresses, no absolute paths, bounded length."""
    text = _PATH.sub("<path>", _PEER.sub("<address>", details or ""))
    return text if len(text) <= _MAX_DETAILS else text[: _MAX_DETAILS - 3] + "..."
