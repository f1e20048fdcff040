"""The controller's own small HTTP API: GET /v1/rollout (state, step, timers, judged figures, history) and
POST /v1/rollout/{pause,resume,abort,promote,retry} (retry's body names the version: ``{"version": 3}``; the others
take none, or ``{}``), both behind the gateway's operator tokens (the same file, so the history names the operator);
/metrics, /healthz."""
from __future__ import annotations

import json
import logging
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from services.gateway.operators import OperatorTokens
from services.http_bodies import BodyRefused, read_body
from services.http_errors import error_response, with_json_errors
from services.http_stop import close_connections_when
from services.rollout import metrics
from services.rollout.controller import COMMANDS, Controller

log = logging.getLogger("rollout.http")
COMMAND_BYTES = 64 * 1024  # the largest body of a command, once decoded


def _error(status: int, code: str, message: str, **headers) -> web.Response:
    return error_response(status, code, message, headers or None)


class RolloutApi:
    def __init__(self, controller: Controller, operators: OperatorTokens, closing: Callable[[], bool] = lambda: False):
        self.controller = controller
        self.operators = operators
        self.closing = closing  # () -> True once the controller is stopping: answers close their connections

    def app(self) -> web.Application:
        app = web.Application(client_max_size=COMMAND_BYTES, middlewares=[self._errors])
        app.on_response_prepare.append(close_connections_when(self.closing))
        app.router.add_get("/v1/rollout", self.status)
        app.router.add_post("/v1/rollout/{action}", self.command)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        async def answered(request: web.Request):
            try:
                return await handler(request)
            except RedisError as exc:
                return _error(503, "redis_unavailable", f"Redis (the rollout state) is unavailable: {exc}",
                              **{"Retry-After": "2"})
        return await with_json_errors(request, answered, log, "rollout controller")

    def _operator(self, request: web.Request) -> str | web.Response:
        """The name of the operator whose bearer token this is, or the error response."""
        if not self.operators.configured:
            return _error(403, "admin_disabled", "no operator token is configured: the rollout API is closed "
                          "(start with --operator-tokens FILE or --admin-token)")
        header = request.headers.get("Authorization", "")
        owner = self.operators.owner(header[7:] if header.startswith("Bearer ") else "")
        if owner is None:
            return _error(401, "unauthorised", "a valid 'Authorization: Bearer <operator token>' is required")
        return owner

    async def status(self, request: web.Request) -> web.Response:
        who = self._operator(request)
        if isinstance(who, web.Response):
            return who
        return web.json_response(await self.controller.describe())

    async def command(self, request: web.Request) -> web.Response:
        who = self._operator(request)
        if isinstance(who, web.Response):
            return who
        action = request.match_info["action"]
        if action not in COMMANDS:
            return _error(404, "not_found", f"unknown rollout command {action!r} (known: {', '.join(COMMANDS)})")
        try:
            body = await read_body(request, COMMAND_BYTES)
        except BodyRefused as exc:
            return _error(exc.status, exc.code, str(exc), **exc.headers)
        try:
            options = json.loads(body) if body.strip() else {}
        except (ValueError, RecursionError):  # RecursionError: nested too deeply
            options = None
        if not isinstance(options, dict) or set(options) - {"version"}:
            return _error(400, "bad_command", 'a command\'s body is empty, {} or, for retry, {"version": <version>}')
        try:
            command = await self.controller.queue_command(action, who, request.headers.get("X-Operator"),
                                                          options.get("version"))
        except ValueError as exc:
            return _error(400, "bad_command", str(exc))
        except OverflowError as exc:
            return _error(429, "too_many_commands", str(exc), **{"Retry-After": "5"})
        return web.json_response({"queued": command}, status=202)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "leader": self.controller.leader})
