"""The rollout controller: runs inside the gateway process, ticks every rollout's state machine.

Each tick reads the metrics window of every active rollout, asks ``machine.decide`` what to do,
applies the route actions (an atomic route swap: rollback takes effect for the next request),
starts a fresh metrics window when a new phase or step begins, then persists state and events.
The route is changed before the record is written so that a rollback is never delayed by disk
I/O; on restart ``recover_all`` re-applies the persisted state's route, so the two agree again.
Admin commands and ticks are serialized by one lock: of two racing commands the second sees the
first's result.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from core.errors import ConflictError, InvalidInputError, KilnError, NotFoundError, RepositoryError
from server.rollout import machine
from server.rollout.analysis import Measurements, reference_p99, shadow_checks, step_checks
from server.rollout.capacity import check_capacity
from server.rollout.machine import Command, Decision, Phase, RolloutState
from server.rollout.plan import RolloutPlan
from server.rollout.ports import MetricsSource, RouteControl, Store, VersionControl
from server.rollout.retire import previous_of, retire_blockers
from server.rollout.routes import desired_route, weights_of
from server.rollout.store import StoredRollout
from server.rollout.versions import upstreams_for

logger = logging.getLogger(__name__)


def _monotonic_s() -> float:
    return time.perf_counter_ns() / 1e9


@dataclass
class _Active:
    plan: RolloutPlan | None
    state: RolloutState
    events: list[dict[str, Any]] = field(default_factory=list)
    last: Measurements | None = None
    unapplied: tuple[machine.RouteAction, ...] = ()
    error: str | None = None  # why the last tick could not decide
    previous: dict[str, Any] | None = None  # what the baseline served (model, version, upstreams)
    retire: dict[str, Any] | None = None  # retirement of the previous version: state and message
    promoted_at: float | None = None


class RolloutController:
    """Owns every rollout of one gateway; thread-safe."""

    def __init__(
        self,
        routes: RouteControl,
        metrics: MetricsSource,
        store: Store,
        *,
        tick_s: float = 0.2,
        clock: Callable[[], float] = _monotonic_s,
        versions: VersionControl | None = None,
    ) -> None:
        self._routes = routes
        self._versions = versions
        self._preparing: set[str] = set()  # routes whose candidate is being loaded (outside the lock)
        self._metrics = metrics
        self._store = store
        self.tick_s = tick_s
        self._clock = clock
        self._lock = threading.RLock()
        self._rollouts: dict[str, _Active] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------------------------
    def recover_all(self) -> None:
        """Load every persisted rollout; resume active ones, restore baseline for unreadable ones."""
        with self._lock:
            for route in self._store.routes():
                now = self._clock()
                try:
                    record = self._store.load(route)
                except RepositoryError as err:
                    logger.warning("rollout state of route %s is unreadable (%s); restoring baseline", route, err)
                    self._store.quarantine(route)
                    self._rollouts[route] = _Active(None, RolloutState(route, Phase.ROLLED_BACK))
                    self._commit(route, machine.unreadable(route, now, str(err)))
                    continue
                active = _Active(
                    record.plan, record.state, list(record.events), previous=record.previous, retire=record.retire
                )
                if record.state.phase is Phase.PROMOTED:
                    active.promoted_at = now  # the rollback window restarts with the process (never shorter)
                self._rollouts[route] = active
                if record.plan is not None:
                    self._commit(route, machine.recover(record.state, record.plan, now))

    def start_background(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="kiln-rollout", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.tick()
            except Exception:  # the loop must survive one bad tick; the error is logged with traceback
                logger.exception("rollout tick failed")

    # -- decisions --------------------------------------------------------------------------
    def tick(self) -> None:
        """One pass: decide every active rollout from its current window; retire what is due."""
        due: list[str] = []
        with self._lock:
            for route, active in list(self._rollouts.items()):
                if active.plan is None or active.state.phase.terminal:
                    if self._retire_due(active):
                        due.append(route)
                    continue
                try:
                    self._tick_one(route, active, active.plan)
                except KilnError as err:  # e.g. metrics unreachable: no decision this tick (never a guess)
                    active.error = str(err)
                    logger.warning("rollout %s: no decision this tick: %s", route, err)
        for route in due:
            try:
                self.retire(route)
            except KilnError as err:  # recorded as an event by retire; the loop goes on
                logger.warning("rollout %s: previous version not retired: %s", route, err)

    def _retire_due(self, active: _Active) -> bool:
        plan = active.plan
        return (
            plan is not None
            and plan.retire_previous
            and active.state.phase is Phase.PROMOTED
            and active.retire is None
            and active.promoted_at is not None
            and self._clock() - active.promoted_at >= plan.retain_for_s
        )

    def _tick_one(self, route: str, active: _Active, plan: RolloutPlan) -> None:
        if active.unapplied:
            self._apply(route, active, active.unapplied)
        if active.state.phase in (Phase.SHADOWING, Phase.STEPPING):
            active.last = self._metrics.read(route, plan.baseline, plan.candidate.name)
            active.error = None
            self._commit(route, machine.decide(active.state, plan, active.last, self._clock()))
        elif active.state.phase is Phase.PENDING:
            self._commit(route, machine.decide(active.state, plan, Measurements(), self._clock()))

    def start(self, plan: RolloutPlan) -> dict[str, Any]:
        """Begin a rollout; its first phase's route is applied before this returns.

        A candidate that names a version must first be ready on every upstream of the route that
        serves its model (loaded there where the server allows it); this runs outside the lock, and
        a second start on the same route meanwhile is refused.
        """
        with self._lock:
            route = self._check_start(plan)
            self._preparing.add(plan.route)
        try:
            ready = self._prepare(plan, route)
        finally:
            with self._lock:
                self._preparing.discard(plan.route)
        with self._lock:
            route = self._check_start(plan)
            now = self._clock()
            begun = machine.start(plan, now)
            first = machine.decide(begun.state, plan, Measurements(), now)
            # Apply the first route change before recording anything: a change the gateway refuses
            # (unknown upstream, ...) fails the start and leaves no trace.
            for action in first.actions:
                self._routes.put_route(
                    plan.route,
                    desired_route(route, action, plan.candidate),
                    f"rollout {plan.candidate.name}: {action.kind}",
                )
            self._rollouts[plan.route] = _Active(plan, begun.state, previous=previous_of(route, plan))
            events = begun.events
            if ready:
                waited = max(r["waited_s"] for r in ready)
                events += (
                    machine.Event(
                        "candidate_ready",
                        now,
                        begun.state.phase.value,
                        begun.state.step,
                        f"{plan.candidate.model} version {plan.candidate.version} ready on "
                        f"{[r['upstream'] for r in ready]} after {waited:.2f}s",
                        {"upstreams": ready},
                    ),
                )
            self._commit(plan.route, replace(first, actions=()), prior_events=events)
            return self.status(plan.route)

    def _check_start(self, plan: RolloutPlan) -> dict[str, Any]:
        refused = check_capacity(plan.capacity, plan.slos.min_capacity_ratio)
        if refused:
            raise InvalidInputError(f"rollout on route {plan.route!r} refused: {refused}")
        current = self._rollouts.get(plan.route)
        if current is not None and not current.state.phase.terminal:
            raise ConflictError(
                f"route {plan.route!r} already has a rollout in phase {current.state.phase.value}; "
                "abort or promote it first"
            )
        if plan.route in self._preparing:
            raise ConflictError(
                f"route {plan.route!r} already has a rollout starting (its candidate is being loaded); wait for it "
                "or abort it once it runs"
            )
        route = self._routes.get_route(plan.route)
        if plan.baseline not in weights_of(route):
            raise NotFoundError(
                f"route {plan.route!r} has no variant {plan.baseline!r} (it has {sorted(weights_of(route))}); "
                "name the route's serving variant as the baseline"
            )
        _check_candidate_name(route, plan)
        return route

    def _prepare(self, plan: RolloutPlan, route: dict[str, Any]) -> list[dict[str, Any]]:
        """Make every upstream serving the candidate's model serve its version; figures per upstream."""
        cand = plan.candidate
        if not cand.version:
            return []
        if self._versions is None:  # e.g. the multi-replica controller, which knows no upstream addresses
            logger.warning(
                "rollout %s: cannot check that %s version %s is ready on the upstreams; make sure "
                "it is before traffic moves",
                plan.route,
                cand.model,
                cand.version,
            )
            return []
        return [
            self._versions.ensure_serving(name, cand.model, cand.version, plan.ready_timeout_s)
            for name in upstreams_for(route, cand)
        ]

    def retire(self, route: str) -> dict[str, Any]:
        """Retire the version the promoted rollout's baseline served; refused while a route points at it."""
        with self._lock:
            active = self._get(route)
            plan = active.plan
            if plan is None or active.state.phase is not Phase.PROMOTED:
                raise ConflictError(
                    f"rollout on route {route!r} is {active.state.phase.value}; only a promoted rollout's previous "
                    "version can be retired"
                )
            if self._versions is None:
                raise ConflictError(
                    "this controller cannot reach upstreams; change the repository's version "
                    "policy (kiln repo policy) instead"
                )
            previous = dict(active.previous or {})
            blocked = retire_blockers(active.previous, plan, self._routes.all_routes())
            if blocked:
                self._record_retire(route, active, "refused", f"previous version not retired: {blocked}")
                raise ConflictError(f"cannot retire the previous version of route {route!r}: {blocked}")
        try:
            results = [
                self._versions.retire(name, previous["model"], previous["version"]) for name in previous["upstreams"]
            ]
        except KilnError as err:
            with self._lock:
                self._record_retire(route, active, "failed", f"previous version not retired: {err}")
            raise
        with self._lock:
            self._record_retire(
                route,
                active,
                "retired",
                f"{previous['model']} version {previous['version']} retired on {previous['upstreams']}",
                results,
            )
            return self.status(route)

    def _record_retire(
        self, route: str, active: _Active, state: str, message: str, results: list[dict[str, Any]] | None = None
    ) -> None:
        active.retire = {"state": state, "message": message}
        kind = "retired" if state == "retired" else "retire_" + state
        event = machine.Event(
            kind, self._clock(), active.state.phase.value, active.state.step, message, {"upstreams": results or []}
        )
        self._commit(route, machine.Decision(active.state), prior_events=(event,))

    def command(self, route: str, cmd: Command, expect_version: int | None = None) -> dict[str, Any]:
        with self._lock:
            active = self._get(route)
            if active.plan is None:
                raise ConflictError(f"rollout on route {route!r} was lost (state unreadable); start a new one")
            self._commit(route, machine.command(active.state, active.plan, cmd, self._clock(), expect_version))
            return self.status(route)

    def _commit(self, route: str, decision: Decision, prior_events: tuple[machine.Event, ...] = ()) -> None:
        active = self._rollouts[route]
        changed = decision.state != active.state
        if decision.state.phase is Phase.PROMOTED and active.state.phase is not Phase.PROMOTED:
            active.promoted_at = self._clock()
        active.state = decision.state
        if decision.actions:
            self._apply(route, active, decision.actions)
        if decision.new_window:
            self._metrics.mark(route)
        for event in (*prior_events, *decision.events):
            stamped = {
                **event.to_dict(),
                "seq": len(active.events) + 1,
                "route": route,
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            }
            active.events.append(stamped)
            warn = ("rolled_back", "state_unreadable", "paused", "retire_refused", "retire_failed")
            log = logger.warning if event.kind in warn else logger.info
            log("rollout %s: %s: %s", route, event.kind, event.message)
        if changed or decision.events or prior_events:
            self._store.save(
                StoredRollout(active.state, active.plan, tuple(active.events), active.previous, active.retire)
            )

    def _apply(self, route: str, active: _Active, actions: tuple[machine.RouteAction, ...]) -> None:
        candidate = active.plan.candidate if active.plan else None
        try:
            for action in actions:
                current = self._routes.get_route(route)
                self._routes.put_route(
                    route,
                    desired_route(current, action, candidate),
                    f"rollout: {action.kind} ({active.state.reason[:120]})",
                )
            active.unapplied = ()
        except KilnError as err:
            logger.warning("rollout %s: route change failed (%s); retrying next tick", route, err)
            active.unapplied = actions

    # -- reading ----------------------------------------------------------------------------
    def _get(self, route: str) -> _Active:
        active = self._rollouts.get(route)
        if active is None:
            raise NotFoundError(f"no rollout on route {route!r}; rollouts exist for {sorted(self._rollouts)}")
        return active

    def events(self, route: str, since: int = 0) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self._get(route).events if e["seq"] > since]

    def routes(self) -> list[str]:
        with self._lock:
            return sorted(self._rollouts)

    def status(self, route: str) -> dict[str, Any]:
        with self._lock:
            active = self._get(route)
            state, plan = active.state, active.plan
            try:
                weights = weights_of(self._routes.get_route(route))
            except NotFoundError:
                weights = {}
            return {
                "route": route,
                "phase": state.phase.value,
                "step": state.step + 1,
                "steps": list(plan.steps) if plan else [],
                "candidate_weight": state.candidate_weight,
                "weights": weights,
                "reason": state.reason,
                "version": state.version,
                "elapsed_s": round(self._clock() - state.window_start, 3),
                "slos": _slo_rows(plan, state, active.last),
                "window": active.last.to_dict() if active.last else None,
                "plan": plan.to_dict() if plan else None,
                "events": len(active.events),
                "unapplied_route_changes": len(active.unapplied),
                "error": active.error,
                "previous": active.previous,
                "retire": active.retire,
            }


def _check_candidate_name(route: dict[str, Any], plan: RolloutPlan) -> None:
    """A candidate may reuse a variant's name only for the very same upstream/model/version."""
    cand = plan.candidate
    for variant in route.get("variants", []):
        if variant.get("name") != cand.name:
            continue
        existing = (variant.get("upstream"), variant.get("model"), str(variant.get("version") or ""))
        if existing != (cand.upstream, cand.model, cand.version):
            shown = f"{existing[0]}/{existing[1]}" + (f":{existing[2]}" if existing[2] else "")
            wanted = f"{cand.upstream}/{cand.model}" + (f":{cand.version}" if cand.version else "")
            raise ConflictError(
                f"route {plan.route!r} already has a variant {cand.name!r} serving {shown}; the candidate "
                f"{wanted} would replace it (and a rollback would delete it). Give the candidate another name"
            )


def _slo_rows(plan: RolloutPlan | None, state: RolloutState, m: Measurements | None) -> list[dict[str, Any]]:
    if plan is None:
        return []
    m = m or Measurements()
    if state.phase is Phase.SHADOWING:
        checks = shadow_checks(plan, m)
    else:
        checks = step_checks(plan, m, reference_p99(plan, m, state.baseline_p99))
    return [
        {
            "name": c.name,
            "measured": c.measured,
            "limit": c.limit,
            "comparison": c.comparison,
            "ok": c.ok,
            "undecided": c.undecided,
        }
        for c in checks
    ]
