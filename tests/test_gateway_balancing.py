"""The gateway in front of several model server replicas behind one gRPC target (Kubernetes' headless Service, here
gRPC's static ``ipv4:`` address list): its calls spread over every replica, not only the first it connected to, and
a replica that dies leaves the others answering. Real redis-server, model server and gateway processes on free
loopback ports."""
from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway_harness import GatewayProcess
from tests.model_server_harness import MODEL, serve_registry, stop_server
from tests.support import RedisServer, drawn_jpeg
from training_job.tiny_model import publish_tiny_versions

MISSES = 40


def predicts_answered(server) -> float:
    """The Predict calls a model server answered OK (its own :tensorflow:serving:request_count)."""
    text = urllib.request.urlopen(f"{server.rest_url}/metrics", timeout=10).read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name.startswith(":tensorflow:serving:request_count")
               and sample.labels.get("status") == "OK")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    registry = tmp_path_factory.mktemp("registry")
    publish_tiny_versions(registry, MODEL)
    monitoring = registry / "monitoring.config"
    monitoring.write_text('prometheus_config { enable: true path: "/metrics" }')
    servers = []
    with RedisServer() as redis:
        try:
            for _ in range(2):
                servers.append(serve_registry(registry, (1, 2), None, f"--monitoring_config_file={monitoring}"))
            gateway = GatewayProcess("ipv4:" + ",".join(s.grpc_target for s in servers), redis.url)
            try:
                yield servers, gateway
            finally:
                gateway.stop()
        finally:
            for server in servers:
                stop_server(server)


def test_calls_spread_over_every_replica_behind_one_target(replicas):
    servers, gateway = replicas
    before = [predicts_answered(s) for s in servers]
    for seed in range(MISSES):
        status, body, _ = gateway.classify(drawn_jpeg(seed))
        assert status == 200 and not body["cached"], body
    shares = [predicts_answered(s) - b for s, b in zip(servers, before)]
    assert sum(shares) >= MISSES and min(shares) >= MISSES // 4, shares


def test_a_replica_that_dies_leaves_the_others_answering(replicas):
    servers, gateway = replicas
    stop_server(servers[1])  # SIGTERM; the fixture's stop of it again is a no-op
    answers = [gateway.classify(drawn_jpeg(1000 + seed)) for seed in range(MISSES)]
    assert [status for status, _, _ in answers] == [200] * MISSES, [(s, b) for s, b, _ in answers if s != 200]
