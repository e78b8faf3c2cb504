"""The KServe v2 protobuf descriptor set Envoy's gRPC field extraction filter needs.

Built from tritonclient's generated modules (``FileDescriptorSet`` of ``grpc_service.proto`` and its
dependencies, in dependency order), so no ``protoc`` and no .proto files are needed.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor
from tritonclient.grpc import service_pb2


def descriptor_set() -> bytes:
    """Serialized ``FileDescriptorSet`` holding ``inference.GRPCInferenceService``."""
    files = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in seen:
            return
        for dependency in file.dependencies:
            add(dependency)
        seen.add(file.name)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        files.file.append(proto)

    add(service_pb2.DESCRIPTOR)
    return files.SerializeToString()
