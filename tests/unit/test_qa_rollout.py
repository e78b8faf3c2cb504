"""QA: a rollout never silently redefines a variant the route already has."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConflictError
from server.rollout.analysis import Measurements
from server.rollout.controller import RolloutController
from server.rollout.plan import RolloutPlan, plan_from_mapping
from server.rollout.ports import MemoryStore
from server.rollout.shared_store import SharedRouteFile


class QuietMetrics:
    """A metrics source that has seen no traffic (only start() is exercised here)."""

    def mark(self, route: str) -> None:
        return None

    def read(self, route: str, baseline: str, candidate: str) -> Measurements:
        return Measurements()


def _variant(name: str, model: str, weight: float) -> dict[str, object]:
    return {"name": name, "upstream": "local", "model": model, "version": "", "weight": weight}


def _plan(candidate_model: str) -> RolloutPlan:
    return plan_from_mapping(
        {
            "route": "digits",
            "baseline": "fp32",
            "candidate": {"name": "int8", "upstream": "local", "model": candidate_model},
            "steps": [20, 100],
            "interval_s": 1,
            "min_requests": 10,
            "shadow": None,
            "sample_percent": 0,
        }
    )


@pytest.fixture
def routes(tmp_path: Path) -> SharedRouteFile:
    table = SharedRouteFile(tmp_path / "routes.json")
    table.write(
        {"digits": {"variants": [_variant("fp32", "digits-fp32-ort", 100.0), _variant("int8", "digits-int8-old", 0.0)]}}
    )
    return table


def test_candidate_name_taken_by_a_different_variant_is_refused(routes: SharedRouteFile) -> None:
    before = routes.read()
    controller = RolloutController(routes, QuietMetrics(), MemoryStore())
    with pytest.raises(ConflictError, match="digits-int8-old"):
        controller.start(_plan("digits-int8-ort"))
    assert routes.read() == before
    assert controller.routes() == []


def test_candidate_identical_to_an_existing_variant_is_accepted(routes: SharedRouteFile) -> None:
    controller = RolloutController(routes, QuietMetrics(), MemoryStore())
    status = controller.start(_plan("digits-int8-old"))
    assert status["phase"] == "stepping"
    weights = {v["name"]: v["weight"] for v in routes.get_route("digits")["variants"]}
    assert weights == {"fp32": 80.0, "int8": 20.0}
