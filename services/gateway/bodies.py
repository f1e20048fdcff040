"""Request bodies read within bounds: bytes are decoded from their Content-Encoding and counted as they arrive, and
reading stops at the limit (413, before the rest is decoded; services/http_bodies.py), and a body must arrive
within a deadline (408). A Content-Encoding not accepted is a 415 (``unsupported_encoding``). What cannot be read is
a 400: a body that is not what its Content-Encoding says (``bad_encoding``), a malformed multipart body
(``bad_multipart``) or one whose photo does not come among its first parts (``too_many_parts``), JSON that
json.loads refuses (``bad_json``; every JSON route reads its body with read_json).

How long a client may take to send a request's headers, and how long an idle keep-alive connection stays open, is
aiohttp's ``keepalive_timeout`` (set by main.py's --keepalive-timeout): the timer runs from the connection's start
or the previous response until a complete request header has arrived, so a client trickling its headers is closed
as one that sends nothing.
"""
from __future__ import annotations

import asyncio
import json

from aiohttp import BodyPartReader, MultipartReader, StreamReader, web
from aiohttp.http_exceptions import BadHttpMessage

from services.gateway.errors import GatewayError
from services.http_bodies import BodyRefused, BodyTooLarge, BodyUndecodable, encoded, read_body
from services.http_errors import UNDECODABLE, undecodable_body


CHUNK_BYTES = 64 * 1024
SMALL_BODY_BYTES = 1024 * 1024  # the largest body of the routes other than classify (feedback, admin, rollout)
# The parts a multipart upload may send before its photo: a form's own fields. aiohttp reads each part on the event
# loop, tens of microseconds of Python; an empty part is 10 bytes, so the body's limit alone bounds nothing.
MAX_FORM_PARTS = 32


class BodyTimeout(TimeoutError):
    """Raised by reads of a request body that did not arrive within the deadline."""


def body_deadline(seconds: float):
    """Middleware: a request's body must have arrived ``seconds`` after its handler starts. A read still waiting
    for it then fails with BodyTimeout, answered 408; a handler that already has its body is never interrupted.
    0 turns the deadline off."""

    @web.middleware
    async def middleware(request: web.Request, handler):
        stream = request.content
        if seconds <= 0 or not request.body_exists or stream.is_eof():
            return await handler(request)

        def expire() -> None:
            if not stream.is_eof():
                stream.set_exception(BodyTimeout(f"the request body did not arrive within {seconds:g} s"))

        timer = asyncio.get_running_loop().call_later(seconds, expire)
        try:
            return await handler(request)
        except BodyTimeout as exc:
            raise GatewayError(408, "body_timeout", str(exc)) from None
        finally:
            timer.cancel()

    return middleware


def _gateway_error(refused: BodyRefused) -> GatewayError:
    """A body refused (services/http_bodies.py) as the gateway answers it, on both protocols."""
    return GatewayError(refused.status, refused.code, str(refused), headers=refused.headers)


async def read_limited(request: web.Request, limit: int, what: str = "the body") -> bytes:
    """The request's whole body decoded, refused with 413 as soon as more than ``limit`` decoded bytes came, 415 for
    a Content-Encoding not accepted, 400 for a body that does not decode."""
    try:
        return await read_body(request, limit, what)
    except BodyRefused as exc:
        raise _gateway_error(exc) from None


async def read_json(request: web.Request, limit: int, max_values: int | None = None):
    """The request's body of at most ``limit`` bytes (413), parsed as JSON: 400 ``bad_json`` for whatever json.loads
    refuses (not JSON, not UTF-8, nested deeper than the recursion limit, an integer of more digits than Python
    converts). With ``max_values``, a body of more separators of values (``,`` and ``:``, within strings too) is a
    400 ``too_many_json_values`` before it is parsed: json.loads runs on the event loop, and its time grows with the
    values a body holds far more than with its bytes."""
    body = await read_limited(request, limit, "the body")
    if max_values is not None and body.count(b",") + body.count(b":") > max_values:
        raise GatewayError(400, "too_many_json_values", f"the JSON body holds more than {max_values} values (its "
                           "',' and ':' counted)")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise GatewayError(400, "bad_json", f"the body is not valid JSON: {str(exc)[:200]}") from None


async def read_form_file(request: web.Request, names: tuple[str, ...], file_limit: int, body_limit: int) -> bytes:
    """The first part of a multipart body named one of ``names``, among its first MAX_FORM_PARTS (400
    ``too_many_parts`` at the next part, before its body is read). Every part's bytes count towards ``body_limit``
    as they arrive (parts before the file included), the file's towards ``file_limit``; 413 past either. A body
    sent with a Content-Encoding is decoded whole first (``body_limit``), then read as one sent without."""
    if encoded(request):
        decoded = await read_limited(request, body_limit, "the multipart body")
        # a stream holding the whole body below its high-water mark: past it, feed_data would ask the connection,
        # whose body is read already, to pause, and aiohttp's parser asserts
        stream = StreamReader(request.protocol, max(CHUNK_BYTES, len(decoded)), loop=asyncio.get_running_loop())
        stream.feed_data(decoded)
        stream.feed_eof()
    else:
        stream = request.content
    try:
        reader = MultipartReader(request.headers, stream)
        size = parts = 0
        while (part := await reader.next()) is not None:
            parts += 1
            if parts > MAX_FORM_PARTS:
                raise GatewayError(400, "too_many_parts", f"the multipart body has more than {MAX_FORM_PARTS} parts "
                                   f"before a {' or '.join(map(repr, names))} field; the limit is {MAX_FORM_PARTS}")
            if not isinstance(part, BodyPartReader):
                raise GatewayError(400, "bad_multipart", "nested multipart bodies are not accepted")
            wanted = part.name in names
            chunks, part_size = [], 0
            while chunk := await part.read_chunk(CHUNK_BYTES):
                size += len(chunk)
                part_size += len(chunk)
                if wanted and part_size > file_limit:
                    raise _gateway_error(BodyTooLarge(file_limit, f"the '{part.name}' field"))
                if size > body_limit:
                    raise _gateway_error(BodyTooLarge(body_limit, "the multipart body"))
                if wanted:
                    chunks.append(chunk)
            if wanted:
                return b"".join(chunks)
    except UNDECODABLE as exc:
        raise _gateway_error(BodyUndecodable(undecodable_body(exc))) from None
    except BadHttpMessage as exc:  # a part's header line that is not a header (InvalidHeader), ...
        raise GatewayError(400, "bad_multipart", f"the multipart body is malformed: {exc.message}") from None
    except ValueError as exc:  # aiohttp's word for a malformed multipart body (no boundary, bad headers, ...)
        raise GatewayError(400, "bad_multipart", f"the multipart body is malformed: {exc}") from None
    raise GatewayError(400, "missing_photo", f"multipart upload without a {' or '.join(map(repr, names))} field")
