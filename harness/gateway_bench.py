"""Helpers for ``bench_gateway.py``: models, child processes, the closed-loop client, measurement, profiles.

Every server under test runs in its own process (as users run them) and the load generator is the
same grpc.aio client for every path, so the paths differ only by what sits between client and
upstream. The processes themselves (roles and floors) are in ``harness/gateway_roles.py``.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import pstats
import signal
import socket
import statistics
import subprocess
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
METHOD = "/inference.GRPCInferenceService/ModelInfer"


# ---- models ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """One model served upstream and the request the client sends for it."""

    label: str
    model: str  # served (Triton) name, also the gateway's public name
    input_name: str
    shape: tuple[int, ...]

    def request(self) -> bytes:
        from tritonclient.grpc import service_pb2

        x = np.random.default_rng(0).random(self.shape, dtype=np.float32)
        request = service_pb2.ModelInferRequest(model_name=self.model)
        tensor = request.inputs.add()
        tensor.name, tensor.datatype = self.input_name, "FP32"
        tensor.shape.extend(x.shape)
        request.raw_input_contents.append(x.tobytes())
        return request.SerializeToString()


DIGITS = Workload("digits (small model)", "digits-fp32-ort", "input", (1, 1, 8, 8))
CNN = Workload("cnn 224x224 (compute-dominated)", "cnn-fp32-ort", "image", (1, 3, 224, 224))


def cnn_model(path: Path, seed: int = 0) -> Path:
    """A small image CNN: 3x224x224 -> 4x (Conv3x3 + Relu + MaxPool2) -> GlobalAvgPool -> Gemm(10).

    Random weights; a few ms per sample on a CPU core, so inference dominates the per-request cost.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, prev, channels = [], [], "image", 3
    for i, (out, stride) in enumerate(((32, 2), (96, 1), (128, 1), (192, 1))):
        w = (rng.standard_normal((out, channels, 3, 3)) / np.sqrt(channels * 9)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(out, np.float32), f"b{i}")]
        nodes += [
            helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1], strides=[stride] * 2),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
            helper.make_node("MaxPool", [f"r{i}"], [f"p{i}"], kernel_shape=[2, 2], strides=[2, 2]),
        ]
        prev, channels = f"p{i}", out
    fc = (rng.standard_normal((channels, 10)) / np.sqrt(channels)).astype(np.float32)
    inits += [numpy_helper.from_array(fc, "fc"), numpy_helper.from_array(np.zeros(10, np.float32), "fcb")]
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
              helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"])]  # fmt: skip
    graph = helper.make_graph(
        nodes, "cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def build_repository(repo: Path, tmp: Path) -> None:
    """Publish the example digits model and the CNN into ``repo`` with Kiln's own pipeline."""
    from builders.examples import example_model_path
    from builders.pipeline import build_model
    from builders.request import BuildRequest

    build_model(BuildRequest(model=example_model_path(), name="digits", precision="fp32", repo=repo))
    build_model(BuildRequest(model=cnn_model(tmp / "cnn.onnx"), name="cnn", precision="fp32", repo=repo))


# ---- child processes ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Child:
    """A server in a child process that writes its port (or JSON) to ``port_file`` once it serves."""

    def __init__(self, command: Sequence[str], port_file: Path | None, env: dict[str, str] | None = None,
                 fixed: str | None = None) -> None:  # fmt: skip
        self.port_file, self.fixed = port_file, fixed
        self.process = subprocess.Popen(list(command), cwd=ROOT, env={**os.environ, **(env or {})},
                                        stdout=subprocess.DEVNULL if fixed else None,
                                        stderr=subprocess.DEVNULL if fixed else None)  # fmt: skip

    def ready(self, timeout_s: float = 90.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.fixed is not None and _listening(self.fixed):
                return self.fixed
            if self.port_file is not None and self.port_file.exists() and self.port_file.read_text():
                return self.port_file.read_text()
            if self.process.poll() is not None:
                raise RuntimeError(f"child {self.process.args!r} exited with {self.process.returncode}")
            time.sleep(0.05)
        raise RuntimeError(f"child {self.process.args!r} did not start in time")

    def cpu_s(self) -> float:
        """User + system CPU seconds this child and its own children (nghttpx's worker) used so far."""
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # a process that just ended
                continue
            if stat.parent.name == str(self.process.pid) or fields[1] == str(self.process.pid):
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.2):
            return True
    except OSError:
        return False


def wait_for_term() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()


# ---- load -----------------------------------------------------------------------------------------
async def _closed_loop(
    address: str, body: bytes, concurrency: int, seconds: float, metadata: Any = None
) -> tuple[list[int], int]:
    import grpc

    options = [("grpc.max_receive_message_length", 2**28)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        call = channel.unary_unary(METHOD)
        for _ in range(10):  # warm up
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

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, errors


def closed_loop(address: str, body: bytes, concurrency: int, seconds: float, metadata: Any = None) -> dict[str, Any]:
    started = time.perf_counter()
    latencies, errors = asyncio.run(_closed_loop(address, body, concurrency, seconds, metadata))
    elapsed = max(time.perf_counter() - started, 1e-9)
    latencies.sort()
    return {
        "concurrency": concurrency,
        "seconds": seconds,
        "requests": len(latencies),
        "errors": errors,
        "throughput_rps": len(latencies) / seconds,
        "elapsed_s": elapsed,
        "p50_us": latencies[len(latencies) // 2] / 1e3 if latencies else 0.0,
        "p99_us": latencies[int(len(latencies) * 0.99)] / 1e3 if latencies else 0.0,
    }


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


def admin_get(admin_url: str, path: str) -> Any:
    with urllib.request.urlopen(admin_url + path, timeout=10) as response:
        return json.loads(response.read())


def admin_post(admin_url: str, path: str, body: Any) -> Any:
    request = urllib.request.Request(admin_url + path, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


# ---- measurement ----------------------------------------------------------------------------------
@dataclass
class Contender:
    """One way from the client to the upstream; ``child`` is None for direct calls."""

    name: str
    address: str
    child: Child | None
    runs: dict[str, list[Any]] = field(default_factory=lambda: {"c16": [], "c1": [], "cpu_us": [], "up_cpu_us": []})


def measure(paths: list[Contender], upstream: Child, body: bytes, rounds: int, seconds: float, c1: bool = True) -> None:
    """Interleaved rounds (drift hits every path alike): c16 throughput + CPU per request, c1 p50.

    A first unmeasured c16 pass on every path warms the upstream (each new dynamic-batch shape
    costs ORT an allocation once) and every hop's connections.
    """
    for path in paths:
        closed_loop(path.address, body, 16, min(seconds, 1.0))
    for _ in range(rounds):
        for path in paths:
            before = path.child.cpu_s() if path.child else 0.0
            up_before = upstream.cpu_s()
            run16 = closed_loop(path.address, body, 16, seconds)
            count = run16["requests"] + 10
            path.runs["up_cpu_us"].append((upstream.cpu_s() - up_before) / count * 1e6)
            path.runs["cpu_us"].append(((path.child.cpu_s() - before) / count * 1e6) if path.child else 0.0)
            path.runs["c16"].append(run16)
            if c1:
                path.runs["c1"].append(closed_loop(path.address, body, 1, seconds / 2))


def summarize(paths: list[Contender]) -> dict[str, Any]:
    """Medians per path; ratios against ``direct`` pair rounds (same round = same box conditions)."""
    direct = paths[0].runs
    out: dict[str, Any] = {}
    for path in paths:
        data = path.runs
        row: dict[str, Any] = {
            "c16_rps": statistics.median(r["throughput_rps"] for r in data["c16"]),
            "c16_p50_us": statistics.median(r["p50_us"] for r in data["c16"]),
            "cpu_us_per_request": statistics.median(data["cpu_us"]),
            "upstream_cpu_us_per_request": statistics.median(data["up_cpu_us"]),
            "errors": sum(r["errors"] for r in data["c16"] + data["c1"]),
        }
        if data["c1"]:
            row["c1_p50_us"] = statistics.median(r["p50_us"] for r in data["c1"])
        if path is not paths[0]:
            pairs16 = list(zip(direct["c16"], data["c16"], strict=True))
            ratios = [g["throughput_rps"] / d["throughput_rps"] for d, g in pairs16]
            row["c16_ratio"], row["c16_ratio_range"] = statistics.median(ratios), [min(ratios), max(ratios)]
            if data["c1"]:
                pairs1 = zip(direct["c1"], data["c1"], strict=True)
                added = [g["p50_us"] - d["p50_us"] for d, g in pairs1]
                row["c1_added_p50_us"], row["c1_added_range_us"] = statistics.median(added), [min(added), max(added)]
            # CPU-bound ceiling on this box: all processes share os.cpu_count() cores, so a request
            # through the proxy costs the direct path's whole-box CPU plus the proxy's own.
            direct_cpu = (os.cpu_count() or 1) / statistics.median(r["throughput_rps"] for r in direct["c16"]) * 1e6
            row["direct_box_cpu_us_per_request"] = direct_cpu
            row["cpu_ceiling_ratio"] = direct_cpu / (direct_cpu + row["cpu_us_per_request"])
        row["runs"] = data
        out[path.name] = row
    return out


# ---- profiles -------------------------------------------------------------------------------------
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
