"""Serve a repository in-process, answer real tritonclient requests, and bench it briefly.

What ``kiln quickstart`` runs after building: proof that the published model serves over the
Triton protocol and how fast, without leaving a server behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tritonclient.grpc as tc
from rich.console import Console

from builders.errors import InvalidInputError
from server.app import start_server
from server.bench import BenchConfig, BenchResult, run_bench


@dataclass(frozen=True)
class ServingCheck:
    url: str
    model: str
    version: str
    requests: int
    correct: int | None  # predictions equal to the labels, when the data has ``labels``
    bench: BenchResult

    @property
    def accuracy(self) -> float | None:
        return None if self.correct is None else self.correct / self.requests


def check_serving(
    repo: Path,
    model: str,
    data: Path,
    *,
    requests: int = 8,
    bench_seconds: float = 2.0,
    concurrency: tuple[int, ...] = (1, 4),
    console: Console | None = None,
) -> ServingCheck:
    """Start ``kiln serve`` on 127.0.0.1 (free port), send ``requests`` rows of ``data``, bench, stop.

    ``data`` is an .npz with one array per model input (and optionally ``labels``, compared with
    the argmax of the first output).
    """
    with np.load(data) as npz:
        arrays = {key: npz[key] for key in npz.files}
    with start_server(repo, port=0, models=[model]) as server:
        with tc.InferenceServerClient(server.url) as client:
            version, correct = _send_rows(client, model, arrays, requests, data)
        if console is not None:
            console.print(f"served [bold]{model}[/] v{version} at {server.url}: {requests} requests answered")
        config = BenchConfig(
            url=server.url, model=model, concurrency=concurrency, duration_s=bench_seconds, warmup_s=0.3, data=data
        )
        bench = run_bench(config)
    if console is not None:
        from server.cli.bench_cmd import print_result

        print_result(bench, console)
    return ServingCheck(server.url, model, version, requests, correct if "labels" in arrays else None, bench)


def _send_rows(
    client: tc.InferenceServerClient, model: str, arrays: dict[str, np.ndarray], requests: int, data: Path
) -> tuple[str, int]:
    """Send rows 0..requests-1 one by one; returns the served version and the correct count."""
    meta = client.get_model_metadata(model)
    missing = [t.name for t in meta.inputs if t.name not in arrays]
    if missing:
        raise InvalidInputError(f"{str(data)!r} has keys {sorted(arrays)}; model {model!r} needs {missing}")
    correct, version = 0, ""
    for row in range(requests):
        inputs = []
        for tensor in meta.inputs:
            value = np.ascontiguousarray(arrays[tensor.name][row : row + 1])
            infer_input = tc.InferInput(tensor.name, list(value.shape), tensor.datatype)
            infer_input.set_data_from_numpy(value)
            inputs.append(infer_input)
        result = client.infer(model, inputs)
        version = result.get_response().model_version
        if "labels" in arrays:
            first = result.as_numpy(meta.outputs[0].name)
            correct += int(np.argmax(first.reshape(-1)) == int(arrays["labels"][row]))
    return version, correct
