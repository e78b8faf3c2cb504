"""The rollout state machine as pure transitions."""

from __future__ import annotations

import pytest

from core.errors import ConflictError
from server.rollout.analysis import Measurements, VariantWindow
from server.rollout.machine import Command, Decision, Phase, RolloutState, command, decide, recover, start, unreadable
from server.rollout.plan import RolloutPlan, plan_from_mapping


def make_plan(**changes: object) -> RolloutPlan:
    data: dict[str, object] = {
        "route": "digits",
        "baseline": "fp32",
        "candidate": {"name": "int8", "upstream": "local", "model": "digits-int8-ort"},
        "steps": [10, 50, 100],
        "interval_s": 10,
        "min_requests": 100,
        "max_wait_s": 30,
        "shadow": {"duration_s": 5, "percent": 100, "min_comparisons": 50},
        "sample_percent": 10,
        "min_comparisons": 20,
        "slos": {"max_error_rate": 0.01, "max_p99_ratio": 1.5, "min_agreement": 0.98},
    }
    data.update(changes)
    return plan_from_mapping(data)


def healthy(
    cand_requests: int = 200,
    base_requests: int = 1000,
    cand_p99: float = 10.0,
    errors: int = 0,
    compared: int = 100,
    agreed: int = 100,
) -> Measurements:
    return Measurements(
        baseline=VariantWindow(base_requests, 0, 10.0),
        candidate=VariantWindow(cand_requests, errors, cand_p99),
        compared=compared,
        agreed=agreed,
    )


def run_to_step(plan: RolloutPlan, step: int) -> Decision:
    d = decide(start(plan, 0.0).state, plan, Measurements(), 0.0)
    t = 0.0
    while d.state.phase is Phase.SHADOWING or d.state.step < step:
        t += 11.0
        d = decide(d.state, plan, healthy(), t)
    return d


def test_happy_path_shadow_steps_promote() -> None:
    plan = make_plan()
    d = start(plan, 0.0)
    assert d.state.phase is Phase.PENDING and d.events[0].kind == "started"
    d = decide(d.state, plan, Measurements(), 0.0)
    assert d.state.phase is Phase.SHADOWING and d.new_window
    assert d.actions[0].kind == "split" and d.actions[0].shadow == ("int8", 100.0)
    assert d.actions[0].candidate_weight == 0
    assert decide(d.state, plan, healthy(), 4.9).state == d.state  # window too short: wait
    weights = []
    t = 5.0
    while not d.state.phase.terminal:
        d = decide(d.state, plan, healthy(), t)
        weights += [a.candidate_weight for a in d.actions]
        t += 10.0
    assert weights == [10.0, 50.0, 100.0, 100.0]
    assert d.state.phase is Phase.PROMOTED
    assert d.actions[0].kind == "promote" and d.actions[0].candidate == "int8"
    assert d.events[0].figures["error_rate"] == 0.0


def test_at_100_percent_shadow_reverses_and_baseline_reference_is_kept() -> None:
    plan = make_plan()
    d = run_to_step(plan, 2)
    assert d.actions[0].candidate_weight == 100 and d.actions[0].shadow == ("fp32", 10.0)
    # baseline gets no traffic at 100 %: its last p99 (10 ms) is the reference; 16 ms is a 1.6 ratio
    d = decide(d.state, plan, healthy(base_requests=0, cand_p99=16.0), 200.0)
    assert d.state.phase is Phase.ROLLED_BACK
    assert d.events[0].figures["p99_ratio"] == pytest.approx(1.6)
    assert d.events[0].figures["baseline_p99_ref_ms"] == 10.0


def test_too_few_requests_waits_once_then_times_out_to_configured_action() -> None:
    plan = make_plan()
    d = run_to_step(plan, 0)
    t0 = d.state.window_start
    few = healthy(cand_requests=99)
    d1 = decide(d.state, plan, few, t0 + 10)
    assert d1.state.phase is Phase.STEPPING and d1.actions == ()
    assert d1.events[0].kind == "waiting" and "candidate requests 99 < 100" in d1.events[0].message
    d2 = decide(d1.state, plan, few, t0 + 20)
    assert d2.events == () and d2.state == d1.state  # reported once
    d3 = decide(d2.state, plan, few, t0 + 30)
    assert d3.state.phase is Phase.PAUSED and d3.actions[0].kind == "restore"
    assert "too little traffic" in d3.events[0].message
    rb = decide(d2.state, make_plan(on_insufficient="rollback"), few, t0 + 30)
    assert rb.state.phase is Phase.ROLLED_BACK
    ab = decide(d2.state, make_plan(on_insufficient="abort"), few, t0 + 30)
    assert ab.state.phase is Phase.ABORTED


def test_missing_comparisons_also_block_a_decision() -> None:
    plan = make_plan()
    d = run_to_step(plan, 0)
    d = decide(d.state, plan, healthy(compared=19, agreed=19), d.state.window_start + 10)
    assert d.events[0].kind == "waiting" and "sampled comparisons 19 < 20" in d.events[0].message


@pytest.mark.parametrize(
    ("window", "passes"),
    [
        (healthy(cand_requests=200, errors=2), True),  # error rate exactly 0.01
        (healthy(cand_requests=200, errors=3), False),
        (healthy(cand_p99=15.0), True),  # ratio exactly 1.5
        (healthy(cand_p99=15.0001), False),
        (healthy(compared=100, agreed=98), True),  # agreement exactly 0.98
        (healthy(compared=100, agreed=97), False),
    ],
)
def test_borderline_slos_exactly_at_the_limit_pass(window: Measurements, passes: bool) -> None:
    plan = make_plan()
    d = run_to_step(plan, 0)
    d = decide(d.state, plan, window, d.state.window_start + 10)
    assert (d.state.phase is Phase.STEPPING and d.state.step == 1) is passes
    if not passes:
        assert d.state.phase is Phase.ROLLED_BACK and d.actions[0].kind == "restore"


def test_failure_reason_names_the_slo_and_figures() -> None:
    plan = make_plan(slos={"max_error_rate": 0.01, "max_p99_ms": 12})
    d = run_to_step(plan, 1)
    d = decide(d.state, plan, healthy(cand_p99=13.0), d.state.window_start + 10)
    assert d.state.phase is Phase.ROLLED_BACK
    assert "p99_ms 13 (limit <= 12)" in d.state.reason
    assert d.events[0].figures["p99_ms"] == 13.0 and d.events[0].figures["candidate_requests"] == 200


def test_shadow_phase_judges_agreement_and_shadow_errors() -> None:
    plan = make_plan()
    d = decide(start(plan, 0.0).state, plan, Measurements(), 0.0)
    bad = decide(d.state, plan, Measurements(compared=100, agreed=50), 5.0)
    assert bad.state.phase is Phase.ROLLED_BACK and "agreement 0.5" in bad.state.reason
    erroring = decide(d.state, plan, Measurements(shadow_errors=60), 5.0)
    assert erroring.state.phase is Phase.ROLLED_BACK and "error_rate 1" in erroring.state.reason
    paused = decide(d.state, make_plan(on_failure="pause"), Measurements(compared=100, agreed=50), 5.0)
    assert paused.state.phase is Phase.PAUSED and paused.actions[0].kind == "restore"


def test_no_shadow_phase_goes_straight_to_first_step() -> None:
    plan = make_plan(shadow=None, sample_percent=0)
    d = decide(start(plan, 0.0).state, plan, Measurements(), 0.0)
    assert d.state.phase is Phase.STEPPING and d.actions[0].shadow is None


def test_admin_pause_resume_keeps_then_restores_weights() -> None:
    plan = make_plan()
    d = run_to_step(plan, 1)
    p = command(d.state, plan, Command.PAUSE, 100.0)
    assert p.state.phase is Phase.PAUSED and p.actions == ()  # weights kept
    assert decide(p.state, plan, healthy(), 500.0).state == p.state  # paused: no decisions
    assert command(p.state, plan, Command.PAUSE, 101.0).state == p.state  # idempotent
    r = command(p.state, plan, Command.RESUME, 102.0)
    assert r.state.phase is Phase.STEPPING and r.state.step == 1 and r.state.window_start == 102.0
    assert [e.kind for e in r.events] == ["resumed", "step"] and r.actions[0].candidate_weight == 50


def test_resume_after_failure_pause_reruns_the_step() -> None:
    plan = make_plan(on_failure="pause")
    d = run_to_step(plan, 1)
    f = decide(d.state, plan, healthy(errors=50), d.state.window_start + 10)
    assert f.state.phase is Phase.PAUSED and f.state.candidate_weight == 0
    r = command(f.state, plan, Command.RESUME, 1000.0)
    assert r.state.step == 1 and r.actions[0].candidate_weight == 50


def test_concurrent_commands_second_conflicts_or_is_stale() -> None:
    plan = make_plan()
    d = run_to_step(plan, 0)
    seen = d.state.version
    aborted = command(d.state, plan, Command.ABORT, 50.0, expect_version=seen)
    assert aborted.state.phase is Phase.ABORTED and aborted.actions[0].kind == "restore"
    with pytest.raises(ConflictError, match="already aborted"):
        command(aborted.state, plan, Command.PROMOTE, 50.1, expect_version=seen)
    paused = command(d.state, plan, Command.PAUSE, 50.0)
    with pytest.raises(ConflictError, match="changed since it was read"):
        command(paused.state, plan, Command.ABORT, 50.1, expect_version=seen)
    with pytest.raises(ConflictError, match="not paused"):
        command(d.state, plan, Command.RESUME, 50.0)
    promoted = command(d.state, plan, Command.PROMOTE, 51.0)
    assert promoted.state.phase is Phase.PROMOTED and promoted.actions[0].kind == "promote"


def test_restart_mid_step_resumes_at_the_same_step_on_a_fresh_window() -> None:
    plan = make_plan()
    d = run_to_step(plan, 1)
    restored = RolloutState.from_dict(d.state.to_dict())
    assert restored == d.state
    r = recover(restored, plan, 7.0)  # a new process: a new monotonic clock
    assert r.state.step == 1 and r.state.window_start == 7.0 and r.new_window
    assert r.actions[0].candidate_weight == 50 and r.events[0].kind == "recovered"
    nxt = decide(r.state, plan, healthy(), 17.0)
    assert nxt.state.step == 2


def test_recover_terminal_and_paused_and_unreadable() -> None:
    plan = make_plan()
    done = command(run_to_step(plan, 0).state, plan, Command.ABORT, 1.0)
    assert recover(done.state, plan, 2.0).actions == ()
    paused = command(run_to_step(plan, 0).state, plan, Command.PAUSE, 1.0)
    r = recover(paused.state, plan, 2.0)
    assert r.state.phase is Phase.PAUSED and r.actions[0].candidate_weight == 10
    u = unreadable("digits", 3.0, "bad json")
    assert u.state.phase is Phase.ROLLED_BACK and u.actions[0].baseline is None
    assert u.events[0].kind == "state_unreadable" and "bad json" in u.events[0].message
