"""Run the embedded KServe v2 server: in-process (``start_server``) or in the foreground (``serve``).

``start_server`` runs the gRPC server on its own event loop thread and returns once every
requested model is loaded (or has failed with its reason), so tests, the quickstart and the
gateway's tests can use it like a remote server. ``serve`` blocks and drains on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from builders.repository import list_models
from core.errors import InvalidInputError, KilnError, NotFoundError, UnavailableError
from runtime.runner import RunnerFactory, create_runner
from server.model_store import CONTROL_MODES, ModelStore, StoreOptions
from server.repository_watch import RepositoryPoller
from server.servicer import InferenceServicer, add_to_server

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_MB = 64
DEFAULT_POLL_S = 15.0  # Triton's --repository-poll-secs default
SERVICE_NAME = "inference.GRPCInferenceService"


@dataclass(frozen=True)
class ServerOptions:
    """How the server runs; parsed once from the CLI or given by the caller."""

    host: str = "127.0.0.1"
    port: int = 8001
    models: tuple[str, ...] | None = None  # None: every model in the repository
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_MB * 2**20
    intra_op_threads: int = 1
    dynamic_batching: bool | None = None  # None: as each config.pbtxt says
    grace_s: float = 10.0
    runner_factory: RunnerFactory = field(default=create_runner)
    model_control_mode: str = "none"  # as Triton's --model-control-mode: none, poll or explicit
    poll_s: float = DEFAULT_POLL_S  # poll mode: seconds between repository scans


class _Server:
    """The running parts, owned by the event loop that runs them."""

    def __init__(self, repo: Path, options: ServerOptions) -> None:
        self.options = options
        store_options = StoreOptions(
            options.intra_op_threads, options.dynamic_batching, options.runner_factory, options.model_control_mode
        )
        self.store = ModelStore(repo, store_options)
        self.poller = RepositoryPoller(self.store, options.models) if options.model_control_mode == "poll" else None
        self._poll_task: asyncio.Task[None] | None = None
        self.ready = False
        self.health = health_aio.HealthServicer()
        limit = options.max_message_bytes
        self.grpc = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ]
        )
        add_to_server(InferenceServicer(self.store, is_ready=lambda: self.ready), self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        self.port = 0

    async def start(self) -> int:
        address = f"{self.options.host}:{self.options.port}"
        try:
            self.port = self.grpc.add_insecure_port(address)
        except RuntimeError as err:
            raise UnavailableError(
                f"cannot listen on {address} ({err}): the port is in use or the address is not on this machine; "
                "pick another --port or --host"
            ) from err
        await self.grpc.start()
        if self.poller is not None:
            self.poller.remember()  # changes made while the start-up load runs are noticed by the first poll
        await self._load_models()
        if self.poller is not None:
            self._poll_task = asyncio.get_running_loop().create_task(self._poll_forever(self.poller))
        self.ready = True
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def _load_models(self) -> None:
        available = tuple(entry.name for entry in list_models(self.store.root))
        names = self.options.models if self.options.models is not None else available
        unknown = [n for n in names if n not in available]
        if unknown:
            raise NotFoundError(
                f"models {unknown} are not in repository {str(self.store.root)!r}; it holds {list(available)}"
            )
        results = await asyncio.gather(*(self.store.load(n) for n in names), return_exceptions=True)
        failed: list[str] = []
        for name, result in zip(names, results, strict=True):
            if isinstance(result, KilnError):
                logger.warning("model %s did not load: %s", name, result)
                failed.append(f"{name}: {result}")
            elif isinstance(result, BaseException):
                raise result
        if failed and self.options.models is not None:
            # models named explicitly must all serve (Triton's --exit-on-error); in whole-repository
            # mode the others still serve, so a GPU plan on a CPU host does not block ONNX models
            raise UnavailableError(
                "models named with --models did not load: " + "; ".join(failed) + "; fix them or leave them out"
            )
        if not names:
            logger.warning("repository %s holds no models; nothing is served until one is loaded", self.store.root)

    async def _poll_forever(self, poller: RepositoryPoller) -> None:
        while True:
            await asyncio.sleep(self.options.poll_s)
            try:
                changed = await poller.poll()
            except Exception:  # one bad pass (e.g. the repository briefly unreadable) must not end polling
                logger.exception("repository poll failed; trying again in %.1f s", self.options.poll_s)
                continue
            if changed:
                logger.info("repository poll: reloaded or unloaded %s", changed)

    async def stop(self, grace_s: float) -> None:
        """Refuse new RPCs, let in-flight ones finish (up to ``grace_s``), then release models."""
        self.ready = False
        if self._poll_task is not None:
            self._poll_task.cancel()
        await self.health.enter_graceful_shutdown()
        await self.grpc.stop(grace_s)
        await self.store.close()


class ServerHandle:
    """A server running on a background thread; ``stop`` drains and joins it."""

    def __init__(self, server: _Server, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self._server, self._loop, self._thread = server, loop, thread
        self.host = server.options.host
        self.port = server.port
        self.store = server.store
        self._stop_lock = threading.Lock()
        self._stopped = False

    @property
    def url(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, grace: float = 5.0) -> None:
        """Drain in-flight requests for up to ``grace`` seconds, release the models, end the thread."""
        with self._stop_lock:
            if self._stopped or not self._thread.is_alive():
                return
            self._stopped = True
        asyncio.run_coroutine_threadsafe(self._server.stop(grace), self._loop).result(grace + 30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_server(
    repo: Path | str,
    host: str = "127.0.0.1",
    port: int = 0,
    models: Sequence[str] | None = None,
    *,
    max_message_mb: float = DEFAULT_MAX_MESSAGE_MB,
    intra_op_threads: int = 1,
    dynamic_batching: bool | None = None,
    runner_factory: RunnerFactory = create_runner,
    model_control_mode: str = "none",
    poll_s: float = DEFAULT_POLL_S,
) -> ServerHandle:
    """Start a server in this process on ``host:port`` (0: a free port, see ``.port``); loads models first."""
    options = make_options(
        host,
        port,
        models,
        max_message_mb,
        intra_op_threads,
        dynamic_batching,
        runner_factory,
        model_control_mode=model_control_mode,
        poll_s=poll_s,
    )
    loop = asyncio.new_event_loop()
    server_box: list[_Server] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_forever()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    thread = threading.Thread(target=run, name=f"kiln-serve-{port}", daemon=True)
    thread.start()

    async def boot() -> int:
        server = _Server(Path(repo), options)
        server_box.append(server)
        return await server.start()

    started_cf = asyncio.run_coroutine_threadsafe(boot(), loop)
    try:
        started_cf.result()
    except BaseException:
        if server_box:
            asyncio.run_coroutine_threadsafe(server_box[0].stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        raise
    return ServerHandle(server_box[0], loop, thread)


def make_options(
    host: str,
    port: int,
    models: Sequence[str] | None,
    max_message_mb: float,
    intra_op_threads: int = 1,
    dynamic_batching: bool | None = None,
    runner_factory: RunnerFactory = create_runner,
    grace_s: float = 10.0,
    *,
    model_control_mode: str = "none",
    poll_s: float = DEFAULT_POLL_S,
) -> ServerOptions:
    """Validated ServerOptions."""
    if model_control_mode not in CONTROL_MODES:
        raise InvalidInputError(
            f"--model-control-mode {model_control_mode!r} is not one of {list(CONTROL_MODES)} (Triton's modes)"
        )
    if not 0 < poll_s <= 86400:
        raise InvalidInputError(f"--repository-poll-secs must be in (0, 86400] seconds, got {poll_s:g}")
    if not 0 <= port <= 65535:
        raise InvalidInputError(f"port {port} is outside 0..65535")
    if not 0 < max_message_mb <= 2047:
        raise InvalidInputError(f"--max-message-mb must be in (0, 2047] (gRPC's limit is 2 GiB), got {max_message_mb}")
    if intra_op_threads < 1:
        raise InvalidInputError(f"intra-op threads must be >= 1, got {intra_op_threads}")
    return ServerOptions(
        host=host,
        port=port,
        models=tuple(models) if models is not None else None,
        max_message_bytes=int(max_message_mb * 2**20),
        intra_op_threads=intra_op_threads,
        dynamic_batching=dynamic_batching,
        grace_s=grace_s,
        runner_factory=runner_factory,
        model_control_mode=model_control_mode,
        poll_s=poll_s,
    )


async def serve(repo: Path | str, options: ServerOptions, on_ready: threading.Event | None = None) -> None:
    """Serve in the foreground until SIGTERM or SIGINT, then drain for ``options.grace_s``."""
    server = _Server(Path(repo), options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        port = await server.start()
        logger.info("serving %s on %s:%s", repo, options.host, port)
        control = options.model_control_mode
        if control == "poll":
            control += f", every {options.poll_s:g} s"
        print(
            f"kiln serve: listening on {options.host}:{port} (repository {repo}, model control {control})", flush=True
        )
        if on_ready is not None:
            on_ready.set()
        await stop.wait()
        print("kiln serve: draining in-flight requests", flush=True)
    finally:
        await server.stop(options.grace_s)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
