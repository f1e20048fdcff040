"""The controller's two windows on the world, both plain HTTP: the gateway's admin API (status figures, routing
reads and changes under the controller's operator token, so every change lands in the gateway's audit log) and the
model server's REST model status (TF Serving's GET /v1/models/<name>)."""
from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import aiohttp


class ApiError(RuntimeError):
    """An error answer: its HTTP status and, when the body says it, its ``error.code`` (e.g. lease_lost)."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.code = code


async def _json(response: aiohttp.ClientResponse) -> dict:
    try:
        body = await response.json(content_type=None)
    except ValueError:
        body = {}
    if response.status >= 400:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        raise ApiError(response.status, error.get("message") or response.reason or "error", error.get("code"))
    return body


class GatewayAdmin:
    """``status_urls``: every gateway replica whose per-process figures are added up (default: ``url`` alone);
    ``status_dns`` ("host:port"): instead, every IPv4 address the name resolves to at each read (a Kubernetes
    headless Service has one A record per ready pod)."""

    def __init__(self, session: aiohttp.ClientSession, url: str, token: str | Callable[[], str],
                 status_urls: list[str] | None = None, timeout: float = 5.0, status_dns: str | None = None):
        """``token``: the controller's operator token, or what gives it as it is now (a watched file)."""
        self.session = session
        self.url = url.rstrip("/")
        self.status_urls = [u.rstrip("/") for u in (status_urls or [url])]
        self.status_dns = status_dns
        self._token = token if callable(token) else lambda: token
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token()}"}

    async def statuses(self) -> tuple[dict[str, dict], dict[str, str]]:
        """GET /v1/admin/status of every replica at once: (status URL -> body, for the replicas that answered;
        status URL -> why not, for those that did not). The feedback counts in every body are the one shared Redis
        tally; the requests, errors, latency and shadow figures are the replica's process's own."""
        try:
            urls = await self._status_urls()
        except OSError as exc:  # the name of the replicas does not resolve: no replica is known
            return {}, {self.status_dns: f"{type(exc).__name__}: {exc}"}

        async def status(url: str) -> dict:
            async with self.session.get(f"{url}/v1/admin/status", headers=self.headers,
                                        timeout=self.timeout) as response:
                return await _json(response)

        results = await asyncio.gather(*(status(url) for url in urls), return_exceptions=True)
        answered, unanswered = {}, {}
        for url, result in zip(urls, results):
            if isinstance(result, (ApiError, aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError)):
                unanswered[url] = f"{type(result).__name__}: {result}"
            elif isinstance(result, BaseException):
                raise result
            else:
                answered[url] = result
        return answered, unanswered

    async def _status_urls(self) -> list[str]:
        if not self.status_dns:
            return self.status_urls
        host, _, port = self.status_dns.rpartition(":")
        infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), family=socket.AF_INET,
                                                             type=socket.SOCK_STREAM)
        return [f"http://{address}:{port}" for address in sorted({info[4][0] for info in infos})]

    async def routing(self) -> dict:
        async with self.session.get(f"{self.url}/v1/admin/routing", headers=self.headers,
                                    timeout=self.timeout) as response:
            return await _json(response)

    async def put_routing(self, table: dict, note: str, lease: str | None = None, candidate: int | None = None,
                          expected_generation: int | None = None) -> dict:
        """Changes the routing; ``note`` (the decision, rule and reason) is recorded in the gateway's audit entry;
        ``lease``: the controller's lease token, so that the gateway refuses the change (409 lease_lost) unless the
        lease is still held under it; ``candidate``: the version the table rolls out (the gateway keeps it with the
        table, to tell an operator's change that replaces it an override); ``expected_generation``: the table's
        generation when it was read, so that the gateway refuses the change (409 routing_changed) if another came
        in between."""
        headers = {**self.headers, "X-Operator": note.encode("ascii", "replace").decode()[:200],
                   **({"X-Rollout-Lease": lease} if lease else {}),
                   **({"X-Rollout-Candidate": str(candidate)} if candidate is not None else {})}
        params = {"expected_generation": str(expected_generation)} if expected_generation is not None else None
        async with self.session.put(f"{self.url}/v1/admin/routing", json=table, headers=headers, params=params,
                                    timeout=self.timeout) as response:
            return await _json(response)


class ModelServerStates:
    STATES = {"START", "LOADING", "AVAILABLE", "UNLOADING", "END"}

    def __init__(self, session: aiohttp.ClientSession, rest_url: str, model_name: str, timeout: float = 5.0):
        self.session = session
        self.url = f"{rest_url.rstrip('/')}/v1/models/{model_name}"
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    async def listed(self) -> dict[int, str]:
        """{version: state} of every version TF Serving's REST model status lists: the ones it manages now (START,
        LOADING, AVAILABLE, UNLOADING) and, in END, the ones it unloaded or failed to load since it started."""
        async with self.session.get(self.url, timeout=self.timeout) as response:
            if response.status == 404:
                return {}
            body = await _json(response)
        return {int(s["version"]): s.get("state") for s in body.get("model_version_status", [])}

    async def label_version(self, label: str) -> int | None:
        """The version a version label points at now, None when unknown or not loaded: the ``model_spec`` of
        TF Serving's REST metadata by label (its model status does not read a label)."""
        async with self.session.get(f"{self.url}/labels/{label}/metadata", timeout=self.timeout) as response:
            if response.status >= 400:
                return None
            body = await _json(response)
        version = body.get("model_spec", {}).get("version")
        return int(version) if version is not None else None
