"""The floor of any Python gRPC server: ModelInfer answered with its own input, no model, no checks.

Run as a child process by ``bench_overhead.py``: prints ``listening on HOST:PORT`` and serves one
model ``identity`` (metadata only) until terminated.
"""

from __future__ import annotations

import asyncio

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc


class Echo(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, width: int) -> None:
        self.width = width

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        meta = pb.ModelMetadataResponse(name=request.name, versions=["1"], platform="echo")
        meta.inputs.add(name="x", datatype="FP32", shape=[-1, self.width])
        meta.outputs.add(name="y", datatype="FP32", shape=[-1, self.width])
        return meta

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        response.outputs.add(name="y", datatype="FP32", shape=list(request.inputs[0].shape))
        response.raw_output_contents.append(request.raw_input_contents[0])
        return response


async def main(width: int = 16) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(width), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
