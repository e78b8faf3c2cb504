"""What ``bench_gateway.py`` runs in child processes: upstream, gateway, floors (Python and native).

Roles (``--role ...`` of ``bench_gateway.py``) are the functions named ``serve_*``. The native floors
are nghttpx (Debian ``nghttp2-proxy``: an HTTP/2 reverse proxy in C, no rewrite) and the C++ gRPC
generic proxy prototype in ``native_proxy/`` (built here with Debian's ``libgrpc++-dev``).
"""

from __future__ import annotations

import asyncio
import cProfile
import json
import pstats
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from harness.gateway_bench import METHOD, ROOT, Child, free_port, wait_for_term

NATIVE_PROXY_DIR = ROOT / "benchmarks" / "native_proxy"
NATIVE_PROXY_BINARY = NATIVE_PROXY_DIR / "build" / "kiln_native_proxy"
TRAILER = (("kiln-variant", "a"),)


def serve_upstream(repo: Path, models: list[str], port_file: Path) -> None:
    from server.app import start_server

    handle = start_server(repo, port=0, models=models)
    port_file.write_text(str(handle.port))
    wait_for_term()
    handle.stop(grace=0.5)


def serve_gateway(config_file: Path, port_file: Path, profile_file: Path | None) -> None:
    from server.gateway.app import start_gateway

    spec = json.loads(config_file.read_text())  # {"config": ..., "grpc_options": [[key, value], ...]}
    if spec.get("grpc_options"):
        add_grpc_options([(k, v) for k, v in spec["grpc_options"]])
    profiles: list[cProfile.Profile] = []
    if profile_file is not None:
        profile_handler_threads(profiles)
    gateway = start_gateway(spec["config"], port=0, admin_port=0, insecure_admin=True, plugins=(),
                            data_plane=spec.get("data_plane", "python"))  # fmt: skip
    port_file.write_text(json.dumps({"port": gateway.port, "admin": gateway.admin_url}))
    wait_for_term()
    if profile_file is not None:
        merged = None
        for profile in profiles:
            merged = pstats.Stats(profile) if merged is None else merged.add(profile)
        if merged is not None:
            merged.dump_stats(str(profile_file))
    gateway.stop()


def serve_aio_floor(upstream: str, port_file: Path, trailer: bool = False, loop: str = "asyncio") -> None:
    """The Python floor: a bare grpc.aio byte pass-through (reads the name, appends it, nothing else).

    ``trailer``: also send a ``kiln-variant`` trailing metadata entry (what that costs, measured);
    ``loop="uvloop"``: run it on uvloop (exploration).
    """
    import grpc

    from server.gateway.wire import name_version_suffix, read_model_name

    async def serve() -> None:
        channel = grpc.aio.insecure_channel(upstream)
        call = channel.unary_unary(METHOD)

        async def infer(request: bytes, context: Any) -> bytes:
            name = read_model_name(request)
            response = await call(request + name_version_suffix(name, ""), timeout=context.time_remaining())
            if trailer:
                context.set_trailing_metadata(TRAILER)
            return response

        handler = grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)}
        )
        server = grpc.aio.server(handlers=[handler], options=[("grpc.max_receive_message_length", 2**28)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_file.write_text(json.dumps({"port": port}))
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(0.5)

    if loop == "uvloop":
        import uvloop

        uvloop.run(serve())
    else:
        asyncio.run(serve())


def serve_threads_floor(upstream: str, port_file: Path) -> None:
    """The Python floor on grpc's thread-pool server: blocking pass-through from the worker thread."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from server.gateway.forward import timeout_of
    from server.gateway.wire import name_version_suffix, read_model_name

    channel = grpc.insecure_channel(upstream)
    call = channel.unary_unary(METHOD)

    def infer(request: bytes, context: Any) -> bytes:
        name = read_model_name(request)
        return call(request + name_version_suffix(name, ""), timeout=timeout_of(context.time_remaining()))

    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)}
    )
    server = grpc.server(ThreadPoolExecutor(max_workers=32), handlers=[handler],
                         options=[("grpc.max_receive_message_length", 2**28)])  # fmt: skip
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_file.write_text(json.dumps({"port": port}))
    wait_for_term()
    server.stop(0.5).wait(5)
    channel.close()


def add_grpc_options(extra: list[tuple[str, Any]]) -> None:
    """Exploration knob: extra grpc options on the gateway's server and upstream channels."""
    from server.gateway import app, upstreams

    base = upstreams.channel_options

    def options(max_message_bytes: int) -> list[tuple[str, Any]]:
        return [*base(max_message_bytes), *extra]

    upstreams.channel_options = options  # type: ignore[assignment]
    app.channel_options = options  # type: ignore[attr-defined]


def profile_handler_threads(profiles: list[cProfile.Profile]) -> None:
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


# ---- native floors --------------------------------------------------------------------------------
def nghttpx_child(upstream: str) -> Child | None:
    """nghttpx (Debian ``nghttp2-proxy``, C) as an HTTP/2 reverse proxy; None when not installed."""
    binary = shutil.which("nghttpx")
    if binary is None:
        return None
    host, port = upstream.rsplit(":", 1)
    listen = free_port()
    command = [binary, f"--frontend=127.0.0.1,{listen};no-tls", f"--backend={host},{port};;proto=h2",
               "--workers=1", "--no-ocsp", "--errorlog-file=/dev/null", "--accesslog-file=/dev/null",
               "--conf=/dev/null", "--single-thread"]  # fmt: skip
    return Child(command, None, fixed=f"127.0.0.1:{listen}")


def build_native_proxy() -> str | None:
    """Compile the C++ prototype when g++ and Debian's libgrpc++-dev are there; None or why not."""
    source = NATIVE_PROXY_DIR / "proxy.cc"
    if NATIVE_PROXY_BINARY.exists() and NATIVE_PROXY_BINARY.stat().st_mtime >= source.stat().st_mtime:
        return None
    if shutil.which("g++") is None or subprocess.run(["pkg-config", "--exists", "grpc++"]).returncode != 0:
        return "not built: needs g++ and libgrpc++-dev (apt-get install libgrpc++-dev)"
    done = subprocess.run([str(NATIVE_PROXY_DIR / "build.sh")], capture_output=True, text=True)
    return None if done.returncode == 0 else f"build failed: {done.stderr[-400:]}"


def native_proxy_child(upstream: str, transport: str = "callback") -> Child | None:
    """The C++ generic gRPC proxy prototype (``native_proxy/``) when built; ``transport``: callback|cq."""
    if not NATIVE_PROXY_BINARY.exists():
        return None
    listen = free_port()
    return Child([str(NATIVE_PROXY_BINARY), f"127.0.0.1:{listen}", upstream, transport], None,
                 fixed=f"127.0.0.1:{listen}")  # fmt: skip
