"""Server overhead and the load generator's ceiling, on a trivial (identity) model.

* Overhead: p50 latency at concurrency 1 of ``kiln serve`` (child process, gRPC on 127.0.0.1,
  measured by ``kiln bench``'s client) minus p50 of the same ONNX Runtime session called
  in-process: the microseconds the protocol and the server add.
* Floor: the same client against a bare Python gRPC servicer that echoes its input
  (``grpc_echo.py``), in both flavours: grpc.aio (what ``kiln serve`` runs) and grpc's
  thread-pool server: what any Python gRPC server costs before doing anything.
* Ceiling: requests/s ``kiln bench`` drives against the echo server at concurrency 32; the client
  and server share this machine's cores, so this is a lower bound of the client's own ceiling.
* Server CPU per request (its process, from /proc) for each of those, the figure that bounds
  throughput on a small machine.

    .venv/bin/python benchmarks/bench_overhead.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.serve_bench import grpc_echo, identity_repo, kiln_serve, measure, write_results
from runtime.onnxruntime import OrtRunner


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
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        repo = identity_repo(Path(tmp) / "repo")
        direct = in_process_p50_us(repo / "identity" / "1" / "model.onnx", min(args.seconds, 1.0))
        with kiln_serve(repo) as url:
            c1 = measure(url, "identity", 1, args.seconds)
            c32 = measure(url, "identity", 32, args.seconds)
        echo: dict[str, dict[str, dict[str, Any]]] = {}
        for flavour, extra in (("threads", ("--threads",)), ("aio", ())):
            with grpc_echo(*extra) as url:
                echo[flavour] = {"c1": measure(url, "identity", 1, args.seconds)}
                echo[flavour]["c32"] = measure(url, "identity", 32, args.seconds)
    floor = echo["aio"]["c1"]
    write_results(
        "serve_overhead",
        {
            "model": "identity float32[1,16]",
            "cpus": os.cpu_count(),
            "server": "kiln serve: grpc.aio server",
            "in_process_p50_us": round(direct, 1),
            "kiln_serve_c1": c1,
            "added_p50_us": round(c1["p50_us"] - direct, 1),
            "kiln_over_grpc_echo_aio_p50_us": round(c1["p50_us"] - float(floor["p50_us"]), 1),
            "kiln_serve_c32": c32,
            "grpc_echo_threads": echo["threads"],
            "grpc_echo_aio": echo["aio"],
            "bench_ceiling_rps_c32": max(float(e["c32"]["throughput_rps"]) for e in echo.values()),
        },
    )


if __name__ == "__main__":
    main()
