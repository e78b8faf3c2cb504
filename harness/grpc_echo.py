"""The floor of any Python gRPC server: ModelInfer answered with its own input, no model, no checks.

Run as a child process by ``bench_overhead.py``: prints ``listening on HOST:PORT`` and serves one
model ``identity`` (metadata only) until terminated. Default: grpc.aio (the flavour ``kiln serve``
uses); ``--threads``: grpc's thread-pool server instead.
"""

from __future__ import annotations

import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc


def metadata(name: str, width: int) -> pb.ModelMetadataResponse:
    meta = pb.ModelMetadataResponse(name=name, versions=["1"], platform="echo")
    meta.inputs.add(name="x", datatype="FP32", shape=[-1, width])
    meta.outputs.add(name="y", datatype="FP32", shape=[-1, width])
    return meta


def echo(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
    response.outputs.add(name="y", datatype="FP32", shape=list(request.inputs[0].shape))
    response.raw_output_contents.append(request.raw_input_contents[0])
    return response


class Echo(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, width: int) -> None:
        self.width = width

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        return metadata(request.name, self.width)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return echo(request)


class ThreadEcho(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, width: int) -> None:
        self.width = width

    def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ModelMetadataResponse:
        return metadata(request.name, self.width)

    def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:
        return echo(request)


async def main(width: int = 16) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(width), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def main_threads(width: int = 16) -> None:
    server = grpc.server(ThreadPoolExecutor(128), options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(ThreadEcho(width), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    if "--threads" in sys.argv[1:]:
        main_threads()
    else:
        asyncio.run(main())
