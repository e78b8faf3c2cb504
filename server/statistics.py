"""Per model version counters in Triton's shape: requests, executions, queue and compute time."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class BatchDurations:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class VersionStats:
    """Mutated only on the server's event loop (no locks needed)."""

    inference_count: int = 0  # samples: a request of batch 4 counts 4
    execution_count: int = 0  # model runs: a batch of 8 requests counts 1
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchDurations] = field(default_factory=dict)

    def record_execution(self, batch_size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        self.execution_count += 1
        per_size = self.batches.setdefault(batch_size, BatchDurations())
        per_size.compute_input.add(input_ns)
        per_size.compute_infer.add(infer_ns)
        per_size.compute_output.add(output_ns)

    def record_request(
        self, *, ok: bool, samples: int, total_ns: int, queue_ns: int, compute_ns: tuple[int, int, int]
    ) -> None:
        """One request finished; compute times are its batch's (Triton counts them per request too)."""
        self.last_inference_ms = time.time_ns() // 1_000_000  # Triton reports wall-clock ms here
        if not ok:
            self.fail.add(total_ns)
            return
        self.inference_count += samples
        self.success.add(total_ns)
        self.queue.add(queue_ns)
        self.compute_input.add(compute_ns[0])
        self.compute_infer.add(compute_ns[1])
        self.compute_output.add(compute_ns[2])
