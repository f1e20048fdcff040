"""A gateway process for the tests and the one client they talk to it with, on the launcher of devstack/servers.py.

``GatewayProcess(model_server, redis_url, *extra_flags, env=...)`` starts ``python -m services.gateway`` on free
loopback ports and waits until it is ready; ``request``/``classify`` answer a ``Reply`` (status, body, headers): the
body as JSON when it is JSON, else as text.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

from devstack.health import http_ok
from devstack.servers import RedisServer, start_gateway, stop_process, wait_until
from tests.model_server_harness import MODEL, serve_registry, stop_server


class Reply(NamedTuple):
    status: int
    body: dict | list | str
    headers: dict


def _body(raw: bytes) -> dict | list | str:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def http_request(url: str, method: str, path: str, body=None, content_type: str | None = None, headers=None,
                 token: str | None = None, timeout: float = 30) -> Reply:
    """``method`` ``path`` of the gateway at ``url``; a dict or list ``body`` is sent as JSON, ``token`` as a bearer
    token."""
    headers = dict(headers or {})
    if isinstance(body, (dict, list)):
        body, content_type = json.dumps(body).encode(), "application/json"
    if content_type:
        headers["Content-Type"] = content_type
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return Reply(response.status, _body(response.read()), dict(response.headers))
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, _body(exc.read()), dict(exc.headers))


class GatewayProcess:
    """A gateway of ``MODEL`` with ``extra`` flags and ``env`` on top of the launcher's environment."""

    def __init__(self, model_server: str, redis_url: str, *extra: str, env: dict | None = None,
                 wait_ready: bool = True):
        self.process, self.http_port, self.grpc_port, self.log = start_gateway(model_server, redis_url, MODEL,
                                                                               *extra, env=env)
        self.url = f"http://127.0.0.1:{self.http_port}"
        if wait_ready:
            try:
                self.wait_ready()
            except BaseException:  # nobody holds this object to stop it: the process would outlive the test
                self.stop()
                raise

    def wait_ready(self, timeout: float = 30) -> None:
        """Until /readyz answers 200; a refused or reset connection means "not ready yet", an exited gateway fails."""
        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self.process.returncode} before it was ready")
            return http_ok(self.url + "/readyz")

        wait_until(ready, timeout=timeout, what="gateway ready")

    def request(self, method: str, path: str, body=None, content_type: str | None = None, headers=None,
                token: str | None = None, timeout: float = 30) -> Reply:
        return http_request(self.url, method, path, body, content_type, headers, token, timeout)

    def classify(self, photo: bytes, query: str = "", *, client: str | None = None, timeout: float = 30,
                 **params) -> Reply:
        """POST /v1/classify of a JPEG body; ``query`` (``"version=1&top_k=2"``) and ``params`` (``version=1``)
        make the query string, ``client`` the X-Client-Id header."""
        query = "&".join(part for part in (query, urllib.parse.urlencode(params)) if part)
        headers = {"X-Client-Id": client} if client is not None else None
        return self.request("POST", f"/v1/classify?{query}", photo, "image/jpeg", headers, timeout=timeout)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the /metrics samples called ``name`` whose labels include ``labels`` (0 when none)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = self.request("GET", "/metrics").body
        return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                   if sample.name == name and labels.items() <= sample.labels.items())

    def stop(self) -> None:
        stop_process(self.process)


@contextmanager
def gateway_stack(registry: Path, versions, make_gateway: Callable[[str, str], "GatewayProcess"],
                  labels: dict[str, int] | None = None) -> Iterator[SimpleNamespace]:
    """Redis, our model server on ``registry`` (``serve_registry``: ``versions`` AVAILABLE, ``labels``) and the gateway
    ``make_gateway(model_server_target, redis_url)`` starts, as ``.redis``, ``.server``, ``.gateway`` (a test may put
    a restarted server in ``.server``); whatever started is stopped, also when a later part fails to start."""
    redis = RedisServer().start()
    try:
        server = serve_registry(registry, versions, labels)
    except BaseException:
        redis.stop()
        raise
    try:
        parts = SimpleNamespace(registry=registry, redis=redis, server=server,
                                gateway=make_gateway(server.grpc_target, redis.url))
    except BaseException:
        stop_server(server)
        redis.stop()
        raise
    try:
        yield parts
    finally:
        parts.gateway.stop()
        stop_server(parts.server)
        redis.stop()
