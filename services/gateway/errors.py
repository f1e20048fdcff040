"""One error type for both protocols: an HTTP status, a gRPC code and a stable machine-readable code."""
from __future__ import annotations

import grpc

from services.status_details import status_details

_GRPC = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
         403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND, 409: grpc.StatusCode.ALREADY_EXISTS,
         410: grpc.StatusCode.FAILED_PRECONDITION,
         413: grpc.StatusCode.INVALID_ARGUMENT, 415: grpc.StatusCode.INVALID_ARGUMENT,
         501: grpc.StatusCode.UNIMPLEMENTED, 503: grpc.StatusCode.UNAVAILABLE,
         504: grpc.StatusCode.DEADLINE_EXCEEDED}
REDIS_RETRY_AFTER_SECONDS = 2


class GatewayError(Exception):
    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None,
                 headers: dict[str, str] | None = None):
        message = status_details(message)  # it may quote the request: cut to what a gRPC client receives
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.headers = headers or {}  # more HTTP headers of the answer

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return _GRPC.get(self.status, grpc.StatusCode.INTERNAL)

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


def redis_unavailable(exc: Exception) -> GatewayError:
    """What admin and feedback calls answer for a RedisError (Redis down or frozen), on both protocols: HTTP 503
    ``redis_unavailable`` with Retry-After, gRPC UNAVAILABLE. Classify never sees one: its cache serves uncached."""
    return GatewayError(503, "redis_unavailable", f"Redis (routing, audit and feedback state) is unavailable: {exc}",
                        retry_after=REDIS_RETRY_AFTER_SECONDS)
