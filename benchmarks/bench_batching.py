"""Dynamic batching on vs off, two ``kiln serve`` processes, one client.

Two models: the example (digits CNN, ~23 µs per sample: RPC-bound, batching saves little on a CPU)
and ``mlp`` (two 2048x2048 MatMuls: weight-bound, a batch of 16 costs about what one sample costs,
the case dynamic batching exists for).

Goals: throughput at concurrency 16 with batching / without >= 2x; p99 at concurrency 1 with
batching / without <= 1.1x. Both servers run the same repository (one instance, one ONNX Runtime
thread); the second is started with ``--no-batching``. Measurements alternate between the two
servers (two rounds) so that background load on this shared machine hits both alike; the best
round of each is kept.

    .venv/bin/python benchmarks/bench_batching.py [--seconds 2.5]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_harness import digits_repo, kiln_serve, mlp_repo, write_bars, write_results

from server.bench import BenchConfig, LoadPoint, run_bench


def point(url: str, model: str, concurrency: int, seconds: float) -> LoadPoint:
    config = BenchConfig(url=url, model=model, concurrency=(concurrency,), duration_s=seconds, warmup_s=0.5)
    return run_bench(config).first


def summary(p: LoadPoint) -> dict[str, Any]:
    return {
        "throughput_rps": round(p.throughput_rps, 1),
        "p50_us": round(p.latency_us["p50"], 1),
        "p99_us": round(p.latency_us["p99"], 1),
        "errors": p.errors,
    }


def compare(urls: dict[str, str], model: str, seconds: float, rounds: int) -> dict[str, Any]:
    results: dict[str, dict[int, list[LoadPoint]]] = {"on": {1: [], 16: []}, "off": {1: [], 16: []}}
    for _ in range(rounds):
        for concurrency in (16, 1):
            for mode in ("on", "off"):
                results[mode][concurrency].append(point(urls[mode], model, concurrency, seconds))
    best16 = {m: max(results[m][16], key=lambda p: p.throughput_rps) for m in results}
    best1 = {m: min(results[m][1], key=lambda p: p.latency_us["p99"]) for m in results}
    return {
        "batching_on": {"c16": summary(best16["on"]), "c1": summary(best1["on"])},
        "batching_off": {"c16": summary(best16["off"]), "c1": summary(best1["off"])},
        "throughput_ratio_c16": round(best16["on"].throughput_rps / best16["off"].throughput_rps, 2),
        "p99_ratio_c1": round(best1["on"].latency_us["p99"] / best1["off"].latency_us["p99"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2, help="rounds for the example model (mlp: one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp, contextlib.ExitStack() as stack:
        repo, digits = digits_repo(Path(tmp) / "repo")
        _, mlp = mlp_repo(repo)
        urls = {
            "on": stack.enter_context(kiln_serve(repo)),
            "off": stack.enter_context(kiln_serve(repo, "--no-batching")),
        }
        example = compare(urls, digits, args.seconds, args.rounds)
        heavy = compare(urls, mlp, args.seconds, 1)
    write_bars(
        "serve_batching",
        "kiln serve, concurrency 16: dynamic batching on vs off",
        "throughput (requests/s)",
        {
            mode: {
                name: figures[f"batching_{mode}"]["c16"]["throughput_rps"]
                for name, figures in ((digits, example), ("mlp", heavy))
            }
            for mode in ("on", "off")
        },
    )
    write_results(
        "serve_batching",
        {
            "config": "max_batch_size 32, preferred 16/32, max_queue_delay 500 us, 1 instance, 1 ORT thread",
            "goals": "throughput_ratio_c16 >= 2.0, p99_ratio_c1 <= 1.1",
            digits: example,
            "mlp (2x MatMul 2048)": heavy,
        },
    )


if __name__ == "__main__":
    main()
