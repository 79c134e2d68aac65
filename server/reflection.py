"""gRPC server reflection under both names: `grpc.reflection.v1` (what current grpcurl, Postman and
grpc-cli ask first) and `grpc.reflection.v1alpha` (older clients).

grpcio-reflection ships v1alpha only. The two protocols are the same messages under another package
name, field for field, so one servicer answers both: v1 requests are parsed with the v1alpha classes
(identical wire format), and v1's file descriptor is v1alpha's with the package renamed, added to the
default pool so that a client can `describe grpc.reflection.v1.ServerReflection` too.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as alpha
from grpc_reflection.v1alpha._async import ReflectionServicer

V1_SERVICE = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE = reflection.SERVICE_NAME
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _add_v1_descriptor() -> None:
    """Put grpc/reflection/v1/reflection.proto in the default pool (once per process)."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    fdp = descriptor_pb2.FileDescriptorProto()
    alpha.DESCRIPTOR.CopyToProto(fdp)
    fdp.name, fdp.package = _V1_FILE, "grpc.reflection.v1"
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    for message in fdp.message_type:
        for f in message.field:
            if f.type_name:  # assigning "" would mark a scalar field as a message reference
                f.type_name = f.type_name.replace(old, new)
    for service in fdp.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    pool.Add(fdp)


def enable_reflection(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    """Serve reflection for `service_names` (plus both reflection services) on an aio `server`."""
    _add_v1_descriptor()
    names = [*service_names, V1_SERVICE, V1ALPHA_SERVICE]
    servicer = ReflectionServicer(names)
    for service in (V1_SERVICE, V1ALPHA_SERVICE):
        handler = grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo, request_deserializer=alpha.ServerReflectionRequest.FromString,
            response_serializer=alpha.ServerReflectionResponse.SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo":
                                                                                        handler}),))
