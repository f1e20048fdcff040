"""Errors carrying the gRPC status code TF Serving would use; the REST layer maps them to HTTP statuses."""
from __future__ import annotations

import grpc

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,  # TF Serving's GATEWAY_TO
}


class ServingError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self):  # pickled as its code and message (json_worker.py sends it across processes)
        return type(self), (self.code, self.message)

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)


class LargeJson(Exception):
    """Raised by a JSON parse run in place (json_worker.py) that found, once the JSON was read, more work than the
    event loop should do: the parse runs again in the worker."""


DEFAULT_SIGNATURE = "serving_default"  # the signature a request that names none asks for


def invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def signature_not_found(name: str) -> ServingError:
    """A request's signature name ("": DEFAULT_SIGNATURE) that its version does not have."""
    return invalid(f"Serving signature name: \"{name or DEFAULT_SIGNATURE}\" not found in signature def")
