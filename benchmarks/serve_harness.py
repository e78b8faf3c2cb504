"""Shared by the serving benchmarks: tiny repositories and ``kiln serve`` in a child process.

The server runs in its own process (as users run it), so it does not share the client's GIL.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
_SERVE = "import sys; from server.cli import main; sys.exit(main(sys.argv[1:]))"


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


def digits_repo(root: Path) -> tuple[Path, str]:
    """The example model built as ``digits-fp32-ort`` (max_batch 32, dynamic batching on)."""
    from builders.examples import example_model_path
    from builders.pipeline import BuildRequest, build_model

    build_model(BuildRequest(model=example_model_path(), name="digits", precision="fp32", repo=root))
    return root, "digits-fp32-ort"


def kiln_serve(repo: Path, *extra: str) -> contextlib.AbstractContextManager[str]:
    """``kiln serve --repo REPO --port 0 EXTRA...`` in a child process; yields its HOST:PORT."""
    return child_server([sys.executable, "-c", _SERVE, "serve", "--repo", str(repo), "--port", "0", *extra])


def grpc_echo() -> contextlib.AbstractContextManager[str]:
    """The bare gRPC floor (``grpc_echo.py``) in a child process; yields its HOST:PORT."""
    return child_server([sys.executable, str(Path(__file__).resolve().parent / "grpc_echo.py")])


@contextlib.contextmanager
def child_server(command: list[str]) -> Iterator[str]:
    """Run a server that prints ``listening on HOST:PORT`` first; SIGTERM it afterwards."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if "listening on" not in line:
                raise RuntimeError(f"{command[-1]} did not start: {line}{proc.stdout.read()}")
            yield line.split("listening on ")[1].split()[0]
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
