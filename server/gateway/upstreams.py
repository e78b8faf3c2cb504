"""gRPC channels to upstreams with identity (bytes in, bytes out) method stubs."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc

from core.errors import NotFoundError
from server.gateway.config import ClientTls, ServerTls, Upstream

SERVICE = "inference.GRPCInferenceService"
UnaryCall = Callable[..., Any]  # bytes -> bytes (sync) or -> Awaitable[bytes] (aio)
StreamCall = Callable[..., Any]


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise NotFoundError(f"cannot read {what} {str(path)!r}: {err.strerror}; check the TLS settings") from err


def channel_credentials(tls: ClientTls) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca, "upstream CA"),
        private_key=_read(tls.key, "client key"),
        certificate_chain=_read(tls.cert, "client certificate"),
    )


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    key = _read(tls.key, "server key")
    cert = _read(tls.cert, "server certificate")
    client_ca = _read(tls.client_ca, "client CA")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 0),  # the gateway does its own (one) retry
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 500),  # a restarted upstream is reached within ~0.5 s
    ]


class UpstreamClient:
    """Channels to one upstream; ``unary(method)`` / ``stream(method)`` return bytes callables."""

    def __init__(self, name: str, upstream: Upstream, max_message_bytes: int, aio: bool = False) -> None:
        self.name = name
        self.aio = aio
        self.address = upstream.address
        options = channel_options(max_message_bytes)
        if upstream.tls is not None and upstream.tls.server_name:
            options.append(("grpc.ssl_target_name_override", upstream.tls.server_name))
        self._channels: list[Any] = []
        insecure, secure = (grpc.aio.insecure_channel, grpc.aio.secure_channel) if aio else (
            grpc.insecure_channel, grpc.secure_channel)  # fmt: skip
        for index in range(upstream.channels):
            # a distinct arg per channel keeps gRPC from sharing one subchannel (connection)
            opts = [*options, ("grpc.channel_pool_index", index)]
            if upstream.tls is None:
                self._channels.append(insecure(upstream.address, options=opts))
            else:
                self._channels.append(secure(upstream.address, channel_credentials(upstream.tls), options=opts))
        self._unary: dict[str, list[UnaryCall]] = {}
        self._streams: dict[str, list[StreamCall]] = {}
        self._next = itertools.count()

    def unary(self, method: str) -> UnaryCall:
        calls = self._unary.get(method)
        if calls is None:
            path = f"/{SERVICE}/{method}"
            calls = self._unary.setdefault(method, [c.unary_unary(path) for c in self._channels])
        return calls[0] if len(calls) == 1 else calls[next(self._next) % len(calls)]

    def stream(self, method: str) -> StreamCall:
        calls = self._streams.get(method)
        if calls is None:
            path = f"/{SERVICE}/{method}"
            calls = self._streams.setdefault(method, [c.stream_stream(path) for c in self._channels])
        return calls[next(self._next) % len(calls)]

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    async def aclose(self) -> None:
        for channel in self._channels:
            await channel.close()


class UpstreamPool:
    """One client per upstream; ``aio=True`` makes grpc.aio channels (create them on their loop)."""

    def __init__(self, upstreams: Mapping[str, Upstream], max_message_bytes: int, aio: bool = False) -> None:
        self.clients = {name: UpstreamClient(name, u, max_message_bytes, aio) for name, u in upstreams.items()}

    def __getitem__(self, name: str) -> UpstreamClient:
        return self.clients[name]

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()
