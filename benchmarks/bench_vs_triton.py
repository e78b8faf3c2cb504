"""``kiln serve`` vs a real Triton 2.51 serving the same ONNX through its Python backend.

Two regimes, same client (``kiln bench``), same machine, each server measured in turn:
(a) issue conditions: the example model (digits, ~23 µs per sample): RPC-bound, so the figure is
    Python gRPC's per-request cost against Triton's C++ frontend;
(b) compute-dominated: ``cnn224``, a 224x224 image CNN with random weights (a few ms per image).
Both servers run one instance, one ONNX Runtime intra-op thread and dynamic batching with the
model's own max_batch_size and 500 µs delay. Figures: throughput ratio kiln/Triton at concurrency 16
(goal >= 1.0), p50 ratio at concurrency 1, and each server's CPU per request (its process tree, from
/proc). Skips with a message when the Triton harness cannot run here.

    .venv/bin/python benchmarks/bench_vs_triton.py [--seconds 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.errors import KilnError
from harness.serve_bench import cnn_repo, digits_repo, kiln_serve, measure, write_bars, write_results

LEVELS = (1, 16)


def measure_levels(url: str, model: str, seconds: float, pid: int | None = None) -> dict[str, Any]:
    return {f"c{c}": measure(url, model, c, seconds, pid) for c in LEVELS}


def ratios(kiln: dict[str, Any], triton: dict[str, Any]) -> dict[str, float]:
    top = f"c{max(LEVELS)}"
    return {
        f"throughput_ratio_{top}": round(kiln[top]["throughput_rps"] / triton[top]["throughput_rps"], 2),
        "p50_ratio_c1": round(kiln["c1"]["p50_us"] / triton["c1"]["p50_us"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    try:
        from harness.triton.cli import (
            default_venv_path,
            ensure_triton_venv,
            start_triton,
            write_python_backend_model,
        )

        install = ensure_triton_venv(default_venv_path())
    except (ImportError, KilnError) as err:
        print(f"SKIPPED: the real Triton server is not available here ({err}); run harness/triton_setup.sh")
        write_results("serve_vs_triton", {"skipped": str(err)})
        return
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        repo, digits = digits_repo(Path(tmp) / "kiln")
        _, cnn = cnn_repo(repo)
        models = {
            f"(a) issue conditions: {digits}": (digits, 32),
            f"(b) compute-dominated: {cnn} 224x224 CNN": (cnn, 16),
        }
        kiln: dict[str, dict[str, Any]] = {}
        with kiln_serve(repo) as url:
            for label, (model, _) in models.items():
                kiln[label] = measure_levels(url, model, args.seconds)
        triton_repo = Path(tmp) / "triton"
        for model, max_batch in models.values():
            onnx_path = repo / model / "1" / "model.onnx"
            write_python_backend_model(
                triton_repo,
                model,
                onnx_path,
                max_batch,
                True,
                max_queue_delay_us=500,
                instance_count=1,
                intra_op_threads=1,
            )
        theirs: dict[str, dict[str, Any]] = {}
        with start_triton(install, triton_repo) as triton:
            for label, (model, _) in models.items():
                theirs[label] = measure_levels(triton.grpc_url, model, args.seconds, triton.process.pid)
    write_bars(
        "serve_vs_triton",
        "kiln serve vs Triton 2.51 (Python backend), same client: throughput ratio",
        "kiln / Triton throughput",
        {
            f"c{c}": {
                label.split(": ")[1].split()[0]: kiln[label][f"c{c}"]["throughput_rps"]
                / theirs[label][f"c{c}"]["throughput_rps"]
                for label in models
            }
            for c in LEVELS
        },
    )
    write_results(
        "serve_vs_triton",
        {
            "triton": install.versions,
            "config": "one instance, 1 ORT intra-op thread, dynamic batching 500 us; client kiln bench, same 2 cores",
            "goal": f"throughput_ratio_c{max(LEVELS)} >= 1.0",
            **{
                label: {
                    "kiln": kiln[label],
                    "triton_python_backend": theirs[label],
                    **ratios(kiln[label], theirs[label]),
                }
                for label in models
            },
        },
    )


if __name__ == "__main__":
    main()
