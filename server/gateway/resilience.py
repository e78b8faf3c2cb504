"""Outlier ejection: an upstream that refuses connections or answers UNAVAILABLE is taken out of
rotation for a growing interval (base * 2^(n-1), capped), and its share goes to the other variants.

After the interval the upstream is tried again; a success keeps it in, a failure ejects it for
twice as long. The ejection count decays back to zero after ``max_ejection_s`` without failures.
Meanwhile ``ReadinessProber`` asks each ejected upstream ``ServerReady`` every
``PROBE_INTERVAL_S`` and readmits it as soon as it answers ready, so a restarted upstream takes
traffic again within about that interval (plus gRPC's reconnect backoff, at most 0.5 s), however
long its ejection had grown.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from tritonclient.grpc import service_pb2

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpstreamHealth:
    """What ``/stats`` shows for one upstream."""

    upstream: str
    ejected: bool
    ejected_for_s: float  # remaining; 0 when not ejected
    ejections: int  # total since start
    consecutive_failures: int
    last_error: str


class _State:
    __slots__ = ("consecutive", "ejected_until", "ejections", "last_error", "last_failure", "streak")

    def __init__(self) -> None:
        self.consecutive = 0
        self.ejected_until = 0
        self.ejections = 0  # total
        self.streak = 0  # ejections without a quiet period; drives the growing interval
        self.last_failure = 0
        self.last_error = ""


class OutlierDetector:
    """Thread-safe ejection state per upstream name; ``clock`` returns nanoseconds."""

    def __init__(
        self,
        upstreams: list[str],
        failures_to_eject: int = 1,
        base_ejection_s: float = 1.0,
        max_ejection_s: float = 30.0,
        clock: object = time.monotonic_ns,
    ) -> None:
        self._states = {name: _State() for name in upstreams}
        self._failures = failures_to_eject
        self._base_ns = int(base_ejection_s * 1e9)
        self._max_ns = int(max_ejection_s * 1e9)
        self._clock = clock
        self._lock = threading.Lock()
        self.any_ejected = False  # hot-path shortcut: False = nothing to mask

    def _now(self) -> int:
        return self._clock()  # type: ignore[operator,no-any-return]

    def is_ejected(self, upstream: str) -> bool:
        state = self._states.get(upstream)
        return state is not None and state.ejected_until > self._now()

    def record_success(self, upstream: str) -> None:
        state = self._states.get(upstream)
        if state is None or (state.consecutive == 0 and state.streak == 0):
            return
        with self._lock:
            state.consecutive = 0
            if state.streak and self._now() - state.last_failure > self._max_ns:
                state.streak = 0
            self._refresh()

    def record_failure(self, upstream: str, error: str) -> bool:
        """Count a connection failure; returns True when this failure ejected the upstream."""
        state = self._states.get(upstream)
        if state is None:
            return False
        with self._lock:
            now = self._now()
            state.last_failure, state.last_error = now, error
            if state.ejected_until > now:
                return False
            state.consecutive += 1
            if state.consecutive < self._failures:
                return False
            state.streak += 1
            state.ejections += 1
            state.consecutive = 0
            interval = min(self._base_ns * 2 ** (state.streak - 1), self._max_ns)
            state.ejected_until = now + interval
            self.any_ejected = True
        logger.warning(
            "upstream %s ejected for %.1f s (ejection %d): %s", upstream, interval / 1e9, state.ejections, error
        )
        return True

    def readmit(self, upstream: str) -> bool:
        """End ``upstream``'s ejection now (an active probe found it ready); True when it was ejected."""
        state = self._states.get(upstream)
        if state is None:
            return False
        with self._lock:
            was = state.ejected_until > self._now()
            state.ejected_until = 0
            state.consecutive = 0
            self._refresh()
        if was:
            logger.info("upstream %s readmitted: it answers ServerReady again", upstream)
        return was

    def _refresh(self) -> None:
        now = self._now()
        self.any_ejected = any(s.ejected_until > now for s in self._states.values())

    def ejected_set(self) -> frozenset[str]:
        """Upstreams ejected right now (and refresh the hot-path shortcut)."""
        with self._lock:
            now = self._now()
            ejected = frozenset(n for n, s in self._states.items() if s.ejected_until > now)
            self.any_ejected = bool(ejected)
            return ejected

    def health(self) -> list[UpstreamHealth]:
        now = self._now()
        with self._lock:
            return [
                UpstreamHealth(
                    name,
                    s.ejected_until > now,
                    max(0.0, (s.ejected_until - now) / 1e9),
                    s.ejections,
                    s.consecutive,
                    s.last_error,
                )
                for name, s in sorted(self._states.items())
            ]


PROBE_INTERVAL_S = 0.25
_READY_REQUEST = service_pb2.ServerReadyRequest().SerializeToString()

ReadyCall = Callable[[str], Callable[..., bytes]]  # upstream name -> ServerReady bytes callable


class ReadinessProber:
    """A daemon thread asking ejected upstreams ``ServerReady``; readmits those that answer ready."""

    def __init__(self, detector: OutlierDetector, ready_call: ReadyCall, interval_s: float = PROBE_INTERVAL_S):
        self._detector = detector
        self._ready_call = ready_call
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kiln-gw-prober", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            if not self._detector.any_ejected:
                continue
            for upstream in self._detector.ejected_set():
                self.probe(upstream)

    def probe(self, upstream: str) -> bool:
        try:
            answer = self._ready_call(upstream)(_READY_REQUEST, timeout=self._interval)
            ready = service_pb2.ServerReadyResponse.FromString(answer).ready
        except Exception:  # refused, timed out, or not a KServe v2 server: stays ejected
            return False
        return bool(ready) and self._detector.readmit(upstream)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
