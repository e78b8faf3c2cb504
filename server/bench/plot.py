"""Latency percentiles (and throughput) against load, as a PNG."""

from __future__ import annotations

from pathlib import Path

from server.bench.capacity import CapacityResult
from server.bench.stats import PERCENTILES, BenchResult


def plot_result(result: BenchResult, path: Path) -> Path:
    """Write ``path``: latency percentiles vs concurrency or rate, throughput on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(result.points, key=lambda p: p.load)
    loads = [p.load for p in points]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, _ in (*PERCENTILES, ("max", 100.0)):
        ax.plot(loads, [p.latency_us[name] / 1e3 for p in points], marker="o", label=name)
    mode = points[0].mode if points else "concurrency"
    ax.set_xlabel("concurrency (requests in flight)" if mode == "concurrency" else "offered rate (requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    if len(set(loads)) > 1 and min(loads) > 0:
        ax.set_xscale("log")
    ax.grid(True, which="both", alpha=0.3)
    twin = ax.twinx()
    twin.plot(loads, [p.throughput_rps for p in points], color="black", linestyle="--", marker="s", label="throughput")
    twin.set_ylabel("throughput (requests/s)")
    lines, labels = ax.get_legend_handles_labels()
    more, more_labels = twin.get_legend_handles_labels()
    ax.legend(lines + more, labels + more_labels, loc="upper left", fontsize=8)
    version = f" v{result.version}" if result.version else ""
    ax.set_title(f"{result.model}{version} at {result.url}, batch {result.batch}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_capacity(result: CapacityResult, path: Path, title: str) -> Path:
    """Write ``path``: p50/p99 and error rate vs offered load, every run of the search, the SLO and the knee."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted((r for r in result.runs if r.phase != "probe"), key=lambda r: r.load)  # the probe is closed loop
    loads = [r.load for r in runs]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, style in (("p50", "o-"), ("p99", "s-")):
        ax.plot(loads, [r.point.latency_us.get(name, float("nan")) / 1e3 for r in runs], style, label=name)
    failed = [r for r in runs if not r.judgement.meets]
    if failed:
        ax.plot(
            [r.load for r in failed],
            [r.judgement.p99_ms for r in failed],
            "x",
            color="red",
            markersize=10,
            label="level failed the SLO",
        )
    ax.axhline(result.slo.p99_ms, color="gray", linestyle=":", label=f"SLO p99 {result.slo.p99_ms:g} ms")
    if result.capacity is not None:
        ax.axvline(
            result.capacity,
            color="green",
            linestyle="--",
            label=f"knee: {result.capacity:g} ({result.limited_by}'s limit)",
        )
    mode = result.mode
    ax.set_xlabel("offered rate (requests/s)" if mode == "rate" else "concurrency (requests in flight)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    twin = ax.twinx()
    errors = [100 * r.judgement.error_rate for r in runs]
    twin.plot(loads, errors, color="darkred", linestyle="--", marker="^", label="errors (%)")
    twin.set_ylabel("errors (%)")
    twin.set_ylim(0, max(5.0, max(errors, default=0.0) * 1.1))
    lines, labels = ax.get_legend_handles_labels()
    more, more_labels = twin.get_legend_handles_labels()
    ax.legend(lines + more, labels + more_labels, loc="upper left", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
