"""A gRPC request message that does not parse, handed to the server's handler to answer with the server's status.

grpcio ends such an RPC itself with UNKNOWN "Unexpected DecodeError", the status of a bug in the server, before any
interceptor, handler or count sees it. A server interceptor puts ``parsing(handler.request_deserializer)`` in its
place: a message that does not parse arrives as an ``Undecodable``, which ``refuse_undecodable`` ends the call with.
"""
from __future__ import annotations

from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class Undecodable:
    """A request message that did not parse, in place of the message."""
    message_name: str
    error: str


def parsing(deserializer):
    """``deserializer`` (a message's FromString), returning an Undecodable where it raises (a DecodeError, or a
    string field that is not UTF-8)."""
    if deserializer is None:
        return None
    message_name = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    message_name = message_name.full_name if message_name is not None else "request message"

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - whatever the bytes make the parser raise
            return Undecodable(message_name, str(exc))
    return parse


async def refuse_undecodable(request, context, code: grpc.StatusCode) -> None:
    """Ends the call with ``code`` when ``request`` did not parse; returns when it did."""
    if isinstance(request, Undecodable):
        await context.abort(code, f"the request is not a valid {request.message_name}: {request.error}")
