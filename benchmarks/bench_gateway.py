"""Gateway overhead in two regimes and split fidelity, against a direct baseline in the same run.

Processes on 127.0.0.1: the embedded KServe v2 server (``server.app.start_server``) serving the
example digits model and a 224x224 CNN, the gateway (``server.gateway.app.start_gateway``) in both
server flavours, the floors (a bare grpc.aio pass-through; nghttpx and the C++ generic gRPC proxy
prototype of ``native_proxy/`` on its two transports, when this machine has them) and this load
generator (a grpc.aio closed loop sending pre-serialized ModelInferRequest bytes, the same client
for every path). Helpers live in ``harness/gateway_bench.py`` (models, load, measurement, profiles) and
``harness/gateway_roles.py`` (the child processes).

Regime (a), the issue's conditions (digits, ~0.1 ms of inference): throughput through the gateway /
direct at concurrency 16 (goal >= 0.85), added p50 at concurrency 1 (goal <= 300 µs), the CPU-bound
ceiling of the ratio on this box, where the time goes (the gateway's upstream vs total split and a
cProfile of its handler threads). Regime (b), compute-dominated (the CNN, a few ms per sample): the
same ratios, where the gateway's fixed cost is a small share. Also: split fidelity (10,000 requests
at 90/10 within ±1.5 %), sticky keys never moving while weights are unchanged, keys moved by a
weight change vs the minimum. ``--explore [--only a,b]`` instead compares the gateway knobs in
``EXPLORE`` (threads, channels, grpc options) and extra Python floors (with the ``kiln-variant``
trailer, on the thread-pool server) against direct and the floors, in both regimes.

    flock /tmp/kiln-bench.lock .venv/bin/python benchmarks/bench_gateway.py [--seconds 1.2] [--rounds 4]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import harness.gateway_bench as h  # noqa: E402
import harness.gateway_roles as roles  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
LABELS = {
    "direct": "direct to the embedded server",
    "envoy": "gateway, Envoy data plane (Kiln control plane)",
    "threads": "gateway, grpc thread-pool server",
    "aio": "gateway, grpc.aio server",
    "floor": "bare grpc.aio pass-through (Python floor)",
    "floor-trailer": "Python floor + kiln-variant trailer",
    "floor-threads": "bare thread-pool pass-through (Python)",
    "floor-uvloop": "bare grpc.aio pass-through on uvloop",
    "aio-uvloop": "gateway, grpc.aio server on uvloop",
    "nghttpx": "nghttpx HTTP/2 proxy (C, no rewrite)",
    "native": "C++ gRPC proxy, callback API (prototype)",
    "native-cq": "C++ gRPC proxy, 1-thread completion queue",
}
# --explore: gateway variants (name -> server settings, upstream settings, extra grpc options)
EXPLORE: dict[str, tuple[dict[str, Any], dict[str, Any], list[tuple[str, Any]]]] = {
    "threads-t8": ({"mode": "threads", "threads": 8}, {}, []),
    "threads-ch4": ({"mode": "threads"}, {"channels": 4}, []),
    "threads-latency": ({"mode": "threads"}, {}, [("grpc.optimization_target", "latency")]),
    "threads-throughput": ({"mode": "threads"}, {}, [("grpc.optimization_target", "throughput")]),
    "threads-minimal": ({"mode": "threads"}, {}, [("grpc.minimal_stack", 1)]),
    "threads-lookahead": ({"mode": "threads"}, {}, [("grpc.http2.lookahead_bytes", 4 << 20)]),
    "threads-frame1m": ({"mode": "threads"}, {}, [("grpc.http2.max_frame_size", 1 << 20)]),
    "threads-window": ({"mode": "threads"}, {}, [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 8 << 20)]),
    "aio-ch4": ({"mode": "aio"}, {"channels": 4}, []),
    "aio-throughput": ({"mode": "aio"}, {}, [("grpc.optimization_target", "throughput")]),
}


def gateway_spec(upstream: str, model: str, server: dict[str, Any], up: dict[str, Any] | None = None,
                 grpc_options: list[tuple[str, Any]] | None = None, data_plane: str = "python",
                 ) -> dict[str, Any]:  # fmt: skip
    config = {
        "upstreams": {"embedded": {"address": upstream, **(up or {})}},
        "routes": {
            name: {
                "variants": [
                    {"name": "a", "upstream": "embedded", "model": name, "weight": 100},
                    {"name": "b", "upstream": "embedded", "model": name, "weight": 0},
                ],
                "sticky": "header:x-user",
            }
            for name in (model, h.CNN.model)
        },
        "server": server,
    }
    return {"config": config, "grpc_options": grpc_options or [], "data_plane": data_plane}


def start_gateway_child(tmp: Path, name: str, spec: dict[str, Any], profile: Path | None = None
                        ) -> tuple[h.Child, dict[str, Any]]:  # fmt: skip
    config_file = tmp / f"{name}.json"
    config_file.write_text(json.dumps(spec))
    command = [sys.executable, __file__, "--role", "gateway", "--config", str(config_file),
               "--port-file", str(tmp / f"{name}.port")]  # fmt: skip
    if profile is not None:
        command += ["--profile", str(profile)]
    child = h.Child(command, tmp / f"{name}.port")
    return child, json.loads(child.ready())


def start_floors(tmp: Path, upstream: str, children: list[h.Child], notes: dict[str, str], explore: bool = False
                 ) -> list[h.Contender]:  # fmt: skip
    """The Python floor(s), and the native ones that this machine has (each absent one noted why)."""
    out = []
    python_floors = ("floor", "floor-trailer", "floor-threads", "floor-uvloop") if explore else ("floor",)
    for name in python_floors:
        role = "threads-floor" if name == "floor-threads" else "aio-floor"
        command = [sys.executable, __file__, "--role", role, "--upstream", upstream,
                   "--port-file", str(tmp / f"{name}.port")]  # fmt: skip
        command += {"floor-trailer": ["--trailer"], "floor-uvloop": ["--loop", "uvloop"]}.get(name, [])
        floor = h.Child(command, tmp / f"{name}.port")
        children.append(floor)
        out.append(h.Contender(name, f"127.0.0.1:{json.loads(floor.ready())['port']}", floor))
    why = roles.build_native_proxy()
    native = [("native", roles.native_proxy_child(upstream)), ("native-cq", roles.native_proxy_child(upstream, "cq"))]
    for name, child in [("nghttpx", roles.nghttpx_child(upstream)), *native]:
        if child is None:
            notes[name] = why if name.startswith("native") and why else f"{name} not available on this machine"
            continue
        children.append(child)
        out.append(h.Contender(name, child.ready(), child))
    return out


def run(args: argparse.Namespace) -> int:
    from server.gateway.config import ServerSettings

    default_mode = ServerSettings().mode
    from runtime.machine import probe_cpu

    isa = probe_cpu().isa()
    print(f"CPU ISA: {', '.join(isa) or 'baseline only'} ({os.cpu_count()} CPUs)", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-gw-"))
    h.build_repository(tmp / "repo", tmp)
    upstream = h.Child([sys.executable, __file__, "--role", "upstream", "--repo", str(tmp / "repo"),
                        "--port-file", str(tmp / "up.port")], tmp / "up.port")  # fmt: skip
    children = [upstream]
    notes: dict[str, str] = {}
    result: dict[str, Any] = {"cpus": os.cpu_count(), "rounds": args.rounds, "seconds": args.seconds,
                              "default_mode": default_mode, "cpu_isa": isa}  # fmt: skip
    try:
        up = f"127.0.0.1:{upstream.ready()}"
        gateways: dict[str, tuple[h.Child, dict[str, Any]]] = {}
        variants: dict[str, tuple[dict[str, Any], dict[str, Any], list[tuple[str, Any]]]] = {
            mode: ({"mode": mode}, {}, []) for mode in ("threads", "aio")
        }
        if importlib.util.find_spec("uvloop") is not None:
            variants["aio-uvloop"] = ({"mode": "aio", "event_loop": "uvloop"}, {}, [])
        else:
            notes["aio-uvloop"] = "not measured: uvloop is not installed (pip install uvloop)"
        if args.explore:
            chosen = args.only.split(",") if args.only else list(EXPLORE)
            variants.update({k: EXPLORE[k] for k in chosen})
        for name, (server, upstream_settings, options) in variants.items():
            spec = gateway_spec(up, h.DIGITS.model, {"threads": 32, **server}, upstream_settings, options)
            gateways[name] = start_gateway_child(tmp, name, spec)
            children.append(gateways[name][0])
        envoy_missing = envoy_unusable()
        if envoy_missing is None:
            envoy_spec = gateway_spec(up, h.DIGITS.model, {}, data_plane="envoy")
            gateways["envoy"] = start_gateway_child(tmp, "envoy", envoy_spec)
            children.append(gateways["envoy"][0])
        else:
            notes["envoy"] = f"not measured: {envoy_missing}"
        headline = "envoy" if "envoy" in gateways else default_mode
        result["headline"] = headline
        contenders = [h.Contender("direct", up, None)]
        contenders += [h.Contender(n, f"127.0.0.1:{info['port']}", child) for n, (child, info) in gateways.items()]
        contenders += start_floors(tmp, up, children, notes, args.explore)
        result["notes"] = notes
        print(f"regime (a) {h.DIGITS.label}: {len(contenders)} paths x {args.rounds} rounds", flush=True)
        h.measure(contenders, upstream, h.DIGITS.request(), args.rounds, args.seconds)
        result["digits"] = regime(h.DIGITS, contenders, headline)
        keep = {"direct", "envoy", default_mode, "floor", "nghttpx", "native", "native-cq"}
        cnn = [h.Contender(c.name, c.address, c.child) for c in contenders if args.explore or c.name in keep]
        print(f"regime (b) {h.CNN.label}: {len(cnn)} paths x {args.cnn_rounds} rounds", flush=True)
        h.measure(cnn, upstream, h.CNN.request(), args.cnn_rounds, args.seconds)
        result["cnn"] = regime(h.CNN, cnn, headline, goal=0.95)
        if not args.explore:
            child, info = gateways[default_mode]
            stats = h.admin_get(info["admin"], "/stats")["routes"][h.DIGITS.model]["variants"]["a"]["cumulative"]
            result["inside_gateway"] = {
                "mean_total_us": stats["total"]["mean_ms"] * 1e3,
                "mean_upstream_us": stats["upstream"]["mean_ms"] * 1e3,
                "mean_handler_overhead_us": (stats["total"]["mean_ms"] - stats["upstream"]["mean_ms"]) * 1e3,
            }
            address = f"127.0.0.1:{info['port']}"
            result["split"] = split_and_sticky(address, info["admin"], h.DIGITS.request(), args.split_requests)
            result["routing_movement"] = routing_movement()
            if "envoy" in gateways:
                envoy_child, envoy_info = gateways["envoy"]
                result["envoy_control"] = weight_changes_and_rollback(
                    f"127.0.0.1:{envoy_info['port']}", envoy_info["admin"], h.DIGITS.request()
                )
                result["shadow_cost"] = shadow_cost(envoy_child, envoy_info, upstream, args.seconds * 2)
            for extra in children[1:]:
                extra.stop()
            children = children[:1]
            result["profiles"] = profiles(tmp, up, args.seconds, children)
    finally:
        for child in children:
            child.stop()
    report(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "gateway_explore" if args.explore else "gateway"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / (name + '.json')} and {name}.png")
    return 0


def regime(workload: h.Workload, contenders: list[h.Contender], headline: str, goal: float = 0.85) -> dict[str, Any]:
    paths = h.summarize(contenders)
    head = paths[headline]
    return {"label": workload.label, "model": workload.model, "paths": paths, "headline": headline,
            "c16": {"ratio": head["c16_ratio"], "goal": goal, "cpu_ceiling": head["cpu_ceiling_ratio"]},
            "c1": {"added_p50_us": head["c1_added_p50_us"], "goal_us": 300}}  # fmt: skip


def envoy_unusable() -> str | None:
    from harness.gateway import envoy_unusable as why

    return why()


def _own_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def shadow_cost(child: h.Child, info: dict[str, Any], upstream: h.Child, seconds: float) -> dict[str, Any]:
    """Envoy data plane: what a 100 % shadow costs, per served request, in Kiln's process (the
    comparator: one server leg, two client calls, the comparison) and in the upstream (two more
    inferences), against the same load without a shadow."""
    model, address = h.DIGITS.model, f"127.0.0.1:{info['port']}"
    out: dict[str, Any] = {}
    for label, shadow in (("no_shadow", None), ("shadow_100", {"variant": "b", "percent": 100})):
        route = {"variants": [{"name": "a", "upstream": "embedded", "model": model, "weight": 100},
                              {"name": "b", "upstream": "embedded", "model": model, "weight": 0}]}  # fmt: skip
        if shadow:
            route["shadow"] = shadow
        request = urllib.request.Request(info["admin"] + f"/routes/{model}", data=json.dumps(route).encode(),
                                         method="PUT")  # fmt: skip
        urllib.request.urlopen(request, timeout=30).read()
        kiln0, all0, up0 = _own_cpu_s(child.process.pid), child.cpu_s(), upstream.cpu_s()
        run = h.closed_loop(address, h.DIGITS.request(), 8, seconds)
        kiln1, all1, up1 = _own_cpu_s(child.process.pid), child.cpu_s(), upstream.cpu_s()
        n = max(1, run["requests"])
        out[label] = {"requests": run["requests"], "rps": run["throughput_rps"],
                      "kiln_cpu_us_per_request": (kiln1 - kiln0) / n * 1e6,
                      "envoy_cpu_us_per_request": ((all1 - all0) - (kiln1 - kiln0)) / n * 1e6,
                      "upstream_cpu_us_per_request": (up1 - up0) / n * 1e6}  # fmt: skip
    compared = h.admin_get(info["admin"], "/stats")["routes"][model]["variants"]["b"]["cumulative"].get("shadow") or {}
    out["compared"] = compared.get("compared", 0)
    out["dropped"] = compared.get("dropped", 0)
    return out


def weight_changes_and_rollback(address: str, admin_url: str, body: bytes, flips: int = 40) -> dict[str, Any]:
    """Envoy data plane: is a weight change (admin API -> runtime layer) in effect for the very next
    request? And a 50/50 canary rolled back to 100/0 under a closed-loop load: requests lost."""
    import threading
    import time

    import grpc

    model = h.DIGITS.model
    in_effect, change_ms = 0, []
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(h.METHOD)
        for flip in range(flips):
            target = "b" if flip % 2 == 0 else "a"
            started = time.perf_counter()
            h.admin_post(
                admin_url,
                f"/routes/{model}/weights",
                {"weights": {"a": 100 if target == "a" else 0, "b": 100 if target == "b" else 0}},
            )
            change_ms.append((time.perf_counter() - started) * 1e3)
            _, info = call.with_call(body)
            in_effect += dict(info.trailing_metadata())["kiln-variant"] == target
        h.admin_post(admin_url, f"/routes/{model}/weights", {"weights": {"a": 50, "b": 50}})
        stop, lock = threading.Event(), threading.Lock()
        seen: list[tuple[float, str]] = []
        errors: list[str] = []

        def load() -> None:
            while not stop.is_set():
                try:
                    _, info = call.with_call(body, timeout=10)
                    with lock:
                        seen.append((time.perf_counter(), dict(info.trailing_metadata())["kiln-variant"]))
                except grpc.RpcError as err:
                    with lock:
                        errors.append(str(err.code()))

        workers = [threading.Thread(target=load) for _ in range(8)]
        for worker in workers:
            worker.start()
        time.sleep(1.0)
        rolled_back = time.perf_counter()
        h.admin_post(admin_url, f"/routes/{model}/weights", {"weights": {"a": 100, "b": 0}})
        applied = time.perf_counter()
        time.sleep(1.0)
        stop.set()
        for worker in workers:
            worker.join(10)
    late = sum(1 for at, variant in seen if at > applied + 0.05 and variant == "b")
    return {"flips": flips, "next_request_in_effect": in_effect, "weight_change_ms_p50": sorted(change_ms)[flips // 2],
            "rollback_requests": len(seen), "rollback_errors": len(errors), "rollback_apply_ms":
            (applied - rolled_back) * 1e3, "b_after_rollback": late}  # fmt: skip


def profiles(tmp: Path, up: str, seconds: float, children: list[h.Child]) -> dict[str, Any]:
    out = {}
    for mode in ("threads", "aio"):
        spec = gateway_spec(up, h.DIGITS.model, {"threads": 32, "mode": mode})
        child, info = start_gateway_child(tmp, f"prof-{mode}", spec, profile=tmp / f"{mode}.prof")
        children.append(child)
        h.closed_loop(f"127.0.0.1:{info['port']}", h.DIGITS.request(), 16, seconds / 2)
        child.stop()
        children.remove(child)
        out[mode] = h.profile_summary(tmp / f"{mode}.prof")
    return out


def split_and_sticky(address: str, admin_url: str, body: bytes, n: int) -> dict[str, Any]:
    """Real requests at 90/10 through a running gateway (weights set through the admin API)."""
    import grpc

    model = h.DIGITS.model
    h.admin_post(admin_url, f"/routes/{model}/weights", {"weights": {"a": 90, "b": 10}})

    def counts() -> dict[str, int]:
        variants = h.admin_get(admin_url, "/stats")["routes"][model]["variants"]
        return {v: variants[v]["cumulative"]["requests"] for v in "ab"}

    before = counts()
    closed = h.closed_loop_count(address, body, n)
    after = counts()
    share_b = (after["b"] - before["b"]) / max(1, closed)
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(h.METHOD)
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

    regimes = [k for k in ("digits", "cnn") if k in result]
    fig, axes = plt.subplots(len(regimes), 3, figsize=(14, 3.8 * len(regimes)), squeeze=False)
    for row, key in zip(axes, regimes, strict=True):
        paths = result[key]["paths"]
        others = [n for n in paths if n != "direct"]
        panels = ((others, "c16_ratio", "c16 throughput / direct"),
                  (others, "c1_added_p50_us", "c1 added p50 (µs)"),
                  (others, "cpu_us_per_request", "CPU per request of the hop (µs)"))  # fmt: skip
        for axis, (shown, field, title) in zip(row, panels, strict=True):
            bars = axis.bar(shown, [paths[n][field] for n in shown], color="#4a7")
            axis.bar_label(bars, fmt="%.2f" if field == "c16_ratio" else "%.0f", fontsize=8)
            axis.set_title(f"{result[key]['label']}: {title}", fontsize=9)
            axis.tick_params(axis="x", labelrotation=30, labelsize=8)
            if field == "c16_ratio":
                axis.axhline(0.85, color="#d62", linestyle="--", linewidth=1)
                axis.plot(shown, [paths[n]["cpu_ceiling_ratio"] for n in shown], "k_", markersize=18,
                          label="CPU-bound ceiling")  # fmt: skip
                axis.legend(fontsize=7)
            elif field == "c1_added_p50_us":
                axis.axhline(300, color="#d62", linestyle="--", linewidth=1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(result: dict[str, Any]) -> None:
    for key in ("digits", "cnn"):
        if key not in result:
            continue
        section = result[key]
        print(f"\n== {section['label']} ({section['model']})")
        print(f"{'path':44} {'c16 rps':>8} {'ratio':>6} {'ceiling':>7} {'c1 p50 µs':>10} {'added µs':>9} "
              f"{'hop CPU µs':>10} {'up CPU µs':>9}")  # fmt: skip
        for name, row in section["paths"].items():
            ratio = f"{row['c16_ratio']:.3f}" if "c16_ratio" in row else "1"
            added = f"{row['c1_added_p50_us']:.0f}" if "c1_added_p50_us" in row else "0"
            ceiling = f"{row['cpu_ceiling_ratio']:.3f}" if "cpu_ceiling_ratio" in row else "1"
            hop, up = row["cpu_us_per_request"], row["upstream_cpu_us_per_request"]
            print(f"{LABELS.get(name, name):44} {row['c16_rps']:8.0f} {ratio:>6} {ceiling:>7} {row['c1_p50_us']:10.0f} "
                  f"{added:>9} {hop:10.0f} {up:9.0f}")  # fmt: skip
        headline = section.get("headline", result["default_mode"])
        head = section["paths"][headline]
        low, high = head["c16_ratio_range"]
        a_low, a_high = head["c1_added_range_us"]
        print(f"rounds spread of the {headline!r} gateway: c16 ratio {low:.3f}..{high:.3f}, "
              f"c1 added {a_low:.0f}..{a_high:.0f} µs")  # fmt: skip
        print(f"{headline!r}: c16 ratio {section['c16']['ratio']:.3f} (goal >= {section['c16']['goal']}, "
              f"CPU-bound ceiling {section['c16']['cpu_ceiling']:.3f}), c1 added p50 "
              f"{section['c1']['added_p50_us']:.0f} µs (goal <= 300)")  # fmt: skip
    for name, why in result.get("notes", {}).items():
        print(f"note: {name}: {why}")
    print("ceiling = direct whole-box CPU per request (cores / direct c16 rps) over that plus the hop's own CPU per "
          "request: the best c16 ratio possible while client, hop and upstream share this box's cores")  # fmt: skip
    if "inside_gateway" not in result:
        return
    inside = result["inside_gateway"]
    print(f"inside the gateway (mean, digits): total {inside['mean_total_us']:.0f} µs = upstream "
          f"{inside['mean_upstream_us']:.0f} µs + handler {inside['mean_handler_overhead_us']:.0f} µs; "
          "the rest of the added latency is gRPC transport (one more hop)")  # fmt: skip
    split = result["split"]
    print(f"split 90/10 over {split['requests']} requests: b got {split['share_b'] * 100:.2f} % "
          f"(within ±1.5 %: {split['within_1_5pct']}); sticky keys moved while unchanged: "
          f"{split['sticky_moved_while_unchanged']} of {split['sticky_keys']}")  # fmt: skip
    control = result.get("envoy_control")
    if control:
        print(f"Envoy: weight change in effect for the next request in {control['next_request_in_effect']} of "
              f"{control['flips']} flips (admin call p50 {control['weight_change_ms_p50']:.1f} ms); rollback 50/50 -> "
              f"100/0 under 8-way load: {control['rollback_errors']} of {control['rollback_requests']} requests "
              f"failed, {control['b_after_rollback']} served by the rolled-back variant >50 ms after the change "
              f"(applied in {control['rollback_apply_ms']:.1f} ms)")  # fmt: skip
    cost = result.get("shadow_cost")
    if cost:
        base, shadow = cost["no_shadow"], cost["shadow_100"]
        print(
            f"Envoy shadow comparator (100 % mirrored, c8, digits): Kiln process CPU/request "
            f"{base['kiln_cpu_us_per_request']:.0f} -> {shadow['kiln_cpu_us_per_request']:.0f} µs, upstream "
            f"{base['upstream_cpu_us_per_request']:.0f} -> {shadow['upstream_cpu_us_per_request']:.0f} µs, Envoy "
            f"{base['envoy_cpu_us_per_request']:.0f} -> {shadow['envoy_cpu_us_per_request']:.0f} µs, throughput "
            f"{base['rps']:.0f} -> {shadow['rps']:.0f} rps; compared {cost['compared']}, dropped {cost['dropped']}"
        )
    move = result["routing_movement"]
    print(f"weights 90/10 -> 80/20 moved {move['moved_90_10_to_80_20'] * 100:.1f} % of keys (minimum 10 %); "
          f"unchanged weights moved {move['moved_unchanged']}")  # fmt: skip
    for name, rows in result["profiles"].items():
        print(f"profile, {LABELS[name]} (cProfile CPU time of the handler threads, top by own time):")
        for row in rows:
            print(f"  {row['share'] * 100:5.1f} %  {row['tottime_s']:.3f} s  {row['calls']:>7}  {row['function']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["upstream", "gateway", "aio-floor", "threads-floor"])
    parser.add_argument("--trailer", action="store_true", help="aio-floor: also send a kiln-variant trailer")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio", help="aio-floor's event loop")
    parser.add_argument("--upstream")
    parser.add_argument("--repo", type=Path)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--port-file", type=Path)
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--seconds", type=float, default=1.2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--cnn-rounds", type=int, default=3)
    parser.add_argument("--split-requests", type=int, default=10_000)
    parser.add_argument("--explore", action="store_true", help="compare gateway knobs (EXPLORE) instead")
    parser.add_argument("--only", help="with --explore: comma-separated EXPLORE names to run")
    args = parser.parse_args()
    if args.role == "upstream":
        roles.serve_upstream(args.repo, [h.DIGITS.model, h.CNN.model], args.port_file)
    elif args.role == "aio-floor":
        roles.serve_aio_floor(args.upstream, args.port_file, args.trailer, args.loop)
    elif args.role == "threads-floor":
        roles.serve_threads_floor(args.upstream, args.port_file)
    elif args.role == "gateway":
        roles.serve_gateway(args.config, args.port_file, args.profile)
    else:
        return run(args)
    return 0


if __name__ == "__main__":
    random.seed(0)
    sys.exit(main())
