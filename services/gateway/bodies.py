"""Request bodies read within bounds: a body must arrive within a deadline (else 408).

How long a client may take to send a request's headers, and how long an idle keep-alive connection stays open, is
aiohttp's ``keepalive_timeout`` (set by main.py's --keepalive-timeout): the timer runs from the connection's start
or the previous response until a complete request header has arrived, so a client trickling its headers is closed
as one that sends nothing.
"""
from __future__ import annotations

import asyncio

from aiohttp import web

from services.gateway.errors import GatewayError


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
