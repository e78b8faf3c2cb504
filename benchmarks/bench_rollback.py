"""How fast a rollback takes effect, against the time of one request measured in the same run.

In one process: the embedded server (example model, twice: baseline and candidate), the gateway
with the rollout plugin, and a closed-loop tritonclient load. Each cycle starts a rollout at 50 %
and aborts it; the time from the abort command to the route-table swap is the rollback latency.
Also the cost of one controller tick (reading the windows and deciding) with a busy window.

    .venv/bin/python benchmarks/bench_rollback.py [--cycles 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from builders.examples import example_model_path  # noqa: E402
from builders.pipeline import build_model  # noqa: E402
from builders.request import BuildRequest  # noqa: E402
from harness.rollout import Load  # noqa: E402
from server.app import start_server  # noqa: E402
from server.gateway.app import start_gateway  # noqa: E402
from server.rollout.machine import Command  # noqa: E402
from server.rollout.plan import plan_from_mapping  # noqa: E402
from server.rollout.plugin import controller_for  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50_ms": round(statistics.median(ordered) * 1e3, 4),
        "max_ms": round(ordered[-1] * 1e3, 4),
        "n": len(ordered),
    }


def run(cycles: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        for name in ("digits", "next"):
            build_model(BuildRequest(model=example_model_path(), name=name, precision="fp32", target="ort", repo=repo))
        with start_server(repo, port=0) as server:
            config = {
                "upstreams": {"local": {"address": server.url}},
                "routes": {
                    "digits": {
                        "variants": [{"name": "fp32", "upstream": "local", "model": "digits-fp32-ort", "weight": 100}]
                    }
                },
            }
            with (
                start_gateway(config, port=0, admin_port=0, insecure_admin=True) as gw,
                Load(gw.address, "digits", threads=2, max_s=120) as load,
            ):
                controller = controller_for(gw)
                swapped: list[float] = []
                gw.routes.add_listener(lambda snap, change: swapped.append(time.perf_counter()))
                plan = plan_from_mapping(
                    {
                        "route": "digits",
                        "baseline": "fp32",
                        "candidate": {"name": "cand", "upstream": "local", "model": "next-fp32-ort"},
                        "steps": [50, 100],
                        "interval_s": 3600,
                        "shadow": None,
                    }
                )
                latencies, ticks = [], []
                for _ in range(cycles):
                    controller.start(plan)
                    time.sleep(0.2)  # traffic on both variants
                    began = time.perf_counter()
                    controller.tick()
                    ticks.append(time.perf_counter() - began)
                    began = time.perf_counter()
                    controller.command("digits", Command.ABORT)
                    latencies.append(swapped[-1] - began)
                load.stop()
                window = gw.metrics.window("digits", "fp32", 60.0)
                requests = [end - start for start, end, ok in load.result.calls if ok]
    request_p50 = statistics.median(requests)
    swap = _ms(latencies)
    return {
        "rollback_swap": swap,
        "controller_tick": _ms(ticks),
        "client_request": _ms(requests),
        "gateway_window_requests": window.requests,
        "swap_over_request_p50": round(swap["p50_ms"] / (request_p50 * 1e3), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=20)
    args = parser.parse_args()
    figures = run(args.cycles)
    print(json.dumps(figures, indent=2))
    print(f"rollback swap p50 = {figures['swap_over_request_p50']}x one client request's p50 (goal <= 1)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "rollback.json").write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
