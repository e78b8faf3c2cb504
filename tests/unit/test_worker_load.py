"""The bounded worker load: stops by itself after ``max_s``, or at once on ``stop()``."""

from __future__ import annotations

import time

from server.bench.workers import WorkerLoad


class Counting(WorkerLoad):
    def __init__(self, threads: int, max_s: float) -> None:
        super().__init__(threads, max_s, join_s=5)
        self.loops = [0] * threads

    def _run(self, index: int) -> None:
        while self.running():
            self.loops[index] += 1
            time.sleep(0.001)


def test_workers_stop_by_themselves_after_max_s() -> None:
    load = Counting(threads=2, max_s=0.1)
    with load:
        time.sleep(0.4)  # longer than max_s: every worker has returned on its own
        assert not any(w.is_alive() for w in load._workers)
    assert all(n > 0 for n in load.loops)


def test_stop_ends_the_workers_before_max_s() -> None:
    load = Counting(threads=3, max_s=60)
    started = time.perf_counter()
    with load:
        time.sleep(0.05)
    assert time.perf_counter() - started < 5
    assert not any(w.is_alive() for w in load._workers) and not load.running()
