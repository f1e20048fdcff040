"""The gateway's gRPC API (protos/mushroom/v1/classifier.proto) as Python modules; see services.protos."""
from __future__ import annotations

from services import protos


def load():
    """Returns (classifier_pb2, classifier_pb2_grpc)."""
    return protos.load("mushroom.v1.classifier_pb2"), protos.load("mushroom.v1.classifier_pb2_grpc")
