"""Shadow traffic: copy a share of a route's requests to a shadow variant, compare, never return.

The real answer is already on its way to the client when the copy is submitted; the copy runs on a
small thread pool, and the number of copies in flight (queued or running) is capped: above the cap
a copy is dropped and counted, so shadow load can never queue up behind or slow the real path.
Decoding happens only here: both answers are parsed and compared per output (top-1 agreement per
row, cosine similarity, max abs error).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

from core.errors import KilnError
from server.gateway.metrics import GatewayMetrics, ShadowResult

logger = logging.getLogger(__name__)

_RAW_DTYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}  # fmt: skip
_TYPED_FIELDS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
}  # fmt: skip


def output_arrays(response: service_pb2.ModelInferResponse) -> dict[str, np.ndarray]:
    """Numeric outputs of a response by name (raw or typed contents); BYTES outputs are skipped."""
    arrays = {}
    for index, output in enumerate(response.outputs):
        dtype = _RAW_DTYPES.get(output.datatype)
        if dtype is None:
            continue
        shape = tuple(int(d) for d in output.shape)
        array: np.ndarray
        if index < len(response.raw_output_contents):
            array = np.frombuffer(response.raw_output_contents[index], dtype=dtype)
        else:
            array = np.asarray(getattr(output.contents, _TYPED_FIELDS.get(output.datatype, "fp32_contents")), dtype)
        if array.size != math.prod(shape):
            continue
        arrays[output.name] = array.reshape(shape)
    return arrays


def compare_arrays(served: np.ndarray, shadow: np.ndarray) -> ShadowResult:
    """Top-1 agreement per row (argmax over the last axis), cosine and max abs error of one output."""
    rows = max(1, int(math.prod(served.shape[:-1]))) if served.ndim else 1
    if served.shape != shadow.shape:
        return ShadowResult(rows, 0, 0.0, 0.0, math.inf)
    a = served.astype(np.float64).reshape(rows, -1)
    b = shadow.astype(np.float64).reshape(rows, -1)
    agreed = int(np.count_nonzero(a.argmax(axis=1) == b.argmax(axis=1)))
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.einsum("ij,ij->i", a, b)
    cosine = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where((a == b).all(axis=1), 1.0, 0.0))
    max_abs = float(np.abs(a - b).max()) if a.size else 0.0
    return ShadowResult(rows, agreed, float(cosine.min()), float(cosine.mean()), max_abs)


def compare_responses(served: bytes, shadow: bytes) -> ShadowResult:
    """Compare two serialized ModelInferResponses output by output (all outputs of the served one)."""
    served_arrays = output_arrays(service_pb2.ModelInferResponse.FromString(served))
    shadow_arrays = output_arrays(service_pb2.ModelInferResponse.FromString(shadow))
    if not served_arrays:
        return ShadowResult(1, 1 if served == shadow else 0, 1.0, 1.0, 0.0)
    results = []
    for name, array in served_arrays.items():
        other = shadow_arrays.get(name)
        results.append(compare_arrays(array, other) if other is not None else ShadowResult(1, 0, 0.0, 0.0, math.inf))
    rows = max(r.rows for r in results)
    agreed_rows = min(r.agreed_rows for r in results)  # a row agrees only if every output agrees
    return ShadowResult(
        rows, agreed_rows, min(r.min_cosine for r in results),
        sum(r.mean_cosine for r in results) / len(results), max(r.max_abs_error for r in results),
    )  # fmt: skip


class ShadowSender:
    """Runs shadow calls off the hot path with a hard cap on copies in flight."""

    def __init__(self, metrics: GatewayMetrics, max_in_flight: int = 8, workers: int = 2) -> None:
        self._metrics = metrics
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kiln-shadow")

    def submit(self, route: str, variant: str, call: Callable[[], bytes], served: bytes) -> bool:
        """Queue one shadow copy; returns False (and counts a drop) when the cap is reached."""
        return self.submit_compared(route, variant, lambda: compare_responses(served, call()))

    def submit_compared(self, route: str, variant: str, compare: Callable[[], ShadowResult]) -> bool:
        """Queue one comparison that makes its own calls (a greedy token replay); capped like a copy."""
        if not self._slots.acquire(blocking=False):
            self._metrics.record_shadow_dropped(route, variant)
            return False
        try:
            self._pool.submit(self._run, route, variant, compare)
        except RuntimeError:  # pool shut down: the gateway is stopping
            self._slots.release()
            return False
        return True

    def _run(self, route: str, variant: str, compare: Callable[[], ShadowResult]) -> None:
        try:
            try:
                result = compare()
            except (grpc.RpcError, KilnError) as err:
                logger.debug("shadow call to %s/%s failed: %s", route, variant, err)
                self._metrics.record_shadow(route, variant, None)
                return
            self._metrics.record_shadow(route, variant, result)
        except Exception:  # a bad answer must never take the shadow pool down
            logger.exception("shadow comparison for %s/%s failed", route, variant)
            self._metrics.record_shadow(route, variant, None)
        finally:
            self._slots.release()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
