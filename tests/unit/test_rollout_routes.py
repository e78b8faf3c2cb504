"""Route actions turned into the route the gateway must serve (pure)."""

from __future__ import annotations

import pytest

from core.errors import NotFoundError
from server.gateway.config import Route
from server.rollout.machine import RouteAction
from server.rollout.plan import CandidateSpec
from server.rollout.routes import desired_route, weights_of

CURRENT = {
    "variants": [
        {"name": "fp32", "upstream": "local", "model": "digits-fp32-ort", "version": "", "weight": 90.0},
        {"name": "fp16", "upstream": "local", "model": "digits-fp16-ort", "version": "", "weight": 10.0},
    ],
    "sticky": "header:x-user-id",
    "shadow": {"variant": "fp16", "percent": 5.0},
}
CAND = CandidateSpec(name="int8", upstream="local", model="digits-int8-ort", version="3")


def test_split_adds_candidate_zeroes_others_and_keeps_sticky() -> None:
    route = desired_route(CURRENT, RouteAction("split", "digits", "fp32", "int8", 25.0, ("int8", 10.0)), CAND)
    assert weights_of(route) == {"fp32": 75.0, "int8": 25.0, "fp16": 0.0}
    assert route["sticky"] == "header:x-user-id" and route["shadow"] == {"variant": "int8", "percent": 10.0}
    assert route["variants"][1]["version"] == "3"
    Route.model_validate(route)  # the gateway accepts it


def test_restore_and_promote() -> None:
    split = desired_route(CURRENT, RouteAction("split", "digits", "fp32", "int8", 50.0), CAND)
    assert "shadow" not in split
    restored = desired_route(split, RouteAction("restore", "digits", "fp32", "int8"), CAND)
    assert weights_of(restored) == {"fp32": 100.0, "fp16": 0.0}
    promoted = desired_route(split, RouteAction("promote", "digits", "fp32", "int8", 100.0), CAND)
    assert weights_of(promoted) == {"int8": 100.0, "fp16": 0.0} and promoted["variants"][0]["name"] == "int8"
    unknown = desired_route(split, RouteAction("restore", "digits", None, None), None)
    assert weights_of(unknown) == {"fp32": 100.0, "int8": 0.0, "fp16": 0.0}  # first variant wins
    for route in (restored, promoted, unknown):
        Route.model_validate(route)


def test_unknown_baseline_is_named() -> None:
    with pytest.raises(NotFoundError, match="has no variant 'gpu'"):
        desired_route(CURRENT, RouteAction("split", "digits", "gpu", "int8", 5.0), CAND)
