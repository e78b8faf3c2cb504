"""Admin endpoint table, token check and error mapping (no sockets)."""

from __future__ import annotations

import pytest

from core.errors import ConflictError
from server.gateway.admin import AdminApp, AdminRequest, AdminResponse, http_status


def request(method: str, path: str, token: str | None = "s3cret", body: bytes = b"") -> AdminRequest:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return AdminRequest(method, path, {}, headers, body)


def app() -> AdminApp:
    admin = AdminApp("s3cret")
    admin.register("GET", "/rollouts", lambda r: AdminResponse(200, {"rollouts": []}))
    admin.register("POST", "/rollouts/", lambda r: AdminResponse(201, {"path": r.path, "body": r.json()}), prefix=True)
    admin.register("POST", "/rollouts/x/", lambda r: (_ for _ in ()).throw(ConflictError("busy")), prefix=True)
    return admin


def test_registered_handlers_and_longest_prefix() -> None:
    admin = app()
    assert admin.handle(request("GET", "/rollouts")).body == {"rollouts": []}
    created = admin.handle(request("POST", "/rollouts/digits/pause", body=b'{"why": 1}'))
    assert created.status == 201 and created.body == {"path": "/rollouts/digits/pause", "body": {"why": 1}}
    conflict = admin.handle(request("POST", "/rollouts/x/pause"))
    assert conflict.status == 409 and conflict.body == {"error": "busy"}


@pytest.mark.parametrize("token", [None, "wrong", "s3cret-but-longer"])
def test_token_is_required(token: str | None) -> None:
    response = app().handle(request("GET", "/rollouts", token=token))
    assert response.status == 401 and "Bearer" in response.body["error"]  # 401: no or wrong credentials


def test_unknown_endpoint_and_bad_json() -> None:
    admin = app()
    missing = admin.handle(request("GET", "/nope"))
    assert missing.status == 404 and "/rollouts" in missing.body["error"]
    bad = admin.handle(request("POST", "/rollouts/a", body=b"{oops"))
    assert bad.status == 400 and "not valid JSON" in bad.body["error"]
    assert http_status(ConflictError("x")) == 409


def test_routes_cli_weights_parsing_and_unreachable_admin(capsys: pytest.CaptureFixture[str]) -> None:
    from core.errors import InvalidInputError
    from server.cli import main
    from server.cli.routes_cmd import parse_weights

    assert parse_weights("fp32=90, int8=10") == {"fp32": 90.0, "int8": 10.0}
    for bad in ("fp32", "fp32=x", "=5"):
        with pytest.raises(InvalidInputError, match="variant=number"):
            parse_weights(bad)
    assert main(["routes", "show", "--admin", "http://127.0.0.1:9"]) == 8  # UnavailableError
    assert "cannot reach the gateway admin API" in capsys.readouterr().err
