"""ONNX Runtime on the CPU: one InferenceSession per model instance."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from core.errors import InvalidInputError, KilnError, RepositoryError

logger = logging.getLogger(__name__)


class OrtRunner:
    """A CPU session with ``intra_op_threads`` threads (0: ONNX Runtime's default, every core); BYTES
    tensors cross as bytes objects."""

    def __init__(self, path: Path, *, intra_op_threads: int, model: str = "") -> None:
        self.model = model or path.parent.parent.name
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            self._session: ort.InferenceSession | None = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # ORT raises its own classes for missing, corrupt or unsupported files
            raise RepositoryError(
                f"model {self.model!r}: {str(path)!r} does not load in ONNX Runtime ({err}); "
                "republish it with 'kiln build'"
            ) from err
        self._string_inputs = {i.name for i in self._session.get_inputs() if i.type == "tensor(string)"}
        self.output_names = tuple(o.name for o in self._session.get_outputs())

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the session once; every output is returned."""
        if self._session is None:
            raise KilnError(f"model {self.model!r}: its ONNX Runtime session was closed; load the model again")
        feed = {name: _to_ort(name, arr) if name in self._string_inputs else arr for name, arr in inputs.items()}
        try:
            results = self._session.run(None, feed)
        except (ort_state.InvalidArgument, ort_state.InvalidProtobuf) as err:
            raise InvalidInputError(f"model {self.model!r} rejected the inputs: {err}") from err
        except Exception as err:  # a kernel failure inside ORT: the request failed, the server goes on
            raise KilnError(f"model {self.model!r} failed while running in ONNX Runtime: {err}") from err
        return {name: _from_ort(value) for name, value in zip(self.output_names, results, strict=True)}

    def close(self) -> None:
        self._session = None


def _to_ort(name: str, arr: np.ndarray) -> np.ndarray:
    """ORT string tensors take str; the wire carries bytes (decoded as UTF-8)."""
    try:
        return np.vectorize(lambda b: b.decode("utf-8") if isinstance(b, bytes) else str(b), otypes=[object])(arr)
    except UnicodeDecodeError as err:
        raise InvalidInputError(f"input {name!r}: a string element is not valid UTF-8 ({err})") from err


def _from_ort(value: np.ndarray) -> np.ndarray:
    if value.dtype.kind == "O":
        return np.vectorize(lambda s: s.encode("utf-8") if isinstance(s, str) else bytes(s), otypes=[object])(value)
    return value
