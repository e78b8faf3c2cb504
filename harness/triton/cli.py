"""A real Triton Inference Server (2.51, from the ``nvidia-pytriton`` wheel) for tests and benchmarks.

Three steps, each usable alone::

    install = ensure_triton_venv(default_venv_path())         # venv: pytriton, numpy<2, onnxruntime
    write_python_backend_model(repo, "digits", onnx_path, max_batch_size=64, dynamic_batching=True)
    with start_triton(install, repo) as triton:               # 127.0.0.1, free ports, waits for ready
        client = tritonclient.grpc.InferenceServerClient(triton.grpc_url)

The model runs ONNX Runtime inside Triton's Python backend (``triton_python_model``).
CI pre-creates the venv with ``python -m harness.triton.cli --setup [DIR]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from core.errors import KilnError, MissingDependencyError
from harness.triton.install import (
    REQUIREMENTS,
    TritonInstall,
    default_venv_path,
    directory_bytes,
    ensure_triton_venv,
    triton_env,
)
from harness.triton.process import TritonProcess, free_port, start_triton
from harness.triton.repository import python_backend_config, write_python_backend_model

__all__ = [
    "REQUIREMENTS",
    "TritonInstall",
    "TritonProcess",
    "default_venv_path",
    "directory_bytes",
    "ensure_triton_venv",
    "free_port",
    "main",
    "python_backend_config",
    "start_triton",
    "triton_env",
    "write_python_backend_model",
]


def main(argv: list[str] | None = None) -> int:
    """``python -m harness.triton.cli --setup [DIR]``: create or reuse the venv, print a summary."""
    parser = argparse.ArgumentParser(
        prog="python -m harness.triton.cli", description="Prepare the real Triton server used by tests."
    )
    parser.add_argument(
        "--setup",
        type=Path,
        nargs="?",
        const=default_venv_path(),
        metavar="DIR",
        help=f"create or reuse the Triton venv at DIR (default {default_venv_path()})",
    )
    args = parser.parse_args(argv)
    if args.setup is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter_ns()
    try:
        install = ensure_triton_venv(args.setup)
    except MissingDependencyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except KilnError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = {
        "venv": str(install.venv),
        "tritonserver": str(install.tritonserver),
        "backends_dir": str(install.backends_dir),
        "python_libdir": str(install.python_libdir),
        "versions": dict(install.versions),
        "seconds": round((time.perf_counter_ns() - started) / 1e9, 1),
        "size_mib": round(directory_bytes(install.venv) / 2**20, 1),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
