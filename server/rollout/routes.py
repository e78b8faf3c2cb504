"""Turn a rollout's RouteAction into the route the gateway must serve (pure).

Routes are in the gateway's JSON shape (``server.gateway.config.route_to_dict``): variants in
order (the first is the baseline), each ``{name, upstream, model, version, weight}``, optional
``sticky`` and ``shadow: {variant, percent}``. Other variants the route had keep their place at
weight 0 while a rollout owns the route.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.errors import NotFoundError
from server.rollout.machine import RouteAction
from server.rollout.plan import CandidateSpec

TOTAL = 100.0


def _variant_dict(candidate: CandidateSpec, weight: float) -> dict[str, Any]:
    return {
        "name": candidate.name,
        "upstream": candidate.upstream,
        "model": candidate.model,
        "version": candidate.version,
        "weight": weight,
    }


def _find(variants: list[dict[str, Any]], name: str, route: str) -> dict[str, Any]:
    for variant in variants:
        if variant["name"] == name:
            return variant
    raise NotFoundError(
        f"route {route!r} has no variant {name!r} (it has {[v['name'] for v in variants]}); "
        "name the route's serving variant as the rollout's baseline"
    )


def desired_route(current: Mapping[str, Any], action: RouteAction, candidate: CandidateSpec | None) -> dict[str, Any]:
    """The route after ``action``; ``candidate`` defines the candidate variant when it must be added."""
    variants = [dict(v) for v in current["variants"]]
    route: dict[str, Any] = {k: v for k, v in current.items() if k not in ("variants", "shadow")}
    if action.kind == "restore":
        base_name = action.baseline if action.baseline is not None else variants[0]["name"]
        base = _find(variants, base_name, action.route)
        others = [v for v in variants if v["name"] not in (base_name, action.candidate)]
        route["variants"] = [{**base, "weight": TOTAL}] + [{**v, "weight": 0.0} for v in others]
        return route
    if candidate is None:
        raise NotFoundError(f"route action {action.kind!r} on {action.route!r} needs the candidate's definition")
    cand = _variant_dict(candidate, 0.0)
    others = [v for v in variants if v["name"] not in (action.baseline, candidate.name)]
    if action.kind == "promote":
        route["variants"] = [{**cand, "weight": TOTAL}] + [{**v, "weight": 0.0} for v in others]
        return route
    base = _find(variants, str(action.baseline), action.route)
    weight = float(action.candidate_weight)
    route["variants"] = [{**base, "weight": TOTAL - weight}, {**cand, "weight": weight}] + [
        {**v, "weight": 0.0} for v in others
    ]
    if action.shadow is not None:
        route["shadow"] = {"variant": action.shadow[0], "percent": float(action.shadow[1])}
    return route


def weights_of(route: Mapping[str, Any]) -> dict[str, float]:
    """Variant name -> weight of a route in the gateway's JSON shape."""
    return {str(v["name"]): float(v["weight"]) for v in route.get("variants", [])}
