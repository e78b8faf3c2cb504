"""Running Envoy: start, wait until ready, restart it if it dies, drain and stop it."""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.errors import UnavailableError
from server.gateway.envoy.admin import EnvoyAdmin
from server.gateway.envoy.binary import EnvoyBinary

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 20.0
MARKER = "kiln.applied"  # runtime key: present while Kiln's weights are in an external Envoy's runtime


@dataclass(frozen=True)
class ProcessSettings:
    bootstrap: Path
    admin_address_path: Path
    log_path: Path  # Envoy's own log (stderr)
    workers: int = 1  # Envoy worker threads (--concurrency)
    file_flush_ms: int = 50  # access log flush interval: how stale per-variant figures can be
    drain_s: float = 2.0


class EnvoyProcess:
    """One supervised Envoy. ``prepare`` runs before every (re)start, ``started`` after it."""

    def __init__(
        self,
        binary: EnvoyBinary,
        settings: ProcessSettings,
        prepare: Callable[[], None],
        started: Callable[[EnvoyAdmin], None],
    ) -> None:
        self._binary = binary
        self._settings = settings
        self._prepare = prepare
        self._started = started
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._process: subprocess.Popen[bytes] | None = None
        self.admin: EnvoyAdmin | None = None
        self.restarts = 0
        self._watcher: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> EnvoyAdmin:
        with self._lock:
            admin = self._spawn()
        self._watcher = threading.Thread(target=self._watch, name="kiln-envoy-watch", daemon=True)
        self._watcher.start()
        return admin

    def _command(self) -> list[str]:
        s = self._settings
        return [
            str(self._binary.path), "-c", str(s.bootstrap), "--concurrency", str(s.workers),
            "--admin-address-path", str(s.admin_address_path), "--disable-hot-restart",
            "--file-flush-interval-msec", str(s.file_flush_ms), "--drain-time-s", str(max(1, round(s.drain_s))),
            "--log-level", "warning",
        ]  # fmt: skip

    def _spawn(self) -> EnvoyAdmin:
        self._prepare()
        self._settings.admin_address_path.unlink(missing_ok=True)
        log = self._settings.log_path.open("ab")
        try:
            self._process = subprocess.Popen(self._command(), stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        admin = self._wait_ready(self._process)
        self.admin = admin
        self._started(admin)
        return admin

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> EnvoyAdmin:
        deadline = time.monotonic() + START_TIMEOUT_S
        path = self._settings.admin_address_path
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise UnavailableError(f"Envoy exited with code {process.returncode} while starting: {self.log_tail()}")
            if path.exists() and path.read_text(encoding="utf-8").strip():
                admin = EnvoyAdmin(path.read_text(encoding="utf-8").strip())
                if admin.ready():
                    return admin
            time.sleep(0.02)
        process.kill()
        process.wait()
        raise UnavailableError(f"Envoy was not ready within {START_TIMEOUT_S:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self._settings.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no Envoy log)"
        picked = [line for line in text.splitlines() if "[critical]" in line or "[error]" in line] or text.splitlines()
        return " | ".join(picked[-lines:]) or "(empty Envoy log)"

    def _watch(self) -> None:
        while not self._stopping.is_set():
            process = self._process
            if process is None:
                return
            code = process.wait()
            if self._stopping.is_set():
                return
            logger.warning("Envoy (pid %d) exited with code %s; restarting it with the current routes",
                           process.pid, code)  # fmt: skip
            print(f"kiln gateway: Envoy exited with code {code}; restarting it with the current routes", flush=True)
            while not self._stopping.is_set():
                try:
                    with self._lock:
                        if self._stopping.is_set():
                            return
                        self._spawn()
                    self.restarts += 1
                    logger.warning("Envoy restarted (pid %s)", self.pid)
                    break
                except Exception:
                    logger.exception("Envoy restart failed; retrying in 1 s")
                    self._stopping.wait(1.0)

    def kill(self) -> None:
        """SIGKILL the running Envoy (what a crash looks like); the watcher restarts it."""
        if self._process is not None:
            self._process.kill()

    def stop(self) -> None:
        """Drain (stop accepting, let in-flight requests finish, up to ``drain_s``), then terminate."""
        self._stopping.set()
        with self._lock:
            process = self._process
            if process is None or process.poll() is not None:
                return
            admin = self.admin
            if admin is not None:
                try:
                    admin.post("/drain_listeners?graceful&inboundonly")
                    deadline = time.monotonic() + self._settings.drain_s
                    while time.monotonic() < deadline:
                        active = admin.stats(r"^http\.kiln\.downstream_rq_active$").get(
                            "http.kiln.downstream_rq_active", "0"
                        )
                        if active == "0":
                            break
                        time.sleep(0.02)
                except UnavailableError as err:
                    logger.warning("Envoy did not drain cleanly: %s", err)
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._watcher is not None:
            self._watcher.join(timeout=5)


class ExternalEnvoy:
    """An Envoy that Kiln does not start (the official Envoy image beside Kiln in a pod or Compose).

    Kiln writes the bootstrap and xDS files into a directory both containers mount at the same path
    and talks to Envoy's admin API at ``admin_address`` (same network namespace). The platform
    restarts Envoy when it dies; Kiln notices (uptime went back, or the admin API came back) and
    re-applies the runtime weights; the xDS files already hold the current routes.
    """

    def __init__(
        self,
        admin_address: str,
        prepare: Callable[[], None],
        started: Callable[[EnvoyAdmin], None],
        wait_s: float = 300.0,
    ) -> None:
        self._admin_address = admin_address
        self._prepare = prepare
        self._started = started
        self._wait_s = wait_s
        self._stopping = threading.Event()
        self.admin: EnvoyAdmin | None = None
        self.restarts = 0
        self.pid: int | None = None
        self._watcher: threading.Thread | None = None

    def start(self) -> EnvoyAdmin:
        self._prepare()
        admin = EnvoyAdmin(self._admin_address)
        deadline = time.monotonic() + self._wait_s
        while not admin.ready():
            if time.monotonic() > deadline or self._stopping.is_set():
                raise UnavailableError(
                    f"the external Envoy's admin API at {self._admin_address} was not ready within "
                    f"{self._wait_s:.0f} s; start Envoy with the bootstrap Kiln wrote (see deploy/)"
                )
            time.sleep(0.2)
        self.admin = admin
        self._apply(admin)
        self._watcher = threading.Thread(target=self._watch, name="kiln-envoy-external", daemon=True)
        self._watcher.start()
        return admin

    def _apply(self, admin: EnvoyAdmin) -> None:
        self._started(admin)
        admin.set_runtime({MARKER: 1})  # gone from the admin layer when Envoy restarts

    def _watch(self) -> None:
        admin = self.admin
        while admin is not None and not self._stopping.wait(0.5):
            try:
                if f'"{MARKER}"' in admin.get("/runtime?format=json"):
                    continue
                logger.warning("the external Envoy restarted (its runtime layer is empty); re-applying the weights")
                self._apply(admin)
                self.restarts += 1
            except UnavailableError as err:
                logger.debug("external Envoy not reachable: %s", err)

    def log_tail(self, lines: int = 5) -> str:
        return f"(external Envoy at {self._admin_address}: see its container's log)"

    def kill(self) -> None:
        raise UnavailableError("an external Envoy is not Kiln's to kill")

    def stop(self) -> None:
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join(timeout=3)
