"""Latency percentiles (and throughput) against load, as a PNG."""

from __future__ import annotations

from pathlib import Path

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
