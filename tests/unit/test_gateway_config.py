"""Gateway config validation: precise errors for every kind of bad config."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from core.errors import InvalidInputError, NotFoundError
from server.gateway.config import load_config, parse_config, parse_route

ROOT = Path(__file__).resolve().parents[2]


def config(**routes: Any) -> dict[str, Any]:
    return {"upstreams": {"a": {"address": "127.0.0.1:8001"}, "b": {"address": "127.0.0.1:8002"}}, "routes": routes}


def route(*weights: float, upstream: str = "a", **extra: Any) -> dict[str, Any]:
    variants = [{"name": f"v{i}", "upstream": upstream, "model": f"m{i}", "weight": w} for i, w in enumerate(weights)]
    return {"variants": variants, **extra}


def test_valid_config_parses_into_frozen_models() -> None:
    cfg = parse_config(config(digits=route(90, 10, sticky="header:x-user", shadow={"variant": "v1", "percent": 5})))
    digits = cfg.routes["digits"]
    assert digits.baseline.name == "v0"
    assert digits.sticky_header == "x-user"
    assert digits.shadow is not None and digits.shadow.percent == 5
    with pytest.raises(Exception, match="frozen"):
        digits.sticky = None  # type: ignore[misc]


def test_weights_that_do_not_add_up_are_named() -> None:
    with pytest.raises(InvalidInputError, match=r"routes\.digits.*add up to 95, not 100"):
        parse_config(config(digits=route(90, 5)))


def test_unknown_upstream_names_the_variant_and_known_upstreams() -> None:
    with pytest.raises(InvalidInputError, match=r"variant 'v0' names unknown upstream 'zz'.*\['a', 'b'\]"):
        parse_config(config(digits=route(100, upstream="zz")))


def test_duplicate_variant_names() -> None:
    bad = route(50, 50)
    bad["variants"][1]["name"] = "v0"
    with pytest.raises(InvalidInputError, match=r"duplicate variant names \['v0'\]"):
        parse_config(config(digits=bad))


def test_duplicate_yaml_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(
        "upstreams:\n  a: {address: '127.0.0.1:1'}\n  a: {address: '127.0.0.1:2'}\nroutes: {}\n", encoding="utf-8"
    )
    with pytest.raises(InvalidInputError, match=r"duplicate key 'a' at line 3"):
        load_config(path)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"sticky": "cookie:x"}, "must be 'header:<lower-case metadata key>'"),
        ({"shadow": {"variant": "nope", "percent": 10}}, "shadow variant 'nope' is not one of"),
        ({"shadow": {"variant": "v0", "percent": 0}}, "greater than 0"),
        ({"unknown_key": 1}, "Extra inputs are not permitted"),
    ],
)
def test_route_level_errors(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        parse_config(config(digits=route(100, **extra)))


def test_bad_address_and_negative_weight_are_both_reported() -> None:
    data = config(digits=route(110, -10))
    data["upstreams"]["a"]["address"] = "localhost"
    with pytest.raises(InvalidInputError) as caught:
        parse_config(data)
    text = str(caught.value)
    assert "must be host:port" in text and "greater than or equal to 0" in text


def test_passthrough_needs_a_default_upstream() -> None:
    with pytest.raises(InvalidInputError, match="passthrough needs a default_upstream"):
        parse_config({**config(), "unknown_models": "passthrough"})


def test_parse_route_checks_upstreams() -> None:
    upstreams = parse_config(config()).upstreams
    assert parse_route("m", route(100), upstreams).variants[0].upstream == "a"
    with pytest.raises(InvalidInputError, match="unknown upstream 'c'"):
        parse_route("m", route(100, upstream="c"), upstreams)


def test_missing_file_and_example_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(NotFoundError, match="cannot read gateway config"):
        load_config(tmp_path / "absent.yaml")
    example = load_config(ROOT / "deploy" / "gateway.example.yaml")
    assert [v.name for v in example.routes["digits"].variants] == ["fp32", "int8", "trt"]


def test_event_loop_only_applies_to_aio_mode() -> None:
    assert parse_config(config()).server.event_loop == "asyncio"
    aio = parse_config({**config(), "server": {"mode": "aio", "event_loop": "uvloop"}})
    assert aio.server.event_loop == "uvloop"
    with pytest.raises(InvalidInputError, match=r"event_loop 'uvloop' only applies to mode 'aio'"):
        parse_config({**config(), "server": {"event_loop": "uvloop"}})
    with pytest.raises(InvalidInputError, match="event_loop"):
        parse_config({**config(), "server": {"mode": "aio", "event_loop": "trio"}})


def test_uvloop_loop_without_the_package_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.errors import MissingDependencyError
    from server.gateway.serve_aio import new_event_loop

    default = new_event_loop("asyncio")
    assert type(default).__module__.startswith("asyncio")
    default.close()
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed: import raises ImportError
    with pytest.raises(MissingDependencyError, match="pip install uvloop"):
        new_event_loop("uvloop")
