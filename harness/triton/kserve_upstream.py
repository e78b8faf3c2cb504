"""A small real KServe v2 gRPC server running ONNX Runtime, for gateway tests and benchmarks.

It implements the inference methods of ``GRPCInferenceService`` with tritonclient's generated
classes (a real gRPC server on 127.0.0.1), so the gateway can be tested before or without Kiln's
embedded server. Models are Python callables over numpy arrays; ``onnx_model`` wraps an ONNX
file in an ORT session, ``reversed_model`` makes a deliberately different model from another.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

Model = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
_DTYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32,
           "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}  # fmt: skip
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def onnx_model(path: Path, threads: int = 1) -> Model:
    """An ONNX Runtime session as a model callable."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, inputs), strict=True))

    return run


def reversed_model(model: Model) -> Model:
    """The same model with every output's last axis reversed: top-1 almost never agrees."""
    return lambda inputs: {k: np.ascontiguousarray(v[..., ::-1]) for k, v in model(inputs).items()}


@dataclass
class Behaviour:
    """Knobs a test can turn while the server runs."""

    delay_s: float = 0.0
    fail_code: grpc.StatusCode | None = None
    calls: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, models: Mapping[str, Model], behaviour: Behaviour) -> None:
        self._models = dict(models)
        self._behaviour = behaviour

    def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):
        return service_pb2.ModelReadyResponse(ready=request.name in self._models)

    def ModelMetadata(self, request, context):
        self._model(request.name, context)
        return service_pb2.ModelMetadataResponse(name=request.name, versions=["1"], platform="onnxruntime_onnx")

    def ModelConfig(self, request, context):
        self._model(request.name, context)
        response = service_pb2.ModelConfigResponse()
        response.config.name = request.name
        response.config.platform = "onnxruntime_onnx"
        return response

    def ModelInfer(self, request, context):
        return self._infer(request, context)

    def ModelStreamInfer(self, requests, context):
        for request in requests:
            yield service_pb2.ModelStreamInferResponse(infer_response=self._infer(request, context))

    def _model(self, name: str, context: grpc.ServicerContext) -> Model:
        model = self._models.get(name)
        if model is None:
            context.abort(
                grpc.StatusCode.NOT_FOUND, f"model {name!r} is not served here; models: {sorted(self._models)}"
            )
        return model  # type: ignore[return-value]

    def _infer(
        self, request: service_pb2.ModelInferRequest, context: grpc.ServicerContext
    ) -> service_pb2.ModelInferResponse:
        behaviour = self._behaviour
        with behaviour.lock:
            behaviour.calls[request.model_name] = behaviour.calls.get(request.model_name, 0) + 1
        if behaviour.fail_code is not None:
            context.abort(behaviour.fail_code, "injected failure")
        if behaviour.delay_s:
            time.sleep(behaviour.delay_s)
        model = self._model(request.model_name, context)
        inputs = {}
        for index, tensor in enumerate(request.inputs):
            array: np.ndarray = np.frombuffer(request.raw_input_contents[index], dtype=_DTYPES[tensor.datatype])
            inputs[tensor.name] = array.reshape(tuple(tensor.shape))
        outputs = model(inputs)
        response = service_pb2.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version or "1", id=request.id
        )
        wanted = [o.name for o in request.outputs] or list(outputs)
        for name in wanted:
            array = np.ascontiguousarray(outputs[name])
            out = response.outputs.add()
            out.name, out.datatype = name, _NAMES[array.dtype]
            out.shape.extend(array.shape)
            response.raw_output_contents.append(array.tobytes())
        return response


@dataclass
class UpstreamServer:
    server: grpc.Server
    port: int
    behaviour: Behaviour

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace: float | None = None) -> None:
        self.server.stop(grace).wait(5)

    def __enter__(self) -> UpstreamServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_upstream(
    models: Mapping[str, Model],
    port: int = 0,
    threads: int = 16,
    credentials: grpc.ServerCredentials | None = None,
) -> UpstreamServer:
    """Serve ``models`` on 127.0.0.1:``port`` (0 = free port, ``credentials`` = TLS) until ``stop()``."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=[("grpc.so_reuseport", 0)])
    behaviour = Behaviour()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_Servicer(models, behaviour), server)
    address = f"127.0.0.1:{port}"
    bound = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    server.start()
    return UpstreamServer(server, bound, behaviour)
