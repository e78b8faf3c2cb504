"""Capacity search vs a fine sweep, against a Kiln server in its own process (same run, same levels).

Two servers (``--server``), each with one instance and no dynamic batching, so the knee is
reachable by the load generator on a 2-core machine:

* ``mlp``: `kiln serve` with a weight-bound MLP (2048 wide, two MatMuls, ~3 ms per request on
  one core). Its knee moves with whatever else the shared machine's two cores are doing;
* ``delay``: the embedded server with the harness's ``DelayFactory`` (a real ONNX Runtime runner
  plus a 5 ms sleep per request): an M/D/1 queue whose knee is set by the sleep, not by CPU
  left over by other processes, so sweep and search measure the same thing.

Every level, in both methods, is ``--warmup`` seconds of warm-up and ``--level`` seconds measured
(open loop, Poisson arrivals).

* **fine sweep** (the baseline, what one does by hand, fine enough to be the reference for a 10 %
  goal): a 1 s closed-loop run at concurrency 16 for the throughput ceiling X, then rates from
  2.5 % to 120 % of X in steps of 2.5 % of X, stopping after three failing levels in a row. The
  true knee: the highest level with every level up to it meeting the SLO.
* **search**: ``kiln bench --find-capacity`` (probe, exponential, interpolated bisection to 5 %,
  two confirming repeats, certainly-failed levels stopped early).

The machine is shared, so what it can serve drifts: the first search is interleaved level by level
with the sweep (each method's time counts only its own levels), and a second search runs alone
afterwards.
Goal: capacity within 10 % of the true knee, in under a third of the sweep's time.

    .venv/bin/python benchmarks/bench_capacity.py [--slo-p99-ms 50] [--level 3] [--warmup 0.5]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builders.model_config import ServingOptions, config_text, render_config
from builders.tensors import TensorSpec
from harness.serve import PAIR_SPECS, make_pair_model, write_model
from harness.serve_bench import RESULTS, child_server, kiln_serve, mlp_repo
from runtime.machine import probe_cpu
from server.bench import BenchConfig, run_bench
from server.bench.capacity import CapacityResult, Run, SearchSettings, Slo, find_capacity, judge
from server.bench.capacity_load import search_endpoint
from server.bench.stats import LoadPoint

WIDTH = 2048
DELAY_S = 0.005
_DELAY_SERVE = """
import signal, sys, threading
from pathlib import Path
from harness.serve import DelayFactory
from server.app import start_server
handle = start_server(Path(sys.argv[1]), runner_factory=DelayFactory(float(sys.argv[2])))
print(f"listening on {handle.url}", flush=True)
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
done.wait()
handle.stop()
"""


def delay_repository(root: Path) -> str:
    pair = make_pair_model(root / "onnx" / "pair.onnx")
    write_model(root / "repo", "pair", {1: pair}, *PAIR_SPECS, ServingOptions(max_batch_size=8, dynamic_batching=False))
    return "pair"


def repository(root: Path) -> str:
    """``mlp`` as ``kiln build`` would configure it, but one request at a time (no dynamic batching)."""
    _, name = mlp_repo(root, WIDTH)
    specs = (TensorSpec("x", "float32", (-1, WIDTH)),), (TensorSpec("y", "float32", (-1, WIDTH)),)
    options = ServingOptions(max_batch_size=32, dynamic_batching=False)
    (root / name / "config.pbtxt").write_text(config_text(render_config(name, "ort", *specs, options)))
    return name


class SimEndpoint:
    """``--server sim``: an M/M/1 queue (service rate ``mu``) with lognormal noise on p99, in virtual time.

    p99 of the time in system is ln(100) / (mu - rate), so the true knee is known: mu - ln(100) / SLO.
    ``spent`` adds up what each level would take (probe 1.5 s; warm-up + level; with ``stoppable``, a
    level ends once 1.2 % of its expected requests were over the SLO, as the search's stop rule
    does: the share over the SLO is exp(-(mu - rate) x SLO) for M/M/1, 1 when overloaded).
    """

    def __init__(self, mu: float, slo: Slo, warmup_s: float, noise: float = 0.1, seed: int = 0) -> None:
        self.mu, self.slo, self.warmup_s, self.noise = mu, slo, warmup_s, noise
        self.rng = np.random.default_rng(seed)
        self.spent = 0.0

    def level(self, load: float, seconds: float, mode: str, stoppable: bool = False) -> LoadPoint:
        if mode == "concurrency":
            self.spent += 1.5
        else:
            over = 1.0 if load >= self.mu else math.exp(-(self.mu - load) * self.slo.p99_ms / 1e3)
            self.spent += (self.warmup_s + seconds) * (min(1.0, 0.012 / over) if stoppable else 1.0)
        rate = load if mode == "rate" else self.mu * load / (load + 1)
        if rate >= self.mu:
            p99_s, ok_rps = max(seconds * (rate - self.mu) / self.mu, 1.0), self.mu
        else:
            p99_s, ok_rps = math.log(100) / (self.mu - rate), rate
        p99_s *= math.exp(self.noise * self.rng.standard_normal())
        ok = max(1, int(ok_rps * seconds))
        latency = {"p50": p99_s * 1e6 * math.log(2) / math.log(100), "p99": p99_s * 1e6, "max": p99_s * 2e6}
        return LoadPoint(mode, load, ok, {}, seconds, ok / seconds, latency, sent_rps=load if mode == "rate" else 0.0)


class Sweep:
    """The fine sweep, one level per ``step()`` call, timing only its own work."""

    def __init__(
        self, url: str, model: str, slo: Slo, settings: SearchSettings, level_s: float, sim: SimEndpoint | None = None
    ) -> None:
        self.url, self.model, self.slo, self.settings, self.level_s = url, model, slo, settings, level_s
        self.sim = sim  # a simulated endpoint: levels cost their nominal time (virtual), not wall time
        self.ceiling = 0.0
        self.points: list[dict[str, Any]] = []
        self.seconds = 0.0
        self.fails = 0

    @property
    def done(self) -> bool:
        return self.fails >= 3 or len(self.points) >= 48

    def step(self) -> None:
        if self.done:
            return
        started = time.perf_counter()
        mark = self.sim.spent if self.sim else 0.0  # the simulated search's clock does not count sweep levels
        if not self.ceiling:  # the sweep's range: 2.5 % .. 120 % of the closed-loop throughput at concurrency 16
            config = BenchConfig(url=self.url, model=self.model, concurrency=(16,), duration_s=1.0, warmup_s=0.5)
            probe = self.sim.level(16, 1.0, "concurrency") if self.sim else run_bench(config).first
            self.ceiling = probe.throughput_rps
            self.seconds += 1.5 if self.sim else 0.0  # (real: counted by the wall clock below)
        rate = float(f"{self.ceiling * 0.025 * (len(self.points) + 1):.3g}")
        config = BenchConfig(
            url=self.url,
            model=self.model,
            rates=(rate,),
            duration_s=self.level_s,
            warmup_s=self.settings.warmup_s,
            seed=len(self.points),
        )
        point = self.sim.level(rate, self.level_s, "rate") if self.sim else run_bench(config).first
        if self.sim:
            self.sim.spent = mark
        verdict = judge(point, self.slo, self.settings)
        self.points.append(
            {
                "rate": rate,
                "p50_ms": point.latency_us["p50"] / 1e3,
                "p99_ms": verdict.p99_ms,
                "error_rate": verdict.error_rate,
                "meets": verdict.meets,
                "cause": verdict.cause,
            }
        )
        print(
            f"  sweep  {rate:7.1f}/s  p50 {self.points[-1]['p50_ms']:7.2f} ms  p99 {verdict.p99_ms:8.2f} ms  "
            f"{'meets' if verdict.meets else verdict.cause}"
        )
        self.fails = 0 if verdict.meets else self.fails + 1
        self.seconds += self.settings.warmup_s + self.level_s if self.sim else time.perf_counter() - started

    def summary(self) -> dict[str, Any]:
        knee = 0.0
        for p in self.points:
            if not p["meets"]:
                break
            knee = p["rate"]
        return {
            "ceiling_rps": self.ceiling,
            "points": self.points,
            "knee": knee,
            "highest_passing": max((p["rate"] for p in self.points if p["meets"]), default=0.0),
            "seconds": self.seconds,
        }


def search(
    url: str,
    model: str,
    slo: Slo,
    settings: SearchSettings,
    between: Callable[[], None] = lambda: None,
    sim: SimEndpoint | None = None,
) -> tuple[CapacityResult, float]:
    """The search; ``between`` runs after each of its levels (interleaving the sweep), not counted in its time."""
    outside = [0.0]

    def on_run(run: Run) -> None:
        verdict = "meets" if run.judgement.meets else run.judgement.cause
        early = f" (stopped early: {run.point.stopped_early})" if run.point.stopped_early else ""
        print(f"  search {run.phase:8s} {run.load:7.1f}  p99 {run.judgement.p99_ms:8.2f} ms  {verdict}{early}")
        started = time.perf_counter()
        between()
        outside[0] += time.perf_counter() - started

    started = time.perf_counter()
    if sim is not None:
        before = sim.spent
        result = find_capacity(
            lambda step: sim.level(step.load or 0.0, step.duration_s, step.mode, True), slo, settings, on_run
        )
        seconds = sim.spent - before
    else:
        result, _ = search_endpoint(BenchConfig(url=url, model=model), slo, settings, on_run)
        seconds = time.perf_counter() - started - outside[0]
    print(f"  -> {result.message}")
    return result, seconds


def plot(found: list[CapacityResult], swept: dict[str, Any], slo: Slo, path: Path, server: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    rates = [p["rate"] for p in swept["points"]]
    ax.plot(rates, [p["p50_ms"] for p in swept["points"]], "o-", label="sweep p50")
    ax.plot(rates, [p["p99_ms"] for p in swept["points"]], "s-", label="sweep p99")
    for index, result in enumerate(found):
        runs = sorted((r for r in result.runs if r.phase != "probe"), key=lambda r: r.load)
        ax.plot(
            [r.load for r in runs],
            [r.judgement.p99_ms for r in runs],
            "x",
            markersize=9,
            label=f"search {index + 1} levels (p99)",
        )
        if result.capacity:
            ax.axvline(
                result.capacity,
                linestyle="--",
                color=f"C{index + 2}",
                label=f"search {index + 1}: {result.capacity:g}/s",
            )
    ax.axvline(swept["knee"], color="black", linestyle=":", label=f"true knee (sweep): {swept['knee']:g}/s")
    ax.axhline(slo.p99_ms, color="gray", linestyle=":", label=f"SLO p99 {slo.p99_ms:g} ms")
    ax.set_yscale("log")
    ax.set_xlabel("offered rate (requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    what = f"mlp{WIDTH} on kiln serve" if server == "mlp" else f"{DELAY_S * 1e3:g} ms per request (M/D/1)"
    ax.set_title(f"capacity search vs fine sweep: {what}, {slo.describe()}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slo-p99-ms", type=float, default=50.0)
    parser.add_argument("--level", type=float, default=3.0, help="measured seconds per level (both methods)")
    parser.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per level (both methods)")
    parser.add_argument("--seed", type=int, default=0, help="sim: the noise's seed")
    parser.add_argument(
        "--server",
        choices=("delay", "mlp", "sim"),
        default="delay",
        help="delay: 5 ms per request, knee set by the sleep; mlp: kiln serve, knee set by CPU; "
        "sim: an M/M/1 queue with noisy p99 in virtual time (the search alone, no machine noise)",
    )
    args = parser.parse_args()
    cpu = probe_cpu()
    print(f"CPU: {cpu.model} ({cpu.cores} cores), ISA: {', '.join(cpu.isa()) or 'none of AVX2/AVX-512/VNNI'}")
    load_before = os.getloadavg()
    print(f"load average before: {load_before[0]:.1f} (1 min), {load_before[1]:.1f} (5 min) on {cpu.cores} cores")
    slo = Slo(args.slo_p99_ms)
    settings = SearchSettings(
        mode="rate",
        start=10,
        min_duration_s=args.level,
        max_duration_s=args.level,
        warmup_s=args.warmup,
        precision=0.05,
        repeats=2,
    )
    if args.server == "sim":
        endpoint = SimEndpoint(mu=200.0, slo=slo, warmup_s=args.warmup, seed=args.seed)
        knee = 200 - math.log(100) / (slo.p99_ms / 1e3)
        print(
            f"simulated M/M/1 at 200 requests/s, p99 noise 10 %; true knee {knee:.1f}/s; {slo.describe()}; "
            f"levels {args.warmup:g} s + {args.level:g} s of virtual time"
        )
        fine = Sweep("", "", slo, settings, args.level, sim=endpoint)
        print("search 1, interleaved with the fine sweep")
        first, first_s = search("", "", slo, settings, fine.step, sim=endpoint)
        while not fine.done:
            fine.step()
        swept = fine.summary()
        print("search 2, alone")
        second, second_s = search("", "", slo, settings, sim=endpoint)
        return report(args, cpu, load_before, slo, swept, first, first_s, second, second_s)
    with tempfile.TemporaryDirectory() as tmp:
        if args.server == "mlp":
            model = repository(Path(tmp))
            server = kiln_serve(Path(tmp))
        else:
            model = delay_repository(Path(tmp))
            server = child_server([sys.executable, "-c", _DELAY_SERVE, str(Path(tmp) / "repo"), str(DELAY_S)])
        with server as url:
            print(
                f"{args.server} server at {url}, model {model}; {slo.describe()}; "
                f"levels {args.warmup:g} s + {args.level:g} s"
            )
            fine = Sweep(url, model, slo, settings, args.level)
            print("search 1, interleaved with the fine sweep (one sweep level after each search level)")
            first, first_s = search(url, model, slo, settings, fine.step)
            while not fine.done:
                fine.step()
            swept = fine.summary()
            print("search 2, alone")
            second, second_s = search(url, model, slo, settings)
    return report(args, cpu, load_before, slo, swept, first, first_s, second, second_s)


def report(
    args: argparse.Namespace,
    cpu: Any,
    load_before: tuple[float, float, float],
    slo: Slo,
    swept: dict[str, Any],
    first: CapacityResult,
    first_s: float,
    second: CapacityResult,
    second_s: float,
) -> int:
    knee = swept["knee"]
    rows = []
    for index, (result, seconds) in enumerate(((first, first_s), (second, second_s)), 1):
        error = abs((result.capacity or 0) - knee) / knee if knee else float("inf")
        share = seconds / swept["seconds"]
        rows.append(
            {
                "capacity": result.capacity,
                "limited_by": result.limited_by,
                "levels": len(result.runs),
                "seconds": seconds,
                "error_vs_knee": error,
                "time_share_of_sweep": share,
                "within_10pct": error <= 0.10,
                "under_a_third": share < 1 / 3,
            }
        )
        print(
            f"search {index}: {result.capacity}/s ({result.limited_by}'s limit) vs true knee {knee:g}/s: "
            f"{error * 100:.1f} % off; {seconds:.1f} s = {share:.2f} of the sweep's {swept['seconds']:.1f} s "
            f"({len(result.runs)} levels vs {len(swept['points'])})"
        )
    if args.server == "sim":  # the noise-free knee is known too
        analytic = 200 - math.log(100) / (slo.p99_ms / 1e3)
        for row in rows:
            row["error_vs_analytic_knee"] = abs((row["capacity"] or 0) - analytic) / analytic
        print(
            f"analytic knee {analytic:.1f}/s: searches "
            + ", ".join(f"{r['error_vs_analytic_knee'] * 100:.1f} %" for r in rows)
            + " off; sweep "
            f"{abs(knee - analytic) / analytic * 100:.1f} % off"
        )
    met = all(r["within_10pct"] and r["under_a_third"] for r in rows)
    load_after = os.getloadavg()
    print(f"load average after: {load_after[0]:.1f} (1 min), {load_after[1]:.1f} (5 min)")
    print(
        f"goal (within 10 % of the knee, < 1/3 of the sweep's time): {'met' if met else 'MISSED'} "
        f"(highest passing sweep level {swept['highest_passing']:g}/s, ceiling {swept['ceiling_rps']:.0f}/s)"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / f"capacity_{args.server}.png"
    plot([first, second], swept, slo, png, args.server)
    data = {
        "cpu": {"model": cpu.model, "isa": cpu.isa()},
        "server": args.server,
        "slo": slo.describe(),
        "load_average": {"before": load_before, "after": load_after},
        "level_s": args.level,
        "warmup_s": args.warmup,
        "sweep": swept,
        "searches": rows,
        "goal_met": met,
        "search_runs": [first.to_dict(), second.to_dict()],
    }
    (RESULTS / f"capacity_{args.server}.json").write_text(json.dumps(data, indent=2, default=str))
    print(f"wrote {RESULTS / f'capacity_{args.server}.json'} and {png}")
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
