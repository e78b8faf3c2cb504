"""A Triton Python-backend model that runs an ONNX file with ONNX Runtime.

``write_python_backend_model`` copies this file as ``<model>/1/model.py``. It runs inside Triton's
Python-backend stub, in the Triton venv (numpy<2), never in Kiln's own process, so
``triton_python_backend_utils`` and ``onnxruntime`` are imported inside ``initialize``: importing
this module anywhere else is harmless.

The requests of one ``execute`` call (one dynamic batch) are concatenated along the batch axis, run
once, and the outputs split back per request. Requests whose non-batch dimensions disagree are run
one by one instead, so one odd request never fails the others.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

MODEL_FILENAME = "model.onnx"


class TritonPythonModel:
    """The class Triton's Python backend instantiates, one per model instance."""

    def initialize(self, args: dict[str, str]) -> None:
        import onnxruntime as ort  # only present in the Triton venv's stub process
        import triton_python_backend_utils as pb_utils

        self._pb = pb_utils
        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        params = config.get("parameters", {})
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", {}).get("string_value", "0"))
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            str(version_dir / MODEL_FILENAME), options, providers=["CPUExecutionProvider"]
        )
        self._inputs = [spec["name"] for spec in config["input"]]
        self._outputs = [spec["name"] for spec in config["output"]]
        self._batched = int(config.get("max_batch_size", 0)) > 0

    def execute(self, requests: list[Any]) -> list[Any]:
        feeds = [self._feeds(request) for request in requests]
        results: list[list[np.ndarray] | Exception] | None = None
        if self._batched and len(requests) > 1 and _stackable(feeds):
            try:
                results = list(self._run_batched(feeds))
            except Exception:  # one bad request: fall back to running them one by one
                results = None
        if results is None:
            results = [self._run_one(feed) for feed in feeds]
        return [self._response(request, result) for request, result in zip(requests, results, strict=True)]

    def finalize(self) -> None:
        self._session = None

    def _feeds(self, request: Any) -> dict[str, np.ndarray]:
        feeds: dict[str, np.ndarray] = {}
        for name in self._inputs:
            tensor = self._pb.get_input_tensor_by_name(request, name)
            if tensor is not None:
                feeds[name] = tensor.as_numpy()
        return feeds

    def _run_one(self, feed: dict[str, np.ndarray]) -> list[np.ndarray] | Exception:
        try:
            return list(self._session.run(self._outputs, feed))
        except Exception as err:  # reported to that request's client, not raised into Triton
            return err

    def _run_batched(self, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
        names = list(feeds[0])
        joined = {name: np.concatenate([feed[name] for feed in feeds], axis=0) for name in names}
        outputs = self._session.run(self._outputs, joined)
        sizes = [feed[names[0]].shape[0] for feed in feeds]
        cuts = np.cumsum(sizes)[:-1]
        per_output = [np.split(array, cuts, axis=0) for array in outputs]
        return [[parts[i] for parts in per_output] for i in range(len(feeds))]

    def _response(self, request: Any, result: list[np.ndarray] | Exception) -> Any:
        if isinstance(result, Exception):
            error = self._pb.TritonError(f"onnxruntime failed: {result}")
            return self._pb.InferenceResponse(output_tensors=[], error=error)
        wanted = set(request.requested_output_names()) or set(self._outputs)
        tensors = [
            self._pb.Tensor(name, np.ascontiguousarray(array))
            for name, array in zip(self._outputs, result, strict=True)
            if name in wanted
        ]
        return self._pb.InferenceResponse(output_tensors=tensors)


def _stackable(feeds: list[dict[str, np.ndarray]]) -> bool:
    """True when every request has the same inputs with equal non-batch dimensions."""
    first = feeds[0]
    if not first:
        return False
    for feed in feeds[1:]:
        if feed.keys() != first.keys():
            return False
        for name, array in feed.items():
            if array.shape[1:] != first[name].shape[1:] or array.dtype != first[name].dtype:
                return False
    return True
