"""Stopping an aiohttp server without cutting off a request its client has sent: the gateway's HTTP API, the model
server's REST API and the rollout controller's API all stop this way.

HTTP/1.1 keep-alive has a race: a server closing an idle connection can cross a request its client is sending on it,
and the client sees the connection closed or reset without knowing whether the request ran (a POST is not retried).
So a server stops in this order (``stop_serving``): it stops listening; from then on every answer says
``Connection: close`` and closes its connection (``close_connections_when``); each open connection gets up to
CLOSE_LINGER_SECONDS to bring one more request, which is answered so; only then are the idle connections closed and
the requests in flight given the runner's ``shutdown_timeout``. Answers start closing their connections only once the
listener is closed: a client told to reconnect before then could land in the closing listener's backlog and be reset
after sending its request.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

# How long an open connection may still bring a request once the server stops listening: a client whose answer came
# just before has sent its next request well within it.
CLOSE_LINGER_SECONDS = 0.5


def close_connections_when(closing: Callable[[], bool]
                           ) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """An ``on_response_prepare`` hook: while ``closing()``, each answer says ``Connection: close`` and its connection
    closes after it. aiohttp writes the Connection header before these hooks run, so the hook sets it as well."""
    async def close_connection(request: web.Request, response: web.StreamResponse) -> None:
        if closing():
            response.force_close()
            response.headers[hdrs.CONNECTION] = "close"

    return close_connection


async def stop_serving(runner: web.BaseRunner, site: web.BaseSite, closing: asyncio.Event) -> None:
    """Stop ``site`` listening, set ``closing`` (the event ``close_connections_when`` reads), give open connections
    CLOSE_LINGER_SECONDS to bring one more request, then ``runner.cleanup()``: idle connections close and requests in
    flight get the runner's shutdown_timeout."""
    await site.stop()
    closing.set()
    loop = asyncio.get_running_loop()
    lingering_until = loop.time() + CLOSE_LINGER_SECONDS
    while runner.server is not None and runner.server.connections and loop.time() < lingering_until:
        await asyncio.sleep(0.01)
    await runner.cleanup()
