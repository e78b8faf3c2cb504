"""The KServe v2 ``GRPCInferenceService`` over a ``ModelStore``: protobuf in, domain calls, protobuf out.

Domain errors become gRPC statuses in one place, ``translate_errors`` (through ``server.status``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from builders.repository import list_models
from core.errors import InvalidInputError, KilnError
from server import __version__
from server.codec import decode_inputs, encode_outputs
from server.llm.stream import answer_decoupled
from server.model_store import ModelState, ModelStore, ServedVersion
from server.statistics import Duration, VersionStats
from server.status import status_code

logger = logging.getLogger(__name__)

SERVER_NAME = "kiln"
EXTENSIONS = ("model_repository", "statistics")

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]


MAX_DETAIL_CHARS = 2000  # status details travel in trailers, which clients cap (8 KiB by default)


@dataclass(frozen=True)
class UndecodableRequest:
    """A ModelInferRequest body that is not valid protobuf: answered INVALID_ARGUMENT, not UNKNOWN."""

    size: int
    reason: str
    model_name: str = ""
    id: str = ""


def parse_infer_request(data: bytes) -> pb.ModelInferRequest | UndecodableRequest:
    """gRPC's request deserializer for the inference methods: a bad body becomes a value to refuse,
    so a stream keeps going and answers it like any other bad request."""
    try:
        return pb.ModelInferRequest.FromString(data)
    except DecodeError as err:
        return UndecodableRequest(len(data), str(err))


def add_to_server(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Register every method of ``GRPCInferenceService`` (like the generated ``add_..._to_server``),
    with ``parse_infer_request`` as the deserializer of ModelInfer and ModelStreamInfer."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        request_type, response_type = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        parse = parse_infer_request if method.name in ("ModelInfer", "ModelStreamInfer") else request_type.FromString
        make = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=parse,
            response_serializer=response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


_HANDLER_KINDS: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def public_message(message: str, root: Path) -> str:
    """An error message as a client may see it: no absolute repository path (paths inside it are shown
    relative to it, e.g. ``digits/1/model.onnx``) and no more than ``MAX_DETAIL_CHARS``."""
    for base in {str(root.absolute()), str(root.resolve())}:
        message = message.replace(base + os.sep, "").replace(base, "<repository>")
    if len(message) > MAX_DETAIL_CHARS:  # keep both ends: what failed, and what to do
        half = (MAX_DETAIL_CHARS - 40) // 2
        message = f"{message[:half]} ...({len(message) - 2 * half} characters cut)... {message[-half:]}"
    return message


def translate_errors(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Abort the RPC with the status code of a domain error (INTERNAL for anything unexpected)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            return await method(self, request, context)
        except Exception as err:
            code, message = self.describe_error(method.__name__, err)
            await context.abort(code, message)
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, store: ModelStore, *, is_ready: Callable[[], bool]) -> None:
        self.store = store
        self._is_ready = is_ready

    def describe_error(self, method: str, err: Exception) -> tuple[grpc.StatusCode, str]:
        """Status code and client-safe message of an error (a bug is logged and answered INTERNAL)."""
        if isinstance(err, KilnError):
            return status_code(err), public_message(str(err), self.store.root)
        logger.error("%s failed", method, exc_info=err)
        message = f"internal error in {method}: {type(err).__name__}: {err}"
        return grpc.StatusCode.INTERNAL, public_message(message, self.store.root)

    @translate_errors
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @translate_errors
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._is_ready())

    @translate_errors
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=list(EXTENSIONS))

    @translate_errors
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.store.is_ready(request.name, request.version))

    @translate_errors
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        served = self.store.get(request.name, request.version)
        record = self.store.record(request.name)
        versions = sorted(record.versions) if record is not None else [served.version]
        response = pb.ModelMetadataResponse(
            name=served.name, versions=[str(v) for v in versions], platform=served.config.platform
        )
        for specs, target in ((served.inputs, response.inputs), (served.outputs, response.outputs)):
            for spec in specs:
                target.add(name=spec.name, datatype=spec.kserve_dtype, shape=list(spec.numeric_shape))
        return response

    @translate_errors
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        served = self.store.get(request.name, request.version)
        return pb.ModelConfigResponse(config=served.config)

    @translate_errors
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await self._infer(request)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Triton's streaming form: one response per request (in completion order, matched by ``id``),
        errors as ``error_message``. Requests of one stream run concurrently, so they can be batched."""
        responses: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()
        generating: set[str] = set()  # ids of this stream's requests still producing tokens

        async def answer(request: pb.ModelInferRequest | UndecodableRequest) -> None:
            try:
                served = self._decoupled(request)
                if served is not None and isinstance(request, pb.ModelInferRequest):
                    await answer_decoupled(served, request, responses.put, generating)
                    return
                response = pb.ModelStreamInferResponse(infer_response=await self._infer(request))
            except Exception as err:  # every request gets its answer, whatever went wrong
                code, message = self.describe_error("ModelStreamInfer", err)
                failed = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                response = pb.ModelStreamInferResponse(error_message=f"{code.name}: {message}", infer_response=failed)
            await responses.put(response)

        async def read_all() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.get_running_loop().create_task(answer(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.wait(set(tasks))
            finally:
                responses.put_nowait(None)  # the writer below stops even if reading failed

        reader = asyncio.get_running_loop().create_task(read_all())
        try:
            while (response := await responses.get()) is not None:
                yield response
            await reader
        finally:
            reader.cancel()
            for task in tasks:
                task.cancel()

    def _decoupled(self, request: pb.ModelInferRequest | UndecodableRequest) -> ServedVersion | None:
        """The version a request goes to when it is a decoupled decoder (errors are left to ``_infer``)."""
        if isinstance(request, UndecodableRequest):
            return None
        try:
            served = self.store.get(request.model_name, request.model_version)
        except KilnError:
            return None
        return served if served.decoder is not None else None

    async def _infer(self, request: pb.ModelInferRequest | UndecodableRequest) -> pb.ModelInferResponse:
        if isinstance(request, UndecodableRequest):
            raise InvalidInputError(
                f"request body ({request.size} bytes) is not a ModelInferRequest protobuf ({request.reason}); "
                "send a KServe v2 ModelInferRequest"
            )
        served = self.store.get(request.model_name, request.model_version)
        if served.decoder is not None:
            raise InvalidInputError(
                f"model {served.name!r} is decoupled (one response per token); ModelInfer cannot answer it, "
                "send the request on ModelStreamInfer (tritonclient: start_stream + async_stream_infer)"
            )
        inputs = decode_inputs(request)
        requested = tuple(o.name for o in request.outputs)
        served.check(inputs, requested)
        outputs, _ = await served.infer(inputs)
        names = requested or served.output_names
        response = pb.ModelInferResponse(model_name=served.name, model_version=str(served.version), id=request.id)
        encode_outputs(response, outputs, names)
        return response

    @translate_errors
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        if request.name:
            self.store.get(request.name, request.version)  # NOT_FOUND / UNAVAILABLE as for inference
        response = pb.ModelStatisticsResponse()
        for record in self.store.records():
            if request.name and record.name != request.name:
                continue
            for version, served in sorted(record.versions.items()):
                if request.version and str(version) != request.version:
                    continue
                response.model_stats.append(_statistics(served))
        return response

    @translate_errors
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for entry in list_models(self.store.root):
            record = self.store.record(entry.name)
            if record is not None and record.versions:
                for version in sorted(record.versions):
                    response.models.add(name=entry.name, version=str(version), state=record.state.value)
                for version, reason in sorted(record.failed.items()):
                    if version not in record.versions:
                        response.models.add(
                            name=entry.name,
                            version=str(version),
                            state=ModelState.UNAVAILABLE.value,
                            reason=public_message(reason, self.store.root),
                        )
            elif not request.ready:
                state = record.state.value if record is not None else ModelState.UNAVAILABLE.value
                reason = public_message(record.reason if record is not None else "not loaded", self.store.root)
                response.models.add(name=entry.name, version="", state=state, reason=reason)
        if request.ready:
            kept = [m for m in response.models if m.state == ModelState.READY.value]
            del response.models[:]
            response.models.extend(kept)
        return response

    @translate_errors
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        parameters = {k: v.string_param for k, v in request.parameters.items()}
        await self.store.request_load(request.model_name, parameters)
        return pb.RepositoryModelLoadResponse()

    @translate_errors
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        await self.store.request_unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def _statistics(served: ServedVersion) -> pb.ModelStatistics:
    s: VersionStats = served.stats
    stats = pb.ModelStatistics(
        name=served.name,
        version=str(served.version),
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
    )
    for field in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
        _duration(getattr(stats.inference_stats, field), getattr(s, field))
    for size in sorted(s.batches):
        batch = stats.batch_stats.add(batch_size=size)
        _duration(batch.compute_input, s.batches[size].compute_input)
        _duration(batch.compute_infer, s.batches[size].compute_infer)
        _duration(batch.compute_output, s.batches[size].compute_output)
    return stats


def _duration(target: pb.StatisticDuration, source: Duration) -> None:
    target.count = source.count
    target.ns = source.ns
