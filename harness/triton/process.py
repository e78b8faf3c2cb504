"""Run the ``tritonserver`` binary on 127.0.0.1 until a ``with`` block ends.

``start_triton`` picks free ports (unless given), starts the server in its own process group with
the environment its Python-backend stubs need (``triton_env``), writes its output to a log file,
waits for ``is_server_ready`` and ``is_model_ready`` of every model, and on exit sends SIGTERM,
then SIGKILL to the group if it has not stopped within ``stop_timeout_s``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from core.errors import InvalidInputError, UnavailableError
from harness.triton.install import TritonInstall, triton_env

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
PORT_RETRIES = 3  # a free port found by bind-and-close can be taken before Triton binds it
_PORT_CLASH = ("address already in use", "failed to start grpc", "failed to start http", "failed to bind")


@dataclass(frozen=True)
class TritonProcess:
    """A running Triton server (valid inside ``start_triton``'s ``with`` block)."""

    process: subprocess.Popen[bytes]
    grpc_port: int
    http_port: int
    metrics_port: int | None
    models: tuple[str, ...]
    log_path: Path
    startup_s: float  # from spawn to server and models ready

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{HOST}:{self.http_port}"

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def repository_models(repo: Path) -> tuple[str, ...]:
    """Names of the model directories (those with a config.pbtxt) in ``repo``."""
    return tuple(sorted(p.parent.name for p in Path(repo).glob("*/config.pbtxt")))


@contextlib.contextmanager
def start_triton(
    install: TritonInstall,
    repo: Path,
    grpc_port: int = 0,
    http_port: int = 0,
    metrics_port: int | None = None,
    *,
    models: Sequence[str] | None = None,
    log_path: Path | None = None,
    ready_timeout_s: float = 120.0,
    stop_timeout_s: float = 15.0,
    extra_args: Sequence[str] = (),
) -> Iterator[TritonProcess]:
    """Serve ``repo`` with Triton on 127.0.0.1 for the duration of the ``with`` block.

    Ports 0 mean "pick a free one". ``metrics_port`` None disables metrics, 0 picks a free port.
    Triton runs in explicit model-control mode with ``models`` loaded (None: every model in
    ``repo``) and waits for each to be ready; the RepositoryModelLoad/Unload API works.
    Raises UnavailableError (with the log's tail) when the server exits early or is not ready
    within ``ready_timeout_s``.
    """
    names = tuple(models) if models is not None else repository_models(repo)
    if not names:
        raise InvalidInputError(f"model repository {str(repo)!r} holds no model with a config.pbtxt")
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="kiln-tritonserver-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    attempts = PORT_RETRIES if 0 in (grpc_port, http_port) or metrics_port == 0 else 1
    for attempt in range(1, attempts + 1):
        ports = _choose_ports(grpc_port, http_port, metrics_port)
        process = _spawn(install, Path(repo), ports, names, log_path, extra_args)
        try:
            started = _wait_ready(process, ports[0], names, log_path, ready_timeout_s)
        except _PortClashError as err:
            _stop(process, stop_timeout_s)
            if attempt == attempts:
                raise UnavailableError(
                    f"Triton could not bind its ports {ports}; free them or pass 0 to pick free ones:\n{err}"
                ) from err
            logger.info("Triton port clash on %s, retrying with new ports", ports)
            continue
        except BaseException:
            _stop(process, stop_timeout_s)
            raise
        break
    server = TritonProcess(process, ports[0], ports[1], ports[2], names, log_path, started)
    logger.info("Triton ready on %s in %.1f s (log %s)", server.grpc_url, started, log_path)
    try:
        yield server
    finally:
        _stop(process, stop_timeout_s)


def _choose_ports(grpc: int, http: int, metrics: int | None) -> tuple[int, int, int | None]:
    """Replace each 0 by a distinct free port (all probe sockets are held open at once)."""
    wanted = [grpc, http] + ([] if metrics is None else [metrics])
    with contextlib.ExitStack() as stack:
        chosen = []
        for port in wanted:
            if port == 0:
                sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                sock.bind((HOST, 0))
                port = int(sock.getsockname()[1])
            chosen.append(port)
    return chosen[0], chosen[1], (None if metrics is None else chosen[2])


def triton_args(
    install: TritonInstall,
    repo: Path,
    ports: tuple[int, int, int | None],
    models: Sequence[str],
) -> list[str]:
    """The command line: 127.0.0.1 only, this install's backends, explicit model control."""
    grpc, http, metrics = ports
    args = [
        str(install.tritonserver),
        f"--model-repository={repo.absolute()}",
        f"--backend-directory={install.backends_dir}",
        f"--cache-directory={install.cache_dir}",
        f"--grpc-address={HOST}",
        f"--grpc-port={grpc}",
        f"--http-address={HOST}",
        f"--http-port={http}",
        "--exit-timeout-secs=5",
        "--log-verbose=0",
    ]
    if metrics is None:
        args.append("--allow-metrics=false")
    else:
        args += ["--allow-metrics=true", f"--metrics-address={HOST}", f"--metrics-port={metrics}"]
    args.append("--model-control-mode=explicit")
    args += [f"--load-model={name}" for name in models]
    return args


def _spawn(
    install: TritonInstall,
    repo: Path,
    ports: tuple[int, int, int | None],
    names: tuple[str, ...],
    log_path: Path,
    extra_args: Sequence[str],
) -> subprocess.Popen[bytes]:
    args = [*triton_args(install, repo, ports, names), *extra_args]
    logger.debug("starting %s", " ".join(args))
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=triton_env(install),
            start_new_session=True,  # its own process group: the stubs die with it
        )


class _PortClashError(Exception):
    """Triton exited because a port it was given was taken."""


def _wait_ready(
    process: subprocess.Popen[bytes],
    grpc_port: int,
    names: tuple[str, ...],
    log_path: Path,
    timeout_s: float,
) -> float:
    """Seconds until the server and every model are ready; raises when it exits or times out."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    start = time.perf_counter_ns()
    deadline = start + int(timeout_s * 1e9)
    client = grpcclient.InferenceServerClient(f"{HOST}:{grpc_port}")
    try:
        while time.perf_counter_ns() < deadline:
            if _exited(process):
                tail = _tail(log_path)
                if any(marker in tail.lower() for marker in _PORT_CLASH):
                    raise _PortClashError(tail)
                raise UnavailableError(f"tritonserver exited before it was ready; log {log_path}:\n{tail}")
            with contextlib.suppress(InferenceServerException):
                if client.is_server_ready(client_timeout=2.0) and all(
                    client.is_model_ready(name, client_timeout=2.0) for name in names
                ):
                    return (time.perf_counter_ns() - start) / 1e9
            time.sleep(0.2)
    finally:
        client.close()
    raise UnavailableError(
        f"tritonserver (models {list(names)}) not ready within {timeout_s:.0f} s; "
        f"raise ready_timeout_s or read the log {log_path}:\n{_tail(log_path)}"
    )


def _exited(process: subprocess.Popen[bytes]) -> bool:
    """Whether the server exited, without reaping it: while it is a zombie its pid, and so the
    id of the process group we created, cannot be reused, so killing that group stays safe."""
    if process.returncode is not None:
        return True
    result = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return result is not None and result.si_pid == process.pid


def _stop(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM the server, then SIGKILL what is left of its process group, then reap it."""
    if process.returncode is not None:
        return
    if not _exited(process):
        process.send_signal(signal.SIGTERM)
        deadline = time.perf_counter_ns() + int(timeout_s * 1e9)
        while not _exited(process) and time.perf_counter_ns() < deadline:
            time.sleep(0.05)
        if not _exited(process):
            logger.warning("tritonserver pid %d ignored SIGTERM for %.0f s; killing it", process.pid, timeout_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # the server if it lingers, and any leftover stub
    process.wait()


def _tail(log_path: Path, lines: int = 25) -> str:
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        return f"(log unreadable: {err})"
    return "\n".join(text.strip().splitlines()[-lines:])
