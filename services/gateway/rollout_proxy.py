"""The rollout controller's API under the gateway's origin, for the web operator panel:
``GET /v1/admin/rollout`` and ``POST /v1/admin/rollout/{pause,resume,abort,promote}`` are forwarded to the
controller (``--rollout-url``) with the caller's Authorization header; the controller checks the operator token
(the same tokens file) and its history names the token's owner. Without ``--rollout-url`` both answer 404
``rollout_not_configured``."""
from __future__ import annotations

import aiohttp
from aiohttp import web

from services.gateway.errors import GatewayError

FORWARDED_HEADERS = ("Authorization", "X-Operator")


class RolloutProxy:
    def __init__(self, url: str | None, timeout: float = 5.0):
        self.url = url.rstrip("/") if url else None
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/admin/rollout", self.forward)
        app.router.add_post("/v1/admin/rollout/{action}", self.forward)
        app.on_cleanup.append(self._close)

    async def _close(self, app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    async def forward(self, request: web.Request) -> web.Response:
        if self.url is None:
            raise GatewayError(404, "rollout_not_configured", "no rollout controller is configured (start the "
                               "gateway with --rollout-url)")
        if self._session is None:
            self._session = aiohttp.ClientSession()
        path = request.path.replace("/v1/admin/rollout", "/v1/rollout", 1)
        headers = {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}
        try:
            async with self._session.request(request.method, self.url + path, headers=headers,
                                             timeout=self.timeout) as response:
                body = await response.read()
                return web.Response(body=body, status=response.status, content_type="application/json")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise GatewayError(503, "rollout_unavailable", f"the rollout controller at {self.url} is unreachable: "
                               f"{type(exc).__name__} {exc}", retry_after=5) from None
