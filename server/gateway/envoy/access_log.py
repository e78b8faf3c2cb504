"""Per-request figures from Envoy's access log into ``GatewayMetrics`` (same windows, same names).

Envoy's own latency histograms record whole milliseconds, too coarse for a model answering in
0.2 ms, so each request's line carries microsecond durations (``COMMON_DURATION(...:us)``): the
cluster (``route/variant``), the gRPC status, the time in Envoy from first request byte to last
response byte, and the upstream's share (first byte sent upstream to last byte back, or to the end
of the downstream response when the upstream never answered). A reader thread tails the file (Envoy flushes it every
``file_flush_ms``) and records each line, so ``/stats``, ``/metrics`` and the rollout controller read
the same ``GatewayMetrics`` on both data planes. ``sync()`` waits until every request Envoy has
completed is recorded (read-your-writes for tests and rollout decisions).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from server.gateway.metrics import GatewayMetrics, VariantWindow

logger = logging.getLogger(__name__)

PASSTHROUGH_ROUTE = "(passthrough)"
ROTATE_BYTES = 64 * 2**20
_CODES = {code.value[0]: code.name for code in grpc.StatusCode}


Record = tuple[str, str, str, int, int]  # (route, variant, code, upstream_ns, total_ns)


def parse_line(line: str) -> list[Record]:
    """What one access-log line records: nothing (not a routed call), one request, or, when Envoy
    retried on another variant, an UNAVAILABLE on the variant that failed plus the retried result
    on the one that answered (as the Python data plane counts them)."""
    parts = line.split()
    if len(parts) < 9 or not parts[5].endswith("Infer"):
        return []
    cluster, status, total, upstream = parts[0], parts[1], parts[2], parts[3]
    if not upstream.isdigit():  # no answer from the upstream (deadline, reset): until Envoy gave up
        upstream = parts[4]
    if cluster.startswith("upstream:"):
        route, variant = PASSTHROUGH_ROUTE, cluster.removeprefix("upstream:")
    else:
        route, sep, variant = cluster.removeprefix("failover:").rpartition("/")
        if not sep or not route:
            return []  # answered by Envoy itself (unknown model, unreadable body) or Kiln's local server
    code = _CODES.get(int(status), "UNKNOWN") if status.isdigit() else _no_status(parts)
    whole_ms = parts[11] if len(parts) > 11 and parts[11].isdigit() else "0"  # ms; when the stream was reset
    total_ns = int(total) * 1000 if total.isdigit() else int(whole_ms) * 1_000_000
    upstream_ns = int(upstream) * 1000 if upstream.isdigit() else total_ns
    served = next((p for p in (parts[7], parts[8]) if p != "-"), variant)
    attempts = int(parts[6]) if parts[6].isdigit() else 1
    if attempts > 1 or served != variant:
        first = (route, variant, "UNAVAILABLE", upstream_ns, total_ns)
        return [first, (route, served, code, upstream_ns, total_ns)] if served != variant else [first]
    return [(route, variant, code, upstream_ns, total_ns)]


def _no_status(parts: list[str]) -> str:
    """The gRPC code of a request that ended without a grpc-status, from Envoy's response flags."""
    flags = parts[9] if len(parts) > 9 else "-"
    had_deadline = len(parts) > 10 and parts[10] != "-"
    if "UT" in flags or "DT" in flags or ("DR" in flags and had_deadline):  # timeouts; the client's deadline
        return "DEADLINE_EXCEEDED"
    if "DR" in flags or "DC" in flags:
        return "CANCELLED"
    if any(f in flags for f in ("UF", "UH", "URX", "UC", "UR", "UO")):
        return "UNAVAILABLE"
    return "UNKNOWN"


class AccessLogReader:
    """Tails Envoy's access log into ``metrics``; rotates the file past ROTATE_BYTES."""

    def __init__(
        self,
        path: Path,
        metrics: GatewayMetrics,
        reopen: Callable[[], None],
        observe: Callable[[Record], None] = lambda record: None,
        poll_s: float = 0.05,
    ) -> None:
        self._path = path
        self._observe = observe
        self._metrics = metrics
        self._reopen = reopen
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._handle: Any = None
        self._partial = ""
        self.lines = 0  # lines consumed so far (every request Envoy logged)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kiln-envoy-access-log", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self.read()
            except Exception:
                logger.exception("reading Envoy's access log failed")

    def read(self) -> int:
        """Consume what Envoy has written since the last call; returns the lines consumed."""
        with self._lock:
            if self._handle is None:
                if not self._path.exists():
                    return 0
                self._handle = self._path.open("r", encoding="utf-8", errors="replace")
            consumed = self._consume()
            if self._handle.tell() > ROTATE_BYTES:
                self._rotate()
            return consumed

    def _consume(self) -> int:
        data = self._handle.read()
        if not data:
            return 0
        data = self._partial + data
        lines = data.split("\n")
        self._partial = lines.pop()
        for line in lines:
            for record in parse_line(line):
                self._metrics.record(*record)
                self._observe(record)
        self.lines += len(lines)
        return len(lines)

    def _rotate(self) -> None:
        old = self._path.with_suffix(".old")
        self._path.rename(old)
        try:
            self._reopen()  # Envoy closes the renamed file and creates a new one
        finally:
            time.sleep(0.1)
            self._consume()
            self._handle.close()
            old.unlink(missing_ok=True)
            self._handle = None

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        with self._lock:
            if self._handle is not None:
                self._consume()
                self._handle.close()
                self._handle = None


class EnvoyMetrics(GatewayMetrics):
    """``GatewayMetrics`` fed from Envoy's access log; every read first catches up with Envoy."""

    def __init__(self, window_s: float, max_samples: int) -> None:
        super().__init__(window_s, max_samples)
        self.catch_up: Callable[[], None] = lambda: None

    def window(self, route: str, variant: str, window_s: float | None = None) -> VariantWindow:
        self.catch_up()
        return super().window(route, variant, window_s)

    def cumulative(self, route: str, variant: str) -> VariantWindow:
        self.catch_up()
        return super().cumulative(route, variant)

    def keys(self) -> list[tuple[str, str]]:
        self.catch_up()
        return super().keys()

    def prometheus_state(self) -> Iterator[Any]:
        self.catch_up()
        return super().prometheus_state()
