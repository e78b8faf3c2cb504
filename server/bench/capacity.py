"""Capacity under a latency SLO: which load level to measure next, and what the measurements say.

Pure logic, no sockets: ``next_step(runs, settings)`` looks at the levels measured so far and
returns the next one (or none when the search is over); ``judge`` says whether one level met the
SLO; ``summarize`` turns the runs into a ``CapacityResult``. ``server/bench/capacity_load.py``
drives a real endpoint with it, the unit tests drive a simulated one.

The search (open loop over the arrival rate, or closed loop over concurrency):

0. **probe** (rate search): a short closed-loop run; the search starts at half the throughput it
   reached (or at ``start`` when it failed);
1. **explore**: multiply the level by ``growth`` (by ``fast_growth`` while p99 is under a quarter
   of the SLO) until a level fails; if the very first level fails, divide by ``fast_growth``
   down to ``start``, and if even ``start`` fails, no level meets the SLO;
2. **bisect** between the highest level that met the SLO and the lowest that failed until they
   are within ``precision`` of each other: for rates, where 1/p99 (linear in the rate for an
   M/M/1 queue) reaches 1/SLO, interpolated from the passing level and the failing one (or zero
   at the throughput ceiling a saturated level showed), with a geometric-midpoint fallback;
   for concurrency, the integer midpoint;
3. **confirm**: run the final level ``repeats`` more times. A level counts as meeting the SLO only
   if every run of it did, so a failed repeat moves the boundary down and the search goes on.

A level fails when p99 or the error rate is over the SLO, and is marked as the *client's* limit
when the load generator itself could not offer the load (its sends fell behind schedule). A level
that has certainly failed (more than 1 % of its expected requests already over the SLO, or too
many errors) stops early (``stop_rule``), so overloaded levels cost little time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from core.errors import InvalidInputError
from server.bench.stats import LoadPoint, StopRule

MODES = ("rate", "concurrency")


@dataclass(frozen=True)
class Slo:
    """p99 latency of successful requests, and the share of requests allowed to fail."""

    p99_ms: float
    error_rate: float = 0.0

    def check(self) -> None:
        if not math.isfinite(self.p99_ms) or self.p99_ms <= 0:
            raise InvalidInputError(f"--slo-p99-ms must be a number > 0, got {self.p99_ms}")
        if not math.isfinite(self.error_rate) or not 0 <= self.error_rate < 1:
            raise InvalidInputError(
                f"--slo-error-rate must be a fraction in [0, 1), got {self.error_rate} (0.01 means 1 %)"
            )

    def describe(self) -> str:
        return f"p99 <= {self.p99_ms:g} ms, errors <= {self.error_rate * 100:g} %"


@dataclass(frozen=True)
class SearchSettings:
    """How the search moves and how long each level runs."""

    mode: str = "rate"
    start: float = 10.0  # first level: requests/s (rate) or requests in flight (concurrency)
    max_load: float = 20000.0  # never offered beyond this
    growth: float = 2.0
    fast_growth: float = 4.0  # while p99 < SLO / 4
    precision: float = 0.05  # bisect until hi / lo <= 1 + precision (concurrency: or hi - lo <= 1)
    repeats: int = 2  # extra runs of the final level
    max_levels: int = 30
    min_samples: int = 2000  # per level, so p99 rests on >= 20 requests of its tail
    min_duration_s: float = 2.0
    max_duration_s: float = 15.0
    warmup_s: float = 1.0  # per level, not measured
    client_lag_share: float = 0.25  # the client's median send lag over this share of the SLO ...
    client_lag_floor_ms: float = 2.0  # ... and over this many ms marks the level as client-limited
    client_rate_share: float = 0.9  # open loop: sending below this share of the offered rate, too
    probe_concurrency: int = 16  # rate mode: a short closed-loop run first; the search starts at half its throughput
    probe_s: float = 1.0
    stop_early: bool = True  # end a level as soon as it has certainly broken the SLO

    def check(self) -> None:
        if self.mode not in MODES:
            raise InvalidInputError(f"capacity search mode must be one of {list(MODES)}, got {self.mode!r}")
        if not math.isfinite(self.start) or self.start <= 0 or (self.mode == "concurrency" and self.start < 1):
            raise InvalidInputError(f"--start must be > 0 (concurrency >= 1), got {self.start:g}")
        if not math.isfinite(self.max_load) or self.max_load < self.start:
            raise InvalidInputError(f"--max-load {self.max_load:g} must be >= --start {self.start:g}")
        if not (self.growth > 1 and self.fast_growth >= self.growth):
            raise InvalidInputError(f"growth must be > 1 (got {self.growth:g}) and fast growth >= it")
        if not 0 < self.precision < 1:
            raise InvalidInputError(f"--precision must be in (0, 1), got {self.precision:g} (0.05 = 5 %)")
        if self.repeats < 0 or self.max_levels < 1:
            raise InvalidInputError(f"--repeats must be >= 0 (got {self.repeats}) and max levels >= 1")
        if self.min_samples < 1 or not 0 < self.min_duration_s <= self.max_duration_s:
            raise InvalidInputError(
                f"level length: need min samples >= 1 and 0 < min duration <= max duration, got "
                f"{self.min_samples}, {self.min_duration_s:g} s, {self.max_duration_s:g} s"
            )
        if self.warmup_s < 0:
            raise InvalidInputError(f"--warmup must be >= 0, got {self.warmup_s:g}")
        if self.probe_concurrency < 0 or self.probe_s <= 0:
            raise InvalidInputError(f"--probe-concurrency must be >= 0 (0: off), got {self.probe_concurrency}")


@dataclass(frozen=True)
class Judgement:
    """One level against the SLO. ``cause``: meets, latency, errors or client."""

    meets: bool
    cause: str
    reason: str
    p99_ms: float
    error_rate: float
    client_note: str = ""  # why the client could not offer this load ("" when it could)


@dataclass(frozen=True)
class Run:
    """One measured level."""

    load: float
    phase: str  # explore, bisect or confirm
    point: LoadPoint
    judgement: Judgement
    elapsed_s: float = 0.0  # wall time incl. warm-up


@dataclass(frozen=True)
class Step:
    """The next level to measure (``load`` None: the search is over, ``phase`` says how)."""

    load: float | None
    phase: str  # probe, explore, bisect, confirm; or the outcome: found, none, above-max, budget
    duration_s: float = 0.0
    mode: str = "rate"
    stop: StopRule | None = None


@dataclass(frozen=True)
class CapacityResult:
    """What the search found. ``outcome``: found, none, above-max or budget."""

    mode: str
    slo: Slo
    outcome: str
    capacity: float | None  # highest level that met the SLO in every run
    limited_by: str  # server, client or max-load
    message: str
    runs: tuple[Run, ...]
    knee_runs: int = 0  # runs of the capacity level ...
    knee_passes: int = 0  # ... and how many met the SLO (all of them, by construction)
    knee_p99_ms: tuple[float, ...] = ()
    knee_throughput_rps: float = 0.0  # successful requests/s at the capacity level (mean over runs)
    failed_above: float | None = None  # the lowest level above it that failed
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.outcome in ("found", "above-max", "budget") and self.capacity is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "slo": asdict(self.slo),
            "outcome": self.outcome,
            "capacity": self.capacity,
            "limited_by": self.limited_by,
            "message": self.message,
            "confidence": {
                "runs": self.knee_runs,
                "passes": self.knee_passes,
                "p99_ms": list(self.knee_p99_ms),
                "p99_spread_ms": (max(self.knee_p99_ms) - min(self.knee_p99_ms)) if self.knee_p99_ms else None,
            },
            "throughput_rps": self.knee_throughput_rps,
            "failed_above": self.failed_above,
            "settings": self.settings,
            "runs": [
                {
                    "load": r.load,
                    "phase": r.phase,
                    "elapsed_s": r.elapsed_s,
                    "judgement": asdict(r.judgement),
                    "point": asdict(r.point),
                }
                for r in self.runs
            ],
        }


def judge(point: LoadPoint, slo: Slo, settings: SearchSettings) -> Judgement:
    """Did this level meet the SLO, and could the client offer the load at all?"""
    total = point.total
    errors = total - point.ok
    error_rate = errors / total if total else 1.0
    p99_ms = point.latency_us.get("p99", float("nan")) / 1e3
    note = client_note(point, slo, settings)
    if total == 0:
        return Judgement(False, "client" if note else "errors", "no request completed", p99_ms, 1.0, note)
    failures: list[str] = []
    cause = "meets"
    if error_rate > slo.error_rate:
        codes = ", ".join(f"{code} {count}" for code, count in point.errors.items())
        failures.append(f"error rate {error_rate * 100:.2f} % > {slo.error_rate * 100:g} % ({codes})")
        cause = "errors"
    if not math.isfinite(p99_ms) or p99_ms > slo.p99_ms:
        failures.append(f"p99 {p99_ms:.2f} ms > {slo.p99_ms:g} ms")
        cause = "errors" if cause == "errors" else "latency"
    if point.stopped_early and not failures:
        failures.append(f"stopped early: {point.stopped_early}")
        cause = "errors" if "error" in point.stopped_early else "latency"
    if note:
        failures.append(note)
        cause = "client"
    return Judgement(not failures, cause, "; ".join(failures), p99_ms, error_rate, note)


def client_note(point: LoadPoint, slo: Slo, settings: SearchSettings) -> str:
    """Why the load generator, not the endpoint, limited this level ("" when it did not)."""
    lag_ms = (point.send_lag_us_p50 if point.mode == "rate" else point.loop_lag_us_p50) / 1e3
    lag_limit = max(settings.client_lag_floor_ms, settings.client_lag_share * slo.p99_ms)
    if point.mode == "rate" and point.sent_rps and point.sent_rps < settings.client_rate_share * point.load:
        return (
            f"the load generator sent only {point.sent_rps:.0f} requests/s of the {point.load:g}/s offered "
            "(its own limit, not the endpoint's)"
        )
    if lag_ms > lag_limit:
        what = "sends fell behind schedule" if point.mode == "rate" else "its event loop stalled"
        return (
            f"the load generator's {what} by a median {lag_ms:.1f} ms (> {lag_limit:.1f} ms): "
            "the figure is the client's limit, not the endpoint's"
        )
    return ""


def level_duration(load: float, runs: Sequence[Run], settings: SearchSettings) -> float:
    """Seconds for a level: long enough for ``min_samples`` successful requests, within bounds."""
    expected = _expected_rps(load, runs, settings)
    if expected <= 0:
        return settings.min_duration_s
    return min(settings.max_duration_s, max(settings.min_duration_s, settings.min_samples / expected))


def _expected_rps(load: float, runs: Sequence[Run], settings: SearchSettings) -> float:
    """Requests/s a level will see: the rate itself, or (closed loop) the nearest level's throughput."""
    if settings.mode == "rate":
        return load
    nearest = min(_levels(runs), key=lambda r: abs(r.load - load), default=None)
    return nearest.point.throughput_rps * min(1.0, load / nearest.load) if nearest else 0.0


def next_step(runs: Sequence[Run], slo: Slo, settings: SearchSettings) -> Step:
    """The next level to measure, from everything measured so far."""
    levels = _levels(runs)
    if not runs and settings.mode == "rate" and settings.probe_concurrency:
        return Step(float(settings.probe_concurrency), "probe", settings.probe_s, "concurrency")
    if not levels:
        return _step(_first_level(runs, settings), "explore", runs, slo, settings)
    if len(runs) >= settings.max_levels:
        return Step(None, "budget")
    lo, hi, upper = _bracket(levels)
    if hi is None:
        top = max(r.load for r in levels)
        if top >= settings.max_load:
            return Step(None, "above-max")
        last = max((r for r in levels if r.load == top), key=lambda r: r.judgement.p99_ms)
        factor = settings.fast_growth if last.judgement.p99_ms < slo.p99_ms / 4 else settings.growth
        grown = min(settings.max_load, _round(top * factor, settings))
        return _step(max(grown, _next_int(top, settings)), "explore", runs, slo, settings)
    if lo is None:
        lowest = min(r.load for r in levels)
        floor = _round(settings.start, settings)
        if lowest <= floor:
            return Step(None, "none")
        # the first level (half the probe's throughput) was too high: go down, as far as --start
        return _step(max(floor, _round(lowest / settings.fast_growth, settings)), "explore", runs, slo, settings)
    if not _close(lo, hi, settings):
        return _step(_candidate(levels, lo, hi, upper, slo, settings), "bisect", runs, slo, settings)
    if sum(1 for r in levels if r.load == lo) < 1 + settings.repeats:
        return _step(lo, "confirm", runs, slo, settings)
    return Step(None, "found")


def stop_rule(
    load: float, duration_s: float, runs: Sequence[Run], slo: Slo, settings: SearchSettings
) -> StopRule | None:
    """When a level has certainly failed: more than 1 % of its expected requests over the SLO (so its
    p99 is), or more errors than the SLO allows, with 20 % margin for the Poisson count."""
    if not settings.stop_early:
        return None
    expected = _expected_rps(load, runs, settings) * duration_s * 1.2
    if expected <= 0:
        return None
    return StopRule(
        slow_ns=int(slo.p99_ms * 1e6),
        max_slow=max(5, math.ceil(0.01 * expected)),
        max_errors=max(5, math.ceil(slo.error_rate * expected)),
    )


def summarize(runs: Sequence[Run], slo: Slo, settings: SearchSettings, outcome: str) -> CapacityResult:
    """The capacity, its confirmations and a one-line message, from the finished search."""
    levels = _levels(runs)
    lo, hi, _ = _bracket(levels)
    runs = tuple(runs)
    common: dict[str, Any] = {"mode": settings.mode, "slo": slo, "runs": runs, "settings": asdict(settings)}
    unit = "requests/s" if settings.mode == "rate" else "requests in flight"
    boundary = [r for r in levels if hi is not None and r.load == hi and not r.judgement.meets]
    client = any(r.judgement.cause == "client" for r in boundary)
    if lo is None:
        if not levels:
            return CapacityResult(
                outcome=outcome,
                capacity=None,
                limited_by="server",
                message=f"the search stopped before any level was measured ({outcome})",
                **common,
            )
        floor = min(r.load for r in levels)  # its failing run: it may also have passed once before a repeat failed
        lowest = next(r for r in levels if r.load == floor and not r.judgement.meets)
        every_error = all(r.judgement.error_rate >= 1.0 for r in levels)
        why = lowest.judgement.reason
        examples = "; ".join(f"{c}: {m}" for c, m in lowest.point.error_examples.items())
        if every_error:
            why = f"every request failed{f' ({examples})' if examples else ''}"
        message = (
            f"no load level met the SLO ({slo.describe()}); the lowest level, {lowest.load:g} {unit}, "
            f"had p99 {_ms(lowest.judgement.p99_ms)} and error rate {lowest.judgement.error_rate * 100:.2f} %: {why}"
        )
        if client:
            message += "; lower --start or run the load generator on another machine"
        elif every_error:
            message += "; check the URL, the model name and the server's log"
        else:
            message += "; relax the SLO or lower --start"
        if outcome == "budget":
            message += f" (the search stopped after {settings.max_levels} levels, --max-levels)"
        return CapacityResult(
            outcome="none", capacity=None, limited_by="client" if client else "server", message=message, **common
        )
    at = [r for r in levels if r.load == lo]
    p99s = tuple(r.judgement.p99_ms for r in at)
    throughput = sum(r.point.throughput_rps for r in at) / len(at)
    figures = f"p99 {', '.join(f'{p:.2f}' for p in p99s)} ms over {len(at)} run(s), {throughput:.1f} ok/s"
    if hi is None and outcome == "budget":
        limited, result_outcome = "max-levels", "budget"
        message = (
            f"met the SLO ({slo.describe()}) at every level up to {lo:g} {unit} ({figures}), then ran out of "
            f"--max-levels ({settings.max_levels}): the capacity is at least that"
        )
    elif hi is None:
        limited, result_outcome = "max-load", "above-max"
        message = (
            f"met the SLO ({slo.describe()}) at every level up to --max-load {lo:g} {unit} ({figures}); "
            "the capacity is at least that: raise --max-load to find the knee"
        )
    else:
        limited = "client" if client else "server"
        result_outcome = "found" if outcome == "found" else outcome
        message = f"capacity {lo:g} {unit} at {slo.describe()} ({figures}); {hi:g} failed"
        if client:
            message += (
                ": the load generator could not offer that load, so this is the client's limit, not the "
                "endpoint's (a lower bound); run the client on another machine for the endpoint's own figure"
            )
        if outcome == "budget":
            message += f" (stopped after {settings.max_levels} levels before the bracket closed)"
    return CapacityResult(
        outcome=result_outcome,
        capacity=lo,
        limited_by=limited,
        message=message,
        knee_runs=len(at),
        knee_passes=sum(r.judgement.meets for r in at),
        knee_p99_ms=p99s,
        knee_throughput_rps=throughput,
        failed_above=hi,
        **common,
    )


# ---------------------------------------------------------------- internals


def _bracket(runs: Sequence[Run]) -> tuple[float | None, float | None, float]:
    """(highest level below the first failure that met the SLO in every run, lowest failing level,
    the upper end for bisection: that level, or less when it showed a lower throughput ceiling)."""
    failing = sorted({r.load for r in runs if not r.judgement.meets})
    hi = failing[0] if failing else None
    passing = [r.load for r in runs if hi is None or r.load < hi]
    lo = max(passing) if passing else None
    upper = hi if hi is not None else math.inf
    if hi is not None and lo is not None:
        ceilings = [r.point.throughput_rps for r in runs if _saturated(r)]
        upper = max(lo, min([hi, *ceilings]))
    return lo, hi, upper


def _saturated(run: Run) -> bool:
    """An open-loop level that failed on latency while completing clearly less than it was offered:
    its throughput is the endpoint's ceiling, and no rate above it can meet any latency SLO (a level
    stopped early after a few dozen answers says too little about its throughput to count)."""
    point = run.point
    if point.mode != "rate" or run.judgement.cause != "latency" or point.ok < 50:
        return False
    return point.throughput_rps < 0.95 * point.load


def _close(lo: float, hi: float, settings: SearchSettings) -> bool:
    if settings.mode == "concurrency" and hi - lo <= 1:
        return True
    return hi <= lo * (1 + settings.precision)


def _midpoint(lo: float, hi: float, settings: SearchSettings) -> float:
    if settings.mode == "concurrency":
        return float(max(lo + 1, min(hi - 1, (lo + hi) // 2)))
    return _round(math.sqrt(lo * hi), settings)


def _round(load: float, settings: SearchSettings) -> float:
    """Concurrency is an integer; rates keep three significant digits (levels read well in tables)."""
    if settings.mode == "concurrency":
        return float(max(1, round(load)))
    return float(f"{load:.3g}")


def _next_int(top: float, settings: SearchSettings) -> float:
    return top + 1 if settings.mode == "concurrency" else top


def _step(load: float, phase: str, runs: Sequence[Run], slo: Slo, settings: SearchSettings) -> Step:
    seconds = level_duration(load, runs, settings)
    return Step(load, phase, seconds, settings.mode, stop_rule(load, seconds, runs, slo, settings))


def _levels(runs: Sequence[Run]) -> list[Run]:
    """The runs that are search levels (not the throughput probe)."""
    return [r for r in runs if r.phase != "probe"]


def _first_level(runs: Sequence[Run], settings: SearchSettings) -> float:
    """``start``, or half the throughput the probe reached (when it ran cleanly and above ``start``)."""
    probe = next((r for r in runs if r.phase == "probe"), None)
    if probe is None or probe.point.errors or probe.judgement.client_note or probe.point.ok < 10:
        return _round(settings.start, settings)
    return _round(min(settings.max_load, max(settings.start, probe.point.throughput_rps / 2)), settings)


def _candidate(levels: list[Run], lo: float, hi: float, upper: float, slo: Slo, settings: SearchSettings) -> float:
    """Next level inside (lo, hi): for rates, where 1/p99 (linear in the rate for an M/M/1 queue) meets
    1/SLO between the best passing level and the failing one (or zero at the measured throughput
    ceiling), kept at least ``precision`` away from both ends; for concurrency, the midpoint."""
    if settings.mode == "concurrency":
        return _midpoint(lo, hi, settings)
    worst_lo = max(r.judgement.p99_ms for r in levels if r.load == lo)
    y_lo, y_slo = 1 / worst_lo if worst_lo > 0 else math.inf, 1 / slo.p99_ms
    failing = [r for r in levels if r.load == hi and r.judgement.cause == "latency"]
    steady = failing and not any(r.point.stopped_early or _saturated(r) for r in failing)
    x_hi, y_hi = (hi, 1 / max(r.judgement.p99_ms for r in failing)) if steady else (upper, 0.0)
    recent = [r.judgement.meets for r in levels if r.phase == "bisect"][-2:]
    one_sided = len(recent) == 2 and recent[0] == recent[1]  # interpolation keeps landing on one side
    if one_sided or not (math.isfinite(y_lo) and y_lo > y_slo > y_hi and x_hi > lo):
        return _midpoint(lo, hi, settings)
    guess = lo + (x_hi - lo) * (y_lo - y_slo) / (y_lo - y_hi)
    grow = 1 + settings.precision
    # the two levels that close the bracket at once: a failure at low_end, or a pass at high_end
    low_end, high_end = _round_to(lo * grow, down=True), _round_to(hi / grow, down=False)
    if guess >= high_end / grow:  # the knee is predicted within precision of hi: try to close from below
        guess = high_end
    chosen = min(max(_round(guess, settings), low_end), max(low_end, high_end))
    return chosen if lo < chosen < hi else _midpoint(lo, hi, settings)


def _round_to(rate: float, *, down: bool) -> float:
    """Three significant digits, rounded toward ``down`` (so a bracket closes as intended)."""
    step = 10 ** (math.floor(math.log10(rate)) - 2)
    return float(f"{(math.floor if down else math.ceil)(round(rate / step, 6)) * step:.6g}")


def _ms(value: float) -> str:
    return f"{value:.2f} ms" if math.isfinite(value) else "n/a (no request succeeded)"


Measure = Callable[[Step], LoadPoint]  # the level's figures, warm-up excluded
RunHook = Callable[[Run], None]


def find_capacity(
    measure: Measure, slo: Slo, settings: SearchSettings, on_run: RunHook | None = None
) -> CapacityResult:
    """Run the whole search against ``measure`` (a real endpoint or a simulated one)."""
    slo.check()
    settings.check()
    runs: list[Run] = []
    while True:
        step = next_step(runs, slo, settings)
        if step.load is None:
            return summarize(runs, slo, settings, step.phase)
        started = time.perf_counter_ns()
        point = measure(step)
        run = Run(step.load, step.phase, point, judge(point, slo, settings), (time.perf_counter_ns() - started) / 1e9)
        runs.append(run)
        if on_run is not None:
            on_run(run)
