"""Measured windows and the SLO checks made on them (pure).

A window holds what one variant did since the current phase or step began. Checks compare each
figure with its limit; a figure exactly at its limit passes. Nothing is judged on too little
traffic: ``missing_traffic`` says what is still lacking.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.rollout.plan import RolloutPlan


@dataclass(frozen=True)
class VariantWindow:
    """Requests, errors and tail latency of one variant over one window."""

    requests: int = 0
    errors: int = 0
    p99_ms: float | None = None
    ttft_p99_ms: float | None = None  # token streams only: time to first token
    itl_p99_ms: float | None = None  # ... and inter-token latency

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Measurements:
    """One read of a route's windows: baseline, candidate and the output comparisons.

    ``compared``/``agreed`` count shadow comparisons (candidate vs baseline answers) in the
    window; ``shadow_errors`` counts shadow calls that failed (so compared nothing).
    """

    baseline: VariantWindow = VariantWindow()
    candidate: VariantWindow = VariantWindow()
    compared: int = 0
    agreed: int = 0
    shadow_errors: int = 0
    first_divergence: tuple[int, ...] = ()  # token streams: where greedy replays diverged

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.compared if self.compared else None

    def to_dict(self) -> dict[str, object]:
        return {
            "baseline": vars(self.baseline).copy(),
            "candidate": vars(self.candidate).copy(),
            "compared": self.compared,
            "agreed": self.agreed,
            "shadow_errors": self.shadow_errors,
            "first_divergence": list(self.first_divergence),
        }


@dataclass(frozen=True)
class SloCheck:
    """One SLO: its measured value against its limit (``ok`` is None when not measurable yet)."""

    name: str
    measured: float | None
    limit: float
    ok: bool | None
    comparison: str  # "<=" or ">="

    def describe(self) -> str:
        shown = "n/a" if self.measured is None else f"{self.measured:.4g}"
        return f"{self.name} {shown} (limit {self.comparison} {self.limit:.4g})"


def _at_most(name: str, measured: float | None, limit: float) -> SloCheck:
    ok = None if measured is None else measured <= limit
    return SloCheck(name, measured, limit, ok, "<=")


def _at_least(name: str, measured: float | None, limit: float) -> SloCheck:
    ok = None if measured is None else measured >= limit
    return SloCheck(name, measured, limit, ok, ">=")


def shadow_checks(plan: RolloutPlan, m: Measurements) -> tuple[SloCheck, ...]:
    """Shadow phase: the candidate serves nobody, so only its errors and agreement count."""
    calls = m.compared + m.shadow_errors
    error_rate = m.shadow_errors / calls if calls else None
    if plan.slos.min_token_agreement is not None:  # a token stream: agreement = greedy exact-match rate
        agreement = _at_least("token_agreement", m.agreement, plan.slos.min_token_agreement)
    else:
        agreement = _at_least("agreement", m.agreement, plan.slos.min_agreement)
    return (_at_most("error_rate", error_rate, plan.slos.max_error_rate), agreement)


def step_checks(plan: RolloutPlan, m: Measurements, baseline_p99_ms: float | None) -> tuple[SloCheck, ...]:
    """A canary step: candidate error rate, p99 ratio to baseline, ceiling, sampled agreement."""
    cand = m.candidate
    error_rate = cand.error_rate if cand.requests else None
    ratio = None
    if cand.p99_ms is not None and baseline_p99_ms:
        ratio = cand.p99_ms / baseline_p99_ms
    checks = [
        _at_most("error_rate", error_rate, plan.slos.max_error_rate),
        _at_most("p99_ratio", ratio, plan.slos.max_p99_ratio),
    ]
    if plan.slos.max_p99_ms is not None:
        checks.append(_at_most("p99_ms", cand.p99_ms, plan.slos.max_p99_ms))
    if plan.sample_percent > 0:
        checks.append(_at_least("agreement", m.agreement, plan.slos.min_agreement))
    return (*checks, *stream_checks(plan, m))


def stream_checks(plan: RolloutPlan, m: Measurements) -> tuple[SloCheck, ...]:
    """Token streams: TTFT and ITL p99, as ratios to the baseline in the same window and absolute.

    A ratio is measured only when both variants streamed in the window (not at a 100 % step).
    """
    slos, base, cand = plan.slos, m.baseline, m.candidate
    checks = []
    for name, ratio_limit, ms_limit, mine, theirs in (
        ("ttft", slos.max_ttft_p99_ratio, slos.max_ttft_p99_ms, cand.ttft_p99_ms, base.ttft_p99_ms),
        ("itl", slos.max_itl_p99_ratio, slos.max_itl_p99_ms, cand.itl_p99_ms, base.itl_p99_ms),
    ):
        if ratio_limit is not None:
            ratio = mine / theirs if mine is not None and theirs else None
            checks.append(_at_most(f"{name}_p99_ratio", ratio, ratio_limit))
        if ms_limit is not None:
            checks.append(_at_most(f"{name}_p99_ms", mine, ms_limit))
    return tuple(checks)


def reference_p99(plan: RolloutPlan, m: Measurements, previous: float | None) -> float | None:
    """Baseline p99 to compare with: this window's when it saw enough traffic, else the last one.

    At the 100% step the baseline gets no traffic, so the last well-measured value stands.
    """
    if m.baseline.requests >= plan.min_requests and m.baseline.p99_ms is not None:
        return m.baseline.p99_ms
    return previous


def missing_traffic(
    plan: RolloutPlan, m: Measurements, shadowing: bool, baseline_p99_ms: float | None
) -> tuple[str, ...]:
    """What the window still lacks before it may be judged (empty when it is enough)."""
    if shadowing:
        need = plan.shadow.min_comparisons if plan.shadow else 1
        calls = m.compared + m.shadow_errors
        return () if calls >= need else (f"shadow comparisons {calls} < {need}",)
    lacking = []
    if m.candidate.requests < plan.min_requests:
        lacking.append(f"candidate requests {m.candidate.requests} < {plan.min_requests}")
    if baseline_p99_ms is None:
        lacking.append(f"baseline requests {m.baseline.requests} < {plan.min_requests}")
    if plan.sample_percent > 0 and m.compared < plan.min_comparisons:
        lacking.append(f"sampled comparisons {m.compared} < {plan.min_comparisons}")
    return tuple(lacking)


def check_figures(checks: tuple[SloCheck, ...]) -> dict[str, float | None]:
    """Flatten checks into event figures: ``<name>`` measured and ``<name>_limit``."""
    figures: dict[str, float | None] = {}
    for check in checks:
        figures[check.name] = check.measured
        figures[f"{check.name}_limit"] = check.limit
    return figures
