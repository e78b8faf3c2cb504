"""Soak: N minutes of mixed load through a real ``kiln gateway`` with route changes and scheduled faults.

Processes: two ``kiln serve`` upstreams (the example model), one ``kiln gateway`` routing ``digits``
over both (variants ``a`` on u1 and ``b`` on u2), and this script's load threads (raw gRPC
ModelInfer, 2 s deadline, plus a short ModelStreamInfer every 50th request). Every 3 s the weights
change (50/50 <-> 70/30) through the admin API. Faults on a 30 s cycle: at +8 s u2 is SIGKILLed and
restarted 2 s later; at +20 s u1 is SIGSTOPped for 3 s, then SIGCONTed.

A fault's window runs from the fault to 1 s after its upstream is ready again (restarted process
answers ServerReady, or SIGCONT). Printed and written to ``benchmarks/results/soak-<plane>.json``: requests,
errors by code inside and outside fault windows, recovery time (upstream ready -> first request
served by its variant again), and the gateway's RSS drift (last tenth of the run vs the 10 s after
its latency windows, ``metrics.window_s`` = 15 s here, are full).
Goals: zero errors outside fault windows, recovery <= 1 s, RSS drift < 10 %.

    .venv/bin/python benchmarks/bench_soak.py [--minutes 2] [--clients 4]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import yaml  # noqa: E402
from rich.progress import Progress  # noqa: E402
from tritonclient.grpc import service_pb2  # noqa: E402

from builders.examples import example_model_path  # noqa: E402
from harness.gateway import INFER, publish_example, request_bytes  # noqa: E402
from runtime.machine import probe_cpu  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
KILN = str(Path(sys.executable).parent / "kiln")
TOKEN = "soak-token"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
CYCLE_S, KILL_AT, RESTART_AFTER, STOP_AT, STOP_FOR, GRACE_S = 30.0, 8.0, 2.0, 20.0, 3.0, 1.0
# The latency windows keep up to metrics.max_samples samples per variant (100,000 by default: ~12 MB
# each, filled after ~200 s at this load). Smaller here, and RSS drift measured from once they are
# full (window_s + 5 s), so that the drift shows leaks, not bounded buffers filling.
WINDOW_S, MAX_SAMPLES = 15.0, 10_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def ready(port: int) -> bool:
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            answer = channel.unary_unary("/inference.GRPCInferenceService/ServerReady")(
                service_pb2.ServerReadyRequest().SerializeToString(), timeout=0.5
            )
        return bool(service_pb2.ServerReadyResponse.FromString(answer).ready)
    except grpc.RpcError:
        return False


@dataclass
class Upstream:
    name: str
    repo: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen([KILN, "serve", "--repo", str(self.repo), "--port", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    def wait_ready(self, timeout_s: float = 60.0) -> float:
        deadline = time.monotonic() + timeout_s
        while not ready(self.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"upstream {self.name} not ready after {timeout_s} s")
            time.sleep(0.05)
        return time.monotonic()

    def signal(self, sig: int) -> None:
        if self.process is not None:
            os.kill(self.process.pid, sig)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(10)


@dataclass
class Record:
    t: float
    code: str
    variant: str
    stream: bool


class Load:
    """Client threads sending ModelInfer (and now and then a 3-message stream) until stopped."""

    def __init__(self, address: str, clients: int) -> None:
        self.address = address
        self.records: list[Record] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def _run(self, index: int) -> None:
        body = request_bytes("digits")
        with grpc.insecure_channel(self.address) as channel:
            unary, stream = channel.unary_unary(INFER), channel.stream_stream(STREAM)
            count = 0
            while not self._stop.is_set():
                count += 1
                is_stream = count % 50 == index
                code, variant = "OK", ""
                try:
                    if is_stream:
                        call = stream(iter([body] * 3), timeout=2.0)
                        answers = list(call)
                        variant = dict(call.initial_metadata()).get("kiln-variant", "")
                        code = "OK" if len(answers) == 3 else "LOST_RESPONSE"
                    else:
                        _, info = unary.with_call(body, timeout=2.0)
                        variant = dict(info.trailing_metadata()).get("kiln-variant", "")
                except grpc.RpcError as err:
                    code = err.code().name
                with self._lock:
                    self.records.append(Record(time.monotonic(), code, variant, is_stream))


def admin_weights(port: int, a: float) -> None:
    body = json.dumps({"weights": {"a": a, "b": 100 - a}, "reason": "soak"}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/routes/digits/weights", data=body, method="POST")
    request.add_header("Authorization", f"Bearer {TOKEN}")
    with urllib.request.urlopen(request, timeout=5) as answer:
        answer.read()


def run(minutes: float, clients: int, data_plane: str = "python") -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kiln-soak-") as tmp:
        work = Path(tmp)
        repo = work / "repo"
        model = publish_example(repo, "digits", example_model_path())
        ups = {"u1": Upstream("u1", repo), "u2": Upstream("u2", repo)}
        for up in ups.values():
            up.start()
        for up in ups.values():
            up.wait_ready()
        (work / "token").write_text(TOKEN)
        config = {
            "upstreams": {name: {"address": f"127.0.0.1:{up.port}"} for name, up in ups.items()},
            "routes": {"digits": {"variants": [
                {"name": "a", "upstream": "u1", "model": model, "weight": 50},
                {"name": "b", "upstream": "u2", "model": model, "weight": 50}]}},
            "admin": {"token_file": str(work / "token")},
            "resilience": {"base_ejection_s": 0.25, "max_ejection_s": 1.0},
            "metrics": {"window_s": WINDOW_S, "max_samples": MAX_SAMPLES},
        }  # fmt: skip
        (work / "gateway.yaml").write_text(yaml.safe_dump(config))
        gw_port, admin_port = free_port(), free_port()
        gateway = subprocess.Popen([KILN, "gateway", "--config", str(work / "gateway.yaml"), "--port", str(gw_port),
                                    "--admin-port", str(admin_port), "--data-plane", data_plane],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            while not ready(gw_port):
                time.sleep(0.05)
            result = soak(minutes, clients, ups, gateway.pid, gw_port, admin_port)
            return {"data_plane": data_plane, **result}
        finally:
            gateway.terminate()
            gateway.wait(20)
            for up in ups.values():
                up.stop()


def soak(minutes: float, clients: int, ups: dict[str, Upstream], gw_pid: int, gw_port: int,
         admin_port: int) -> dict[str, Any]:  # fmt: skip
    duration = minutes * 60
    load = Load(f"127.0.0.1:{gw_port}", clients)
    faults: list[dict[str, Any]] = []
    rss: list[tuple[float, int]] = []
    start = time.monotonic()
    load.start()
    changes = 0
    with Progress() as progress:
        task = progress.add_task("soak", total=duration)
        cycle_start = start
        while time.monotonic() - start < duration:
            now = time.monotonic()
            in_cycle = now - cycle_start
            if in_cycle >= KILL_AT and not any(f["cycle"] == cycle_start and f["kind"] == "SIGKILL" for f in faults):
                fault = {"cycle": cycle_start, "kind": "SIGKILL", "upstream": "u2", "variant": "b", "at": now}
                faults.append(fault)
                ups["u2"].signal(signal.SIGKILL)
                ups["u2"].process.wait(5)  # type: ignore[union-attr]
                time.sleep(RESTART_AFTER)
                ups["u2"].start()
                fault["ready"] = ups["u2"].wait_ready()
            elif in_cycle >= STOP_AT and not any(f["cycle"] == cycle_start and f["kind"] == "SIGSTOP" for f in faults):
                fault = {"cycle": cycle_start, "kind": "SIGSTOP", "upstream": "u1", "variant": "a", "at": now}
                faults.append(fault)
                ups["u1"].signal(signal.SIGSTOP)
                time.sleep(STOP_FOR)
                ups["u1"].signal(signal.SIGCONT)
                fault["ready"] = time.monotonic()
            if in_cycle >= CYCLE_S:
                cycle_start = now
            if int(now - start) // 3 != changes:
                changes = int(now - start) // 3
                try:
                    admin_weights(admin_port, 50.0 if changes % 2 else 70.0)
                except OSError as err:
                    print(f"route change failed: {err}")
            rss.append((now - start, rss_bytes(gw_pid)))
            progress.update(task, completed=min(duration, time.monotonic() - start))
            time.sleep(0.2)
    load.stop()
    return summarize(load.records, faults, rss, start, duration, changes)


def summarize(records: list[Record], faults: list[dict[str, Any]], rss: list[tuple[float, int]], start: float,
              duration: float, changes: int) -> dict[str, Any]:  # fmt: skip
    windows = [(f["at"], f["ready"] + GRACE_S) for f in faults if "ready" in f]
    inside: Counter[str] = Counter()
    outside: Counter[str] = Counter()
    for record in records:
        if record.code == "OK":
            continue
        hit = any(a <= record.t <= b + 2.0 for a, b in windows)  # +2 s: a request sent in the window ends later
        (inside if hit else outside)[record.code] += 1
    recoveries = []
    for fault in faults:
        if "ready" not in fault:
            continue
        served = [r.t for r in records if r.code == "OK" and r.variant == fault["variant"] and r.t >= fault["ready"]]
        recoveries.append({"kind": fault["kind"], "at_s": round(fault["at"] - start, 2),
                           "recovery_s": round(min(served) - fault["ready"], 3) if served else None})  # fmt: skip
    values = [r for _, r in rss]
    tenth = max(1, len(values) // 10)
    early = [r for t, r in rss if WINDOW_S + 5 <= t < WINDOW_S + 15] or values[:tenth]
    late = values[-tenth:]
    drift = (sum(late) / len(late)) / (sum(early) / len(early)) - 1.0
    measured = [r["recovery_s"] for r in recoveries if r["recovery_s"] is not None]
    return {
        "cpu_isa": probe_cpu().isa(),
        "duration_s": round(duration, 1),
        "requests": len(records),
        "streams": sum(r.stream for r in records),
        "route_changes": changes,
        "faults": len(faults),
        "errors_inside_fault_windows": dict(inside),
        "errors_outside_fault_windows": dict(outside),
        "recovery": recoveries,
        "recovery_max_s": max(measured) if measured else None,
        "rss_mb": {
            "early": round(sum(early) / len(early) / 2**20, 1),
            "late": round(sum(late) / len(late) / 2**20, 1),
            "max": round(max(values) / 2**20, 1),
        },
        "rss_drift": round(drift, 4),
        "rss_samples_mb": [[round(t, 1), round(r / 2**20, 1)] for t, r in rss[::5]],
        "goals": {
            "zero_errors_outside_windows": not outside,
            "recovery_within_1s": bool(measured) and max(measured) <= 1.0,
            "rss_drift_under_10pct": drift < 0.10,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument(
        "--data-plane",
        choices=("python", "envoy"),
        default="python",
        help="the gateway's data plane (RSS is the kiln process's; with envoy, Envoy's is not counted)",
    )
    args = parser.parse_args()
    result = run(args.minutes, args.clients, args.data_plane)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"soak-{args.data_plane}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"CPU ISA: {', '.join(result['cpu_isa']) or 'baseline x86-64'}")
    print(f"requests {result['requests']} ({result['streams']} streams), route changes {result['route_changes']}, "
          f"faults {result['faults']}")  # fmt: skip
    print(f"errors outside fault windows: {result['errors_outside_fault_windows'] or 0}; "
          f"inside: {result['errors_inside_fault_windows']}")  # fmt: skip
    print(f"recovery max {result['recovery_max_s']} s; RSS drift {result['rss_drift'] * 100:.1f} % "
          f"({result['rss_mb']['early']} -> {result['rss_mb']['late']} MB)")  # fmt: skip


if __name__ == "__main__":
    main()
