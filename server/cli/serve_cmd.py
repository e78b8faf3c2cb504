"""``kiln serve --repo DIR [--host H] [--port P] [--models a,b] [--model-control-mode M] [...]``."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from builders.repository import repository_root
from builders.request import DEFAULT_REPO
from core.errors import InvalidInputError
from server.app import DEFAULT_MAX_MESSAGE_MB, DEFAULT_POLL_S, make_options, serve


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("serve", help="serve a model repository over the KServe v2 / Triton gRPC protocol")
    parser.add_argument("--repo", type=Path, default=DEFAULT_REPO, help="Triton model repository")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8001, help="gRPC port (default 8001, Triton's; 0 picks one)")
    parser.add_argument("--models", default=None, help="comma-separated models to load (default: all)")
    parser.add_argument(
        "--max-message-mb",
        type=float,
        default=DEFAULT_MAX_MESSAGE_MB,
        help=f"largest request or response in MiB (default {DEFAULT_MAX_MESSAGE_MB}); larger: RESOURCE_EXHAUSTED",
    )
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads per model instance")
    parser.add_argument("--no-batching", action="store_true", help="ignore dynamic_batching in config.pbtxt")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds to drain in-flight requests on SIGTERM")
    parser.add_argument(
        "--model-control-mode",
        default="none",
        help="as Triton's: none (load at start; RepositoryModelLoad/Unload refused), poll (also pick up new, "
        "changed and removed versions and models every --repository-poll-secs), explicit (load/unload through "
        "the repository API; --models are loaded at start, default all)",
    )
    parser.add_argument(
        "--repository-poll-secs",
        type=float,
        default=None,
        help=f"poll mode: seconds between repository scans (default {DEFAULT_POLL_S:g}, Triton's)",
    )
    parser.set_defaults(func=run)


def check_flags(args: argparse.Namespace) -> list[str] | None:
    """Refuse flags that would serve the wrong models or exhaust the machine; returns --models as a list."""
    cpus = os.cpu_count() or 1
    if not 1 <= args.threads <= cpus:
        raise InvalidInputError(
            f"--threads {args.threads} is outside 1..{cpus} (this machine's CPUs); ONNX Runtime starts that many "
            "threads per model instance"
        )
    if args.grace < 0:
        raise InvalidInputError(f"--grace must be >= 0 seconds, got {args.grace:g}")
    if args.repository_poll_secs is not None and args.model_control_mode != "poll":
        raise InvalidInputError(
            f"--repository-poll-secs {args.repository_poll_secs:g} only applies to --model-control-mode poll "
            f"(got {args.model_control_mode!r}); add --model-control-mode poll or drop it"
        )
    if args.models is None:
        return None
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise InvalidInputError(f"--models {args.models!r} names no model; give names like digits-fp32-ort,a,b")
    return models


def run(args: argparse.Namespace) -> int:
    models = check_flags(args)
    repo = repository_root(args.repo)
    options = make_options(
        args.host,
        args.port,
        models,
        args.max_message_mb,
        intra_op_threads=args.threads,
        dynamic_batching=False if args.no_batching else None,
        grace_s=args.grace,
        model_control_mode=args.model_control_mode,
        poll_s=args.repository_poll_secs if args.repository_poll_secs is not None else DEFAULT_POLL_S,
    )
    asyncio.run(serve(repo, options))
    return 0
