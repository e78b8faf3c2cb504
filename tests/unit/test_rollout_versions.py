"""Rollouts by version: candidate readiness before traffic, one rollout per route, retiring the
previous version (pure decisions, and the controller over in-memory routes and a recording fake
of the upstreams' repository API)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from core.errors import ConflictError, InvalidInputError, UnavailableError
from server.rollout.controller import RolloutController
from server.rollout.machine import Command
from server.rollout.plan import RolloutPlan, plan_from_mapping
from server.rollout.retire import previous_of, retire_blockers
from server.rollout.store import RolloutStore
from server.rollout.versions import routes_pointing_at, upstreams_for
from tests.unit.test_rollout_store import Clock, FakeMetrics, FakeRoutes

MODEL = "digits-int8-ort"


def version_routes(second_replica: bool = True) -> FakeRoutes:
    """Route ``digits``: v1 on upstream a, (v1b on upstream b, weight 0,) and another model on c."""
    routes = FakeRoutes()
    variants = [
        {"name": "v1", "upstream": "a", "model": MODEL, "version": "1", "weight": 100.0},
        {"name": "v1b", "upstream": "b", "model": MODEL, "version": "1", "weight": 0.0},
        {"name": "other", "upstream": "c", "model": "digits-fp32-ort", "version": "", "weight": 0.0},
    ]
    routes.routes = {"digits": {"variants": variants if second_replica else [variants[0], variants[2]]}}
    return routes


def version_plan(**changes: Any) -> RolloutPlan:
    data: dict[str, Any] = {
        "route": "digits",
        "baseline": "v1",
        "candidate": {"name": "v2", "upstream": "a", "model": MODEL, "version": 2},
        "steps": [50, 100],
        "interval_s": 1,
        "min_requests": 10,
        "shadow": None,
        "sample_percent": 0,
        "retire_previous": True,
        "retain_for_s": 30,
    }
    data.update(changes)
    return plan_from_mapping(data)


class FakeVersions:
    """Records calls; ``missing`` upstreams never serve the candidate; ``gate`` holds ensure_serving."""

    def __init__(self, missing: tuple[str, ...] = ()) -> None:
        self.missing = missing
        self.calls: list[tuple[str, str, str, str]] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def ensure_serving(self, upstream: str, model: str, version: str, timeout_s: float) -> dict[str, Any]:
        self.calls.append(("ensure", upstream, model, version))
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        if upstream in self.missing:
            raise UnavailableError(f"upstream {upstream!r} does not serve {model} version {version}")
        return {"upstream": upstream, "loaded": True, "waited_s": 0.01}

    def retire(self, upstream: str, model: str, version: str) -> dict[str, Any]:
        self.calls.append(("retire", upstream, model, version))
        return {"upstream": upstream, "retired": True, "served": ["2"]}


def controller(
    tmp_path: Path, versions: FakeVersions, routes: FakeRoutes | None = None
) -> tuple[RolloutController, FakeRoutes, Clock]:
    routes = routes or version_routes()
    clock = Clock()
    ctl = RolloutController(routes, FakeMetrics(), RolloutStore(tmp_path), clock=clock, versions=versions)
    return ctl, routes, clock


def test_upstreams_and_pointers() -> None:
    route = version_routes().routes["digits"]
    assert upstreams_for(route, version_plan().candidate) == ["a", "b"]
    assert previous_of(route, version_plan()) == {"model": MODEL, "version": "1", "upstreams": ["a", "b"]}
    routes = {
        "digits": route,
        "pinned": {"variants": [{"name": "old", "upstream": "b", "model": MODEL, "version": "1", "weight": 100.0}]},
    }
    assert routes_pointing_at(routes, ["a", "b"], MODEL, "1") == ["digits/v1", "digits/v1b", "pinned/old"]
    assert routes_pointing_at(routes, ["a"], MODEL, "2") == []


def test_retire_blockers() -> None:
    plan = version_plan()
    previous = {"model": MODEL, "version": "1", "upstreams": ["a"]}
    assert retire_blockers(previous, plan, {}) is None
    pinned = {"x": {"variants": [{"name": "old", "upstream": "a", "model": MODEL, "version": "1", "weight": 0}]}}
    assert "still pointed at by ['x/old']" in str(retire_blockers(previous, plan, pinned))
    assert "named no version" in str(retire_blockers({**previous, "version": ""}, plan, {}))
    same = version_plan(candidate={"name": "v2", "upstream": "a", "model": MODEL, "version": "1"})
    assert "same version" in str(retire_blockers(previous, same, {}))


def test_candidate_not_ready_on_one_upstream_refuses_the_start(tmp_path: Path) -> None:
    ctl, routes, _ = controller(tmp_path, FakeVersions(missing=("b",)))
    before = routes.get_route("digits")
    with pytest.raises(UnavailableError, match="upstream 'b'"):
        ctl.start(version_plan())
    assert routes.get_route("digits") == before  # no traffic moved
    assert ctl.routes() == []  # and no rollout recorded


def test_ready_candidate_starts_with_an_event_per_upstream(tmp_path: Path) -> None:
    versions = FakeVersions()
    ctl, _, _ = controller(tmp_path, versions)
    status = ctl.start(version_plan())
    assert versions.calls == [("ensure", "a", MODEL, "2"), ("ensure", "b", MODEL, "2")]
    assert status["phase"] == "stepping" and status["previous"]["version"] == "1"
    ready = [e for e in ctl.events("digits") if e["kind"] == "candidate_ready"]
    assert [u["upstream"] for u in ready[0]["figures"]["upstreams"]] == ["a", "b"]


def test_two_rollouts_on_one_route_are_refused_even_while_the_first_is_loading(tmp_path: Path) -> None:
    versions = FakeVersions()
    versions.gate = threading.Event()
    ctl, _, _ = controller(tmp_path, versions)
    first = threading.Thread(target=ctl.start, args=(version_plan(),))
    first.start()
    assert versions.entered.wait(10)
    with pytest.raises(ConflictError, match="already has a rollout starting"):
        ctl.start(version_plan(candidate={"name": "v3", "upstream": "a", "model": MODEL, "version": 3}))
    versions.gate.set()
    first.join(10)
    with pytest.raises(ConflictError, match="already has a rollout in phase stepping"):
        ctl.start(version_plan())


def test_previous_version_is_retired_after_the_rollback_window(tmp_path: Path) -> None:
    versions = FakeVersions()
    ctl, routes, clock = controller(tmp_path, versions, version_routes(second_replica=False))
    ctl.start(version_plan())
    ctl.command("digits", Command.PROMOTE)
    ctl.tick()
    assert [c for c in versions.calls if c[0] == "retire"] == []  # within retain_for_s
    clock.now += 31
    ctl.tick()
    assert [c for c in versions.calls if c[0] == "retire"] == [("retire", "a", MODEL, "1")]
    assert ctl.status("digits")["retire"]["state"] == "retired"
    ctl.tick()
    assert len([c for c in versions.calls if c[0] == "retire"]) == 1  # once
    restarted = RolloutController(routes, FakeMetrics(), RolloutStore(tmp_path), clock=clock, versions=versions)
    restarted.recover_all()
    assert restarted.status("digits")["retire"]["state"] == "retired"  # persisted


def test_retiring_a_version_a_route_points_at_is_refused(tmp_path: Path) -> None:
    versions = FakeVersions()
    routes = version_routes(second_replica=False)
    routes.routes["pinned"] = {
        "variants": [{"name": "old", "upstream": "a", "model": MODEL, "version": "1", "weight": 100.0}]
    }
    ctl, _, clock = controller(tmp_path, versions, routes)
    ctl.start(version_plan())
    ctl.command("digits", Command.PROMOTE)
    with pytest.raises(ConflictError, match=r"still pointed at by \['pinned/old'\]"):
        ctl.retire("digits")
    clock.now += 31
    ctl.tick()  # the automatic retirement is refused the same way, once, as an event
    assert [c for c in versions.calls if c[0] == "retire"] == []
    kinds = [e["kind"] for e in ctl.events("digits")]
    assert kinds.count("retire_refused") == 1 and ctl.status("digits")["retire"]["state"] == "refused"


def test_retire_needs_a_promoted_rollout(tmp_path: Path) -> None:
    ctl, _, _ = controller(tmp_path, FakeVersions())
    ctl.start(version_plan())
    with pytest.raises(ConflictError, match="only a promoted rollout"):
        ctl.retire("digits")


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"retire_previous": False, "retain_for_s": 5}, "only applies with retire_previous"),
        ({"candidate": {"name": "v2", "upstream": "a", "model": MODEL, "version": "02"}}, "version number"),
        ({"ready_timeout_s": 0}, "ready_timeout_s"),
    ],
)
def test_bad_version_plans_are_refused(changes: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidInputError, match=words):
        version_plan(**changes)
