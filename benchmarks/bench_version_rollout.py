"""A version rollout under load, and how fast a poll-mode server picks up a new version.

Part 1: ``kiln serve --model-control-mode explicit`` serves version 1 of ``digits-fp32-ort``;
version 2 is published while it runs (not loaded). Through the gateway, closed-loop load at
concurrency 8 runs during the whole version rollout: load v2 on the upstream (repository API),
shadow, steps, promote, retire v1. Goal: zero failed client requests. Reported: time from
``rollout start`` to the first candidate traffic (the route swap that sends it shadow copies),
against the same figure for a candidate that is already loaded (the baseline, same run).

Part 2: ``--model-control-mode poll --repository-poll-secs P``; each new version is published
atomically and the time until ``ModelReady`` on it is measured. Goal: within P + 1 s.

    .venv/bin/python benchmarks/bench_version_rollout.py [--poll-secs 1.0] [--versions 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tritonclient.grpc as tc  # noqa: E402

from builders.examples import example_model_path  # noqa: E402
from builders.pipeline import build_model  # noqa: E402
from builders.request import BuildRequest  # noqa: E402
from harness.rollout import Load  # noqa: E402
from runtime.machine import probe_machine  # noqa: E402
from server.app import start_server  # noqa: E402
from server.gateway.app import start_gateway  # noqa: E402
from server.rollout.machine import Command  # noqa: E402
from server.rollout.plan import plan_from_mapping  # noqa: E402
from server.rollout.plugin import controller_for  # noqa: E402
from server.rollout.timeline import plot_rollouts, run_rollout  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODEL = "digits-fp32-ort"
CONCURRENCY = 8


def _plan(route: str, baseline: str, candidate: dict[str, str], **extra: Any) -> Any:
    return plan_from_mapping(
        {
            "route": route,
            "baseline": baseline,
            "candidate": candidate,
            "steps": [10, 50, 100],
            "interval_s": 1.0,
            "min_requests": 20,
            "max_wait_s": 30,
            "shadow": {"duration_s": 1.0, "percent": 100, "min_comparisons": 20},
            "sample_percent": 20,
            "min_comparisons": 10,
            "ready_timeout_s": 60,
            # a loose p99 ratio: this measures the flow and client errors, not latency noise on a shared box
            "slos": {"max_error_rate": 0.0, "max_p99_ratio": 20.0, "min_agreement": 0.95},
            **extra,
        }
    )


def _first_candidate_route(
    swaps: list[tuple[float, dict[str, Any]]], route: str, candidate: str, since: float
) -> float:
    for at, routes in swaps:
        variants = routes.get(route, {}).get("variants", [])
        if at >= since and any(v["name"] == candidate for v in variants):
            return at - since
    raise RuntimeError(f"the candidate {candidate!r} never entered route {route!r}")


def version_rollout(tmp: Path) -> dict[str, Any]:
    repo = tmp / "repo"
    example = example_model_path()
    build_model(BuildRequest(model=example, name="digits", repo=repo))
    build_model(BuildRequest(model=example, name="other", repo=repo))
    with start_server(repo, port=0, model_control_mode="explicit") as server:
        build_model(BuildRequest(model=example, name="digits", repo=repo))  # version 2: published, not loaded
        client = tc.InferenceServerClient(server.url)
        assert not client.is_model_ready(MODEL, "2")
        config = {
            "upstreams": {"local": {"address": server.url}},
            "routes": {
                "digits": {
                    "variants": [{"name": "v1", "upstream": "local", "model": MODEL, "version": "1", "weight": 100}]
                },
                "warm": {
                    "variants": [
                        {"name": "a", "upstream": "local", "model": "other-fp32-ort", "version": "1", "weight": 100}
                    ]
                },
            },
            "metrics": {"window_s": 30},
        }
        with start_gateway(config, port=0, admin_port=0, insecure_admin=True) as gw:
            swaps: list[tuple[float, dict[str, Any]]] = []
            gw.routes.add_listener(lambda snap, change: swaps.append((time.perf_counter(), snap.to_dict()["routes"])))
            controller = controller_for(gw)
            with Load(gw.address, "digits", threads=CONCURRENCY, max_s=300) as load:
                # baseline: a candidate that is already loaded (no repository call needed)
                began = time.perf_counter()
                controller.start(_plan("warm", "a", {"name": "b", "upstream": "local", "model": MODEL, "version": "1"}))
                warm_s = _first_candidate_route(swaps, "warm", "b", began)
                controller.command("warm", Command.ABORT)
                # the version rollout: load v2, shadow, steps, promote, retire v1
                began = time.perf_counter()
                run = run_rollout(
                    gw,
                    _plan(
                        "digits",
                        "v1",
                        {"name": "v2", "upstream": "local", "model": MODEL, "version": "2"},
                        retire_previous=True,
                    ),
                    timeout_s=120,
                )
                cold_s = _first_candidate_route(swaps, "digits", "v2", began)
                for _ in range(600):  # retirement follows promotion on the next controller tick
                    if controller.status("digits").get("retire"):
                        break
                    time.sleep(0.05)
                retire = controller.status("digits").get("retire")
                load.stop()
        v1_ready, v2_ready = client.is_model_ready(MODEL, "1"), client.is_model_ready(MODEL, "2")
        client.close()
    ready = next(e for e in run.events if e["kind"] == "candidate_ready")["figures"]["upstreams"][0]
    requests = [end - start for start, end, ok in load.result.calls if ok]
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = plot_rollouts([run], RESULTS / "version_rollout.png")
    return {
        "outcome": run.outcome,
        "retire": retire,
        "served_after": {"v1": v1_ready, "v2": v2_ready},
        "concurrency": CONCURRENCY,
        "client_requests": len(load.result.calls),
        "client_failed": load.result.errors(),
        "client_p50_ms": round(statistics.median(requests) * 1e3, 3),
        "rollout_s": round(run.duration_s, 2),
        "start_to_first_candidate_traffic_s": round(cold_s, 3),
        "candidate_load_s": ready["waited_s"],
        "baseline_already_loaded_s": round(warm_s, 4),
        "ratio_vs_already_loaded": round(cold_s / warm_s, 1) if warm_s > 0 else None,
        "plot": str(png),
    }


def poll_pickup(tmp: Path, poll_s: float, versions: int) -> dict[str, Any]:
    repo = tmp / "poll-repo"
    example = example_model_path()
    build_model(BuildRequest(model=example, name="digits", repo=repo, keep_versions="all"))
    pickups: list[float] = []
    with start_server(repo, port=0, model_control_mode="poll", poll_s=poll_s) as server:
        client = tc.InferenceServerClient(server.url)
        for _ in range(versions):
            published = build_model(BuildRequest(model=example, name="digits", repo=repo)).published
            assert published is not None
            done = time.perf_counter()  # the version directory is visible from here on
            deadline = done + poll_s + 30
            while not client.is_model_ready(MODEL, str(published.version)):
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"version {published.version} not picked up within {poll_s + 30:g} s")
                time.sleep(0.01)
            pickups.append(time.perf_counter() - done)
        client.close()
    goal = poll_s + 1.0
    return {
        "poll_secs": poll_s,
        "versions": versions,
        "pickup_s": [round(p, 3) for p in pickups],
        "pickup_max_s": round(max(pickups), 3),
        "pickup_p50_s": round(statistics.median(pickups), 3),
        "goal_s": goal,
        "max_over_goal": round(max(pickups) / goal, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--poll-secs", type=float, default=1.0)
    parser.add_argument("--versions", type=int, default=5)
    args = parser.parse_args()
    isa = probe_machine(accelerators=False).cpu.isa()
    print(f"CPU ISA: {', '.join(isa) or 'none of AVX2/AVX-512/VNNI/AMX'}")
    with tempfile.TemporaryDirectory(prefix="kiln-bench-versions-") as tmp:
        rollout = version_rollout(Path(tmp))
        poll = poll_pickup(Path(tmp), args.poll_secs, args.versions)
    figures = {"cpu_isa": isa, "version_rollout": rollout, "poll": poll}
    print(json.dumps(figures, indent=2))
    print(
        f"version rollout at concurrency {CONCURRENCY}: {rollout['outcome']}, v1 {rollout['retire']['state']}; "
        f"{rollout['client_failed']} of {rollout['client_requests']} client requests failed (goal 0)"
    )
    print(
        f"rollout start -> first candidate traffic: {rollout['start_to_first_candidate_traffic_s']} s "
        f"(of which loading v2 {rollout['candidate_load_s']} s; an already-loaded candidate: "
        f"{rollout['baseline_already_loaded_s']} s, {rollout['ratio_vs_already_loaded']}x)"
    )
    print(
        f"poll pickup: max {poll['pickup_max_s']} s, p50 {poll['pickup_p50_s']} s over {poll['versions']} "
        f"versions; goal <= poll secs + 1 s = {poll['goal_s']:g} s ({poll['max_over_goal']}x of the goal)"
    )
    (RESULTS / "version_rollout.json").write_text(json.dumps(figures, indent=2))
    return 0 if rollout["client_failed"] == 0 and poll["max_over_goal"] <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
