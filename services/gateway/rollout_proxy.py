"""The rollout controller's API under the gateway's origin, for the web operator panel and the operator CLI:
``GET /v1/admin/rollout`` and ``POST /v1/admin/rollout/{pause,resume,abort,promote,retry}`` are forwarded to the
controller (``--rollout-url``) with the caller's Authorization header and body (retry's names the version); the
controller checks the operator token
(the same tokens file) and its history names the token's owner. A command is also an entry in the gateway's audit
log, where operators read the routing changes (``/v1/admin/audit``): the gateway checks the token as for a routing
change (its owner is ``who``) and records ``action``, the controller's ``status`` and ``answer`` once it answered.
Without ``--rollout-url`` both answer 404 ``rollout_not_configured``."""
from __future__ import annotations

import json
import logging

import aiohttp
from aiohttp import web
from redis.exceptions import RedisError

from services.gateway.bodies import SMALL_BODY_BYTES, read_limited
from services.gateway.errors import GatewayError

log = logging.getLogger("gateway.rollout_proxy")

FORWARDED_HEADERS = ("Authorization", "X-Operator", "Content-Type")
MAX_AUDITED_ANSWER = 4096  # bytes of the controller's answer kept as JSON in the audit entry; longer ones as text


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


class RolloutProxy:
    def __init__(self, url: str | None, timeout: float = 5.0):
        self.url = url.rstrip("/") if url else None
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._authorise = None
        self._audit = None

    def add_routes(self, app: web.Application, authorise=None, audit=None) -> None:
        """``authorise(request, write) -> operator name`` (raises GatewayError) and ``audit`` (routing.Router, whose
        ``record`` writes an audit entry): with both, commands are audited in the gateway's log too."""
        self._authorise, self._audit = authorise, audit
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
        audited = request.method == "POST" and self._authorise is not None and self._audit is not None
        who = self._authorise(request, write=True) if audited else None
        if self._session is None:
            self._session = aiohttp.ClientSession()
        path = request.path.replace("/v1/admin/rollout", "/v1/rollout", 1)
        headers = {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}
        body = await read_limited(request, SMALL_BODY_BYTES) if request.method == "POST" else None
        try:
            async with self._session.request(request.method, self.url + path, headers=headers, data=body,
                                             timeout=self.timeout) as response:
                status, body = response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise GatewayError(503, "rollout_unavailable", f"the rollout controller at {self.url} is unreachable: "
                               f"{type(exc).__name__} {exc}", retry_after=5) from None
        if audited:
            await self._record(who, request, status, body)
        if not _is_json(body):  # not the controller's answer: whatever answers at its address (an ingress's page)
            raise GatewayError(502, "rollout_bad_answer", f"{self.url} answered {status} with a body that is not "
                               f"JSON, so not as the rollout controller answers: "
                               f"{body[:200].decode('utf-8', 'replace')!r}")
        return web.Response(body=body, status=status, content_type="application/json")

    async def _record(self, who: str, request: web.Request, status: int, body: bytes) -> None:
        action = f"rollout {request.match_info['action'][:40]}"
        try:
            answer = json.loads(body) if len(body) <= MAX_AUDITED_ANSWER else None
        except ValueError:
            answer = None
        if answer is None:
            answer = body[:MAX_AUDITED_ANSWER].decode("utf-8", "replace")
        try:
            await self._audit.record(who, request.headers.get("X-Operator"), action=action, status=status,
                                     answer=answer)
        except RedisError as exc:  # the command reached the controller: say so, so that nobody sends it twice
            log.error("%s by %s (controller answered %d) not audited: %s", action, who, status, exc)
            raise GatewayError(503, "redis_unavailable", f"the rollout controller answered {status} to {action} by "
                               f"{who}, but Redis is unavailable, so the gateway's audit does not hold it: {exc}; "
                               "the controller's history does (do not resend)") from None
        log.info("%s by %s: the controller answered %d", action, who, status)
