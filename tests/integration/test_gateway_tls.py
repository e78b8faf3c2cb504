"""TLS on the data plane (with mTLS), towards an upstream, and on the admin port."""

from __future__ import annotations

import json
import ssl
import urllib.request
from pathlib import Path

import grpc
import pytest

from harness.gateway import (
    PLANES,
    TOKEN,
    digits_models,
    gateway_config,
    make_certificates,
    plane_options,
    served_variant,
    variant,
)
from harness.triton.kserve_upstream import start_upstream
from server.gateway.app import start_gateway

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.mark.parametrize("plane", PLANES)
def test_mtls_data_plane_tls_upstream_and_https_admin(certs: dict[str, Path], plane: str) -> None:
    server_creds = grpc.ssl_server_credentials([(certs["server_key"].read_bytes(), certs["server"].read_bytes())])
    with start_upstream(digits_models(), credentials=server_creds) as upstream:
        config = gateway_config(
            {"up": upstream.address},
            {"digits": {"variants": [variant("a", "digits", 100)]}},
        )
        config["upstreams"]["up"]["tls"] = {"ca": str(certs["ca"])}
        tls = {"cert": str(certs["server"]), "key": str(certs["server_key"])}
        config["server"]["tls"] = {**tls, "client_ca": str(certs["ca"])}
        config["admin"] = {"tls": tls}
        with start_gateway(config, port=0, admin_port=0, admin_token_value=TOKEN, plugins=(),
                           **plane_options(plane)) as gw:  # fmt: skip
            good = grpc.ssl_channel_credentials(
                certs["ca"].read_bytes(), certs["client_key"].read_bytes(), certs["client"].read_bytes()
            )
            with grpc.secure_channel(gw.address, good) as channel:
                assert served_variant(channel, "digits") == ("a", "digits")  # through TLS to a TLS upstream
            no_client_cert = grpc.ssl_channel_credentials(certs["ca"].read_bytes())
            with grpc.secure_channel(gw.address, no_client_cert) as channel, pytest.raises(grpc.RpcError) as caught:
                served_variant(channel, "digits")
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            with grpc.insecure_channel(gw.address) as channel, pytest.raises(grpc.RpcError):
                served_variant(channel, "digits")
            assert gw.admin_url.startswith("https://")
            request = urllib.request.Request(gw.admin_url + "/routes", headers={"Authorization": f"Bearer {TOKEN}"})
            context = ssl.create_default_context(cafile=str(certs["ca"]))
            with urllib.request.urlopen(request, timeout=10, context=context) as response:
                assert json.loads(response.read())["routes"]["digits"]["variants"][0]["name"] == "a"
