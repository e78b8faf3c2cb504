"""Watch a rollout on a running gateway to its end, recording weights and per-variant p99 over time.

``run_rollout(gateway, plan)`` starts the plan on a gateway that has the rollout plugin attached,
samples the route's weights and each variant's p99 every ``sample_s`` while the caller's load
runs, and returns the event log and the time series. ``plot_rollouts(runs, path)`` writes a PNG
(matplotlib, Agg backend) with one column per rollout: candidate weight on top, p99 below.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import KilnError
from server.gateway.app import GatewayHandle
from server.rollout.machine import Command
from server.rollout.plan import RolloutPlan
from server.rollout.plugin import controller_for

TERMINAL = ("promoted", "rolled_back", "aborted")


@dataclass(frozen=True)
class RolloutSample:
    t_s: float  # seconds since the rollout started
    phase: str
    weights: dict[str, float]
    p99_ms: dict[str, float | None]  # per variant, over the last ``window_s``
    requests: dict[str, int]


@dataclass(frozen=True)
class RolloutRun:
    plan: RolloutPlan
    final: dict[str, Any]  # the last status document
    events: list[dict[str, Any]]
    series: list[RolloutSample] = field(default_factory=list)
    duration_s: float = 0.0
    timed_out: bool = False
    window_s: float = 1.0  # span of each p99 sample

    @property
    def outcome(self) -> str:
        return str(self.final.get("phase"))


def _sample(
    gateway: GatewayHandle, plan: RolloutPlan, status: dict[str, Any], t_s: float, window_s: float
) -> RolloutSample:
    p99: dict[str, float | None] = {}
    requests: dict[str, int] = {}
    for name in (plan.baseline, plan.candidate.name):
        window = gateway.metrics.window(plan.route, name, window_s)
        requests[name] = window.requests
        p99[name] = window.p99_ms if window.requests else None
    return RolloutSample(round(t_s, 3), status["phase"], dict(status["weights"]), p99, requests)


def run_rollout(
    gateway: GatewayHandle,
    plan: RolloutPlan,
    *,
    timeout_s: float = 120.0,
    sample_s: float = 0.25,
    window_s: float = 1.0,
    on_sample: Callable[[RolloutSample], None] | None = None,
) -> RolloutRun:
    """Run ``plan`` to a terminal state (load is the caller's); aborts it if ``timeout_s`` passes."""
    controller = controller_for(gateway)
    began = time.perf_counter_ns()
    status = controller.start(plan)
    series: list[RolloutSample] = []
    timed_out = False
    while True:
        elapsed = (time.perf_counter_ns() - began) / 1e9
        status = controller.status(plan.route)
        sample = _sample(gateway, plan, status, elapsed, window_s)
        series.append(sample)
        if on_sample is not None:
            on_sample(sample)
        if status["phase"] in TERMINAL:
            break
        if elapsed >= timeout_s:
            timed_out = True
            try:
                status = controller.command(plan.route, Command.ABORT)
            except KilnError:  # it ended on its own meanwhile
                status = controller.status(plan.route)
            break
        time.sleep(sample_s)
    duration = (time.perf_counter_ns() - began) / 1e9
    return RolloutRun(plan, status, controller.events(plan.route), series, round(duration, 3), timed_out, window_s)


def plot_rollouts(runs: Sequence[RolloutRun], path: Path) -> Path:
    """PNG of candidate weight and per-variant p99 over time, one column per rollout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(1, len(runs))
    fig, axes = plt.subplots(2, columns, figsize=(5.5 * columns, 6), squeeze=False, sharex="col")
    for col, run in enumerate(runs):
        times = [s.t_s for s in run.series]
        top, bottom = axes[0][col], axes[1][col]
        for name in (run.plan.baseline, run.plan.candidate.name):
            top.step(times, [s.weights.get(name, 0.0) for s in run.series], where="post", label=name)
            bottom.plot(
                times,
                [s.p99_ms.get(name) if s.p99_ms.get(name) is not None else float("nan") for s in run.series],
                marker=".",
                label=name,
            )
        for event in run.events:
            if event["kind"] in ("step", "promoted", "rolled_back", "aborted", "paused"):
                t = _event_time(run, event)
                if t is not None:
                    for ax in (top, bottom):
                        ax.axvline(t, color="grey", linewidth=0.6, linestyle=":")
        cand = run.plan.candidate
        title = f"{run.plan.route}: {cand.name} ({cand.model}) vs {run.plan.baseline}: {run.outcome}"
        top.set_title(title, fontsize=10)
        top.set_ylabel("weight (%)")
        top.set_ylim(-5, 105)
        bottom.set_ylabel(f"p99 over the last {run.window_s:g} s (ms)")
        bottom.set_xlabel("seconds since start")
        top.legend(loc="best")
        bottom.legend(loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _event_time(run: RolloutRun, event: dict[str, Any]) -> float | None:
    """An event's time on the series' axis (events carry the controller's monotonic ``at``)."""
    started = next((e["at"] for e in run.events if e["kind"] == "started"), None)
    return None if started is None else float(event["at"]) - float(started)
