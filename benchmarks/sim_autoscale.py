"""Replay a day of traffic (diurnal curve + a burst) through the HPA that `kiln deploy autoscale` prints.

No cluster here, so the HorizontalPodAutoscaler's documented algorithm is replayed instead
(``server/autoscale/simulate.py``: desired = ceil(current * metric / target), tolerance 0.1, a
300 s scale-down stabilization window, scale-up policies, pods serving only after a start-up
delay). The per-replica capacity is the one recorded by ``kiln bench --find-capacity --record``
(``--repo/--model``) or given with ``--capacity``. Baseline: a fixed fleet sized for the trace's
peak at that capacity.

Goal: the autoscaled fleet meets the SLO for >= 99 % of the trace at <= 70 % of the
fixed fleet's replica-hours.

    python benchmarks/sim_autoscale.py [--repo DIR --model M | --capacity 250] [--headroom 0.7]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.machine import probe_cpu
from server.autoscale.hpa import AutoscaleSpec, pick_capacity, policy_from_hpa, triton_hpa
from server.autoscale.simulate import Replay, diurnal_trace, replay

RESULTS = Path(__file__).resolve().parent / "results"


def recorded_capacity(repo: Path, model: str) -> tuple[float, str]:
    from builders.repository import read_model, repository_root

    entry = read_model(repository_root(repo), model)
    for version in reversed(entry.versions):
        entries = list((version.manifest or {}).get("capacity") or [])
        if any(e.get("mode") == "rate" for e in entries):
            chosen = pick_capacity(entries, "rate", None, f"{model} version {version.version}")
            return float(chosen["capacity"]), f"recorded in {model} v{version.version} ({chosen['measured']})"
    raise SystemExit(f"{model} in {repo} has no recorded rate capacity; run kiln bench --find-capacity --record")


def burst_window(times: np.ndarray) -> np.ndarray:
    """The burst (10 min from 15:00) and the 10 minutes after it."""
    return (times >= 15 * 3600) & (times < 15 * 3600 + 1200)


def plot(result: Replay, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hours = result.times_s / 3600
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(hours, result.rate_rps, color="black", linewidth=0.8, label="arrivals (req/s)")
    top.plot(hours, result.ready * result.capacity_rps, color="green", label="ready replicas x capacity")
    top.axhline(result.fixed_replicas * result.capacity_rps, color="gray", linestyle=":", label="fixed fleet")
    breach = result.breached
    top.scatter(hours[breach], result.rate_rps[breach], color="red", s=8, label="SLO breached", zorder=3)
    top.set_ylabel("requests/s")
    top.legend(fontsize=8, loc="upper left")
    top.set_title(title, fontsize=10)
    bottom.step(hours, result.replicas, where="post", label="replicas (HPA)")
    bottom.step(hours, result.ready, where="post", label="ready")
    bottom.axhline(result.fixed_replicas, color="gray", linestyle=":", label="fixed fleet")
    bottom.set_xlabel("hour of day")
    bottom.set_ylabel("replicas")
    bottom.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--capacity", type=float, default=None, help="per-replica requests/s at the SLO")
    parser.add_argument("--headroom", type=float, default=0.7)
    parser.add_argument("--peak-replicas", type=float, default=16.0, help="diurnal peak in units of capacity")
    parser.add_argument("--burst", type=float, default=0.5, help="burst height as a share of the curve")
    parser.add_argument("--startup-s", type=float, default=60.0, help="seconds from pod creation to serving")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cpu = probe_cpu()
    print(f"CPU: {cpu.model} ({cpu.cores} cores), ISA: {', '.join(cpu.isa()) or 'none of AVX2/AVX-512/VNNI'}")
    if args.repo and args.model:
        capacity, source = recorded_capacity(args.repo, args.model)
    elif args.capacity:
        capacity, source = args.capacity, "--capacity"
    else:
        raise SystemExit("pass --repo DIR --model M (a recorded capacity) or --capacity REQ_PER_S")
    peak = capacity * args.peak_replicas
    spec = AutoscaleSpec(
        model=args.model or "model",
        mode="rate",
        capacity=capacity,
        headroom=args.headroom,
        max_replicas=math.ceil(args.peak_replicas * (1 + args.burst) / args.headroom) + 2,
    )
    policy = policy_from_hpa(triton_hpa(spec), startup_s=args.startup_s)
    times, rates = diurnal_trace(peak, burst_share=args.burst, seed=args.seed)
    result = replay(times, rates, capacity, policy)

    ratio = result.replica_hours / result.fixed_replica_hours
    print(
        f"capacity {capacity:g} req/s per replica ({source}); HPA target {policy.target_per_pod:g} "
        f"(headroom {args.headroom:g}), pods start in {args.startup_s:g} s"
    )
    print(
        f"trace: 24 h in {result.step_s:g} s steps, {rates.min():.0f}..{rates.max():.0f} req/s "
        f"(burst +{args.burst * 100:.0f} % for 10 min at 15:00)"
    )
    print("hour  req/s  replicas  ready")
    for hour in range(0, 24, 2):
        i = int(hour * 3600 / result.step_s)
        print(f"{hour:4d} {rates[i]:6.0f} {result.replicas[i]:9d} {result.ready[i]:6d}")
    burst = burst_window(times)
    print(
        f"burst: replicas {result.replicas[burst].min()}..{result.replicas[burst].max()}, "
        f"{int(result.breached[burst].sum())} breached step(s)"
    )
    met, met_requests = result.slo_met_share, result.requests_met_share
    print(
        f"SLO met for {met * 100:.2f} % of the time ({met_requests * 100:.2f} % of requests); "
        f"{int(result.breached.sum())} of {len(rates)} steps breached"
    )
    print(
        f"replica-hours: autoscaled {result.replica_hours:.1f} vs fixed fleet of {result.fixed_replicas} "
        f"{result.fixed_replica_hours:.1f} -> ratio {ratio:.3f}"
    )
    calm = ~burst_window(times)
    diurnal_fleet = max(1, math.ceil(float(rates[calm].max()) / capacity))
    diurnal_met = 1.0 - float((rates > diurnal_fleet * capacity).mean())
    print(
        f"for comparison, a fixed fleet of {diurnal_fleet} sized for the daily peak without the burst: "
        f"replica-hours ratio {diurnal_fleet / result.fixed_replicas:.3f}, SLO met {diurnal_met * 100:.2f} % "
        "of the time"
    )
    goal_slo, goal_cost = met >= 0.99, ratio <= 0.70
    print(
        f"goal: SLO >= 99 % of the trace: {'met' if goal_slo else 'MISSED'}; "
        f"replica-hours <= 70 % of fixed: {'met' if goal_cost else 'MISSED'}"
    )

    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / "sim_autoscale.png"
    plot(
        result,
        png,
        f"HPA replay: capacity {capacity:g} req/s/replica, headroom {args.headroom:g}, "
        f"SLO met {met * 100:.2f} %, replica-hours {ratio * 100:.1f} % of fixed",
    )
    data = {
        "cpu": {"model": cpu.model, "isa": cpu.isa()},
        "capacity_rps": capacity,
        "capacity_source": source,
        "headroom": args.headroom,
        "policy": policy.__dict__,
        "slo_met_share": met,
        "requests_met_share": met_requests,
        "replica_hours": result.replica_hours,
        "fixed_replicas": result.fixed_replicas,
        "fixed_replica_hours": result.fixed_replica_hours,
        "replica_hours_ratio": ratio,
        "diurnal_peak_fleet": {"replicas": diurnal_fleet, "slo_met_share": diurnal_met},
        "goals": {"slo_met_ge_0.99": goal_slo, "replica_hours_le_0.70": goal_cost},
        "replicas_hourly": [int(r) for r in result.replicas[:: int(3600 / result.step_s)]],
        "rates_hourly": [float(r) for r in np.round(rates[:: int(3600 / result.step_s)], 1)],
    }
    (RESULTS / "sim_autoscale.json").write_text(json.dumps(data, indent=2))
    print(f"wrote {RESULTS / 'sim_autoscale.json'} and {png}")
    return 0 if goal_slo and goal_cost else 1


if __name__ == "__main__":
    raise SystemExit(main())
