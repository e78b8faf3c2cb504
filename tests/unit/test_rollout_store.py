"""Atomic persistence of rollout state, and what a controller does with what it finds on restart."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from core.errors import ConflictError, InvalidInputError, NotFoundError, RepositoryError, UnavailableError
from server.rollout.analysis import Measurements, VariantWindow
from server.rollout.controller import RolloutController
from server.rollout.machine import Command
from server.rollout.plan import plan_from_mapping
from server.rollout.store import RolloutStore, StoredRollout, write_atomic

PLAN = plan_from_mapping(
    {
        "route": "digits",
        "baseline": "fp32",
        "candidate": {"name": "int8", "upstream": "local", "model": "digits-int8-ort"},
        "steps": [20, 100],
        "interval_s": 1,
        "min_requests": 10,
        "shadow": None,
        "sample_percent": 0,
    }
)
GOOD = Measurements(VariantWindow(100, 0, 5.0), VariantWindow(50, 0, 5.5))


class FakeRoutes:
    """RouteControl over a dict; validates weights like the gateway does."""

    def __init__(self) -> None:
        self.routes: dict[str, dict[str, Any]] = {
            "digits": {
                "variants": [
                    {"name": "fp32", "upstream": "local", "model": "digits-fp32-ort", "version": "", "weight": 100.0}
                ]
            }
        }
        self.history: list[dict[str, float]] = []

    def get_route(self, public: str) -> dict[str, Any]:
        if public not in self.routes:
            raise NotFoundError(public)
        return json.loads(json.dumps(self.routes[public]))

    def all_routes(self) -> dict[str, dict[str, Any]]:
        return json.loads(json.dumps(self.routes))

    def put_route(self, public: str, route: Mapping[str, Any], reason: str) -> None:
        if sum(v["weight"] for v in route["variants"]) != 100:
            raise InvalidInputError("weights")
        self.routes[public] = dict(route)
        self.history.append({v["name"]: v["weight"] for v in route["variants"]})


class FakeMetrics:
    def __init__(self) -> None:
        self.marks = 0
        self.current = GOOD

    def mark(self, route: str) -> None:
        self.marks += 1

    def read(self, route: str, baseline: str, candidate: str) -> Measurements:
        return self.current


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def controller(tmp_path: Path, routes: FakeRoutes | None = None) -> tuple[RolloutController, FakeRoutes, Clock]:
    routes = routes or FakeRoutes()
    clock = Clock()
    return RolloutController(routes, FakeMetrics(), RolloutStore(tmp_path), clock=clock), routes, clock


def test_write_atomic_replaces_whole_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    write_atomic(target, b"old")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "missing-dir" / "x.json", b"lost")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_store_round_trip_and_route_names(tmp_path: Path) -> None:
    store = RolloutStore(tmp_path)
    ctl, _, _ = controller(tmp_path)
    ctl.start(plan_from_mapping({**PLAN.to_dict(), "route": "digits"}))
    record = store.load("digits")
    assert record.plan == PLAN and record.state.phase.value == "stepping"
    assert [e["kind"] for e in record.events] == ["started", "step"]
    odd = StoredRollout(record.state.__class__(route="a/b c", phase=record.state.phase), PLAN)
    store.save(odd)
    assert "a/b c" in store.routes() and store.load("a/b c").state.route == "a/b c"
    with pytest.raises(NotFoundError):
        store.load("nothing")


def test_corrupt_state_restores_baseline_with_event(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ctl, routes, _ = controller(tmp_path)
    ctl.start(PLAN)
    assert routes.history[-1] == {"fp32": 80.0, "int8": 20.0}
    store = RolloutStore(tmp_path)
    store.path("digits").write_text('{"format": 1, "state": {"route": "dig')  # torn by a bad disk
    with pytest.raises(RepositoryError, match="unreadable"):
        store.load("digits")
    fresh, _, _ = controller(tmp_path, routes)
    fresh.recover_all()
    assert routes.history[-1] == {"fp32": 100.0, "int8": 0.0}  # the route's first variant at 100 %
    status = fresh.status("digits")
    assert status["phase"] == "rolled_back" and "state unreadable" in status["reason"]
    assert fresh.events("digits")[-1]["kind"] == "state_unreadable"
    assert "restoring baseline" in caplog.text
    assert (tmp_path / (store.path("digits").name + ".corrupt")).exists()
    assert store.load("digits").state.phase.value == "rolled_back"  # the new record is readable
    with pytest.raises(ConflictError, match="lost"):
        fresh.command("digits", Command.PAUSE)


def test_restart_mid_step_resumes_at_the_step(tmp_path: Path) -> None:
    ctl, routes, clock = controller(tmp_path)
    ctl.start(PLAN)
    clock.now += 1.5
    ctl.tick()
    assert ctl.status("digits")["candidate_weight"] == 100.0
    routes.routes["digits"]["variants"][0]["weight"] = 100.0  # someone changed the route meanwhile
    routes.routes["digits"]["variants"][1]["weight"] = 0.0
    restarted, _, clock2 = controller(tmp_path, routes)
    restarted.recover_all()
    assert routes.history[-1] == {"fp32": 0.0, "int8": 100.0}  # state re-applied
    assert restarted.events("digits")[-1]["kind"] == "recovered"
    clock2.now += 1.0
    restarted.tick()
    assert restarted.status("digits")["phase"] == "promoted"
    assert routes.routes["digits"]["variants"][0]["name"] == "int8"  # candidate is the baseline now


def test_second_start_conflicts_and_unknown_baseline_is_refused(tmp_path: Path) -> None:
    ctl, routes, _ = controller(tmp_path)
    with pytest.raises(NotFoundError, match="no variant 'gpu'"):
        ctl.start(plan_from_mapping({**PLAN.to_dict(), "baseline": "gpu"}))
    assert routes.history == [] and RolloutStore(tmp_path).routes() == []
    ctl.start(PLAN)
    with pytest.raises(ConflictError, match="already has a rollout"):
        ctl.start(PLAN)
    ctl.command("digits", Command.ABORT)
    assert routes.history[-1] == {"fp32": 100.0}
    ctl.start(PLAN)  # a terminal rollout may be replaced
    assert ctl.status("digits")["phase"] == "stepping"


def _race(ctl: RolloutController, commands: tuple[Command, ...]) -> dict[str, str]:
    barrier = threading.Barrier(len(commands))
    outcomes: dict[str, str] = {}

    def act(cmd: Command) -> None:
        barrier.wait()
        try:
            outcomes[cmd.value] = ctl.command("digits", cmd)["phase"]
        except ConflictError:
            outcomes[cmd.value] = "conflict"

    threads = [threading.Thread(target=act, args=(c,)) for c in commands]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def test_racing_admin_commands_one_wins_the_other_conflicts(tmp_path: Path) -> None:
    for attempt in range(20):
        ctl, routes, _ = controller(tmp_path / str(attempt))
        ctl.start(PLAN)
        outcomes = _race(ctl, (Command.ABORT, Command.PROMOTE))
        assert sorted(outcomes.values()) in (["aborted", "conflict"], ["conflict", "promoted"])
        final = ctl.status("digits")["phase"]
        assert final in outcomes.values()
        expected = {"aborted": {"fp32": 100.0}, "promoted": {"int8": 100.0}}[final]
        assert routes.history[-1] == expected  # the route matches the winner, nothing half-applied


def test_unreachable_metrics_mean_no_decision_and_a_visible_error(tmp_path: Path) -> None:
    class DownMetrics(FakeMetrics):
        def read(self, route: str, baseline: str, candidate: str) -> Measurements:
            raise UnavailableError("cannot query Prometheus at http://p:9090")

    clock = Clock()
    routes = FakeRoutes()
    ctl = RolloutController(routes, DownMetrics(), RolloutStore(tmp_path), clock=clock)
    ctl.start(PLAN)
    clock.now += 60
    ctl.tick()
    status = ctl.status("digits")
    assert status["phase"] == "stepping" and status["step"] == 1  # nothing decided blind
    assert "cannot query Prometheus" in status["error"]
    assert routes.history[-1] == {"fp32": 80.0, "int8": 20.0}
