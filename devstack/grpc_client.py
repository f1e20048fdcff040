"""A small client of the gateway's gRPC ``mushroom.v1.Classifier`` (stubs from services.gateway.protos), shared by the
stack report and the load tests."""
from __future__ import annotations

import grpc
from google.protobuf import json_format



class ClassifierClient:
    def __init__(self, target: str):
        from services.gateway.protos import load

        self.pb2, pb_grpc = load()  # generates the stubs on first use
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.ClassifierStub(self.channel)

    def classify(self, photo: bytes, top_k: int = 3, client_id: str = "", timeout: float = 30.0) -> dict:
        request = self.pb2.ClassifyRequest(photo=photo, top_k=top_k, client_id=client_id)
        response = self.stub.Classify(request, timeout=timeout)
        return json_format.MessageToDict(response, preserving_proto_field_name=True)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "ClassifierClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
