"""Retiring the previous version after a version rollout promotes (pure decisions).

At start the controller notes what the baseline serves (``previous_of``); after promotion, once
``retain_for_s`` has passed, ``retire_blockers`` says why the old version may not be retired yet
(a route still points at it, or it is the candidate's own version), and the controller asks each
upstream that served it to stop (``VersionControl.retire``). Every outcome is an event.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from server.rollout.plan import RolloutPlan
from server.rollout.versions import routes_pointing_at


def previous_of(route: Mapping[str, Any], plan: RolloutPlan) -> dict[str, Any] | None:
    """The baseline's model and version, and the upstreams of the route serving that version."""
    for variant in route.get("variants", []):
        if variant.get("name") == plan.baseline:
            model, version = str(variant.get("model")), str(variant.get("version") or "")
            upstreams = sorted(
                {
                    str(v.get("upstream"))
                    for v in route.get("variants", [])
                    if v.get("model") == model and str(v.get("version") or "") == version
                }
            )
            return {"model": model, "version": version, "upstreams": upstreams}
    return None


def retire_blockers(
    previous: Mapping[str, Any] | None, plan: RolloutPlan, routes: Mapping[str, Mapping[str, Any]]
) -> str | None:
    """Why the previous version may not be retired (None: it may)."""
    if previous is None or not previous.get("version"):
        return (
            "the baseline named no version (the upstream's policy chose it), so there is no version to "
            "retire; name versions in the route (MODEL:VERSION) to retire them"
        )
    model, version, upstreams = previous["model"], previous["version"], previous["upstreams"]
    if plan.candidate.model == model and plan.candidate.version == version:
        return f"the candidate serves the same version ({model}:{version})"
    pointing = routes_pointing_at(routes, upstreams, model, version)
    if pointing:
        return (
            f"{model} version {version} is still pointed at by {pointing}; move those variants to another "
            "version (kiln routes set) and retire again"
        )
    return None
