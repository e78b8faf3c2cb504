"""Gateway overhead and split fidelity, measured against a direct baseline in the same run.

Three processes on 127.0.0.1: the embedded KServe v2 server (``server.app.start_server``) serving the
example model, the gateway (``server.gateway.app.start_gateway``), and this load generator (a
grpc.aio closed loop sending pre-serialized ModelInferRequest bytes, the same client for both paths).

Figures: throughput through the gateway / direct at concurrency 16 (goal >= 0.85), added p50 at
concurrency 1 (goal <= 300 µs), where the time goes (the gateway's own upstream vs total split, and
a cProfile of its handler threads), split fidelity (10,000 requests at 90/10 within ±1.5 %), sticky
keys never moving while weights are unchanged, and keys moved by a weight change vs the minimum.

    .venv/bin/python benchmarks/bench_gateway.py [--seconds 1.5] [--rounds 6] [--split-requests 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tritonclient.grpc import service_pb2  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
METHOD = "/inference.GRPCInferenceService/ModelInfer"
MODEL = "digits-fp32-ort"


# ---- roles run in child processes ---------------------------------------------------------------
def _serve_upstream(repo: Path, port_file: Path) -> None:
    from server.app import start_server

    handle = start_server(repo, port=0, models=[MODEL])
    port_file.write_text(str(handle.port))
    _wait_for_term()
    handle.stop(grace=0.5)


def _serve_gateway(config_file: Path, port_file: Path, profile_file: Path | None) -> None:
    from server.gateway.app import start_gateway

    profiles: list[cProfile.Profile] = []
    if profile_file is not None:
        _profile_handler_threads(profiles)
    config = json.loads(config_file.read_text())
    gateway = start_gateway(config, port=0, admin_port=0, insecure_admin=True, plugins=())
    port_file.write_text(json.dumps({"port": gateway.port, "admin": gateway.admin_url}))
    _wait_for_term()
    if profile_file is not None:
        merged = None
        for profile in profiles:
            merged = pstats.Stats(profile) if merged is None else merged.add(profile)
        if merged is not None:
            merged.dump_stats(str(profile_file))
    gateway.stop()


def _serve_aio_floor(upstream: str, port_file: Path) -> None:
    """The floor to compare against: a bare grpc.aio byte pass-through (name rewrite only, no features)."""
    import grpc

    from server.gateway.wire import name_version_suffix, read_model_name

    async def serve() -> None:
        channel = grpc.aio.insecure_channel(upstream)
        call = channel.unary_unary(METHOD)
        suffix = name_version_suffix(MODEL, "")

        async def infer(request: bytes, context: Any) -> bytes:
            read_model_name(request)
            return await call(request + suffix, timeout=context.time_remaining())

        handler = grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)}
        )
        server = grpc.aio.server(handlers=[handler])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_file.write_text(json.dumps({"port": port}))
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(0.5)

    asyncio.run(serve())


def _profile_handler_threads(profiles: list[cProfile.Profile]) -> None:
    """From its first request on, profile (CPU time) every thread that runs gateway handlers.

    cProfile is per thread: a wrapper enables one profile in each handler thread (the pool's
    workers in "threads" mode, the event-loop thread in "aio" mode) and leaves it on, so it sees
    everything Python-level those threads do, grpc's own Python code included.
    """
    from server.gateway.serve_aio import AioHandlers
    from server.gateway.serve_threads import ThreadHandlers

    local = threading.local()

    def ensure() -> None:
        if getattr(local, "profile", None) is None:
            local.profile = cProfile.Profile(time.thread_time)
            profiles.append(local.profile)
            local.profile.enable()

    sync_infer, aio_infer = ThreadHandlers.model_infer, AioHandlers.model_infer

    def sync_wrapper(self: Any, request: bytes, context: Any) -> bytes:
        ensure()
        return sync_infer(self, request, context)

    async def aio_wrapper(self: Any, request: bytes, context: Any) -> bytes:
        ensure()
        return await aio_infer(self, request, context)

    ThreadHandlers.model_infer = sync_wrapper  # type: ignore[method-assign]
    AioHandlers.model_infer = aio_wrapper  # type: ignore[method-assign]


def _wait_for_term() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()


# ---- orchestration -------------------------------------------------------------------------------
class Child:
    def __init__(self, args: list[str], port_file: Path) -> None:
        self.port_file = port_file
        self.process = subprocess.Popen([sys.executable, __file__, *args], cwd=ROOT)

    def ready(self, timeout_s: float = 60.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.port_file.exists() and self.port_file.read_text():
                return self.port_file.read_text()
            if self.process.poll() is not None:
                raise RuntimeError(f"child {self.process.args} exited with {self.process.returncode}")
            time.sleep(0.05)
        raise RuntimeError("child did not start in time")

    def cpu_s(self) -> float:
        """User + system CPU seconds this child has used so far (Linux /proc)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def request_bytes(batch: int = 1) -> bytes:
    x = np.random.default_rng(0).random((batch, 1, 8, 8), dtype=np.float32)
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "input", "FP32"
    tensor.shape.extend(x.shape)
    request.raw_input_contents.append(x.tobytes())
    return request.SerializeToString()


async def _closed_loop(
    address: str, body: bytes, concurrency: int, seconds: float, metadata: Any = None
) -> tuple[int, list[int], int]:
    import grpc

    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(METHOD)
        for _ in range(20):  # warm up
            await call(body, metadata=metadata)
        latencies: list[int] = []
        errors = 0
        stop_at = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                start = time.perf_counter_ns()
                try:
                    await call(body, metadata=metadata, timeout=10)
                except grpc.RpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter_ns() - start)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(latencies), latencies, errors if time.perf_counter() - started > 0 else 0


def closed_loop(address: str, body: bytes, concurrency: int, seconds: float, metadata: Any = None) -> dict[str, Any]:
    count, latencies, errors = asyncio.run(_closed_loop(address, body, concurrency, seconds, metadata))
    latencies.sort()
    return {
        "concurrency": concurrency,
        "seconds": seconds,
        "requests": count,
        "errors": errors,
        "throughput_rps": count / seconds,
        "p50_us": latencies[len(latencies) // 2] / 1e3 if latencies else 0.0,
        "p99_us": latencies[int(len(latencies) * 0.99)] / 1e3 if latencies else 0.0,
    }


def admin_get(admin_url: str, path: str) -> Any:
    with urllib.request.urlopen(admin_url + path, timeout=10) as response:
        return json.loads(response.read())


def gateway_config(upstream: str, mode: str, weights: tuple[float, float] = (100.0, 0.0)) -> dict[str, Any]:
    return {
        "upstreams": {"embedded": {"address": upstream}},
        "routes": {
            MODEL: {
                "variants": [
                    {"name": "a", "upstream": "embedded", "model": MODEL, "weight": weights[0]},
                    {"name": "b", "upstream": "embedded", "model": MODEL, "weight": weights[1]},
                ],
                "sticky": "header:x-user",
            }
        },
        "server": {"threads": 32, "mode": mode},
    }


def start_gateway_child(
    tmp: Path, upstream: str, name: str, mode: str, profile: Path | None = None
) -> tuple[Child, dict[str, Any]]:
    config_file = tmp / f"{name}.json"
    config_file.write_text(json.dumps(gateway_config(upstream, mode)))
    args = ["--role", "gateway", "--config", str(config_file), "--port-file", str(tmp / f"{name}.port")]
    if profile is not None:
        args += ["--profile", str(profile)]
    child = Child(args, tmp / f"{name}.port")
    return child, json.loads(child.ready())


IDLE_WAITS = (
    "<method 'get' of '_queue.SimpleQueue' objects>",
    "<method 'acquire' of '_thread.lock' objects>",
    "select",
)


def profile_summary(path: Path, top: int = 14) -> list[dict[str, Any]]:
    """Top functions by own CPU time; idle waits (a worker waiting for work) are left out."""
    stats = pstats.Stats(str(path), stream=io.StringIO())
    entries = {k: v for k, v in stats.stats.items() if k[2] not in IDLE_WAITS}  # type: ignore[attr-defined]
    total = max(sum(v[2] for v in entries.values()), 1e-12)
    rows = []
    for (file, line, func), (_, calls, tottime, cumtime, _) in entries.items():
        rows.append({"function": f"{Path(file).name}:{line}({func})", "calls": calls,
                     "tottime_s": round(tottime, 4), "share": round(tottime / total, 3),
                     "cumtime_s": round(cumtime, 4)})  # fmt: skip
    rows.sort(key=lambda r: -r["tottime_s"])
    return rows[:top]


def split_and_sticky(address: str, admin_url: str, body: bytes, n: int) -> dict[str, Any]:
    """Real requests at 90/10 through a running gateway (weights set through the admin API)."""
    import grpc

    _post(admin_url, f"/routes/{MODEL}/weights", {"weights": {"a": 90, "b": 10}})
    before = {v: admin_get(admin_url, "/stats")["routes"][MODEL]["variants"][v]["cumulative"]["requests"] for v in "ab"}
    closed = closed_loop_count(address, body, n)
    after = {v: admin_get(admin_url, "/stats")["routes"][MODEL]["variants"][v]["cumulative"]["requests"] for v in "ab"}
    share_b = (after["b"] - before["b"]) / max(1, closed)
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(METHOD)
        first, moved = {}, 0
        for round_ in range(2):
            for key in range(300):
                _, info = call.with_call(body, metadata=(("x-user", f"user-{key}"),))
                variant = dict(info.trailing_metadata())["kiln-variant"]
                if round_ == 0:
                    first[key] = variant
                elif first[key] != variant:
                    moved += 1
    sticky_b = sum(1 for v in first.values() if v == "b") / len(first)
    return {"requests": closed, "share_b": share_b, "target_b": 0.10, "within_1_5pct": abs(share_b - 0.10) <= 0.015,
            "sticky_keys": len(first), "sticky_moved_while_unchanged": moved, "sticky_share_b": sticky_b}  # fmt: skip


def closed_loop_count(address: str, body: bytes, n: int) -> int:
    async def run() -> int:
        import grpc

        async with grpc.aio.insecure_channel(address) as channel:
            call = channel.unary_unary(METHOD)
            remaining = n

            async def worker() -> int:
                nonlocal remaining
                done = 0
                while remaining > 0:
                    remaining -= 1
                    await call(body, timeout=10)
                    done += 1
                return done

            return sum(await asyncio.gather(*(worker() for _ in range(16))))

    return asyncio.run(run())


def _post(admin_url: str, path: str, body: Any) -> Any:
    request = urllib.request.Request(admin_url + path, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def routing_movement(keys: int = 20_000) -> dict[str, Any]:
    """Pure routing: keys moved by 90/10 -> 80/20 (minimum possible: 10 %) and by no change."""
    from server.gateway.routing import WeightedSet, choose_sticky

    before = WeightedSet.build(["a", "b"], [90, 10])
    after = WeightedSet.build(["a", "b"], [80, 20])
    ids = [f"user-{i}".encode() for i in range(keys)]
    first = [choose_sticky(before, k) for k in ids]
    same = sum(1 for k, f in zip(ids, first, strict=True) if choose_sticky(before, k) != f)
    moved = sum(1 for k, f in zip(ids, first, strict=True) if choose_sticky(after, k) != f)
    return {"keys": keys, "moved_unchanged": same, "moved_90_10_to_80_20": moved / keys, "minimum": 0.10}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["paths"])
    rows = [result["paths"][n] for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    colors = ["#888", "#d62", "#26d", "#aaa"][: len(names)]
    panels = (("c16_rps", "c16 throughput (rps)"), ("c1_p50_us", "c1 p50 latency (µs)"),
              ("cpu_us_per_request", "CPU per request (µs)"))  # fmt: skip
    for axis, (key, title) in zip(axes, panels, strict=True):
        axis.bar(names, [r[key] for r in rows], color=colors)
        axis.set_title(title)
    fig.suptitle(f"gateway vs direct (default mode {result['default_mode']}): c16 ratio {result['c16']['ratio']:.2f} "
                 f"(goal 0.85), c1 added {result['c1']['added_p50_us']:.0f} µs (goal 300)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["upstream", "gateway", "aio-floor"])
    parser.add_argument("--upstream")
    parser.add_argument("--repo", type=Path)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--port-file", type=Path)
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--split-requests", type=int, default=10_000)
    args = parser.parse_args()
    if args.role == "upstream":
        _serve_upstream(args.repo, args.port_file)
        return 0
    if args.role == "aio-floor":
        _serve_aio_floor(args.upstream, args.port_file)
        return 0
    if args.role == "gateway":
        _serve_gateway(args.config, args.port_file, args.profile)
        return 0
    return run(args)


def run(args: argparse.Namespace) -> int:
    from builders.examples import example_model_path
    from builders.pipeline import BuildRequest, build_model
    from server.gateway.config import ServerSettings

    default_mode = ServerSettings().mode
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-gw-"))
    build_model(BuildRequest(model=example_model_path(), name="digits", precision="fp32", repo=tmp / "repo"))
    upstream = Child(["--role", "upstream", "--repo", str(tmp / "repo"), "--port-file", str(tmp / "up.port")],
                     tmp / "up.port")  # fmt: skip
    children = [upstream]
    try:
        up_address = f"127.0.0.1:{upstream.ready()}"
        paths: dict[str, tuple[str, Child | None]] = {"direct": (up_address, None)}
        admin_urls = {}
        for mode in ("threads", "aio"):
            child, info = start_gateway_child(tmp, up_address, mode, mode)
            children.append(child)
            paths[mode] = (f"127.0.0.1:{info['port']}", child)
            admin_urls[mode] = info["admin"]
        floor = Child(["--role", "aio-floor", "--upstream", up_address, "--port-file", str(tmp / "floor.port")],
                      tmp / "floor.port")  # fmt: skip
        children.append(floor)
        paths["floor"] = (f"127.0.0.1:{json.loads(floor.ready())['port']}", floor)
        body = request_bytes()
        runs = measure(paths, upstream, body, args)
        result: dict[str, Any] = {"model": MODEL, "cpus": os.cpu_count(), "rounds": args.rounds,
                                  "seconds": args.seconds, "default_mode": default_mode}  # fmt: skip
        result["paths"] = summarize(runs)
        headline = result["paths"][default_mode]
        result["c16"] = {"ratio": headline["c16_ratio"], "goal": 0.85}
        result["c1"] = {"added_p50_us": headline["c1_added_p50_us"], "goal_us": 300}
        gw_address, _ = paths[default_mode]
        stats = admin_get(admin_urls[default_mode], "/stats")["routes"][MODEL]["variants"]["a"]["cumulative"]
        result["inside_gateway"] = {
            "mean_total_us": stats["total"]["mean_ms"] * 1e3,
            "mean_upstream_us": stats["upstream"]["mean_ms"] * 1e3,
            "mean_handler_overhead_us": (stats["total"]["mean_ms"] - stats["upstream"]["mean_ms"]) * 1e3,
        }
        result["split"] = split_and_sticky(gw_address, admin_urls[default_mode], body, args.split_requests)
        result["routing_movement"] = routing_movement()
        for child in children[1:]:
            child.stop()
        children = children[:1]
        result["profiles"] = {}
        for mode in ("threads", "aio"):
            profiled, pinfo = start_gateway_child(tmp, up_address, f"prof-{mode}", mode, profile=tmp / f"{mode}.prof")
            children.append(profiled)
            closed_loop(f"127.0.0.1:{pinfo['port']}", body, 16, args.seconds / 2)
            profiled.stop()
            children.remove(profiled)
            result["profiles"][mode] = profile_summary(tmp / f"{mode}.prof")
    finally:
        for child in children:
            child.stop()
    report(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gateway.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / "gateway.png")
    print(f"wrote {RESULTS / 'gateway.json'} and gateway.png")
    return 0


def measure(
    paths: dict[str, tuple[str, Child | None]], upstream: Child, body: bytes, args: argparse.Namespace
) -> dict[str, dict[str, list[Any]]]:
    """Interleaved rounds (drift hits every path alike): c16 throughput + CPU per request, c1 p50."""
    runs: dict[str, dict[str, list[Any]]] = {name: {"c16": [], "c1": [], "cpu_us": []} for name in paths}
    for _ in range(args.rounds):
        for name, (address, child) in paths.items():
            owner = child or upstream
            before = owner.cpu_s()
            run16 = closed_loop(address, body, 16, args.seconds)
            runs[name]["cpu_us"].append((owner.cpu_s() - before) / (run16["requests"] + 20) * 1e6)
            runs[name]["c16"].append(run16)
            runs[name]["c1"].append(closed_loop(address, body, 1, args.seconds / 2))
    return runs


def summarize(runs: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    direct = runs["direct"]
    out: dict[str, Any] = {}
    for name, data in runs.items():
        out[name] = {
            "c16_rps": statistics.median(r["throughput_rps"] for r in data["c16"]),
            "c1_p50_us": statistics.median(r["p50_us"] for r in data["c1"]),
            "cpu_us_per_request": statistics.median(data["cpu_us"]),
            "errors": sum(r["errors"] for r in data["c16"] + data["c1"]),
            "runs": data,
        }
        if name != "direct":
            # CPU-bound ceiling of the ratio on this box: all processes share os.cpu_count() cores,
            # so a request through the gateway costs the direct path's CPU plus the gateway's.
            direct_cpu = (os.cpu_count() or 1) / statistics.median(r["throughput_rps"] for r in direct["c16"]) * 1e6
            out[name]["cpu_ceiling_ratio"] = direct_cpu / (direct_cpu + out[name]["cpu_us_per_request"])
            pairs16 = zip(direct["c16"], data["c16"], strict=True)
            pairs1 = zip(direct["c1"], data["c1"], strict=True)
            out[name]["c16_ratio"] = statistics.median(g["throughput_rps"] / d["throughput_rps"] for d, g in pairs16)
            out[name]["c1_added_p50_us"] = statistics.median(g["p50_us"] - d["p50_us"] for d, g in pairs1)
    return out


def report(result: dict[str, Any]) -> None:
    labels = {"direct": "direct to the embedded server", "threads": "gateway, grpc thread-pool server",
              "aio": "gateway, grpc.aio server", "floor": "bare grpc.aio pass-through (floor)"}  # fmt: skip
    print(
        f"{'path':38} {'c16 rps':>8} {'ratio':>6} {'ceiling':>7} {'c1 p50 µs':>10} {'added µs':>9} {'CPU µs/req':>10}"
    )
    for name, row in result["paths"].items():
        ratio = f"{row['c16_ratio']:.3f}" if "c16_ratio" in row else "1"
        added = f"{row['c1_added_p50_us']:.0f}" if "c1_added_p50_us" in row else "0"
        ceiling = f"{row['cpu_ceiling_ratio']:.3f}" if "cpu_ceiling_ratio" in row else "1"
        print(f"{labels[name]:38} {row['c16_rps']:8.0f} {ratio:>6} {ceiling:>7} {row['c1_p50_us']:10.0f} {added:>9} "
              f"{row['cpu_us_per_request']:10.0f}")  # fmt: skip
    mode = result["default_mode"]
    print(f"default mode {mode!r}: c16 ratio {result['c16']['ratio']:.3f} (goal >= 0.85), "
          f"c1 added p50 {result['c1']['added_p50_us']:.0f} µs (goal <= 300)")  # fmt: skip
    print("ceiling = the c16 ratio this box allows when CPU-bound: direct CPU per request (cores / direct rps) "
          "over that plus the gateway process's CPU per request; reaching 0.85 needs <= 18 % extra CPU")  # fmt: skip
    inside = result["inside_gateway"]
    print(f"inside the gateway (mean): total {inside['mean_total_us']:.0f} µs = upstream "
          f"{inside['mean_upstream_us']:.0f} µs + handler {inside['mean_handler_overhead_us']:.0f} µs; "
          "the rest of the added latency is gRPC transport (one more hop)")  # fmt: skip
    split = result["split"]
    print(f"split 90/10 over {split['requests']} requests: b got {split['share_b'] * 100:.2f} % "
          f"(within ±1.5 %: {split['within_1_5pct']}); sticky keys moved while unchanged: "
          f"{split['sticky_moved_while_unchanged']} of {split['sticky_keys']}")  # fmt: skip
    move = result["routing_movement"]
    print(f"weights 90/10 -> 80/20 moved {move['moved_90_10_to_80_20'] * 100:.1f} % of keys (minimum 10 %); "
          f"unchanged weights moved {move['moved_unchanged']}")  # fmt: skip
    for name, rows in result["profiles"].items():
        print(f"profile, {labels[name]} (cProfile CPU time of the handler threads, top by own time):")
        for row in rows:
            print(f"  {row['share'] * 100:5.1f} %  {row['tottime_s']:.3f} s  {row['calls']:>7}  {row['function']}")


if __name__ == "__main__":
    random.seed(0)
    sys.exit(main())
