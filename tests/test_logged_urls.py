"""A Redis password in the URL the services are given works, and never reaches their logs (which are shipped and
kept elsewhere). A real Redis with a password, model server and gateway."""
from __future__ import annotations

import pytest

from services.urls import without_password
from tests.gateway_harness import GatewayProcess
from tests.model_server_harness import MODEL, serve_registry, stop_server
from tests.support import NOT_MUSHROOMS, RedisServer
from training_job.tiny_model import publish_tiny_versions

PASSWORD = "s3cret-redis-password"


def test_a_gateway_given_a_redis_password_uses_it_and_logs_it_hidden(tmp_path):
    publish_tiny_versions(tmp_path, MODEL, biases=(0.0,))
    redis = RedisServer(extra_args=("--requirepass", PASSWORD)).start()
    server = serve_registry(tmp_path, (1,))
    try:
        gateway = GatewayProcess(server.grpc_target, redis.url.replace("redis://", f"redis://:{PASSWORD}@"))
        try:
            photo = sorted(NOT_MUSHROOMS.iterdir())[0].read_bytes()
            assert [gateway.classify(photo).body["cached"] for _ in range(2)] == [False, True]
            assert gateway.request("GET", "/readyz").body["reason"] == "ok"
        finally:
            gateway.stop()
        log = gateway.log.read_text()
        assert "redis redis://:***@127.0.0.1" in log and PASSWORD not in log
    finally:
        stop_server(server)
        redis.stop()


@pytest.mark.parametrize("url, shown", [
    ("redis://:pw@redis:6379/0", "redis://:***@redis:6379/0"),
    ("redis://default:p%40ss@redis:6379/0", "redis://default:***@redis:6379/0"),
    ("rediss://redis:6380/0?password=pw&ssl_cert_reqs=none", "rediss://redis:6380/0?password=***&ssl_cert_reqs=none"),
    ("http://alice:pw@[::1]:8080/v1", "http://alice:***@[::1]:8080/v1"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://redis:port/0", "redis://redis:port/0"),  # does not parse as a URL: shown as given, never an error
])
def test_a_url_is_logged_without_its_password(url, shown):
    assert without_password(url) == shown
