"""``kiln serve`` vs a real Triton 2.51 serving the same ONNX through its Python backend.

Both serve the example model's built ``model.onnx`` with one instance, one ONNX Runtime intra-op
thread, max_batch_size 32 and dynamic batching (500 µs); the same ``kiln bench`` client drives
each in turn at concurrency 1 and 16. Figure: throughput ratio kiln/Triton at concurrency 16
(goal >= 1.0). Skips with a message when the Triton harness cannot run here.

    .venv/bin/python benchmarks/bench_vs_triton.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_harness import digits_repo, kiln_serve, write_bars, write_results

from builders.errors import KilnError
from server.bench import BenchConfig, LoadPoint, run_bench

LEVELS = (1, 16)


def measure(url: str, model: str, seconds: float) -> dict[int, LoadPoint]:
    config = BenchConfig(url=url, model=model, concurrency=LEVELS, duration_s=seconds, warmup_s=0.5)
    return {int(p.load): p for p in run_bench(config).points}


def figures(points: dict[int, LoadPoint]) -> dict[str, Any]:
    return {
        f"c{c}": {
            "throughput_rps": round(p.throughput_rps, 1),
            "p50_us": round(p.latency_us["p50"], 1),
            "p99_us": round(p.latency_us["p99"], 1),
            "errors": p.errors,
        }
        for c, p in points.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    try:
        from server.testing.triton import (
            default_venv_path,
            ensure_triton_venv,
            start_triton,
            write_python_backend_model,
        )

        install = ensure_triton_venv(default_venv_path())
    except (ImportError, KilnError) as err:
        print(f"SKIPPED: the real Triton server is not available here ({err}); run benchmarks/triton_setup.sh")
        write_results("serve_vs_triton", {"skipped": str(err)})
        return
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        repo, model = digits_repo(Path(tmp) / "kiln")
        with kiln_serve(repo) as url:
            kiln = measure(url, model, args.seconds)
        triton_repo = Path(tmp) / "triton"
        onnx_path = repo / model / "1" / "model.onnx"
        write_python_backend_model(
            triton_repo, model, onnx_path, 32, True, max_queue_delay_us=500, instance_count=1, intra_op_threads=1
        )
        with start_triton(install, triton_repo) as triton:
            theirs = measure(triton.grpc_url, model, args.seconds)
    write_bars(
        "serve_vs_triton",
        f"{model}: kiln serve vs Triton 2.51 (Python backend), same client",
        "throughput (requests/s)",
        {
            "kiln serve": {f"c{c}": kiln[c].throughput_rps for c in LEVELS},
            "Triton python backend": {f"c{c}": theirs[c].throughput_rps for c in LEVELS},
        },
    )
    top = max(LEVELS)
    ratio = kiln[top].throughput_rps / theirs[top].throughput_rps if theirs[top].throughput_rps else float("nan")
    write_results(
        "serve_vs_triton",
        {
            "model": model,
            "triton": install.versions,
            "kiln": figures(kiln),
            "triton_python_backend": figures(theirs),
            f"throughput_ratio_c{top}": round(ratio, 2),
            "p50_ratio_c1": round(kiln[1].latency_us["p50"] / theirs[1].latency_us["p50"], 2),
            "goal": f"throughput_ratio_c{top} >= 1.0",
        },
    )


if __name__ == "__main__":
    main()
