"""The gateway's own generated gRPC modules (mushroom.v1), generated first if needed."""
from __future__ import annotations

import sys

from services.gateway.proto_build import ensure_generated

_out = str(ensure_generated())
if _out not in sys.path:
    sys.path.insert(0, _out)  # generated code imports "mushroom.v1.classifier_pb2" absolutely

from mushroom.v1 import classifier_pb2 as pb  # noqa: E402
from mushroom.v1 import classifier_pb2_grpc as pb_grpc  # noqa: E402

__all__ = ["pb", "pb_grpc"]
