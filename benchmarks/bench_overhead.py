"""Server overhead and the load generator's ceiling, on a trivial (identity) model.

* Overhead: p50 latency at concurrency 1 of ``kiln serve`` (child process, gRPC on 127.0.0.1,
  measured by ``kiln bench``'s client) minus p50 of the same ONNX Runtime session called
  in-process: the microseconds the protocol and the server add.
* Floor: the same client against a bare Python gRPC servicer that echoes its input
  (``grpc_echo.py``): what any Python gRPC server costs before doing anything.
* Ceiling: requests/s ``kiln bench`` drives against that server at concurrency 32; the client and
  server share this machine's cores, so this is a lower bound of the client's own ceiling.

    .venv/bin/python benchmarks/bench_overhead.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_harness import grpc_echo, identity_repo, kiln_serve, write_results

from server.backends.onnxruntime import OrtRunner
from server.bench import BenchConfig, run_bench


def in_process_p50_us(model: Path, seconds: float) -> float:
    runner = OrtRunner(model, intra_op_threads=1)
    x = {"x": np.ones((1, 16), np.float32)}
    times = []
    end = time.perf_counter_ns() + int(seconds * 1e9)
    while time.perf_counter_ns() < end:
        start = time.perf_counter_ns()
        runner.run(x)
        times.append(time.perf_counter_ns() - start)
    return float(np.percentile(times, 50)) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        repo = identity_repo(Path(tmp) / "repo")
        direct = in_process_p50_us(repo / "identity" / "1" / "model.onnx", min(args.seconds, 1.0))
        with kiln_serve(repo) as url:
            c1 = run_bench(BenchConfig(url=url, model="identity", duration_s=args.seconds, warmup_s=0.5)).first
            ceiling = run_bench(
                BenchConfig(url=url, model="identity", concurrency=(32,), duration_s=args.seconds, warmup_s=0.5)
            ).first
        with grpc_echo() as url:
            echo1 = run_bench(BenchConfig(url=url, model="identity", duration_s=args.seconds, warmup_s=0.5)).first
            echo32 = run_bench(
                BenchConfig(url=url, model="identity", concurrency=(32,), duration_s=args.seconds, warmup_s=0.5)
            ).first
    write_results(
        "serve_overhead",
        {
            "model": "identity float32[1,16]",
            "cpus": os.cpu_count(),
            "in_process_p50_us": round(direct, 1),
            "kiln_serve_p50_us": round(c1.latency_us["p50"], 1),
            "kiln_serve_p99_us": round(c1.latency_us["p99"], 1),
            "added_p50_us": round(c1.latency_us["p50"] - direct, 1),
            "c1_throughput_rps": round(c1.throughput_rps, 1),
            "grpc_echo_p50_us": round(echo1.latency_us["p50"], 1),
            "kiln_over_grpc_echo_p50_us": round(c1.latency_us["p50"] - echo1.latency_us["p50"], 1),
            "grpc_echo_rps_c32": round(echo32.throughput_rps, 1),
            "bench_ceiling_rps_c32": round(ceiling.throughput_rps, 1),
            "bench_ceiling_p50_us_c32": round(ceiling.latency_us["p50"], 1),
            "errors": {**c1.errors, **ceiling.errors},
        },
    )


if __name__ == "__main__":
    main()
