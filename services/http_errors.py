"""HTTP errors the project's APIs answer in their own form rather than aiohttp's.

The gateway's and the rollout controller's APIs answer ``{"error": {"code", "message"}}`` (``with_json_errors``),
also where aiohttp would answer itself: its 404, 405 and 413 are plain text, and an exception no handler catches
becomes its plain text 500. A client that reads ``error.code`` reads it from every answer. A body that does not
decode (``UNDECODABLE``, ``undecodable_body``) is named the same way by every API, the model server's REST API
(TF Serving's ``{"error": "..."}``) included."""
from __future__ import annotations

import logging

from aiohttp import hdrs, web
from aiohttp.http_exceptions import PayloadEncodingError
from multidict import CIMultiDict

AIOHTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
# aiohttp decodes a chunked transfer as it arrives (Content-Encoding is decoded by services/http_bodies.py) and fails
# the read with one of these when the bytes are not so framed: its parser's error (PayloadEncodingError), which it
# hands the reader as the cause of a RequestPayloadError.
UNDECODABLE = (PayloadEncodingError, web.RequestPayloadError)


def undecodable_body(exc: Exception) -> str:
    """What to tell the client whose body raised ``exc`` (one of UNDECODABLE) as it was read."""
    cause = exc if isinstance(exc, PayloadEncodingError) else exc.__cause__
    reason = cause.message if isinstance(cause, PayloadEncodingError) else str(exc)
    return f"the body cannot be decoded: {reason}"


def error_response(status: int, code: str, message: str, headers=None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


async def with_json_errors(request: web.Request, handler, log: logging.Logger, server: str) -> web.StreamResponse:
    """``handler``'s answer to ``request``, with aiohttp's own errors and a bug's 500 (logged to ``log``, naming
    the ``server``) answered as JSON: the tail of each API's error middleware."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        answer = _aiohttp_error(exc)
        if answer is None:
            raise
        return answer
    except Exception:  # a bug
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal_error", f"the {server} failed on this request (a bug, logged)")


def _aiohttp_error(exc: web.HTTPException) -> web.Response | None:
    """aiohttp's own error ``exc`` as JSON, keeping its headers (a 405's Allow, which RFC 9110 requires); None when
    ``exc`` is not an error or already JSON, to be raised as it is."""
    if exc.status < 400 or exc.content_type == "application/json":
        return None
    headers = CIMultiDict(exc.headers)
    for name in (hdrs.CONTENT_TYPE, hdrs.CONTENT_LENGTH):
        headers.popall(name, None)
    return error_response(exc.status, AIOHTTP_CODES.get(exc.status, "http_error"), exc.reason, headers)

