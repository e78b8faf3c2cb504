"""Shared by the serving benchmarks: tiny repositories and ``kiln serve`` in a child process.

The server runs in its own process (as users run it), so it does not share the client's GIL.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
_SERVE = "import sys; from server.cli import main; sys.exit(main(sys.argv[1:]))"
SERVER_PIDS: dict[str, int] = {}  # HOST:PORT of each running child server -> its pid


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and its live descendants (Triton's stubs)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = (Path("/proc") / entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    total, frontier = 0.0, [pid]
    while frontier:
        current = frontier.pop()
        total += times.get(current, 0.0)
        frontier.extend(child for child, parent in parents.items() if parent == current)
    return total


def measure(url: str, model: str, concurrency: int, seconds: float, pid: int | None = None) -> dict[str, Any]:
    """One closed-loop point after a 0.5 s warm-up: throughput, p50/p99, CPU per request of the server
    (its process tree) and of the client (this process: ``kiln bench`` shares the machine's cores)."""
    from server.bench import BenchConfig, run_bench

    run_bench(BenchConfig(url=url, model=model, concurrency=(concurrency,), duration_s=0.5, warmup_s=0))
    pid = pid if pid is not None else SERVER_PIDS.get(url)
    before = tree_cpu_s(pid) if pid else 0.0
    client_before = time.process_time()
    point = run_bench(
        BenchConfig(url=url, model=model, concurrency=(concurrency,), duration_s=seconds, warmup_s=0)
    ).first
    used = tree_cpu_s(pid) - before if pid else float("nan")
    client = time.process_time() - client_before
    done = point.total
    return {
        "throughput_rps": round(point.throughput_rps, 1),
        "p50_us": round(point.latency_us["p50"], 1),
        "p99_us": round(point.latency_us["p99"], 1),
        "server_cpu_us_per_request": round(used / done * 1e6, 1) if done else None,
        "client_cpu_us_per_request": round(client / done * 1e6, 1) if done else None,
        "requests": done,
        "errors": point.errors,
    }


def identity_model(path: Path, width: int = 16) -> Path:
    """y = x, float32 [batch, width]: the trivial model for overhead and ceiling figures."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def identity_repo(root: Path, width: int = 16) -> Path:
    """A plain Triton repository with model ``identity`` (max_batch_size 8, no dynamic batching)."""
    from builders.model_config import ServingOptions, config_text, render_config
    from builders.tensors import TensorSpec

    model_dir = root / "identity"
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    identity_model(model_dir / "1" / "model.onnx", width)
    spec_in = TensorSpec("x", "float32", (-1, width))
    spec_out = TensorSpec("y", "float32", (-1, width))
    options = ServingOptions(max_batch_size=8, dynamic_batching=False)
    (model_dir / "config.pbtxt").write_text(
        config_text(render_config("identity", "ort", (spec_in,), (spec_out,), options))
    )
    return root


def mlp_repo(root: Path, width: int = 2048, seed: int = 0) -> tuple[Path, str]:
    """Model ``mlp``: y = relu(x @ W1) @ W2, float32 [batch, width]; weight-bound, so batching pays.

    Its config is what ``kiln build`` writes: max_batch_size 32, preferred 16/32, 500 µs delay.
    """
    import numpy as np
    from onnx import numpy_helper

    from builders.model_config import ServingOptions, config_text, render_config
    from builders.tensors import TensorSpec

    rng = np.random.default_rng(seed)
    weights = [
        numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), name)
        for name in ("W1", "W2")
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model_dir = root / "mlp"
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(model_dir / "1" / "model.onnx"))
    specs = (TensorSpec("x", "float32", (-1, width)),), (TensorSpec("y", "float32", (-1, width)),)
    config = render_config("mlp", "ort", *specs, ServingOptions(max_batch_size=32))
    (model_dir / "config.pbtxt").write_text(config_text(config))
    return root, "mlp"


CNN_SIZE = 224


def cnn_model(path: Path, seed: int = 0) -> Path:
    """A compute-bound image CNN with random weights: float32 [batch,3,224,224] -> [batch,1000].

    Conv3x3/2(32)-Relu-MaxPool, then Conv3x3(64/128/256)-Relu each followed by MaxPool (the last by
    GlobalAveragePool), Flatten, Gemm(1000): ~185 M multiply-adds, a few ms per image on one core.
    """
    import numpy as np
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    weights, nodes, current = [], [], "x"
    channels = [(3, 32, 2), (32, 64, 1), (64, 128, 1), (128, 256, 1)]
    for index, (c_in, c_out, stride) in enumerate(channels):
        w = (rng.standard_normal((c_out, c_in, 3, 3)) * np.sqrt(2.0 / (c_in * 9))).astype(np.float32)
        bias = np.zeros(c_out, np.float32)
        weights += [numpy_helper.from_array(w, f"w{index}"), numpy_helper.from_array(bias, f"b{index}")]
        nodes.append(
            helper.make_node(
                "Conv", [current, f"w{index}", f"b{index}"], [f"c{index}"], pads=[1, 1, 1, 1], strides=[stride, stride]
            )
        )
        nodes.append(helper.make_node("Relu", [f"c{index}"], [f"r{index}"]))
        last = index == len(channels) - 1
        pool = (
            helper.make_node("GlobalAveragePool", [f"r{index}"], [f"p{index}"])
            if last
            else helper.make_node("MaxPool", [f"r{index}"], [f"p{index}"], kernel_shape=[2, 2], strides=[2, 2])
        )
        nodes.append(pool)
        current = f"p{index}"
    fc = (rng.standard_normal((256, 1000)) / 16.0).astype(np.float32)
    weights += [numpy_helper.from_array(fc, "fc"), numpy_helper.from_array(np.zeros(1000, np.float32), "fcb")]
    nodes += [helper.make_node("Flatten", [current], ["flat"]), helper.make_node("Gemm", ["flat", "fc", "fcb"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "cnn224",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, CNN_SIZE, CNN_SIZE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1000])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def cnn_repo(root: Path, max_batch_size: int = 16) -> tuple[Path, str]:
    """Model ``cnn224`` (see ``cnn_model``), configured like ``kiln build`` output: dynamic batching on.

    max_batch_size 16, preferred 8/16, max_queue_delay 500 µs, one instance, one ONNX Runtime thread.
    """
    from builders.model_config import ServingOptions, config_text, render_config
    from builders.tensors import TensorSpec

    model_dir = root / "cnn224"
    cnn_model(model_dir / "1" / "model.onnx")
    specs = (TensorSpec("x", "float32", (-1, 3, CNN_SIZE, CNN_SIZE)),), (TensorSpec("y", "float32", (-1, 1000)),)
    options = ServingOptions(max_batch_size=max_batch_size, preferred_batch_sizes=(8, 16))
    (model_dir / "config.pbtxt").write_text(config_text(render_config("cnn224", "ort", *specs, options)))
    return root, "cnn224"


def digits_repo(root: Path) -> tuple[Path, str]:
    """The example model built as ``digits-fp32-ort`` (max_batch 32, dynamic batching on)."""
    from builders.examples import example_model_path
    from builders.pipeline import build_model
    from builders.request import BuildRequest

    build_model(BuildRequest(model=example_model_path(), name="digits", precision="fp32", repo=root))
    return root, "digits-fp32-ort"


def kiln_serve(repo: Path, *extra: str) -> contextlib.AbstractContextManager[str]:
    """``kiln serve --repo REPO --port 0 EXTRA...`` in a child process; yields its HOST:PORT."""
    return child_server([sys.executable, "-c", _SERVE, "serve", "--repo", str(repo), "--port", "0", *extra])


def grpc_echo(*extra: str) -> contextlib.AbstractContextManager[str]:
    """The bare gRPC floor (``grpc_echo.py EXTRA...``) in a child process; yields its HOST:PORT."""
    return child_server([sys.executable, str(Path(__file__).resolve().parent / "grpc_echo.py"), *extra])


@contextlib.contextmanager
def child_server(command: list[str]) -> Iterator[str]:
    """Run a server that prints ``listening on HOST:PORT`` first; SIGTERM it afterwards."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if "listening on" not in line:
                raise RuntimeError(f"{command[-1]} did not start: {line}{proc.stdout.read()}")
            url = line.split("listening on ")[1].split()[0]
            SERVER_PIDS[url] = proc.pid
            yield url
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def write_results(name: str, figures: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    print(f"written to {path}")
    return path


def write_bars(name: str, title: str, ylabel: str, series: dict[str, dict[str, float]]) -> Path:
    """``results/<name>.png``: grouped bars, one group per key of the inner dicts, one bar per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = list(next(iter(series.values())))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, values) in enumerate(series.items()):
        xs = np.arange(len(groups)) + i * width
        bars = ax.bar(xs, [values[g] for g in groups], width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(np.arange(len(groups)) + width * (len(series) - 1) / 2, groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot written to {path}")
    return path
