"""The rollout state machine (pure): pending -> shadowing -> step k -> promoted | rolled_back | paused | aborted.

``decide`` advances a rollout from measured windows only; admin commands are pure transitions
too. Each returns a ``Decision``: the new state, the events that explain it (each carrying the
figures that caused it) and the route actions the controller must apply. Time is a number of
seconds from any monotonic clock, passed in as ``now``.

Pause semantics: an admin pause keeps the current weights; a pause caused by a failed SLO or by
too little traffic sends all traffic back to the baseline (the rollout stays open for a human to
resume, promote or abort). Resume re-runs the paused phase or step on a fresh window.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace
from typing import Any

from core.errors import ConflictError
from server.rollout.analysis import (
    Measurements,
    SloCheck,
    Tail,
    check_figures,
    missing_traffic,
    reference_p99,
    shadow_checks,
    step_checks,
    undecided,
)
from server.rollout.capacity import describe_comparison
from server.rollout.plan import RolloutPlan


class Phase(str, enum.Enum):
    PENDING = "pending"
    SHADOWING = "shadowing"
    STEPPING = "stepping"
    PAUSED = "paused"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"

    @property
    def terminal(self) -> bool:
        return self in (Phase.PROMOTED, Phase.ROLLED_BACK, Phase.ABORTED)


class Command(str, enum.Enum):
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    PROMOTE = "promote"


@dataclass(frozen=True)
class RolloutState:
    route: str
    phase: Phase
    step: int = -1  # index into plan.steps; -1 before the first step
    window_start: float = 0.0
    candidate_weight: float = 0.0
    shadow_percent: float = 0.0
    paused_from: Phase | None = None
    baseline_p99_ms: float | None = None  # last well-measured baseline p99 (reference at 100%)
    baseline_p99_high_ms: float | None = None  # ... its upper 95 % bound (None: unbounded)
    waiting_reported: bool = False
    reason: str = ""
    version: int = 0  # bumped by every transition; admin commands may require it (optimistic lock)

    @property
    def baseline_p99(self) -> Tail | None:
        if self.baseline_p99_ms is None:
            return None
        high = math.inf if self.baseline_p99_high_ms is None else self.baseline_p99_high_ms
        return Tail(self.baseline_p99_ms, self.baseline_p99_ms, high)

    def to_dict(self) -> dict[str, Any]:
        data = dict(vars(self))
        data["phase"] = self.phase.value
        data["paused_from"] = self.paused_from.value if self.paused_from else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutState:
        fields = dict(data)
        fields["phase"] = Phase(fields["phase"])
        fields["paused_from"] = Phase(fields["paused_from"]) if fields.get("paused_from") else None
        return cls(**fields)


@dataclass(frozen=True)
class Event:
    """One decision or command, with the figures that caused it."""

    kind: str
    at: float
    phase: str
    step: int
    message: str
    figures: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass(frozen=True)
class RouteAction:
    """What the route must look like now.

    ``split``: baseline 100-w %, candidate w %, optional shadow (variant, percent).
    ``restore``: baseline 100 %, candidate removed (``baseline`` None: the route's first variant).
    ``promote``: candidate 100 % as the route's first variant (the new baseline), old baseline removed.
    """

    kind: str
    route: str
    baseline: str | None
    candidate: str | None
    candidate_weight: float = 0.0
    shadow: tuple[str, float] | None = None


@dataclass(frozen=True)
class Decision:
    state: RolloutState
    events: tuple[Event, ...] = ()
    actions: tuple[RouteAction, ...] = ()
    new_window: bool = False  # the controller must start a fresh metrics window


def _split(plan: RolloutPlan, weight: float, shadow_percent: float) -> RouteAction:
    shadow = None
    if shadow_percent > 0:
        # Below 100 % the baseline serves and a copy goes to the candidate; at 100 % the reverse.
        target = plan.candidate.name if weight < 100 else plan.baseline
        shadow = (target, shadow_percent)
    return RouteAction("split", plan.route, plan.baseline, plan.candidate.name, weight, shadow)


def _restore(plan: RolloutPlan) -> RouteAction:
    return RouteAction("restore", plan.route, plan.baseline, plan.candidate.name)


def _promote(plan: RolloutPlan) -> RouteAction:
    return RouteAction("promote", plan.route, plan.baseline, plan.candidate.name, 100.0)


def _event(state: RolloutState, kind: str, now: float, message: str, **figures: Any) -> Event:
    return Event(kind, now, state.phase.value, state.step, message, dict(figures))


def _moved(state: RolloutState, **changes: Any) -> RolloutState:
    return replace(state, version=state.version + 1, **changes)


def start(plan: RolloutPlan, now: float) -> Decision:
    """A new rollout, pending; the next ``decide`` enters its first phase."""
    state = RolloutState(route=plan.route, phase=Phase.PENDING, window_start=now, reason="started")
    event = _event(
        state,
        "started",
        now,
        f"rollout of {plan.candidate.name!r} on route {plan.route!r} "
        f"against baseline {plan.baseline!r}, steps {list(plan.steps)}"
        + ("" if plan.capacity is None else f"; {describe_comparison(plan.capacity)}"),
        **plan.to_dict()["slos"],
        **({} if plan.capacity is None else {"capacity": plan.capacity.model_dump(mode="json")}),
    )
    return Decision(state, (event,))


def _enter_step(
    state: RolloutState, plan: RolloutPlan, index: int, now: float, why: str, figures: dict[str, Any]
) -> Decision:
    weight = plan.steps[index]
    new = _moved(
        state,
        phase=Phase.STEPPING,
        step=index,
        window_start=now,
        candidate_weight=weight,
        shadow_percent=plan.sample_percent,
        paused_from=None,
        waiting_reported=False,
        reason=why,
    )
    event = _event(
        new,
        "step",
        now,
        f"step {index + 1}/{len(plan.steps)}: candidate at {weight:g}% ({why})",
        weight=weight,
        **figures,
    )
    return Decision(new, (event,), (_split(plan, weight, plan.sample_percent),), new_window=True)


def _enter_first_phase(state: RolloutState, plan: RolloutPlan, now: float) -> Decision:
    if plan.shadow is None:
        return _enter_step(state, plan, 0, now, "no shadow phase", {})
    new = _moved(
        state,
        phase=Phase.SHADOWING,
        window_start=now,
        candidate_weight=0.0,
        shadow_percent=plan.shadow.percent,
        waiting_reported=False,
        reason="shadowing",
    )
    event = _event(
        new,
        "shadowing",
        now,
        f"shadowing {plan.shadow.percent:g}% of traffic to the candidate",
        percent=plan.shadow.percent,
    )
    return Decision(new, (event,), (_split(plan, 0.0, plan.shadow.percent),), new_window=True)


def _finish(
    state: RolloutState, plan: RolloutPlan, now: float, phase: Phase, kind: str, why: str, figures: dict[str, Any]
) -> Decision:
    promoted = phase is Phase.PROMOTED
    new = _moved(
        state,
        phase=phase,
        candidate_weight=100.0 if promoted else 0.0,
        shadow_percent=0.0,
        paused_from=None,
        reason=why,
    )
    action = _promote(plan) if promoted else _restore(plan)
    return Decision(new, (_event(new, kind, now, why, **figures),), (action,))


def _hold(state: RolloutState, plan: RolloutPlan, now: float, why: str, figures: dict[str, Any]) -> Decision:
    """Pause after a failure: traffic back to baseline, the rollout stays open for a human."""
    new = _moved(
        state, phase=Phase.PAUSED, paused_from=state.phase, candidate_weight=0.0, shadow_percent=0.0, reason=why
    )
    return Decision(new, (_event(new, "paused", now, why, **figures),), (_restore(plan),))


def _on_failure(
    state: RolloutState, plan: RolloutPlan, now: float, failed: list[SloCheck], figures: dict[str, Any]
) -> Decision:
    where = "shadow phase" if state.phase is Phase.SHADOWING else f"step {state.step + 1}"
    why = f"{where} failed: " + "; ".join(check.describe() for check in failed)
    if plan.on_failure == "pause":
        return _hold(state, plan, now, why, figures)
    return _finish(state, plan, now, Phase.ROLLED_BACK, "rolled_back", why, figures)


def _on_timeout(
    state: RolloutState, plan: RolloutPlan, now: float, lacking: tuple[str, ...], figures: dict[str, Any]
) -> Decision:
    why = (
        f"too little traffic to decide after {now - state.window_start:.1f}s (limit {plan.wait_limit_s:g}s): "
        + ", ".join(lacking)
        + f"; on_insufficient={plan.on_insufficient}"
    )
    if plan.on_insufficient == "pause":
        return _hold(state, plan, now, why, figures)
    phase = Phase.ROLLED_BACK if plan.on_insufficient == "rollback" else Phase.ABORTED
    return _finish(state, plan, now, phase, phase.value, why, figures)


def decide(state: RolloutState, plan: RolloutPlan, m: Measurements, now: float) -> Decision:
    """Advance a rollout from its current window; waits (no decision) while the window is short."""
    if state.phase is Phase.PENDING:
        return _enter_first_phase(state, plan, now)
    if state.phase not in (Phase.SHADOWING, Phase.STEPPING):
        return Decision(state)
    shadowing = state.phase is Phase.SHADOWING
    elapsed = now - state.window_start
    duration = plan.shadow.duration_s if shadowing and plan.shadow else plan.interval_s
    if elapsed < duration:
        return Decision(state)
    reference = state.baseline_p99 if shadowing else reference_p99(plan, m, state.baseline_p99)
    figures: dict[str, Any] = {"elapsed_s": round(elapsed, 3), **_window_figures(m)}
    lacking = missing_traffic(plan, m, shadowing, reference)
    checks: tuple[SloCheck, ...] = ()
    if not lacking:
        checks = shadow_checks(plan, m) if shadowing else step_checks(plan, m, reference)
        figures.update(check_figures(checks))
        figures["baseline_p99_ref_ms"] = None if reference is None else reference.ms
        failed = [check for check in checks if check.ok is False]
        if failed:
            return _on_failure(_with_reference(state, reference), plan, now, failed, figures)
        lacking = undecided(checks)  # a tail over its limit that the bounds cannot yet confirm
    if lacking:
        if elapsed >= max(plan.wait_limit_s, duration):
            return _on_timeout(state, plan, now, lacking, figures)
        if state.waiting_reported:
            return Decision(state)
        new = _moved(state, waiting_reported=True)
        return Decision(new, (_event(new, "waiting", now, "waiting for traffic: " + ", ".join(lacking), **figures),))
    state = _with_reference(state, reference)
    summary = ", ".join(check.describe() for check in checks)
    if shadowing:
        return _enter_step(state, plan, 0, now, f"shadow phase passed: {summary}", figures)
    if state.step + 1 < len(plan.steps):
        return _enter_step(state, plan, state.step + 1, now, f"step {state.step + 1} passed: {summary}", figures)
    return _finish(
        state,
        plan,
        now,
        Phase.PROMOTED,
        "promoted",
        f"all {len(plan.steps)} steps passed, candidate promoted: {summary}",
        figures,
    )


def _with_reference(state: RolloutState, reference: Tail | None) -> RolloutState:
    if reference is None:
        return replace(state, baseline_p99_ms=None, baseline_p99_high_ms=None)
    high = reference.high if math.isfinite(reference.high) else None
    return replace(state, baseline_p99_ms=reference.ms, baseline_p99_high_ms=high)


def _window_figures(m: Measurements) -> dict[str, Any]:
    return {
        "baseline_requests": m.baseline.requests,
        "baseline_errors": m.baseline.errors,
        "baseline_p99_ms": m.baseline.p99_ms,
        "candidate_requests": m.candidate.requests,
        "candidate_errors": m.candidate.errors,
        "candidate_p99_ms": m.candidate.p99_ms,
        "candidate_p99_low_ms": None if m.candidate.p99 is None else m.candidate.p99.low,
        "compared": m.compared,
        "agreed": m.agreed,
        "shadow_errors": m.shadow_errors,
        "first_divergence_min": min(m.first_divergence, default=None),
    }


def command(
    state: RolloutState, plan: RolloutPlan, cmd: Command, now: float, expect_version: int | None = None
) -> Decision:
    """Apply an admin command. Conflicting commands raise ConflictError and change nothing.

    Commands are applied one at a time to the latest state (the controller serializes them), so
    of two racing commands the second sees the first's result: e.g. ``promote`` after ``abort``
    fails because the rollout is already aborted. A client that read ``version`` may pass it as
    ``expect_version`` to refuse acting on a state that has changed since. ``pause`` on a paused
    rollout is an idempotent no-op.
    """
    if state.phase.terminal:
        raise ConflictError(
            f"rollout on route {state.route!r} is already {state.phase.value}; '{cmd.value}' does "
            "nothing now; start a new rollout instead"
        )
    if expect_version is not None and expect_version != state.version:
        raise ConflictError(
            f"rollout on route {state.route!r} changed since it was read (version {expect_version}, now "
            f"{state.version}, phase {state.phase.value}); re-read its status and retry"
        )
    if cmd is Command.PAUSE:
        if state.phase is Phase.PAUSED:
            return Decision(state)
        new = _moved(state, phase=Phase.PAUSED, paused_from=state.phase, reason="paused by admin")
        return Decision(
            new, (_event(new, "paused", now, "paused by admin; weights kept", weight=state.candidate_weight),)
        )
    if cmd is Command.RESUME:
        return _resume(state, plan, now)
    if cmd is Command.ABORT:
        return _finish(
            state,
            plan,
            now,
            Phase.ABORTED,
            "aborted",
            "aborted by admin; baseline restored",
            {"weight_before": state.candidate_weight},
        )
    return _finish(
        state, plan, now, Phase.PROMOTED, "promoted", "promoted by admin", {"weight_before": state.candidate_weight}
    )


def _resume(state: RolloutState, plan: RolloutPlan, now: float) -> Decision:
    if state.phase is not Phase.PAUSED or state.paused_from is None:
        raise ConflictError(
            f"rollout on route {state.route!r} is {state.phase.value}, not paused; only a paused rollout can be resumed"
        )
    back = replace(state, phase=state.paused_from, paused_from=None)
    if back.phase is Phase.PENDING:
        decision = _enter_first_phase(back, plan, now)
    elif back.phase is Phase.SHADOWING or back.step < 0:
        decision = _enter_first_phase(replace(back, phase=Phase.PENDING), plan, now)
    else:
        decision = _enter_step(back, plan, back.step, now, "resumed by admin", {})
    resumed = _event(decision.state, "resumed", now, f"resumed into {decision.state.phase.value}")
    return replace(decision, events=(resumed, *decision.events))


def recover(state: RolloutState, plan: RolloutPlan, now: float) -> Decision:
    """After a gateway restart: re-apply the persisted state's route and restart its window."""
    if state.phase.terminal:
        return Decision(state)
    if state.phase is Phase.PAUSED:
        action = _split(plan, state.candidate_weight, state.shadow_percent)
        new = _moved(state)
        return Decision(new, (_event(new, "recovered", now, "gateway restarted; rollout still paused"),), (action,))
    if state.phase is Phase.PENDING:
        return Decision(state)
    new = _moved(state, window_start=now, waiting_reported=False)
    action = _split(plan, state.candidate_weight, state.shadow_percent)
    where = "shadow phase" if state.phase is Phase.SHADOWING else f"step {state.step + 1}"
    event = _event(
        new,
        "recovered",
        now,
        f"gateway restarted; resuming at {where} on a fresh window",
        weight=state.candidate_weight,
    )
    return Decision(new, (event,), (action,), new_window=True)


def unreadable(route: str, now: float, detail: str) -> Decision:
    """The persisted state could not be read: fall back to the route's first variant at 100 %."""
    state = RolloutState(
        route=route, phase=Phase.ROLLED_BACK, window_start=now, reason=f"state unreadable, restored baseline: {detail}"
    )
    event = _event(state, "state_unreadable", now, state.reason, detail=detail)
    return Decision(state, (event,), (RouteAction("restore", route, None, None),))
