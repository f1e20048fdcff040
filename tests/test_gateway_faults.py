"""The gateway under faults (issue 11): a caller that leaves cancels nothing for the others, readiness sees a frozen
model server, slow or idle connections are closed within their bounds, oversized chunked uploads are refused as they
arrive, JSON options are validated or refused, top_k follows the version that answered, and the routing PUT refuses
what it cannot split. Real redis-server, model server and gateway processes on free loopback ports."""
from __future__ import annotations

import asyncio
import base64
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from services.gateway import metrics
from services.gateway.single_flight import SingleFlight
from services.gateway.protos import load
from tests.gateway_harness import GatewayProcess, gateway_stack
from tests.model_server_harness import MODEL, wait_until
from tests.support import MUSHROOMS, NOT_MUSHROOMS, closed_within, exit_code_within
from training_job.tiny_model import LABELS, publish_tiny_versions, write_tiny_model
from training_job.paths import PROJECT_ROOT
from training_job.publish import publish_dir

pb, pb_grpc = load()
TOKEN = "faults-admin-token"
PHOTOS = sorted(p for d in sorted(MUSHROOMS.iterdir()) for p in sorted(d.iterdir())[:3])
FRESH = sorted(NOT_MUSHROOMS.iterdir())  # photos no test of this module sends twice unless it says so
MAX_PHOTO_BYTES = 1024 * 1024
# Bounds the gateway under test runs with (environment variables, the flags' documented alternative).
GATEWAY_ENV = {"MAX_PHOTO_BYTES": str(MAX_PHOTO_BYTES), "KEEPALIVE_TIMEOUT_SECONDS": "1", "BODY_TIMEOUT_SECONDS": "2",
               "HEALTH_TIMEOUT_SECONDS": "0.5"}


class Gateway(GatewayProcess):
    """A gateway showing the registry's display names, with the admin token TOKEN and the bounds of GATEWAY_ENV."""

    def __init__(self, model_server: str, redis_url: str, base_path: Path):
        super().__init__(model_server, redis_url, f"--model-base-path={base_path}",
                         env={"GATEWAY_ADMIN_TOKEN": TOKEN, **GATEWAY_ENV})


FIVE_LABELS = [*LABELS, "cantharellus_cibarius"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Versions 1 and 2: the tiny model's 4 classes; version 3: 5 classes."""
    registry = tmp_path_factory.mktemp("registry")
    publish_tiny_versions(registry, MODEL)
    publish_dir(lambda d: write_tiny_model(d, labels=FIVE_LABELS), registry, MODEL)
    with gateway_stack(registry, (1, 2, 3),
                       lambda server, redis: Gateway(server, redis, registry / MODEL)) as parts:
        yield {"registry": registry, "redis": parts.redis, "server": parts.server, "gateway": parts.gateway}


class Frozen:
    """SIGSTOP a process for the duration of a ``with`` block; SIGCONT whatever happens."""

    def __init__(self, process: subprocess.Popen):
        self.process = process

    def __enter__(self):
        os.kill(self.process.pid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc):
        os.kill(self.process.pid, signal.SIGCONT)


def started(run) -> threading.Thread:
    """``run()`` in a thread of its own, started: a client whose request waits while the test goes on."""
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def wait_preprocessed(gateway, before: float, count: int) -> None:
    """Until ``count`` photos more than ``before`` (the preprocess histogram's count) have been preprocessed: their
    misses have reached the predict stage."""
    wait_until(lambda: gateway.metric("mushroom_gateway_preprocess_seconds_count") >= before + count,
               timeout=5, interval=0.02, what=f"{count} photos to reach the predict stage")


def distinct_miss(photo: bytes, tag: bytes, index: int) -> bytes:
    """``photo`` made a distinct cache miss: bytes after the JPEG's end, which decoders ignore."""
    return photo + b"\0" + tag + b"\0" + str(index).encode()


def waiting_client(gateway, photo: bytes, replies: dict, key, headers: dict | None = None) -> threading.Thread:
    """A client asking version 1 about ``photo`` and waiting up to 30 s, in a thread of its own: its reply goes into
    ``replies[key]``."""
    def run():
        replies[key] = gateway.request("POST", "/v1/classify?version=1", photo, "image/jpeg", headers, timeout=30)
    return started(run)


# ------------------------------------------------------------------------------------------- 1. single-flight
def test_single_flight_survives_the_caller_that_started_it_leaving():
    async def scenario():
        flight, release, calls = SingleFlight(), asyncio.Event(), []

        async def work():
            calls.append(1)
            await release.wait()
            return "answer"

        leader = asyncio.create_task(flight.do("photo", work))
        await asyncio.sleep(0)  # the leader starts the shared call
        follower = asyncio.create_task(flight.do("photo", work))
        await asyncio.sleep(0)  # the follower joins it
        leader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leader
        release.set()
        assert await asyncio.wait_for(follower, 5) == "answer"
        assert calls == [1]

    asyncio.run(scenario())


def test_single_flight_call_every_waiter_left_is_cancelled_and_a_latecomer_starts_afresh():
    """Work nobody waits for is not done: when the last caller of a call leaves, the call is cancelled (under
    overload, clients that gave up would otherwise still cost a decode and a Predict each); an identical request
    arriving afterwards makes a call of its own rather than joining the cancelled one."""
    async def scenario():
        flight, release, calls, cancelled = SingleFlight(), asyncio.Event(), [], []
        abandoned = metrics.MISSES_ABANDONED._value.get()

        async def work():
            calls.append(1)
            try:
                await release.wait()
            except asyncio.CancelledError:
                cancelled.append(1)
                raise
            return "answer"

        leavers = [asyncio.create_task(flight.do("photo", work)) for _ in range(2)]
        await asyncio.sleep(0)
        leavers[0].cancel()
        await asyncio.sleep(0)
        assert not cancelled, "a caller is still waiting: the call goes on"
        leavers[1].cancel()
        for leaver in leavers:
            with pytest.raises(asyncio.CancelledError):
                await leaver
        await asyncio.sleep(0)
        assert cancelled == [1]
        assert metrics.MISSES_ABANDONED._value.get() == abandoned + 1
        latecomer = asyncio.create_task(flight.do("photo", work))
        await asyncio.sleep(0)
        release.set()
        assert await asyncio.wait_for(latecomer, 5) == "answer"
        assert calls == [1, 1]

    asyncio.run(scenario())


def test_single_flight_failure_reaches_every_waiter_and_frees_the_key():
    async def scenario():
        flight, release = SingleFlight(), asyncio.Event()

        async def failing():
            await release.wait()
            raise ValueError("upstream said no")

        waiters = [asyncio.create_task(flight.do("photo", failing)) for _ in range(3)]
        await asyncio.sleep(0)
        release.set()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(r, ValueError) for r in results), results

        async def fine():
            return "answer"

        assert await flight.do("photo", fine) == "answer"

    asyncio.run(scenario())


def test_a_caller_whose_deadline_expires_cancels_nothing_for_the_others(stack):
    """A gRPC caller with a short deadline starts the upstream call of a new photo (the model server is frozen, so the
    call is still in flight when the deadline expires); the same photo over HTTP and over gRPC joins that call. Only
    the leaver gets DEADLINE_EXCEEDED; the others get the answer once the model server runs again."""
    gateway, server = stack["gateway"], stack["server"]
    photo = FRESH[0].read_bytes()
    preprocessed = gateway.metric("mushroom_gateway_preprocess_seconds_count")
    shared = gateway.metric("mushroom_gateway_single_flight_shared_total")
    http_answer = {}

    def http_follower():
        http_answer["reply"] = gateway.classify(photo, "version=1", timeout=30)

    with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        stub = pb_grpc.ClassifierStub(channel)
        with Frozen(server.process):
            leaver = stub.Classify.future(pb.ClassifyRequest(photo=photo, version=1), timeout=3)
            wait_until(lambda: gateway.metric("mushroom_gateway_preprocess_seconds_count") > preprocessed,
                       timeout=3, interval=0.02, what="the leaver's call to reach the model server")
            http_thread = started(http_follower)
            grpc_follower = stub.Classify.future(pb.ClassifyRequest(photo=photo, version=1), timeout=30)
            wait_until(lambda: gateway.metric("mushroom_gateway_single_flight_shared_total") >= shared + 2,
                       timeout=3, interval=0.02, what="both followers to join the leaver's call")
            assert not leaver.done(), "the followers must join while the leaver still waits"
            with pytest.raises(grpc.RpcError) as left:
                leaver.result()
            assert left.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        reply = grpc_follower.result()
        http_thread.join(30)
    gateway.wait_ready(timeout=10)  # the status checks missed during the freeze
    status, answer, _ = http_answer["reply"]
    assert status == 200, answer
    assert reply.model_version == answer["model"]["version"] == 1
    assert [p.label for p in reply.predictions] == [p["label"] for p in answer["predictions"]]


def test_misses_for_one_version_share_a_predict_call_and_a_leaver_cancels_nothing(stack):
    """Distinct photos for one version pile up while the model server is frozen: two calls are in flight, the other
    photos wait and then go out together in one Predict call. A gRPC caller among the waiting ones whose deadline
    expires gets DEADLINE_EXCEEDED; every other photo gets its own answer, the one the model server gives that photo
    alone."""
    from services.gateway.upstream import ModelServerClient
    from training_job.preprocessing import Limits, preprocess_bytes

    gateway, server = stack["gateway"], stack["server"]
    photos = [p.read_bytes() for p in FRESH[10:18]]
    calls = gateway.metric("mushroom_gateway_predict_batch_photos_count")
    sent = gateway.metric("mushroom_gateway_predict_batch_photos_sum")
    preprocessed = gateway.metric("mushroom_gateway_preprocess_seconds_count")
    replies: dict[int, object] = {}

    def http(index: int) -> threading.Thread:
        def run():
            replies[index] = gateway.classify(photos[index], "version=2&top_k=4", timeout=30)
        return started(run)

    def arrived(count: int) -> None:
        wait_preprocessed(gateway, preprocessed, count)

    with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        stub = pb_grpc.ClassifierStub(channel)
        with Frozen(server.process):
            threads = [http(0)]
            arrived(1)
            threads.append(http(1))
            arrived(2)  # both calls in flight
            leaver = stub.Classify.future(pb.ClassifyRequest(photo=photos[2], version=2), timeout=2)
            arrived(3)
            threads += [http(i) for i in range(3, len(photos))]
            arrived(len(photos))
            with pytest.raises(grpc.RpcError) as left:
                leaver.result()
            assert left.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for thread in threads:
            thread.join(30)
    gateway.wait_ready(timeout=10)
    # 1 + 1 photos in the calls in flight, then the 5 that waited (not the leaver's: nobody waits for its answer)
    assert gateway.metric("mushroom_gateway_predict_batch_photos_count") - calls == 3
    assert gateway.metric("mushroom_gateway_predict_batch_photos_sum") - sent == len(photos) - 1

    async def alone(photo: bytes):
        client = ModelServerClient(server.grpc_target, MODEL)
        try:
            (prediction,) = await client.predict(preprocess_bytes(photo, 224, Limits())[None], 2)
        finally:
            await client.close()
        return dict(zip(prediction.classes, prediction.probabilities.tolist()))

    for index in sorted(replies):
        status, answer, _ = replies[index]
        assert status == 200, answer
        assert answer["model"]["version"] == 2
        expected = asyncio.run(alone(photos[index]))
        assert {p["label"]: p["score"] for p in answer["predictions"]} == pytest.approx(expected, abs=1e-6)


def test_misses_whose_clients_all_left_are_not_sent_to_the_model_server(stack):
    """HTTP clients give up (their timeout closes the connection) while their misses wait behind a frozen model
    server: two photos in the calls in flight, four waiting for a place in a call. The first call is cancelled when
    its client leaves, and its place goes to the four still waiting then (one call); once their clients have left
    too, that call is cancelled as well, as is the second (gRPC tells the model server, whose batching does not
    run a request its caller left). (Before this test's first version, the four abandoned photos still went out in
    a Predict call of their own, ahead of the next request; before its second, the calls in flight were never
    cancelled, and the four waited for the first to come back.)"""
    gateway, server = stack["gateway"], stack["server"]
    cancelled = gateway.metric("mushroom_gateway_predict_calls_abandoned_total")
    photos = [p.read_bytes() for p in FRESH[20:26]]
    probe = FRESH[26].read_bytes()
    calls = gateway.metric("mushroom_gateway_predict_batch_photos_count")
    sent = gateway.metric("mushroom_gateway_predict_batch_photos_sum")
    preprocessed = gateway.metric("mushroom_gateway_preprocess_seconds_count")
    abandoned = gateway.metric("mushroom_gateway_misses_abandoned_total")
    gave_up = []

    def impatient(photo: bytes) -> threading.Thread:
        def run():
            try:
                gateway.classify(photo, "version=1", timeout=1.5)
            except OSError:  # the client's timeout: urllib closes the connection
                gave_up.append(1)
        return started(run)

    with Frozen(server.process):
        threads = []
        for count, photo in enumerate(photos, 1):
            threads.append(impatient(photo))
            wait_preprocessed(gateway, preprocessed, count)  # in order: two go out at once, the other four wait
        for thread in threads:
            thread.join(10)
        assert len(gave_up) == len(photos)
        wait_until(lambda: gateway.metric("mushroom_gateway_misses_abandoned_total") >= abandoned + len(photos),
                   timeout=5, interval=0.05, what="every miss to be dropped")
    gateway.wait_ready(timeout=10)
    status, answer, _ = gateway.classify(probe, "version=1")
    assert status == 200, answer
    # two in flight, then (on time) the four waiting in the first one's place, then the probe's; every call but the
    # probe's cancelled
    made = gateway.metric("mushroom_gateway_predict_batch_photos_count") - calls
    assert made >= 4 and gateway.metric("mushroom_gateway_predict_batch_photos_sum") - sent == 7
    assert gateway.metric("mushroom_gateway_predict_calls_abandoned_total") - cancelled == made - 1


def test_misses_beyond_what_can_be_answered_in_time_are_refused_at_once_and_hits_still_served(stack):
    """The model server frozen, the gateway takes on admission.MIN_ADMITTED misses (before any answer rate is known);
    the next miss is refused at once: HTTP 503 overloaded with Retry-After, gRPC UNAVAILABLE, counted as
    result="overloaded" and not as the version's error. A cache hit is still answered meanwhile, and every miss
    taken on gets its answer once the server runs again. (Before, every miss queued until the model server
    answered or the call's 10 s deadline expired.)"""
    from services.gateway.admission import MIN_ADMITTED

    gateway, server = stack["gateway"], stack["server"]
    cached = PHOTOS[0].read_bytes()
    assert gateway.classify(cached, "version=1")[0] == 200
    photo = FRESH[30].read_bytes()

    def distinct(index: int) -> bytes:
        return distinct_miss(photo, b"admission", index)

    def requests(result: str) -> float:
        return gateway.metric("mushroom_gateway_request_seconds_count", result=result)

    def version_errors() -> int:  # what the rollout rules judge a version by
        figures = gateway.request("GET", "/v1/admin/status", token=TOKEN).body["versions"]["1"]
        return round(figures["error_rate"] * figures["requests"])

    overloaded, unavailable, errors = requests("overloaded"), requests("unavailable"), version_errors()
    replies = {}

    with Frozen(server.process):
        threads = [waiting_client(gateway, distinct(i), replies, i) for i in range(MIN_ADMITTED)]
        wait_until(lambda: gateway.metric("mushroom_gateway_misses_in_progress") == MIN_ADMITTED, timeout=20,
                   interval=0.1, what=f"{MIN_ADMITTED} misses in progress")
        asked_at = time.monotonic()
        status, body, headers = gateway.classify(distinct(MIN_ADMITTED), "version=1", timeout=10)
        assert time.monotonic() - asked_at < 2
        assert (status, body["error"]["code"]) == (503, "overloaded"), body
        assert int(headers["Retry-After"]) >= 1
        with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.ClassifierStub(channel).Classify(
                    pb.ClassifyRequest(photo=distinct(MIN_ADMITTED + 1), version=1), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "overloaded" in refused.value.details()
        assert int(dict(refused.value.trailing_metadata())["grpc-retry-pushback-ms"]) >= 1000  # its Retry-After
        status, answer, _ = gateway.classify(cached, "version=1", timeout=10)
        assert status == 200 and answer["cached"], answer
    for thread in threads:
        thread.join(30)
    assert sorted(reply[0] for reply in replies.values()) == [200] * MIN_ADMITTED
    assert requests("overloaded") - overloaded == 2 and requests("unavailable") == unavailable
    assert version_errors() == errors
    gateway.wait_ready(timeout=10)


def test_a_miss_its_callers_deadline_would_not_see_answered_is_refused_at_once(stack):
    """A gateway that may queue a minute of misses (--max-queue-wait 60) and has answered misses lately holds
    admission.MIN_ADMITTED of them behind a frozen model server. A miss whose caller waits 1 s (a gRPC deadline, or
    Envoy's x-envoy-expected-rq-timeout-ms over HTTP) is refused at once, 504 deadline_unreachable / gRPC
    DEADLINE_EXCEEDED, counted as result="overloaded"; one without a deadline, or with a long one, is taken on, and
    every miss taken on is answered once the server runs again. (Before, the short deadline's miss was taken on too,
    holding a place until its caller left.)"""
    from services.gateway.admission import MIN_ADMITTED

    server = stack["server"]
    gateway = GatewayProcess(server.grpc_target, stack["redis"].url, f"--model-base-path={stack['registry'] / MODEL}",
                             env={**GATEWAY_ENV, "MAX_QUEUE_WAIT_SECONDS": "60"})
    try:
        photo = FRESH[31].read_bytes()

        def distinct(index: int) -> bytes:
            return distinct_miss(photo, b"deadline", index)

        for index in range(30):  # an answer rate, so that the limit is the rate times 60 s, not the floor
            assert gateway.classify(distinct(index), "version=1")[0] == 200
        wait_until(lambda: gateway.metric("mushroom_gateway_misses_admitted_limit") > MIN_ADMITTED + 2, timeout=5,
                   interval=0.1, what="the answer rate's one-second window to end")
        refused_before = gateway.metric("mushroom_gateway_misses_refused_total", reason="deadline")
        overloaded_before = gateway.metric("mushroom_gateway_request_seconds_count", result="overloaded")
        replies = {}

        with Frozen(server.process):
            threads = [waiting_client(gateway, distinct(100 + i), replies, 100 + i) for i in range(MIN_ADMITTED)]
            wait_until(lambda: gateway.metric("mushroom_gateway_misses_in_progress") == MIN_ADMITTED, timeout=20,
                       interval=0.1, what=f"{MIN_ADMITTED} misses in progress")
            status, body, _ = gateway.request("POST", "/v1/classify?version=1", distinct(1000), "image/jpeg",
                                              {"x-envoy-expected-rq-timeout-ms": "1000"}, timeout=10)
            assert (status, body["error"]["code"]) == (504, "deadline_unreachable"), body
            with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
                with pytest.raises(grpc.RpcError) as refused:
                    pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(photo=distinct(1001), version=1),
                                                             timeout=1.0)
            assert refused.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "deadline_unreachable" in refused.value.details()  # the gateway's refusal, not the client's expiry
            threads.append(waiting_client(gateway, distinct(200), replies, 200))
            threads.append(waiting_client(gateway, distinct(201), replies, 201,
                                          {"x-envoy-expected-rq-timeout-ms": "120000"}))
            wait_until(lambda: gateway.metric("mushroom_gateway_misses_in_progress") == MIN_ADMITTED + 2,
                       timeout=10, interval=0.05, what="the misses without a short deadline taken on")
        for thread in threads:
            thread.join(30)
        assert sorted(reply[0] for reply in replies.values()) == [200] * (MIN_ADMITTED + 2)
        assert gateway.metric("mushroom_gateway_misses_refused_total", reason="deadline") - refused_before == 2
        assert gateway.metric("mushroom_gateway_request_seconds_count", result="overloaded") - overloaded_before == 2
    finally:
        gateway.stop()
    stack["gateway"].wait_ready(timeout=10)


def test_an_expected_timeout_runs_from_when_the_body_has_arrived_as_envoys_route_timeout_does(stack):
    """Envoy's route timeout, which x-envoy-expected-rq-timeout-ms tells, starts once the whole request has reached
    it: a photo uploaded over a slow link for longer than that timeout is still answered by an idle gateway. (Before,
    the deadline ran from the request's headers, so the upload had spent it and the miss was refused with 504.)"""
    photo = FRESH[32].read_bytes() + b"\0slow upload"  # a miss
    half = len(photo) // 2
    with socket.create_connection(("127.0.0.1", stack["gateway"].http_port), timeout=10) as sock:
        sock.sendall(f"POST /v1/classify?version=1 HTTP/1.1\r\nHost: gateway\r\nContent-Type: image/jpeg\r\n"
                     f"x-envoy-expected-rq-timeout-ms: 300\r\nContent-Length: {len(photo)}\r\n\r\n".encode()
                     + photo[:half])
        time.sleep(0.6)  # the link is slow: the rest arrives after twice the timeout
        sock.sendall(photo[half:])
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


@pytest.mark.parametrize("value", ["soon", "-5", "1.5", "\u00b2"])
def test_an_expected_timeout_header_that_is_not_whole_milliseconds_is_a_400(stack, value):
    status, body, _ = stack["gateway"].request("POST", "/v1/classify", PHOTOS[0].read_bytes(), "image/jpeg",
                                               {"x-envoy-expected-rq-timeout-ms": value})
    assert (status, body["error"]["code"]) == (400, "bad_timeout"), body


# ------------------------------------------------------------------------------------------- 8. readiness
def test_a_burst_of_cache_hits_opens_no_more_redis_connections_than_its_bound(stack):
    """A cache lookup that found no free connection opened one: a burst of hits opened one per request, a storm of
    connects Redis answered late, each counted a failure, and the breaker then sent the rest of the burst to the
    model server. The cache's connections are bounded (REDIS_CACHE_CONNECTIONS), each carrying many lookups."""
    import aiohttp
    import redis

    bound, burst = 2, 600
    gateway = GatewayProcess(stack["server"].grpc_target, stack["redis"].url,
                             env={**GATEWAY_ENV, "REDIS_CACHE_CONNECTIONS": str(bound)})
    client = redis.Redis.from_url(stack["redis"].url)
    try:
        photos = [photo.read_bytes() for photo in PHOTOS[:6]]
        for photo in photos:
            wait_until(lambda: gateway.classify(photo, version=1)[1]["cached"], timeout=10, what="the answer cached")
        url = f"http://127.0.0.1:{gateway.http_port}/v1/classify?version=1"
        lookups = [gateway.metric("mushroom_gateway_cache_total", outcome=o) for o in ("hit", "error", "bypass")]
        opened = client.info("stats")["total_connections_received"]

        async def send_burst() -> list[tuple[int, bool]]:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                async def one(i: int) -> tuple[int, bool]:
                    async with session.post(url, data=photos[i % len(photos)],
                                            headers={"Content-Type": "image/jpeg"}) as response:
                        return response.status, (await response.json()).get("cached", False)

                return await asyncio.gather(*(one(i) for i in range(burst)))

        answers = asyncio.run(send_burst())
        opened = client.info("stats")["total_connections_received"] - opened
        hits, errors, bypassed = (gateway.metric("mushroom_gateway_cache_total", outcome=o) - before
                                  for o, before in zip(("hit", "error", "bypass"), lookups))
    finally:
        client.close()
        gateway.stop()
    assert {status for status, _ in answers} == {200}
    assert opened <= bound, f"{opened} connections opened to Redis for a burst of {burst} hits"
    # a lookup still fails at the socket timeout (0.1 s) past its writing, here when the loop is too busy to read its
    # reply in time: a few may, opening the breaker for a moment
    assert hits == sum(cached for _, cached in answers) >= 0.9 * burst, (hits, errors, bypassed)


def test_readyz_turns_503_while_the_model_server_is_frozen(stack):
    gateway, server = stack["gateway"], stack["server"]
    gateway.wait_ready(timeout=10)
    with Frozen(server.process):
        status, body, _ = wait_until(lambda: (lambda r: r if r[0] == 503 else None)(gateway.request("GET", "/readyz")),
                                  timeout=5, interval=0.1, what="/readyz to say 503")
        assert "model server" in body["reason"] and not body["ready"], body
    gateway.wait_ready(timeout=10)


def test_a_gateway_near_its_descriptor_limit_says_so_and_serves_again_once_connections_close(stack):
    """Every client connection holds a file descriptor. A gateway whose limit (RLIMIT_NOFILE, lowered here on the
    running process) is nearly taken by idle connections logs a warning and exports process_open_fds near
    process_max_fds (alert GatewayFileDescriptorsNearLimit); once they close it logs that, and answers. (Before:
    nothing in its log or metrics.)"""
    import resource

    from tests.gateway_harness import GatewayProcess

    gateway = GatewayProcess(stack["server"].grpc_target, stack["redis"].url,
                             env={"KEEPALIVE_TIMEOUT_SECONDS": "60"})  # idle connections stay open
    fd_dir = Path(f"/proc/{gateway.process.pid}/fd")
    sockets = []
    try:
        limit = len(list(fd_dir.iterdir())) + 40
        resource.prlimit(gateway.process.pid, resource.RLIMIT_NOFILE, (limit, limit))
        assert gateway.metric("process_max_fds") == limit
        while len(list(fd_dir.iterdir())) < 0.92 * limit:
            sockets.append(socket.create_connection(("127.0.0.1", gateway.http_port), timeout=5))
            time.sleep(0.01)  # accepted before the next one comes
        wait_until(lambda: "file descriptors in use" in gateway.log.read_text(), timeout=10, interval=0.2,
                   what="the warning")
        assert gateway.metric("process_open_fds") >= 0.9 * limit
        for sock in sockets:
            sock.close()
        sockets.clear()
        wait_until(lambda: "file descriptors back to" in gateway.log.read_text(), timeout=10, interval=0.2,
                   what="the all-clear")
        assert gateway.classify(PHOTOS[0].read_bytes())[0] == 200
    finally:
        for sock in sockets:
            sock.close()
        gateway.stop()


# ------------------------------------------------------------------------------------------- 9. slow clients
def test_a_client_trickling_its_headers_is_closed_within_the_bound(stack):
    with socket.create_connection(("127.0.0.1", stack["gateway"].http_port), timeout=10) as sock:
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: gateway\r\n")
        closed, _ = closed_within(sock, 8, trickle=b"X")  # one header byte every 0.2 s, never a complete header
    assert closed is not None and closed < 5, closed  # --keepalive-timeout 1 s, plus slack for a busy machine


def listen_queue(port: int) -> int:
    """How many connections the kernel queues for the socket listening on ``port`` before it drops new ones (ss shows
    a listening socket's backlog as its Send-Q)."""
    shown = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return int(shown.split()[2])


def test_a_burst_of_new_connections_waits_in_the_listen_queue_rather_than_being_dropped(stack):
    """An overload spike opened 500 connections a second: the gateway's queue of 128 (aiohttp's default) overflowed,
    760 times in one 20 s spike, and each dropped connection reached it a second late, its client giving up on an
    answer it would have had. Both HTTP servers queue LISTEN_BACKLOG, as far as the kernel allows."""
    from services.http_listen import LISTEN_BACKLOG

    allowed = min(LISTEN_BACKLOG, int(Path("/proc/sys/net/core/somaxconn").read_text()))
    assert listen_queue(stack["gateway"].http_port) == allowed
    assert listen_queue(int(stack["server"].rest_url.rsplit(":", 1)[1])) == allowed


def test_an_idle_keepalive_connection_is_closed_within_the_bound(stack):
    with socket.create_connection(("127.0.0.1", stack["gateway"].http_port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
        received = b""
        while b'"ok"' not in received:
            received += sock.recv(65536)
        assert received.startswith(b"HTTP/1.1 200")
        closed, _ = closed_within(sock, 8)
    assert closed is not None and closed < 5, closed


@pytest.mark.parametrize("path", ["/v1/classify", "/v1/admin/routing"])
def test_a_body_that_stops_arriving_gets_408_within_the_bound(stack, path):
    method = "PUT" if "admin" in path else "POST"
    with socket.create_connection(("127.0.0.1", stack["gateway"].http_port), timeout=10) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                     f"Authorization: Bearer {TOKEN}\r\nContent-Length: 1000\r\n\r\n{{\"wei".encode())
        start = time.monotonic()
        readable, _, _ = select.select([sock], [], [], 8)
        answer = sock.recv(65536) if readable else b""
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - start < 6  # --body-timeout 2 s, plus slack


# ------------------------------------------------------------------------------------------- 9b. every response counted
def _responses(gateway, protocol: str, code: str) -> float:
    return gateway.metric("mushroom_gateway_responses_total", protocol=protocol, code=code)


def test_http_answers_given_before_classify_runs_are_counted_by_status(stack):
    """A body over the limit (413), JSON that does not parse (400), a body that stops arriving (408) and an unknown
    route (404) never reach the classify histogram; each is one response in mushroom_gateway_responses_total."""
    gateway = stack["gateway"]
    codes = ("413", "400", "408", "404")
    before = {code: _responses(gateway, "http", code) for code in codes}
    assert gateway.request("POST", "/v1/classify", bytes(MAX_PHOTO_BYTES + 1), "image/jpeg").status == 413
    assert gateway.request("POST", "/v1/classify", b'{"image_b64": ', "application/json").status == 400
    with socket.create_connection(("127.0.0.1", gateway.http_port), timeout=10) as sock:
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: gateway\r\nContent-Type: image/jpeg\r\n"
                     b"Content-Length: 1000\r\n\r\n\xff\xd8")
        assert select.select([sock], [], [], 8)[0] and sock.recv(65536).startswith(b"HTTP/1.1 408")
    assert gateway.request("GET", "/v1/nothing-here").status == 404
    assert {code: _responses(gateway, "http", code) - before[code] for code in codes} == dict.fromkeys(codes, 1)


def test_grpc_answers_are_counted_by_status_code(stack):
    gateway = stack["gateway"]
    ok, invalid = _responses(gateway, "grpc", "OK"), _responses(gateway, "grpc", "INVALID_ARGUMENT")
    with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        stub = pb_grpc.ClassifierStub(channel)
        assert stub.Classify(pb.ClassifyRequest(photo=PHOTOS[3].read_bytes(), version=1), timeout=30).predictions
        with pytest.raises(grpc.RpcError) as refused:
            stub.Classify(pb.ClassifyRequest(photo=b"", version=1), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (_responses(gateway, "grpc", "OK") - ok, _responses(gateway, "grpc", "INVALID_ARGUMENT") - invalid) == (1, 1)


def test_a_grpc_caller_whose_deadline_expires_is_counted_as_such_not_as_answered(stack):
    """The model server is frozen, so the classify still waits for it when the client's deadline expires: the
    histogram records result="cancelled" and the responses DEADLINE_EXCEEDED, what the client saw."""
    gateway, server = stack["gateway"], stack["server"]

    def classified(result: str) -> float:
        return gateway.metric("mushroom_gateway_request_seconds_count", protocol="grpc", result=result)

    before = {"ok": classified("ok"), "cancelled": classified("cancelled"),
              "DEADLINE_EXCEEDED": _responses(gateway, "grpc", "DEADLINE_EXCEEDED"),
              "OK": _responses(gateway, "grpc", "OK")}
    with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        stub = pb_grpc.ClassifierStub(channel)
        with Frozen(server.process):
            with pytest.raises(grpc.RpcError) as left:
                stub.Classify(pb.ClassifyRequest(photo=FRESH[20].read_bytes(), version=1), timeout=1)
            assert left.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            wait_until(lambda: classified("cancelled") > before["cancelled"], timeout=5, interval=0.05,
                       what="the cancelled classify to be recorded")
    gateway.wait_ready(timeout=10)  # the status checks missed during the freeze
    after = {"ok": classified("ok"), "cancelled": classified("cancelled"),
             "DEADLINE_EXCEEDED": _responses(gateway, "grpc", "DEADLINE_EXCEEDED"),
             "OK": _responses(gateway, "grpc", "OK")}
    assert {name: after[name] - before[name] for name in before} == {
        "ok": 0, "cancelled": 1, "DEADLINE_EXCEEDED": 1, "OK": 0}


# ------------------------------------------------------------------------------------------- 10. chunked uploads
def _send_chunked_until_answered(port: int, path: str, content_type: str, head: bytes, total: int):
    """Sends a chunked body of ``total`` bytes (``head`` then zeros) in 64 KiB chunks, stopping as soon as the server
    answers. Returns (bytes sent, the answer's first bytes)."""
    chunk = 64 * 1024
    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: gateway\r\nContent-Type: {content_type}\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        body = memoryview(head + bytes(total - len(head)))
        try:
            while sent < total:
                piece = body[sent:sent + chunk]
                sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
                sent += len(piece)
                if select.select([sock], [], [], 0)[0]:
                    break
            else:
                sock.sendall(b"0\r\n\r\n")
        except OSError:  # the server closed: its answer is readable
            pass
        if select.select([sock], [], [], 20)[0]:
            answer = sock.recv(65536)
    return sent, answer


_PHOTO_PART = (b'--BOUNDARY\r\nContent-Disposition: form-data; name="photo"; filename="a.jpg"\r\n'
               b"Content-Type: image/jpeg\r\n\r\n")
_NOTE_PART = b'--BOUNDARY\r\nContent-Disposition: form-data; name="note"\r\n\r\n'
UPLOADS = {  # content type, the body's first bytes (zeros follow)
    "raw": ("image/jpeg", b"\xff\xd8"),
    "multipart photo": ("multipart/form-data; boundary=BOUNDARY", _PHOTO_PART),
    "multipart field before the photo": ("multipart/form-data; boundary=BOUNDARY", _NOTE_PART),
    "json": ("application/json", b'{"image_b64": "'),
}


@pytest.mark.parametrize("kind", UPLOADS)
def test_a_chunked_upload_over_the_limit_gets_413_before_it_is_all_sent(stack, kind):
    content_type, head = UPLOADS[kind]
    total = 16 * MAX_PHOTO_BYTES
    sent, answer = _send_chunked_until_answered(stack["gateway"].http_port, "/v1/classify", content_type, head, total)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert sent < total // 2, f"{sent} of {total} bytes sent before the answer"


def test_a_json_photo_near_the_limit_is_not_refused_for_its_base64_size(stack):
    """The limit is on the photo: its base64 form in a JSON body is a third bigger."""
    photo = PHOTOS[0].read_bytes()
    padded = photo + bytes(MAX_PHOTO_BYTES - 1000 - len(photo))  # a JPEG with trailing bytes Pillow ignores
    status, answer, _ = stack["gateway"].request("POST", "/v1/classify?version=1",
                                              {"image_b64": base64.b64encode(padded).decode()})
    assert status == 200, answer
    too_big = photo + bytes(MAX_PHOTO_BYTES + 1 - len(photo))
    status, answer, _ = stack["gateway"].request("POST", "/v1/classify?version=1",
                                              {"image_b64": base64.b64encode(too_big).decode()})
    assert status == 413, answer


def test_a_photo_at_the_limit_still_goes_through_chunked(stack):
    photo = PHOTOS[0].read_bytes()
    head = (b'--BOUNDARY\r\nContent-Disposition: form-data; name="photo"; filename="a.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n")
    body = head + photo + b"\r\n--BOUNDARY--\r\n"
    with socket.create_connection(("127.0.0.1", stack["gateway"].http_port), timeout=30) as sock:
        sock.sendall(b"POST /v1/classify?version=1 HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n"
                     b"Content-Type: multipart/form-data; boundary=BOUNDARY\r\nTransfer-Encoding: chunked\r\n\r\n")
        for start in range(0, len(body), 7000):
            piece = body[start:start + 7000]
            sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


# ------------------------------------------------------------------------------------------- 13. JSON options
def _json_classify(gateway, query="", **fields):
    photo = fields.pop("photo", PHOTOS[1].read_bytes())
    return gateway.request("POST", f"/v1/classify?{query}",
                           {"image_b64": base64.b64encode(photo).decode(), **fields})


def test_json_body_options_are_applied(stack):
    status, answer, _ = _json_classify(stack["gateway"], top_k=2, version=2, client_id="erin")
    assert status == 200, answer
    assert len(answer["predictions"]) == 2 and answer["model"]["version"] == 2


@pytest.mark.parametrize("fields, status, code", [
    ({"top_k": 0}, 400, "bad_top_k"),
    ({"top_k": 99}, 400, "bad_top_k"),
    ({"top_k": True}, 400, "bad_top_k"),
    ({"top_k": "2"}, 400, "bad_top_k"),
    ({"top_k": 1.5}, 400, "bad_top_k"),
    ({"version": 987654}, 404, "unknown_version"),
    ({"version": "1"}, 400, "bad_version"),
    ({"label": "nope"}, 404, "unknown_label"),
    ({"label": 3}, 400, "bad_label"),
    ({"client_id": 7}, 400, "bad_client_id"),
    ({"colour": "red"}, 400, "unknown_field"),
])
def test_json_body_options_are_validated_like_the_query_string(stack, fields, status, code):
    got, body, _ = _json_classify(stack["gateway"], **fields)
    assert (got, body["error"]["code"]) == (status, code), body


def test_an_option_in_both_the_body_and_the_query_is_refused(stack):
    status, body, _ = _json_classify(stack["gateway"], "top_k=1", top_k=2)
    assert status == 400 and "top_k" in body["error"]["message"], body


# ------------------------------------------------------------------------------------------- 14. top_k per version
def test_top_k_is_checked_against_the_version_that_answers(stack):
    gateway = stack["gateway"]
    status, answer, _ = gateway.classify(PHOTOS[2].read_bytes(), "version=1&top_k=1")
    assert status == 200, answer
    status, answer, _ = gateway.classify(PHOTOS[3].read_bytes(), "version=3&top_k=5")  # 5 classes: allowed
    assert status == 200 and len(answer["predictions"]) == 5, answer
    status, answer, _ = gateway.classify(PHOTOS[4].read_bytes(), "version=1&top_k=5")  # 4 classes: refused
    assert status == 400 and answer["error"]["code"] == "bad_top_k", answer
    assert "4" in answer["error"]["message"]


# ------------------------------------------------------------------------------------------- 6. routing PUT
def _put_routing(gateway, body: bytes):
    return gateway.request("PUT", "/v1/admin/routing", body, "application/json", token=TOKEN)


@pytest.mark.parametrize("body, message", [
    (b'{"weights": {"1": 50, "2": 50\xff}}', "not valid JSON"),
    (b'{"weights": {"' + b"9" * 5000 + b'": 100}}', "version"),
    (b'{"weights": {"1": 100}, "shadow": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b'{"weights": {"1": 100}, "shadow": "' + b"9" * 30 + b'"}', "version"),
    (b'{"weights": {"\xc2\xb2": 100}}', "neither a version number nor a version label"),
    (b'{"weights": {"1": 1e9}}', "between 0 and"),
    (b'{"weights": {"1": true}}', "JSON number"),
    (b'{"weights": {"1": "50"}}', "JSON number"),
    (b'{"weights": {"1": 1e308, "2": 1e308}}', "between 0 and"),
    (b'{"weights": {"1": NaN}}', "finite"),
    (b'{"weights": {"1": -1}}', "between 0 and"),
    (b'{"weights": {"1": 50, "01": 50}}', "twice"),
    (b"{}", "clear"),
    (b'{"weights": {}}', "clear"),
    (b'{"weights": {"1": 0, "2": 0}}', "clear"),
    (b'{"weights": {"1": 100}, "colour": 1}', "unknown field"),
    (b'{"clear": true, "weights": {"1": 100}}', "clear"),
    (b'{"clear": 1}', "clear"),
    (b"[" * 100000 + b"]" * 100000, "JSON"),
])
def test_routing_put_refuses_what_it_cannot_split_with_400(stack, body, message):
    gateway = stack["gateway"]
    assert _put_routing(gateway, b'{"weights": {"1": 60, "2": 40}}')[0] == 200
    status, answer, _ = _put_routing(gateway, body)
    assert status == 400 and answer["error"]["code"] in ("bad_json", "bad_routing"), answer
    assert message in answer["error"]["message"], answer
    assert gateway.request("GET", "/v1/admin/routing", token=TOKEN)[1]["weights"] == {"1": 60.0, "2": 40.0}


def test_routing_put_accepts_the_bounds_and_clears_only_when_asked(stack):
    gateway = stack["gateway"]
    status, applied, _ = _put_routing(gateway, b'{"weights": {"1": 1000000, "2": 1000000.0, "3": 0}, "shadow": null}')
    assert status == 200, applied
    assert applied["effective"] == {"1": 1e6, "2": 1e6}
    status, cleared, _ = _put_routing(gateway, b'{"clear": true}')
    assert status == 200, cleared
    assert (cleared["weights"], cleared["shadow"]) == ({}, None)
    assert cleared["audit"]["old"]["weights"] == {"1": 1e6, "2": 1e6} and cleared["audit"]["new"]["weights"] == {}


def test_the_split_follows_large_weights():
    from collections import Counter

    from services.gateway.routing import RoutingTable, pick_entry

    table = RoutingTable.from_request({"weights": {"1": 1e6, "2": 1e6}})
    counts = Counter(pick_entry(table.weights, f"client-{i}") for i in range(4000))
    assert abs(counts[1] / 4000 - 0.5) < 0.03, counts  # binomial sd 0.008


def test_admin_cli_clears_the_table_and_refuses_all_zero_weights(stack):
    gateway = stack["gateway"]
    env = {**os.environ, "GATEWAY_ADMIN_TOKEN": TOKEN}

    def admin(*args):
        return subprocess.run([sys.executable, "-m", "services.gateway.operator_cli", "--url", gateway.url, *args],
                              capture_output=True, text=True, env=env, cwd=PROJECT_ROOT, timeout=60)

    assert admin("set", "1=60", "2=40").returncode == 0
    zero = admin("set", "1=0", "2=0")
    assert zero.returncode != 0 and "clear" in zero.stderr, zero.stderr
    for bad in ("1=true", "1=1e9", "1=nan"):
        refused = admin("set", bad)
        assert refused.returncode != 0, (bad, refused.stdout)
    assert gateway.request("GET", "/v1/admin/routing", token=TOKEN)[1]["weights"] == {"1": 60.0, "2": 40.0}
    cleared = admin("clear")
    assert cleared.returncode == 0, cleared.stderr
    assert gateway.request("GET", "/v1/admin/routing", token=TOKEN)[1]["weights"] == {}


@pytest.mark.parametrize("taken", ["http", "grpc"])
def test_a_second_gateway_on_a_taken_port_exits_saying_so(stack, tmp_path, taken):
    """A gateway given a port another gateway serves (a stale process, a typo in a port map) must exit saying so.
    gRPC servers bind with SO_REUSEPORT unless told not to: the second gateway served the gRPC port too, and the
    kernel split the callers between the two. And a port that could not be bound, HTTP's included, left the
    process hanging as it stopped, its background loops and channels still open. The first keeps every caller."""
    from devstack.servers import free_port, gateway_argv, python_env

    first, log = stack["gateway"], tmp_path / "second-gateway.log"
    ports = {"http": free_port(), "grpc": free_port(), taken: getattr(first, f"{taken}_port")}
    with open(log, "w") as out:
        process = subprocess.Popen(gateway_argv(ports["http"], ports["grpc"], stack["server"].grpc_target,
                                                stack["redis"].url, MODEL),
                                   stdout=out, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT, env=python_env(GATEWAY_ENV))
    returncode = exit_code_within(process, 60)
    assert returncode == 1, f"the second gateway {'still ran' if returncode is None else f'exited {returncode}'}"
    assert "error: " in log.read_text() and f"{ports[taken]}" in log.read_text().split("error: ")[-1]
    assert first.classify(PHOTOS[0].read_bytes(), version=1)[0] == 200
    with grpc.insecure_channel(f"127.0.0.1:{first.grpc_port}") as channel:
        answer = pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(photo=PHOTOS[0].read_bytes(), version=1),
                                                          timeout=30)
    assert answer.predictions


def test_a_model_server_connection_that_goes_silent_is_replaced_within_seconds(stack):
    """The gateway's connection to the model server goes silent without a reset (the pod behind a Service replaced,
    a NAT or load balancer that dropped the flow), while a new connection would reach a model server. Calls on the
    silent one waited for their deadline, every one of them, as long as TCP kept it: here forever. A ping left
    unanswered now closes it within seconds; the call under way then is retried on a new connection and answered."""
    from services.gateway.upstream import KEEPALIVE_MS, KEEPALIVE_TIMEOUT_MS
    from tests.support import BlackholingProxy

    server = stack["server"]
    proxy = BlackholingProxy(int(server.grpc_target.rsplit(":", 1)[1]))
    gateway = GatewayProcess(f"127.0.0.1:{proxy.port}", stack["redis"].url,
                             f"--model-base-path={stack['registry'] / MODEL}", env=GATEWAY_ENV)
    try:
        photo = FRESH[40].read_bytes()
        assert gateway.classify(distinct_miss(photo, b"silent", 0), "version=1")[0] == 200
        assert proxy.blackhole() >= 1
        started_at = time.monotonic()
        status, body, _ = gateway.classify(distinct_miss(photo, b"silent", 1), "version=1", timeout=60)
        assert status == 200, body
        assert time.monotonic() - started_at < (KEEPALIVE_MS + KEEPALIVE_TIMEOUT_MS) / 1000 + 5
        assert [gateway.classify(distinct_miss(photo, b"silent", 2 + i), "version=1")[0] for i in range(3)] == [200] * 3
    finally:
        gateway.stop()
        proxy.close()


def test_a_grpc_client_that_pings_its_idle_connection_keeps_it(stack):
    """A client keeping its idle connection alive with a ping every 10 s (grpc-java's shortest keepalive) is not cut
    off: gRPC's defaults answered its fourth ping with GOAWAY too_many_pings, which the client sees as its
    connection failing. Four pings take 40 s."""
    gateway = stack["gateway"]
    options = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.http2.max_pings_without_data", 0)]
    with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}", options=options) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        states = []
        channel.subscribe(states.append, try_to_connect=False)
        time.sleep(48)
        channel.unsubscribe(states.append)
    assert set(states) == {grpc.ChannelConnectivity.READY}, states  # never dropped
