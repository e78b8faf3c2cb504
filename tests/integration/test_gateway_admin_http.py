"""The admin API against a hostile client, over raw sockets.

Each case reproduces what the hostile-input pass did to the stdlib server: body read before the
token check, ``Content-Length: -1``/``abc``, no socket timeout, no connection cap, backlog 5, 500
with internal text for ``window_s=nan`` and deeply nested JSON, ``true`` as a weight, 403 for a
missing token. After each, the server answers the next good request and the routes are unchanged.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from harness.gateway import TOKEN, gateway_config, variant
from server.gateway import admin as admin_module
from server.gateway.app import GatewayHandle, start_gateway

pytestmark = pytest.mark.integration
AUTH = f"Authorization: Bearer {TOKEN}\r\n"


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch) -> Iterator[GatewayHandle]:
    monkeypatch.setattr(admin_module, "SOCKET_TIMEOUT_S", 1.0)
    monkeypatch.setattr(admin_module, "MAX_CONNECTIONS", 4)
    routes = {"digits": {"variants": [variant("a", "digits", 60), variant("b", "digits", 40)]}}
    config = gateway_config({"up": "127.0.0.1:1"}, routes)
    with start_gateway(config, port=0, admin_port=0, admin_token_value=TOKEN, plugins=()) as handle:
        yield handle


def connect(gw: GatewayHandle) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.admin_port), timeout=5)


def exchange(gw: GatewayHandle, head: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send one raw request; (status, headers, body) of the answer."""
    with connect(gw) as sock:
        sock.sendall(head.encode("latin-1") + body)
        return read_response(sock)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response; got {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:length]


def error_of(body: bytes) -> str:
    return str(json.loads(body)["error"])


def still_good(gw: GatewayHandle, version: int = 0) -> None:
    status, _, body = exchange(gw, f"GET /routes HTTP/1.1\r\nHost: x\r\n{AUTH}\r\n")
    assert status == 200 and json.loads(body)["version"] == version
    assert gw.routes.route("digits").variants[0].weight == 60


def test_token_is_checked_before_the_body_is_read(gateway: GatewayHandle) -> None:
    # headers promise 300 MB; the answer comes before a single body byte is sent
    head = "PUT /routes HTTP/1.1\r\nHost: x\r\nContent-Length: 300000000\r\n\r\n"
    started = time.monotonic()
    with connect(gateway) as sock:
        sock.sendall(head.encode())
        status, headers, body = read_response(sock)
        assert status == 401 and headers["www-authenticate"].startswith("Bearer")
        assert "no Authorization header" in error_of(body) and headers["connection"] == "close"
        assert sock.recv(10) == b""  # closed: the body is never read
    assert time.monotonic() - started < 0.9  # not the socket timeout either
    status, _, body = exchange(gateway, "GET /routes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\n\r\n")
    assert status == 401 and "wrong token" in error_of(body)
    still_good(gateway)


@pytest.mark.parametrize("value", ["-1", "abc", "1e3", " 12 34", "99999999999999999999"])
def test_bad_content_length_is_400_not_a_dropped_connection(gateway: GatewayHandle, value: str) -> None:
    head = f"POST /routes/digits/weights HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Length: {value}\r\n\r\n"
    status, headers, body = exchange(gateway, head, b'{"weights": {"a": 0, "b": 100}}' + b"x" * 100_000)
    assert status == 400 and "Content-Length" in error_of(body) and headers["connection"] == "close"
    still_good(gateway)


def test_body_limits_and_chunked(gateway: GatewayHandle) -> None:
    big = admin_module.MAX_BODY_BYTES + 1
    status, _, body = exchange(gateway, f"PUT /routes HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Length: {big}\r\n\r\n")
    assert status == 413 and f"{big} bytes" in error_of(body)
    chunked = f"PUT /routes HTTP/1.1\r\nHost: x\r\n{AUTH}Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    status, _, body = exchange(gateway, chunked)
    assert status == 411 and "Content-Length" in error_of(body)
    still_good(gateway)


def test_slow_and_silent_clients_are_dropped(gateway: GatewayHandle) -> None:
    with connect(gateway) as sock:
        sock.sendall(b"GET /routes HTTP/1.1\r\nHost: x\r\n")  # headers never finish
        started = time.monotonic()
        assert sock.recv(100) == b""  # the server's socket timeout closed it
        assert time.monotonic() - started < 4.0
    with connect(gateway) as sock:  # a body that never arrives
        sock.sendall(f"PUT /routes HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Length: 50\r\n\r\n{{".encode())
        assert sock.recv(100) == b""  # closed after the timeout, nothing applied
    still_good(gateway)


def test_connections_beyond_the_cap_get_503_at_once(gateway: GatewayHandle) -> None:
    held = [connect(gateway) for _ in range(admin_module.MAX_CONNECTIONS)]
    try:
        for sock in held:
            sock.sendall(b"GET /routes HTTP/1.1\r\n")  # each holds a connection slot
        time.sleep(0.2)
        started = time.monotonic()
        status, headers, body = exchange(gateway, f"GET /routes HTTP/1.1\r\nHost: x\r\n{AUTH}\r\n")
        assert status == 503 and "busy" in error_of(body) and headers["retry-after"] == "1"
        assert time.monotonic() - started < 0.9
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    still_good(gateway)


def test_backlog_is_not_five(gateway: GatewayHandle) -> None:
    assert admin_module.BACKLOG >= 128
    sockets = [socket.create_connection(("127.0.0.1", gateway.admin_port), timeout=5) for _ in range(40)]
    for sock in sockets:
        sock.close()
    still_good(gateway)


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("GET /stats?window_s=nan", b"", "window_s must be a positive number of seconds, got 'nan'"),
        ("GET /stats?window_s=-5", b"", "got '-5'"),
        ("GET /stats?window_s=inf", b"", "got 'inf'"),
        ("POST /routes/digits/weights", b"[" * 50_000 + b"]" * 50_000, "nests deeper than 32 levels"),
        ("POST /routes/digits/weights", b'{"a":' * 40 + b"1" + b"}" * 40, "nests deeper than 32 levels"),
        ("POST /routes/digits/weights", b'{"weights": {"a": true, "b": false}}', 'needs {"weights"'),
        (
            "PUT /routes/digits",
            b'{"variants": [{"name": "a", "upstream": "up", "model": "m", "weight": true}]}',
            "valid number",
        ),
        ("PUT /routes", b'{"routes": 5}', "PUT /routes needs"),
        ("POST /routes/digits/weights", b"\xff\xfe", "not valid JSON"),
    ],
)
def test_bad_bodies_and_queries_are_400_with_a_clean_message(
    gateway: GatewayHandle, path: str, body: bytes, message: str
) -> None:
    method, target = path.split(" ")
    head = f"{method} {target} HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Length: {len(body)}\r\n\r\n"
    status, _, answer = exchange(gateway, head, body)
    assert status == 400, answer
    text = error_of(answer)
    assert message in text and "Traceback" not in text and "internal" not in text
    still_good(gateway)


def test_handler_bug_is_500_without_internal_text(gateway: GatewayHandle) -> None:
    from server.gateway.admin import AdminRequest, AdminResponse

    def broken(request: AdminRequest) -> AdminResponse:
        raise ZeroDivisionError("secret internal detail /srv/x")

    gateway.admin.register("GET", "/broken", broken)
    status, _, body = exchange(gateway, f"GET /broken HTTP/1.1\r\nHost: x\r\n{AUTH}\r\n")
    assert status == 500 and error_of(body) == "internal error in the admin API; see the gateway log"
    still_good(gateway)
