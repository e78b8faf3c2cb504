"""Token streams through the gateway: per-variant TTFT and ITL, and greedy token-agreement replays.

A ``ModelStreamInfer`` call stays on the variant its first message chose (the transports pin it).
``StreamMeter`` watches one call: the id and send time of each request forwarded, and each response
(parsed here, off nothing but the responses themselves): the first and last responses carrying
tokens and the ``triton_final_response`` flag. A finished request is recorded as one request of its
variant (end-to-end time, status) plus its time to first token and inter-token latency
(GenAI-Perf's definition). ``StreamMetrics`` keeps them as windows (for rollouts) and Prometheus
histograms (``kiln_gateway_ttft_seconds``, ``kiln_gateway_itl_seconds``).

While a route has a shadow variant, a sampled request is replayed greedily (temperature, top_k and
seed removed, ``stream`` false) on the variant that served it and on the shadow variant, off the
hot path and capped like every shadow copy; the two token sequences give an exact match (recorded
as the shadow agreement the rollout judges) and the position of the first divergence.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from core.errors import UnavailableError
from server.gateway.metrics import GatewayMetrics, ShadowResult
from server.gateway.shadow import ShadowSender
from server.gateway.stream_metrics import StreamMetrics
from server.gateway.table import LiveRoute
from server.gateway.upstreams import UpstreamPool

FINAL = "triton_final_response"
SAMPLING_INPUTS = ("temperature", "top_k", "seed", "stream")


@dataclass(frozen=True)
class StreamTarget:
    """Where a stream's requests go: route and variant (as recorded), the live route and variant index."""

    route: str
    variant: str
    live: LiveRoute | None
    index: int


@dataclass
class _Open:
    sent_ns: int
    raw: bytes | None  # the client's request, kept when sampled for a replay
    first_ns: int = 0
    last_ns: int = 0
    tokens: int = 0


class StreamMeter:
    """Times one ModelStreamInfer call's requests by id; records each when its final response passes."""

    def __init__(
        self,
        target: StreamTarget,
        metrics: GatewayMetrics,
        streams: StreamMetrics,
        replayer: TokenReplayer | None,
        draw: Callable[[], float],
    ) -> None:
        self._target, self._metrics, self._streams = target, metrics, streams
        self._replayer, self._draw = replayer, draw
        self._open: dict[str, _Open] = {}
        self._lock = threading.Lock()

    def sent(self, client_message: bytes) -> None:
        """A client request is being forwarded (``client_message``: as the client sent it)."""
        live = self._target.live
        sample = (
            live is not None
            and self._replayer is not None
            and live.shadow_index is not None
            and live.shadow_index != self._target.index
            and self._draw() < live.shadow_fraction
        )
        entry = _Open(time.perf_counter_ns(), client_message if sample else None)
        with self._lock:
            self._open[_request_id(client_message)] = entry

    def received(self, response: bytes) -> None:
        """An upstream response is being passed back to the client."""
        now = time.perf_counter_ns()
        try:
            parsed = pb.ModelStreamInferResponse.FromString(response)
        except Exception:  # a response we cannot read is passed through, just not timed
            return
        inner = parsed.infer_response
        with self._lock:
            entry = self._open.get(inner.id)
            if entry is None:
                return
            if parsed.error_message:
                self._open.pop(inner.id)
                code = parsed.error_message.split(":", 1)[0]
                self._record(entry, code if code.isupper() and " " not in code else "ERROR", now)
                return
            tokens = _token_count(inner)
            if tokens:
                entry.tokens += tokens
                entry.first_ns = entry.first_ns or now
                entry.last_ns = now
            if not inner.parameters[FINAL].bool_param:
                return
            self._open.pop(inner.id)
        self._record(entry, "OK", now)
        if entry.raw is not None and self._replayer is not None:
            self._replayer.submit(self._target, entry.raw)

    def finish(self, code: str) -> None:
        """The call ended; requests still open count as failed with ``code`` (CANCELLED when it ended well)."""
        now = time.perf_counter_ns()
        with self._lock:
            left, self._open = list(self._open.values()), {}
        for entry in left:
            self._record(entry, code if code != "OK" else "CANCELLED", now)

    def _record(self, entry: _Open, code: str, now: int) -> None:
        t = self._target
        self._metrics.record(t.route, t.variant, code, now - entry.sent_ns, now - entry.sent_ns)
        if code == "OK" and entry.tokens:
            ttft = entry.first_ns - entry.sent_ns
            itl = (entry.last_ns - entry.first_ns) // (entry.tokens - 1) if entry.tokens > 1 else None
            self._streams.record(t.route, t.variant, ttft, itl, entry.tokens)


class TokenReplayer:
    """Greedy replays of sampled stream requests on the serving and the shadow variant (off the hot path)."""

    def __init__(self, streams: StreamMetrics, shadow: ShadowSender, pool: UpstreamPool, timeout_s: float = 60.0):
        self._streams, self._shadow, self._pool, self._timeout_s = streams, shadow, pool, timeout_s

    def submit(self, target: StreamTarget, raw: bytes) -> None:
        live = target.live
        if live is None or live.shadow_index is None:
            return
        public, shadow = live.public, live.shadow_index
        served, candidate = live.route.variants[target.index], live.route.variants[shadow]
        greedy = greedy_request(raw)
        served_body = greedy + live.request_suffixes[target.index]
        candidate_body = greedy + live.request_suffixes[shadow]

        def compare() -> ShadowResult:
            divergence = first_divergence(
                self._tokens(served.upstream, served_body), self._tokens(candidate.upstream, candidate_body)
            )
            self._streams.record_replay(public, candidate.name, divergence)
            same = divergence is None
            return ShadowResult(1, int(same), float(same), float(same), 0.0 if same else 1.0)

        self._shadow.submit_compared(public, candidate.name, compare)

    def _tokens(self, upstream: str, body: bytes) -> list[int]:
        call = self._pool[upstream].stream("ModelStreamInfer")
        tokens: list[int] = []
        for response in call(iter([body]), timeout=self._timeout_s):
            parsed = pb.ModelStreamInferResponse.FromString(response)
            if parsed.error_message:
                raise UnavailableError(f"greedy replay on upstream {upstream!r} failed: {parsed.error_message}")
            tokens += _token_ids(parsed.infer_response)
            if parsed.infer_response.parameters[FINAL].bool_param:
                break
        return tokens


def greedy_request(raw: bytes) -> bytes:
    """The request with its sampling inputs removed and ``stream`` false (one response, greedy)."""
    request = pb.ModelInferRequest.FromString(raw)
    kept = [(t, request.raw_input_contents[i] if i < len(request.raw_input_contents) else None)
            for i, t in enumerate(request.inputs) if t.name not in SAMPLING_INPUTS]  # fmt: skip
    del request.inputs[:]
    del request.raw_input_contents[:]
    raw_mode = all(content is not None for _, content in kept)
    for tensor, content in kept:
        request.inputs.append(tensor)
        if raw_mode and content is not None:
            request.raw_input_contents.append(content)
    stream = request.inputs.add(name="stream", datatype="BOOL", shape=[1])
    if raw_mode:
        request.raw_input_contents.append(b"\x00")
    else:
        stream.contents.bool_contents.append(False)
    request.id = f"replay-{request.id}"
    return request.SerializeToString()


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first position where two token sequences differ (None when identical)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _request_id(message: bytes) -> str:
    try:
        return pb.ModelInferRequest.FromString(message).id
    except Exception:
        return ""


def _token_ids(response: pb.ModelInferResponse) -> list[int]:
    for index, tensor in enumerate(response.outputs):
        if tensor.name == "output_ids" and index < len(response.raw_output_contents):
            return [int(t) for t in np.frombuffer(response.raw_output_contents[index], dtype="<i8")]
    return []


def _token_count(response: pb.ModelInferResponse) -> int:
    for tensor in response.outputs:
        if tensor.name == "output_ids":
            return int(np.prod(tensor.shape))
    return 0
