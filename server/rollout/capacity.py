"""Recorded capacity of a rollout's candidate against its baseline (pure).

``kiln bench --find-capacity --record`` writes one entry per measurement into a version's
``kiln.json`` (``server/bench/record.py``). Two entries compare only when they were measured under
the same conditions: mode (rate or concurrency), SLO (p99 and error rate), request batch and
hardware label. Of several such pairs the one whose older side is newest counts. An entry the
load generator capped (``lower_bound``: the client's limit, not the server's) gives no ratio.
``kiln rollout start --repo`` reads both manifests, and the plan carries the comparison; a plan
with ``slos.min_capacity_ratio`` is refused unless a comparison shows the candidate holding at
least that share of the baseline's capacity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.bench.record import conditions_of
from server.rollout.plan import CapacityFigures


def describe_conditions(entry: dict[str, Any]) -> str:
    mode, p99, error_rate, batch, hardware = conditions_of(entry)
    return f"{mode} search, p99 <= {p99:g} ms, error rate <= {error_rate:g}, request batch {batch}, on {hardware}"


def describe_comparison(figures: CapacityFigures) -> str:
    if figures.ratio is None:
        return f"capacity not compared: {figures.note}"
    return (
        f"capacity: candidate {figures.candidate:g} vs baseline {figures.baseline:g} {figures.unit} "
        f"({figures.ratio:.3g}x) at {figures.conditions}"
    )


def compare_capacity(
    baseline: Sequence[dict[str, Any]], candidate: Sequence[dict[str, Any]], *, names: tuple[str, str]
) -> CapacityFigures:
    """Compare the recorded capacities (the ``capacity`` lists of two manifests); ``names`` for messages."""
    base_name, cand_name = names
    hint = "record both with kiln bench --find-capacity --record under the same SLO, batch and hardware"
    if not baseline or not candidate:
        missing = " and ".join(n for n, entries in ((base_name, baseline), (cand_name, candidate)) if not entries)
        return CapacityFigures.make(None, None, "", None, "", f"no capacity recorded for {missing}; {hint}")
    pairs = [
        (b, c) for b in baseline for c in candidate if b.get("capacity") and c.get("capacity")
        and conditions_of(b) == conditions_of(c)
    ]  # fmt: skip
    if not pairs:
        shown = "; ".join(sorted({describe_conditions(e) for e in (*baseline, *candidate)}))
        why = f"{base_name} and {cand_name} were measured under different conditions ({shown}); {hint}"
        return CapacityFigures.make(None, None, "", None, "", why)
    base, cand = max(pairs, key=lambda pair: min(str(pair[0].get("measured", "")), str(pair[1].get("measured", ""))))
    conditions = describe_conditions(base)
    unit = str(base.get("unit", ""))
    capped = [n for n, e in ((base_name, base), (cand_name, cand)) if e.get("lower_bound")]
    if capped:
        return CapacityFigures.make(
            float(base["capacity"]), float(cand["capacity"]), unit, None, conditions,
            f"the load generator, not the server, limited {' and '.join(capped)}'s measurement (a lower bound); "
            "measure again from a stronger client",
        )  # fmt: skip
    ratio = float(cand["capacity"]) / float(base["capacity"])
    return CapacityFigures.make(float(base["capacity"]), float(cand["capacity"]), unit, ratio, conditions, "")


def check_capacity(figures: CapacityFigures | None, min_ratio: float | None) -> str | None:
    """Why a plan with ``min_capacity_ratio`` must be refused (None: it may start)."""
    if min_ratio is None:
        return None
    if figures is None:
        return (
            f"min_capacity_ratio {min_ratio:g} needs the recorded capacities: start the rollout with "
            "`kiln rollout start --repo PATH` (the repository both versions were published to)"
        )
    if figures.ratio is None:
        return f"min_capacity_ratio {min_ratio:g} cannot be checked: {figures.note}"
    if figures.ratio < min_ratio:
        return (
            f"the candidate holds {figures.ratio:.3g}x the baseline's recorded capacity ({figures.candidate:g} vs "
            f"{figures.baseline:g} {figures.unit} at {figures.conditions}), below min_capacity_ratio "
            f"{min_ratio:g}; it would need more replicas for the same traffic"
        )
    return None
