"""Dynamic batching on vs off, two ``kiln serve`` processes, one client, in two regimes.

(a) issue conditions: the example model (digits CNN, ~23 µs per sample). Requests are RPC-bound:
    the server's per-request CPU (gRPC, decode, encode) dwarfs the model, and batching can only
    save the model's share, so on this CPU it cannot double throughput.
(b) compute-dominated: ``cnn224``, a 224x224 image CNN with random weights (~185 M multiply-adds,
    a few ms per image on one core). The model dominates; a CNN costs about the same per image in
    a batch as alone on a CPU, so batching mostly trades latency, not throughput.
Also ``mlp`` (two 2048x2048 MatMuls): weight-bound, a batch of 16 costs about what one sample
costs, the case dynamic batching exists for.

Goals: throughput at concurrency 16 with batching / without >= 2x; p99 at concurrency 1
with / without <= 1.1x. Both servers serve the same repository (one instance, one ONNX Runtime
thread); the second is started with ``--no-batching``. Measurements alternate between the two
servers so that background load on this shared machine hits both alike; the best round of each is
kept (p99 at concurrency 1: best of at least two rounds). Each point also reports the server's and
the client's CPU per request; each regime reports the model's own run time (in process) and its
share of the server's CPU per request, which bounds what batching can win on a CPU-bound box.

    .venv/bin/python benchmarks/bench_batching.py [--seconds 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.serve_bench import cnn_repo, digits_repo, kiln_serve, measure, mlp_repo, write_bars, write_results
from runtime.onnxruntime import OrtRunner


def model_run_us(path: Path, name: str, shape: tuple[int, ...], runs: int) -> float:
    """Median in-process ONNX Runtime run of one sample (1 thread): the model's own cost per request."""
    runner = OrtRunner(path, intra_op_threads=1)
    feed = {name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    times = []
    for _ in range(runs + 2):
        start = time.perf_counter_ns()
        runner.run(feed)
        times.append(time.perf_counter_ns() - start)
    runner.close()
    return float(np.median(times[2:])) / 1e3


def compare(urls: dict[str, str], model: str, seconds: float, rounds: int, run_us: float) -> dict[str, Any]:
    results: dict[str, dict[int, list[dict[str, Any]]]] = {"on": {1: [], 16: []}, "off": {1: [], 16: []}}
    for index in range(max(rounds, 2)):
        for concurrency in (16, 1) if index < rounds else (1,):  # p99 at c1 always gets two rounds
            for mode in ("on", "off"):
                results[mode][concurrency].append(measure(urls[mode], model, concurrency, seconds))
    best16 = {m: max(results[m][16], key=lambda p: p["throughput_rps"]) for m in results}
    best1 = {m: min(results[m][1], key=lambda p: p["p99_us"]) for m in results}
    share = min(run_us / best16["off"]["server_cpu_us_per_request"], 1.0)
    return {
        "batching_on": {"c16": best16["on"], "c1": best1["on"]},
        "batching_off": {"c16": best16["off"], "c1": best1["off"]},
        "throughput_ratio_c16": round(best16["on"]["throughput_rps"] / best16["off"]["throughput_rps"], 2),
        "p99_ratio_c1": round(best1["on"]["p99_us"] / best1["off"]["p99_us"], 2),
        "model_run_us_in_process": round(run_us, 1),
        "model_share_of_server_cpu_c16_off": round(share, 3),
        # if batching made the model free and nothing else changed, CPU-bound throughput would rise by:
        "batching_ceiling_if_model_were_free": round(1 / (1 - share), 2) if share < 1 else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2, help="rounds for the example model (others: one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp, contextlib.ExitStack() as stack:
        repo, digits = digits_repo(Path(tmp) / "repo")
        _, cnn = cnn_repo(repo)
        _, mlp = mlp_repo(repo)
        urls = {
            "on": stack.enter_context(kiln_serve(repo)),
            "off": stack.enter_context(kiln_serve(repo, "--no-batching")),
        }
        inputs = {digits: ("input", (1, 1, 8, 8), 300), cnn: ("x", (1, 3, 224, 224), 20), mlp: ("x", (1, 2048), 30)}
        runs = {model: model_run_us(repo / model / "1" / "model.onnx", *spec) for model, spec in inputs.items()}
        regimes = {
            f"(a) issue conditions: {digits}": compare(urls, digits, args.seconds, args.rounds, runs[digits]),
            f"(b) compute-dominated: {cnn} 224x224 CNN": compare(urls, cnn, args.seconds, 1, runs[cnn]),
            f"weight-bound: {mlp} (2x MatMul 2048)": compare(urls, mlp, args.seconds, 1, runs[mlp]),
        }
    write_bars(
        "serve_batching",
        "kiln serve, concurrency 16: dynamic batching on / off (throughput ratio)",
        "throughput ratio on/off",
        {"on / off": {name.split(": ")[1].split()[0]: f["throughput_ratio_c16"] for name, f in regimes.items()}},
    )
    write_results(
        "serve_batching",
        {
            "config": "max_batch_size 32 (cnn224: 16), preferred 16/32 (cnn224: 8/16), max_queue_delay 500 us, "
            "1 instance, 1 ORT thread; client kiln bench on the same 2-core machine",
            "goals": "throughput_ratio_c16 >= 2.0, p99_ratio_c1 <= 1.1",
            **regimes,
        },
    )


if __name__ == "__main__":
    main()
