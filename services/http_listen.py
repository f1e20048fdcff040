"""How the HTTP servers (the gateway's API, the model server's REST API) listen.

A connection the server has not accepted yet waits in the kernel's listen queue; once the queue is full the kernel
drops the next ones, and each client sends its SYN again after a second (then three): under a burst of new
connections (every request of an overload spike on a connection of its own) requests reached the gateway a second
late, and clients with a 2 s deadline gave up on ones it would have answered. aiohttp's default queue is 128
connections; this one is as long as uvicorn's and gunicorn's, and the kernel caps it at net.core.somaxconn.
"""
from __future__ import annotations

LISTEN_BACKLOG = 2048
SITE_OPTIONS = {"backlog": LISTEN_BACKLOG}  # for web.TCPSite
