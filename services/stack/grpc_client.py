"""A client of the gateway's gRPC ``mushroom.v1.Classifier`` built from server reflection, so the stack report and the
load tests need no generated stubs of their own."""
from __future__ import annotations

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import FieldDescriptor
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

SERVICE = "mushroom.v1.Classifier"


class ClassifierClient:
    def __init__(self, target: str, method: str = "Classify"):
        self.channel = grpc.insecure_channel(target)
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(self.channel))
        service = pool.FindServiceByName(SERVICE)
        rpc = service.FindMethodByName(method)
        self.request_class = message_factory.GetMessageClass(rpc.input_type)
        response_class = message_factory.GetMessageClass(rpc.output_type)
        self.image_field = next(f.name for f in rpc.input_type.fields if f.type == FieldDescriptor.TYPE_BYTES)
        self.has_top_k = "top_k" in rpc.input_type.fields_by_name
        self.call = self.channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=lambda m: m.SerializeToString(),
                                             response_deserializer=response_class.FromString)

    def classify(self, photo: bytes, top_k: int = 3, timeout: float = 30.0) -> dict:
        request = self.request_class(**{self.image_field: photo})
        if self.has_top_k:
            request.top_k = top_k
        response = self.call(request, timeout=timeout)
        return json_format.MessageToDict(response, preserving_proto_field_name=True)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "ClassifierClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
