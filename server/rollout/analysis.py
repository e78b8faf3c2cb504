"""Measured windows and the SLO checks made on them (pure).

A window holds what one variant did since the current phase or step began. Checks compare each
figure with its limit; a figure exactly at its limit passes. Nothing is judged on too little
traffic: ``missing_traffic`` says what is still lacking.

Tail latency (p99, TTFT p99, ITL p99) is judged with its 95 % confidence bounds
(``core.quantiles``), since a p99 over a few hundred requests is nearly the maximum and one
scheduling stall moves it tenfold. A tail check passes when its measured value is within the
limit; it fails only when even the most favourable reading the bounds allow (candidate at its
lower bound, baseline at its upper bound) breaks the limit; in between it is *undecided* and the
phase keeps collecting traffic (the window grows, the bounds tighten) until ``wait_limit_s``,
when ``on_insufficient`` applies. Where a window is too small to bound a p99 from above (fewer
than 367 requests), the sources give its largest sample as the upper reading: a stand-in, so a
ratio against a small baseline can still fail when the baseline drew no tail, but a candidate's
few stalls never fail it (its lower bound discards them). Error rate and agreement are judged on
their measured values.
"""

from __future__ import annotations

import math
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
    # 95 % bounds of each true p99: 0.0 / math.inf where the window cannot bound it; None where the
    # source gave no bounds (the measured value is then taken as exact)
    p99_bounds_ms: tuple[float, float] | None = None
    ttft_p99_bounds_ms: tuple[float, float] | None = None
    itl_p99_bounds_ms: tuple[float, float] | None = None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def p99(self) -> Tail | None:
        return Tail.of(self.p99_ms, self.p99_bounds_ms)

    @property
    def ttft_p99(self) -> Tail | None:
        return Tail.of(self.ttft_p99_ms, self.ttft_p99_bounds_ms)

    @property
    def itl_p99(self) -> Tail | None:
        return Tail.of(self.itl_p99_ms, self.itl_p99_bounds_ms)

    def to_dict(self) -> dict[str, object]:
        """JSON-safe (an unbounded side of a bound is shown as None)."""
        data: dict[str, object] = dict(vars(self))
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = [v if math.isfinite(v) else None for v in value]
        return data


@dataclass(frozen=True)
class Tail:
    """A measured p99 (ms) and the 95 % bounds of the true one (``low`` 0 / ``high`` inf: unbounded)."""

    ms: float
    low: float
    high: float

    @classmethod
    def of(cls, ms: float | None, bounds: tuple[float, float] | None) -> Tail | None:
        if ms is None:
            return None
        return cls(ms, ms, ms) if bounds is None else cls(ms, min(bounds[0], ms), max(bounds[1], ms))


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
            "baseline": self.baseline.to_dict(),
            "candidate": self.candidate.to_dict(),
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
    undecided: str = ""  # measured beyond the limit, but the bounds do not yet show it: why

    def describe(self) -> str:
        shown = "n/a" if self.measured is None else f"{self.measured:.4g}"
        why = f"; undecided: {self.undecided}" if self.undecided else ""
        return f"{self.name} {shown} (limit {self.comparison} {self.limit:.4g}{why})"


def _at_most(name: str, measured: float | None, limit: float) -> SloCheck:
    ok = None if measured is None else measured <= limit
    return SloCheck(name, measured, limit, ok, "<=")


def _at_least(name: str, measured: float | None, limit: float) -> SloCheck:
    ok = None if measured is None else measured >= limit
    return SloCheck(name, measured, limit, ok, ">=")


def _bound(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else "unbounded"


def tail_at_most(name: str, tail: Tail | None, limit: float) -> SloCheck:
    """An absolute tail limit: passes at or under it, fails when even the lower bound is over it."""
    if tail is None or tail.ms <= limit:
        return _at_most(name, None if tail is None else tail.ms, limit)
    if tail.low > limit:
        return SloCheck(name, tail.ms, limit, False, "<=")
    why = f"95% bounds {_bound(tail.low)}..{_bound(tail.high)} ms reach the limit; needs more requests"
    return SloCheck(name, tail.ms, limit, None, "<=", why)


def tail_ratio_at_most(name: str, mine: Tail | None, theirs: Tail | None, limit: float) -> SloCheck:
    """A ratio of tails: passes at or under the limit, fails when even ``mine.low / theirs.high`` breaks it."""
    if mine is None or theirs is None or not theirs.ms:
        return _at_most(name, None, limit)
    ratio = mine.ms / theirs.ms
    if ratio <= limit:
        return _at_most(name, ratio, limit)
    floor = mine.low / theirs.high if theirs.high > 0 else math.inf
    if floor > limit:
        return SloCheck(name, ratio, limit, False, "<=")
    why = (
        f"with 95% bounds the ratio may be as low as {floor:.3g} (candidate p99 >= {_bound(mine.low)} ms, "
        f"baseline p99 <= {_bound(theirs.high)} ms); needs more requests"
    )
    return SloCheck(name, ratio, limit, None, "<=", why)


def shadow_checks(plan: RolloutPlan, m: Measurements) -> tuple[SloCheck, ...]:
    """Shadow phase: the candidate serves nobody, so only its errors and agreement count."""
    calls = m.compared + m.shadow_errors
    error_rate = m.shadow_errors / calls if calls else None
    if plan.slos.min_token_agreement is not None:  # a token stream: agreement = greedy exact-match rate
        agreement = _at_least("token_agreement", m.agreement, plan.slos.min_token_agreement)
    else:
        agreement = _at_least("agreement", m.agreement, plan.slos.min_agreement)
    return (_at_most("error_rate", error_rate, plan.slos.max_error_rate), agreement)


def step_checks(plan: RolloutPlan, m: Measurements, baseline_p99: Tail | None) -> tuple[SloCheck, ...]:
    """A canary step: candidate error rate, p99 ratio to baseline, ceiling, sampled agreement."""
    cand = m.candidate
    error_rate = cand.error_rate if cand.requests else None
    checks = [
        _at_most("error_rate", error_rate, plan.slos.max_error_rate),
        tail_ratio_at_most("p99_ratio", cand.p99, baseline_p99, plan.slos.max_p99_ratio),
    ]
    if plan.slos.max_p99_ms is not None:
        checks.append(tail_at_most("p99_ms", cand.p99, plan.slos.max_p99_ms))
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
        ("ttft", slos.max_ttft_p99_ratio, slos.max_ttft_p99_ms, cand.ttft_p99, base.ttft_p99),
        ("itl", slos.max_itl_p99_ratio, slos.max_itl_p99_ms, cand.itl_p99, base.itl_p99),
    ):
        if ratio_limit is not None:
            checks.append(tail_ratio_at_most(f"{name}_p99_ratio", mine, theirs, ratio_limit))
        if ms_limit is not None:
            checks.append(tail_at_most(f"{name}_p99_ms", mine, ms_limit))
    return tuple(checks)


def reference_p99(plan: RolloutPlan, m: Measurements, previous: Tail | None) -> Tail | None:
    """Baseline p99 to compare with: this window's when it saw enough traffic, else the last one.

    At the 100% step the baseline gets no traffic, so the last well-measured value stands.
    """
    if m.baseline.requests >= plan.min_requests and m.baseline.p99 is not None:
        return m.baseline.p99
    return previous


def missing_traffic(plan: RolloutPlan, m: Measurements, shadowing: bool, baseline_p99: Tail | None) -> tuple[str, ...]:
    """What the window still lacks before it may be judged (empty when it is enough)."""
    if shadowing:
        need = plan.shadow.min_comparisons if plan.shadow else 1
        calls = m.compared + m.shadow_errors
        return () if calls >= need else (f"shadow comparisons {calls} < {need}",)
    lacking = []
    if m.candidate.requests < plan.min_requests:
        lacking.append(f"candidate requests {m.candidate.requests} < {plan.min_requests}")
    if baseline_p99 is None:
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


def undecided(checks: tuple[SloCheck, ...]) -> tuple[str, ...]:
    """What keeps a window from a verdict although it has the traffic: tail checks still undecided."""
    return tuple(
        f"{check.name} {check.measured:.4g} over its limit {check.limit:.4g} but {check.undecided}"
        for check in checks
        if check.undecided and check.measured is not None
    )
