"""The gateway stopping (SIGTERM, as Kubernetes, Compose and `make stop` stop it): unready at once, still serving for
its shutdown delay, then no request it has read goes unanswered, HTTP keep-alive connections are closed with the
answer to their last request (never under a request the client already sent), calls in flight over HTTP and gRPC
are answered, and it exits within its grace period even when a call cannot finish. Real redis-server, model server
and gateway processes on free loopback ports; each test stops a gateway of its own."""
from __future__ import annotations

import http.client
import io
import signal
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from services.gateway.protos import load
from tests.gateway_harness import GatewayProcess, gateway_stack
from tests.model_server_harness import MODEL, wait_until
from tests.test_gateway_faults import Frozen
from training_job.tiny_model import publish_tiny_versions

pb, pb_grpc = load()
CLIENTS = 8


def drawn_photo(seed: int) -> bytes:
    """A small JPEG no other photo of these tests shares (a new cache key, so a miss)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


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


class KeepAliveClients:
    """CLIENTS threads, each POSTing photos back to back on its own keep-alive connection (a new one when the
    gateway closed the last, as a browser or a connection pool does). Every request is recorded with how it ended:
    ``refused`` when a new connection was refused (nothing was sent), ``lost`` when the request was sent and the
    connection closed or reset under it, otherwise its HTTP status."""

    def __init__(self, port: int, photos: list[bytes]):
        self.port, self.photos = port, photos
        self.outcomes: list[str] = []
        self._lock, self._stop = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(CLIENTS)]

    def _client(self, index: int) -> None:
        connection, n = None, index
        while not self._stop.is_set():
            photo, n = self.photos[n % len(self.photos)], n + CLIENTS
            fresh = connection is None
            if fresh:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                if fresh:
                    connection.connect()
            except ConnectionRefusedError:
                outcome, connection = "refused", None
            else:
                try:
                    connection.request("POST", "/v1/classify", body=photo, headers={"Content-Type": "image/jpeg"})
                    response = connection.getresponse()
                    response.read()
                    outcome = str(response.status)
                    if response.will_close:
                        connection.close()
                        connection = None
                except (http.client.RemoteDisconnected, ConnectionError, OSError) as exc:
                    outcome, connection = f"lost ({type(exc).__name__})", None
            with self._lock:
                self.outcomes.append(outcome)
            if outcome == "refused":
                time.sleep(0.02)

    def __enter__(self) -> "KeepAliveClients":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self.threads:
            thread.join(60)


def test_sigterm_under_keepalive_load_leaves_no_request_it_was_sent_unanswered(stack, stopping_gateway):
    """Eight clients keep their connections busy; SIGTERM. Each connection's last answer closes it (``Connection:
    close``); a request sent on it is never met by a closed or reset connection instead (the race of closing an idle
    keep-alive connection while its client sends). New connections are refused once the gateway stops listening."""
    gateway = stopping_gateway()
    photos = [drawn_photo(seed) for seed in range(16)]
    with KeepAliveClients(gateway.http_port, photos) as clients:
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
        status, body, headers = gateway.classify(drawn_photo(100))
        assert status == 200, body
        assert headers.get("Connection", "").lower() == "close"
        assert classifier.Classify(pb.ClassifyRequest(photo=drawn_photo(101)), timeout=10).predictions
        assert time.monotonic() - signalled < 3 and gateway.process.poll() is None
    assert exits_within(gateway, 8) == 0
    assert time.monotonic() - signalled >= 3


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_call_in_flight_at_sigterm_is_answered(stack, stopping_gateway, protocol):
    """The model server frozen, a classify waits on it; SIGTERM; the model server resumes a second later: the call is
    answered 200 / OK, then the gateway exits."""
    gateway = stopping_gateway()
    preprocessed = gateway.metric("mushroom_gateway_preprocess_seconds_count")
    photo, answer = drawn_photo(200 if protocol == "http" else 201), {}

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
            ended["reply"] = gateway.classify(drawn_photo(300), timeout=30)
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
