"""The gateway stopping (SIGTERM, as Kubernetes, Compose and `make stop` stop it): unready at once, still serving for
its shutdown delay, then no request it has read goes unanswered, HTTP keep-alive connections are closed with the
answer to their last request (never under a request the client already sent), calls in flight over HTTP and gRPC
are answered, and it exits within its grace period even when a call cannot finish. Real redis-server, model server
and gateway processes on free loopback ports; each test stops a gateway of its own."""
from __future__ import annotations

import http.client
import queue
import signal
import subprocess
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gateway.protos import load
from tests.gateway_harness import GatewayProcess, gateway_stack
from tests.model_server_harness import MODEL, wait_until
from tests.support import KeepAliveClients, drawn_jpeg
from tests.test_gateway_faults import Frozen
from training_job.tiny_model import publish_tiny_versions

pb, pb_grpc = load()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    registry = tmp_path_factory.mktemp("registry")
    publish_tiny_versions(registry, MODEL)
    with gateway_stack(registry, (1, 2), lambda server, redis: GatewayProcess(server, redis)) as parts:
        yield parts


@pytest.fixture
def stopping_gateway(stack):
    """Starts a gateway of the stack's with these environment variables; whatever it started and is still running
    at the end of the test is stopped."""
    started: list[GatewayProcess] = []

    def start(**env: str) -> GatewayProcess:
        started.append(GatewayProcess(stack.server.grpc_target, stack.redis.url, env=env))
        return started[-1]

    yield start
    for gateway in started:
        if gateway.process.poll() is None:
            gateway.stop()


def exits_within(gateway: GatewayProcess, seconds: float) -> int:
    try:
        return gateway.process.wait(seconds)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the gateway was still running {seconds} s after SIGTERM") from None


def test_sigterm_under_keepalive_load_leaves_no_request_it_was_sent_unanswered(stack, stopping_gateway):
    """Eight clients keep their connections busy; SIGTERM. Each connection's last answer closes it (``Connection:
    close``); a request sent on it is never met by a closed or reset connection instead (the race of closing an idle
    keep-alive connection while its client sends). New connections are refused once the gateway stops listening."""
    gateway = stopping_gateway()
    requests = [("POST", "/v1/classify", drawn_jpeg(seed), {"Content-Type": "image/jpeg"}) for seed in range(16)]
    with KeepAliveClients(gateway.http_port, requests) as clients:
        wait_until(lambda: len(clients.outcomes) >= 200, timeout=30, interval=0.05, what="steady load")
        gateway.process.send_signal(signal.SIGTERM)
        assert exits_within(gateway, 10) == 0
        time.sleep(0.3)  # the clients meet the closed port
    outcomes = clients.outcomes
    lost = [o for o in outcomes if o.startswith("lost")]
    assert not lost, f"{len(lost)} requests lost of {len(outcomes)}: {sorted(set(lost))}"
    assert set(outcomes) <= {"200", "refused"}, sorted(set(outcomes))
    assert outcomes.count("refused") >= 1  # the load went on past the stop


def test_a_stopping_gateway_turns_unready_and_keeps_serving_for_its_shutdown_delay(stack, stopping_gateway):
    """SHUTDOWN_DELAY_SECONDS=3: after SIGTERM /readyz answers 503 and gRPC health NOT_SERVING (load balancers take
    the replica out), while classify is still answered, each answer closing its connection; then it exits."""
    gateway = stopping_gateway(SHUTDOWN_DELAY_SECONDS="3")
    with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        classifier = pb_grpc.ClassifierStub(channel)
        wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status ==
                   health_pb2.HealthCheckResponse.SERVING, timeout=5, interval=0.1, what="gRPC health SERVING")
        signalled = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        wait_until(lambda: gateway.request("GET", "/readyz").status == 503, timeout=1, interval=0.05,
                   what="/readyz to say 503")
        assert "shutting down" in str(gateway.request("GET", "/readyz").body)
        for service in ("", "mushroom.v1.Classifier"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
        status, body, headers = gateway.classify(drawn_jpeg(100))
        assert status == 200, body
        assert headers.get("Connection", "").lower() == "close"
        assert classifier.Classify(pb.ClassifyRequest(photo=drawn_jpeg(101)), timeout=10).predictions
        assert time.monotonic() - signalled < 3 and gateway.process.poll() is None
    assert exits_within(gateway, 8) == 0
    assert time.monotonic() - signalled >= 3


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_call_in_flight_at_sigterm_is_answered(stack, stopping_gateway, protocol):
    """The model server frozen, a classify waits on it; SIGTERM; the model server resumes a second later: the call is
    answered 200 / OK, then the gateway exits."""
    gateway = stopping_gateway()
    preprocessed = gateway.metric("mushroom_gateway_preprocess_seconds_count")
    photo, answer = drawn_jpeg(200 if protocol == "http" else 201), {}

    def call():
        if protocol == "http":
            answer["http"] = gateway.classify(photo, timeout=30)
        else:
            with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
                answer["grpc"] = pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(photo=photo),
                                                                          timeout=30)

    with Frozen(stack.server.process):
        caller = threading.Thread(target=call)
        caller.start()
        wait_until(lambda: gateway.metric("mushroom_gateway_preprocess_seconds_count") > preprocessed, timeout=10,
                   interval=0.02, what="the call to reach the model server")
        gateway.process.send_signal(signal.SIGTERM)
        time.sleep(1)
        assert gateway.process.poll() is None, "the gateway left a call in flight"
    caller.join(30)
    assert exits_within(gateway, 10) == 0
    if protocol == "http":
        assert answer["http"].status == 200, answer["http"]
    else:
        assert answer["grpc"].predictions


def test_stopping_is_bounded_by_the_grace_period_when_a_call_cannot_finish(stack, stopping_gateway):
    """SHUTDOWN_GRACE_SECONDS=1 and a classify stuck on a frozen model server (whose own deadline is 10 s): the
    gateway exits about a second after SIGTERM, not when the stuck call's deadline passes; the caller is not left
    waiting either."""
    gateway = stopping_gateway(SHUTDOWN_GRACE_SECONDS="1")
    preprocessed = gateway.metric("mushroom_gateway_preprocess_seconds_count")
    ended = {}

    def call():
        try:
            ended["reply"] = gateway.classify(drawn_jpeg(300), timeout=30)
        except (http.client.HTTPException, ConnectionError, OSError) as exc:
            ended["error"] = exc
        ended["at"] = time.monotonic()

    with Frozen(stack.server.process):
        caller = threading.Thread(target=call)
        caller.start()
        wait_until(lambda: gateway.metric("mushroom_gateway_preprocess_seconds_count") > preprocessed, timeout=10,
                   interval=0.02, what="the call to reach the model server")
        signalled = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        assert exits_within(gateway, 5) == 0
        assert time.monotonic() - signalled < 4
        caller.join(5)
        assert "at" in ended and ended["at"] - signalled < 4, ended
    stack.gateway.wait_ready(timeout=10)  # the module's gateway, after the freeze


def test_an_open_classify_stream_ends_with_unavailable_when_the_gateway_stops(stack, stopping_gateway):
    """A ClassifyStream client between frames at SIGTERM: its stream ends at once with UNAVAILABLE (reconnect, and
    send again what was not answered) rather than stay open until the grace period cancels it, and the gateway exits
    without waiting that period out."""
    gateway = stopping_gateway()
    frames: queue.SimpleQueue = queue.SimpleQueue()

    def requests():
        while (frame := frames.get()) is not None:
            yield frame

    with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        responses = pb_grpc.ClassifierStub(channel).ClassifyStream(requests(), timeout=60)
        try:
            frames.put(pb.ClassifyRequest(photo=drawn_jpeg(400)))
            assert next(responses).predictions
            signalled = time.monotonic()
            gateway.process.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as ended:
                next(responses)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value
            assert time.monotonic() - signalled < 3
        finally:
            frames.put(None)
    assert exits_within(gateway, 5) == 0
