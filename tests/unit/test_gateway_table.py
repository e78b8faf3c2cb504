"""Route table changes (atomic, validated, persisted) and the state file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from core.errors import ConflictError, InvalidInputError, NotFoundError
from server.gateway.config import parse_config
from server.gateway.state import StateStore
from server.gateway.table import RouteChange, RouteTable


def base_config() -> Any:
    return parse_config(
        {
            "upstreams": {"a": {"address": "127.0.0.1:8001"}},
            "routes": {
                "digits": {
                    "variants": [
                        {"name": "fp32", "upstream": "a", "model": "digits-fp32", "weight": 90},
                        {"name": "int8", "upstream": "a", "model": "digits-int8", "weight": 10},
                    ]
                }
            },
        }
    )


def table(store: StateStore | None = None) -> RouteTable:
    cfg = base_config()
    return RouteTable(cfg.routes, cfg.upstreams, persist=store.save if store else None)


def test_set_weights_swaps_a_new_snapshot_notifies_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="server.gateway.table")
    routes = table()
    seen: list[int] = []
    routes.add_listener(lambda snapshot, change: seen.append(snapshot.version))
    old = routes.snapshot
    new = routes.set_weights("digits", {"fp32": 50, "int8": 50}, reason="test")
    assert old.routes["digits"].route.variants[1].weight == 10  # the old snapshot is untouched
    assert new.routes["digits"].options.weights == (50.0, 50.0)
    assert routes.snapshot is new and new.version == 1 and seen == [1]
    assert "routes v1 applied by api (test)" in caplog.text and "'int8': 50" in caplog.text


def test_a_bad_change_is_refused_whole() -> None:
    routes = table()
    good_route = {"variants": [{"name": "x", "upstream": "a", "model": "m", "weight": 100}]}
    change = RouteChange(put={"new": good_route}, weights={"digits": {"fp32": 80}})  # 80 + 10 != 100
    with pytest.raises(InvalidInputError, match="add up to 90"):
        routes.apply(change)
    assert "new" not in routes.snapshot.routes and routes.snapshot.version == 0
    with pytest.raises(InvalidInputError, match="has no variants \\['bf16'\\]"):
        routes.set_weights("digits", {"bf16": 100})
    with pytest.raises(InvalidInputError, match="unknown upstream 'zz'"):
        routes.replace_route("digits", {"variants": [{"name": "x", "upstream": "zz", "model": "m", "weight": 100}]})
    with pytest.raises(NotFoundError, match="cannot remove route 'nope'"):
        routes.remove_route("nope")
    assert routes.snapshot.version == 0


def test_expected_version_conflict() -> None:
    routes = table()
    routes.set_weights("digits", {"fp32": 100, "int8": 0})
    with pytest.raises(ConflictError, match="since version 0"):
        routes.apply(RouteChange(weights={"digits": {"fp32": 90, "int8": 10}}, expected_version=0))


def test_changes_persist_and_restore(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    routes = table(store)
    routes.set_weights("digits", {"fp32": 25, "int8": 75})
    restored = store.load(base_config().upstreams)
    assert restored is not None and [v.weight for v in restored["digits"].variants] == [25.0, 75.0]
    assert not list(tmp_path.glob(".state.json.*"))  # no temp file left behind


def test_failed_persist_leaves_routes_unchanged(tmp_path: Path) -> None:
    def broken(_: Any) -> None:
        raise OSError("disk full")

    cfg = base_config()
    routes = RouteTable(cfg.routes, cfg.upstreams, persist=broken)
    with pytest.raises(OSError, match="disk full"):
        routes.set_weights("digits", {"fp32": 50, "int8": 50})
    assert routes.snapshot.version == 0


def test_unreadable_or_stale_state_is_refused_with_advice(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(InvalidInputError, match="unreadable.*delete it"):
        StateStore(path).load(base_config().upstreams)
    route = {"variants": [{"name": "x", "upstream": "gone", "model": "m", "weight": 100}]}
    path.write_text(json.dumps({"format": 1, "routes": {"digits": route}}), encoding="utf-8")
    with pytest.raises(InvalidInputError, match="no longer matches the config.*unknown upstream 'gone'"):
        StateStore(path).load(base_config().upstreams)
    assert StateStore(tmp_path / "absent.json").load(base_config().upstreams) is None
