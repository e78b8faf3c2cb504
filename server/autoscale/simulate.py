"""The Kubernetes HorizontalPodAutoscaler's algorithm, replayed against a traffic trace.

Pure: a trace of arrival rates in, replicas and SLO breaches out, so the scaling policy that
``kiln deploy autoscale`` prints can be judged here, without a cluster. It follows the documented
algorithm (kubernetes.io, "Horizontal Pod Autoscaling"):

* every ``sync_period_s`` (15 s) the controller reads the per-pod metric (averaged over
  ``metric_window_s``, like a Prometheus ``rate(...[1m])``) and computes
  ``desired = ceil(current * metric / target)``, skipped while ``|metric / target - 1| <= tolerance``
  (0.1); pods still starting count as using nothing when scaling up (so a scale-up in progress is
  not doubled);
* scale-down takes the highest recommendation of the last ``scale_down_window_s`` (300 s), and is
  limited by its policy (100 % of the pods per 15 s by default);
* scale-up has no stabilization window and is limited by the larger of its policies (by default
  +100 % or +4 pods per 15 s);
* a new pod serves only after ``startup_s`` (image pull, model load, readiness probe).

A step breaches the SLO when its arrival rate exceeds what the ready pods hold at the SLO
(``ready * capacity``): that is what the capacity search measured, the highest per-replica rate
with p99 within the SLO.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.errors import InvalidInputError


@dataclass(frozen=True)
class HpaPolicy:
    """The autoscaler's settings (defaults: Kubernetes' own, plus ``min``/``max`` replicas)."""

    target_per_pod: float  # the metric's target average value per pod (requests/s)
    min_replicas: int = 1
    max_replicas: int = 20
    tolerance: float = 0.1
    sync_period_s: float = 15.0
    scale_down_window_s: float = 300.0
    scale_up_percent: float = 100.0  # per sync period (the policies' periods are taken equal to it)
    scale_up_pods: int = 4  # per sync period (the larger of the two scale-up policies applies)
    scale_down_percent: float = 100.0  # per sync period
    metric_window_s: float = 60.0
    startup_s: float = 60.0

    def check(self) -> None:
        if not self.target_per_pod > 0:
            raise InvalidInputError(f"HPA target per pod must be > 0, got {self.target_per_pod}")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise InvalidInputError(
                f"need 1 <= min replicas ({self.min_replicas}) <= max replicas ({self.max_replicas})"
            )
        if self.tolerance < 0 or self.sync_period_s <= 0 or self.startup_s < 0:
            raise InvalidInputError("tolerance and startup must be >= 0 and the sync period > 0")


@dataclass(frozen=True)
class Replay:
    """Replicas over time and what the clients would have seen."""

    times_s: np.ndarray
    rate_rps: np.ndarray
    replicas: np.ndarray  # desired (and billed) pods at each step
    ready: np.ndarray  # pods serving at each step
    breached: np.ndarray  # bool: arrivals above ready * capacity
    step_s: float
    capacity_rps: float

    @property
    def slo_met_share(self) -> float:
        """Share of the trace's time within the SLO."""
        return 1.0 - float(self.breached.mean())

    @property
    def requests_met_share(self) -> float:
        """Share of requests that arrived while the fleet held the SLO."""
        total = float(self.rate_rps.sum())
        return 1.0 - float(self.rate_rps[self.breached].sum()) / total if total else 1.0

    @property
    def replica_hours(self) -> float:
        return float(self.replicas.sum()) * self.step_s / 3600

    @property
    def fixed_replicas(self) -> int:
        """A fixed fleet sized for the trace's peak at the measured capacity."""
        return max(1, math.ceil(float(self.rate_rps.max()) / self.capacity_rps))

    @property
    def fixed_replica_hours(self) -> float:
        return self.fixed_replicas * len(self.rate_rps) * self.step_s / 3600


def diurnal_trace(
    peak_rps: float,
    *,
    hours: float = 24.0,
    step_s: float = 15.0,
    trough_share: float = 0.15,
    burst_at_h: float = 15.0,
    burst_share: float = 0.5,
    burst_minutes: float = 10.0,
    burst_ramp_s: float = 60.0,
    noise: float = 0.03,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(times, rates): a day between ``trough_share`` and 1 of ``peak_rps`` (lowest at 04:00, highest
    at 16:00), plus a burst of ``burst_share`` of the curve at ``burst_at_h`` that ramps up in
    ``burst_ramp_s``, and multiplicative noise."""
    times = np.arange(0.0, hours * 3600, step_s)
    phase = 2 * np.pi * (times / 3600 - 4.0) / 24.0
    curve = trough_share + (1 - trough_share) * (1 - np.cos(phase)) / 2
    start = burst_at_h * 3600
    ramp = np.clip((times - start) / max(burst_ramp_s, 1e-9), 0, 1)
    ramp[times > start + burst_minutes * 60] = 0
    rng = np.random.default_rng(seed)
    rates = peak_rps * curve * (1 + burst_share * ramp) * (1 + noise * rng.standard_normal(times.size))
    return times, np.maximum(rates, 0.0)


def replay(
    times_s: Sequence[float],
    rates_rps: Sequence[float],
    capacity_rps: float,
    policy: HpaPolicy,
    initial: int | None = None,
) -> Replay:
    """Replay ``rates_rps`` (one value per equal step) through the HPA algorithm, from ``initial``
    ready pods (default: what the first step's load asks for)."""
    policy.check()
    if capacity_rps <= 0:
        raise InvalidInputError(f"per-replica capacity must be > 0 requests/s, got {capacity_rps}")
    times = np.asarray(times_s, dtype=float)
    rates = np.asarray(rates_rps, dtype=float)
    if times.size < 2 or times.size != rates.size:
        raise InvalidInputError(f"a trace needs >= 2 steps and as many rates as times, got {times.size}/{rates.size}")
    step = float(times[1] - times[0])
    window = max(1, round(policy.metric_window_s / step))
    wanted = initial if initial is not None else math.ceil(rates[0] / policy.target_per_pod)
    first = min(policy.max_replicas, max(policy.min_replicas, wanted))
    starts: list[float] = [-policy.startup_s] * first  # when each pod was created
    history: deque[tuple[float, int]] = deque()  # (time, recommendation) for scale-down stabilization
    last_sync = -math.inf
    replicas = np.zeros(times.size, dtype=int)
    ready = np.zeros(times.size, dtype=int)
    for i, now in enumerate(times):
        if now - last_sync >= policy.sync_period_s - 1e-9:
            last_sync = now
            metric = float(rates[max(0, i - window + 1) : i + 1].mean()) / max(1, len(starts))
            desired = _recommend(len(starts), metric, policy)
            history.append((now, desired))
            while history and history[0][0] < now - policy.scale_down_window_s:
                history.popleft()
            target = _limit(len(starts), desired, history, policy)
            if target > len(starts):
                starts += [now] * (target - len(starts))
            elif target < len(starts):
                starts = sorted(starts)[:target]  # the newest pods go first
        replicas[i] = len(starts)
        ready[i] = sum(1 for s in starts if now - s >= policy.startup_s)
    breached = rates > ready * capacity_rps
    return Replay(times, rates, replicas, ready, breached, step, capacity_rps)


def _recommend(current: int, metric: float, policy: HpaPolicy) -> int:
    ratio = metric / policy.target_per_pod
    if abs(ratio - 1) <= policy.tolerance:
        return current
    return min(policy.max_replicas, max(policy.min_replicas, math.ceil(current * ratio)))


def _limit(current: int, desired: int, history: deque[tuple[float, int]], policy: HpaPolicy) -> int:
    if desired > current:
        most = max(current + math.ceil(current * policy.scale_up_percent / 100), current + policy.scale_up_pods)
        return min(desired, most, policy.max_replicas)
    stabilized = max(r for _, r in history)  # the highest recommendation of the window
    if stabilized >= current:
        return current
    fewest = current - math.floor(current * policy.scale_down_percent / 100)
    return max(stabilized, fewest, policy.min_replicas)
