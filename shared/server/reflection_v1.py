"""grpc.reflection.v1 next to v1alpha.

grpcio-reflection (1.85) serves only grpc.reflection.v1alpha, while current tools
(grpcurl, Postman, grpcui) ask for grpc.reflection.v1 first. The two protos are the same
messages with the same field numbers under another package, so v1 is served by the very
same servicer with the v1alpha message classes (identical on the wire). The v1 file
descriptor is added to the default pool too, so that reflection can describe itself under
both names.
"""
from __future__ import annotations

from typing import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2 as alpha
from grpc_reflection.v1alpha._async import ReflectionServicer

PACKAGE = "grpc.reflection.v1"
SERVICE_NAME = f"{PACKAGE}.ServerReflection"
FILE_NAME = "grpc/reflection/v1/reflection.proto"
_ALPHA_PREFIX = f".{alpha.DESCRIPTOR.package}."


def _retyped(name: str) -> str:
    return f".{PACKAGE}.{name[len(_ALPHA_PREFIX):]}" if name.startswith(_ALPHA_PREFIX) else name


def _rename_messages(messages) -> None:
    for msg in messages:
        for field in msg.field:
            if field.HasField("type_name"):  # setting it, even to "", would mark a scalar field as typed
                field.type_name = _retyped(field.type_name)
        _rename_messages(msg.nested_type)


def ensure_v1_descriptor(pool: descriptor_pool.DescriptorPool | None = None) -> None:
    """Add grpc/reflection/v1/reflection.proto to the pool (once), made from v1alpha's."""
    pool = pool or descriptor_pool.Default()
    try:
        pool.FindFileByName(FILE_NAME)
        return
    except KeyError:
        pass
    fdp = descriptor_pb2.FileDescriptorProto()
    alpha.DESCRIPTOR.CopyToProto(fdp)
    fdp.name, fdp.package = FILE_NAME, PACKAGE
    fdp.ClearField("options")  # v1alpha's java/go package options do not describe v1
    _rename_messages(fdp.message_type)
    for service in fdp.service:
        for method in service.method:
            method.input_type = _retyped(method.input_type)
            method.output_type = _retyped(method.output_type)
    pool.AddSerializedFile(fdp.SerializeToString())


def add_reflection_v1(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve grpc.reflection.v1.ServerReflection over the given service names."""
    ensure_v1_descriptor()
    servicer = ReflectionServicer(list(service_names))
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=alpha.ServerReflectionRequest.FromString,
        response_serializer=alpha.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, {"ServerReflectionInfo": handler}),))
