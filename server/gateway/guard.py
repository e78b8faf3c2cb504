"""Limits that keep the data plane answering: admission slots, stream idle timeouts, quiet logs.

* ``Admission``: at most ``server.threads`` data-plane RPCs in flight, of them at most
  ``server.max_streams`` open streams, and unary request bodies of at most
  ``server.max_in_flight_bytes`` together (each forwarded body costs a few times its size). A
  call over a limit is refused at once with RESOURCE_EXHAUSTED instead of waiting for a thread,
  and health checks never take a slot, so a pile of idle streams or calls to a stalled upstream
  cannot starve them.
* ``StreamWatch`` / ``IdleReaper`` (threads mode): a stream with no message in either direction
  for ``server.stream_idle_timeout_s`` is ended with DEADLINE_EXCEEDED and its upstream call is
  cancelled, freeing its thread. One reaper thread watches every stream.
* ``QuietLog``: at most one log line per kind of failure per interval, so a client sending
  garbage cannot flood the log (the suppressed count goes into the next line).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from server.gateway.control import RpcAbort

logger = logging.getLogger(__name__)


class Admission:
    """Non-blocking counters of RPCs and streams in flight; ``enter`` refuses when full."""

    def __init__(self, requests: int, streams: int, limit_bytes: int = 2**62) -> None:
        self.limit_requests, self.limit_streams, self.limit_bytes = requests, streams, limit_bytes
        self.requests = self.streams = self.bytes = 0
        self.refused = 0
        self._lock = threading.Lock()

    def enter(self, stream: bool = False, size: int = 0) -> None:
        """Take a slot (and ``size`` bytes of the in-flight budget; one request always fits)."""
        with self._lock:
            if size and self.bytes and self.bytes + size > self.limit_bytes:
                self.refused += 1
                raise RpcAbort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"gateway busy: {self.bytes} bytes of requests in flight, and this one has {size} "
                               f"(server.max_in_flight_bytes {self.limit_bytes}); retry with backoff")  # fmt: skip
            if self.requests >= self.limit_requests:
                self.refused += 1
                raise RpcAbort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"gateway busy: {self.requests} requests in flight, its limit (server.threads); "
                               "retry with backoff")  # fmt: skip
            if stream and self.streams >= self.limit_streams:
                self.refused += 1
                raise RpcAbort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"gateway busy: {self.streams} streams open, its limit (server.max_streams); "
                               "close idle streams or retry with backoff")  # fmt: skip
            self.requests += 1
            self.bytes += size
            if stream:
                self.streams += 1

    def leave(self, stream: bool = False, size: int = 0) -> None:
        with self._lock:
            self.requests -= 1
            self.bytes -= size
            if stream:
                self.streams -= 1


def end_call(context: Any, code: grpc.StatusCode, details: str) -> None:
    """End a sync server call now, from any thread, with ``code`` and ``details`` for the client.

    ``context.abort`` only works from the handler's own thread and only once it runs again; a
    handler blocked reading the next request never would. gRPC core's cancel-with-status ends
    the call and wakes the handler; the plain ``context.cancel()`` (CANCELLED, no text) is the
    fallback should grpc's internals change.
    """
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        call.cancel(code.value[0], details)  # type: ignore[union-attr]
    except Exception:
        context.cancel()


class StreamWatch:
    """One stream's last activity; ``expire`` ends it (client side and upstream side)."""

    __slots__ = ("context", "expired", "last", "upstream")

    def __init__(self, context: Any) -> None:
        self.context = context
        self.last = time.monotonic()
        self.upstream: Any = None  # the upstream call, once made (has .cancel())
        self.expired = False

    def touch(self) -> None:
        self.last = time.monotonic()

    def expire(self, idle_s: float) -> None:
        self.expired = True
        end_call(self.context, grpc.StatusCode.DEADLINE_EXCEEDED,
                 f"stream idle for {idle_s:g} s (no message either way; server.stream_idle_timeout_s); "
                 "send messages more often or open a new stream")  # fmt: skip
        self.cancel_upstream()

    def cancel_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.cancel()


class IdleReaper:
    """A daemon thread ending streams idle for more than ``timeout_s``."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.reaped = 0
        self._watches: set[StreamWatch] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kiln-gw-reaper", daemon=True)
        self._thread.start()

    def watch(self, context: Any) -> StreamWatch:
        watch = StreamWatch(context)
        with self._lock:
            self._watches.add(watch)
        return watch

    def forget(self, watch: StreamWatch) -> None:
        with self._lock:
            self._watches.discard(watch)

    def _run(self) -> None:
        step = min(1.0, self.timeout_s / 4)
        while not self._stop.wait(step):
            limit = time.monotonic() - self.timeout_s
            with self._lock:
                idle = [w for w in self._watches if w.last < limit]
                self._watches.difference_update(idle)
            for watch in idle:
                self.reaped += 1
                try:
                    watch.expire(self.timeout_s)
                except Exception:  # a stream that ended meanwhile
                    logger.debug("ending an idle stream failed", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class QuietLog:
    """``warning(kind, ...)`` logs at most once per ``interval_s`` per kind; counts the rest."""

    def __init__(self, log: logging.Logger, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self._log, self._interval, self._clock = log, interval_s, clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, kind: str, message: str, *args: object) -> bool:
        """Log ``message % args`` unless ``kind`` was logged within the interval; True when logged."""
        now = self._clock()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self._interval:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return False
            self._last[kind] = now
            suppressed = self._suppressed.pop(kind, 0)
        more = f" ({suppressed} more like it in the last {self._interval:g} s)" if suppressed else ""
        self._log.warning(message + more, *args)
        return True
