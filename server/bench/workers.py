"""A bounded closed-loop load: ``threads`` worker threads that stop by themselves after ``max_s``.

The scaffolding shared by the loads that demos and tests drive through a server or the gateway;
a subclass writes ``_run(index)``, looping while ``running()``.
"""

from __future__ import annotations

import threading
import time
from typing import TypeVar

W = TypeVar("W", bound="WorkerLoad")


class WorkerLoad:
    """Start on ``with`` entry, stop (and join) on exit or ``stop()``; never runs past ``max_s``."""

    def __init__(self, threads: int, max_s: float, join_s: float = 30.0) -> None:
        self.threads, self.max_s = threads, max_s
        self._join_s = join_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._deadline = 0.0
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self: W) -> W:
        self._deadline = time.perf_counter() + self.max_s
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=self._join_s)

    def running(self) -> bool:
        """Whether a worker should send another request."""
        return not self._stop.is_set() and time.perf_counter() < self._deadline

    def _run(self, index: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define _run(index): the loop of one worker")
