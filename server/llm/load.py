"""A bounded closed-loop load of token streams: each client sends prompts one after another, each on a
new ModelStreamInfer stream (a stream stays on the gateway variant its first message chose)."""

from __future__ import annotations

import queue
from dataclasses import dataclass, field

import numpy as np
from tritonclient import grpc as triton

from server.bench.workers import WorkerLoad

FINAL = "triton_final_response"


@dataclass
class StreamLoadResult:
    completed: int = 0
    errors: list[str] = field(default_factory=list)


class StreamLoad(WorkerLoad):
    """``threads`` clients, each sending greedy prompts one after another, each on a new stream."""

    def __init__(self, address: str, model: str, threads: int = 2, max_tokens: int = 8, max_s: float = 60.0):
        super().__init__(threads, max_s)
        self.address, self.model, self.max_tokens = address, model, max_tokens
        self.result = StreamLoadResult()

    def _run(self, index: int) -> None:
        rng = np.random.default_rng(index)
        client = triton.InferenceServerClient(self.address)
        tokens = triton.InferInput("max_tokens", [1], "INT32")
        tokens.set_data_from_numpy(np.array([self.max_tokens], np.int32))
        sent = 0
        try:
            while self.running():
                prompt = bytes(rng.integers(97, 123, size=int(rng.integers(4, 12)))).decode()
                text = triton.InferInput("text_input", [1], "BYTES")
                text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
                sent += 1
                # a new stream per request: a stream stays on the variant its first message chose
                answers: queue.Queue[tuple[triton.InferResult | None, Exception | None]] = queue.Queue()
                client.start_stream(callback=lambda result, error, q=answers: q.put((result, error)))
                try:
                    client.async_stream_infer(self.model, [text, tokens], request_id=f"{index}-{sent}")
                    if not self._until_final(answers):
                        break
                finally:
                    client.stop_stream()
        finally:
            client.close()

    def _until_final(self, answers: queue.Queue[tuple[triton.InferResult | None, Exception | None]]) -> bool:
        while True:
            try:
                result, error = answers.get(timeout=30)
            except queue.Empty:
                with self._lock:
                    self.result.errors.append("no answer within 30 s")
                return False
            if error is not None or result is None:
                with self._lock:
                    self.result.errors.append(str(error))
                return True
            if result.get_response().parameters[FINAL].bool_param:
                with self._lock:
                    self.result.completed += 1
                return True
