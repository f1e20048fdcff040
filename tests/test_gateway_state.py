"""Gateway state in Redis under faults: answers cost no key (signed feedback tokens), operator state survives a Redis
restart, admin and feedback answer 503 while Redis is down or frozen, named operator tokens, supervised watchers.
Real redis-server, model server and gateway processes on free loopback ports."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import redis

from services.gateway import keys
from services.gateway.feedback import BadFeedbackToken, FeedbackTokens
from services.gateway.protos import load
from tests.gateway_harness import GatewayProcess
from tests.model_server_harness import MODEL, serve_registry, stop_server, wait_until
from tests.support import MUSHROOMS, RedisServer, free_port
from training_job.tiny_model import LABELS, publish_tiny_versions
from training_job.paths import PROJECT_ROOT

pb, pb_grpc = load()
FEEDBACK_SECRET = "a-test-feedback-secret-shared-by-replicas"
OPERATORS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789"}
PHOTOS = sorted(p for d in sorted(MUSHROOMS.iterdir()) for p in sorted(d.iterdir())[:2])


class Gateway(GatewayProcess):
    """A gateway with the replicas' shared FEEDBACK_SECRET and no admin token; ``extra`` flags and ``env`` on top."""

    def __init__(self, model_server: str, redis_url: str, *extra: str, env: dict | None = None,
                 wait_ready: bool = True):
        super().__init__(model_server, redis_url, *extra, wait_ready=wait_ready,
                         env={"FEEDBACK_SECRET": FEEDBACK_SECRET, "GATEWAY_ADMIN_TOKEN": "", **(env or {})})


@pytest.fixture(scope="module")
def model_server(tmp_path_factory):
    registry = tmp_path_factory.mktemp("registry")
    publish_tiny_versions(registry, MODEL)
    server = serve_registry(registry, (1, 2))
    yield server
    stop_server(server)


@pytest.fixture()
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture()
def gateway(model_server, redis_server):
    gw = Gateway(model_server.grpc_target, redis_server.url, env={"GATEWAY_ADMIN_TOKEN": "the-admin-token"})
    yield gw
    gw.stop()


# ---------------------------------------------------------------------------------------------- feedback tokens
def test_a_running_gateway_takes_a_rotated_feedback_secret_and_loses_no_feedback(model_server, redis_server,
                                                                                  tmp_path):
    """The rotation README "Gateway" describes, on a running gateway reading a mounted Secret: the new secret listed
    second (verifies), then first (signs), then the old one dropped after the feedback window."""
    old, new = "the-old-secret-0123456789", "the-new-secret-0123456789"
    mounted = tmp_path / "feedback"
    swap_mounted_secret(mounted, {"secret": old})
    gw = Gateway(model_server.grpc_target, redis_server.url, f"--feedback-secret-file={mounted / 'secret'}")
    try:
        answers = [gw.classify(photo.read_bytes(), version=1)[1] for photo in PHOTOS[:3]]
        swap_mounted_secret(mounted, {"secret": f"{old}\n{new}\n"})
        swap_mounted_secret(mounted, {"secret": f"{new}\n{old}\n"})
        status, rotated, _ = gw.classify(PHOTOS[3].read_bytes(), version=1)
        assert status == 200
        assert FeedbackTokens(new.encode(), MODEL).verify(rotated["feedback_token"])  # signed with the new one
        for answer in (answers[0], rotated):
            status, recorded, _ = gw.request("POST", "/v1/feedback", {
                "feedback_token": answer["feedback_token"], "true_label": answer["predictions"][0]["label"]})
            assert status == 200 and recorded["correct"], recorded
        swap_mounted_secret(mounted, {"secret": new})
        status, error, _ = gw.request("POST", "/v1/feedback", {
            "feedback_token": answers[1]["feedback_token"], "true_label": answers[1]["predictions"][0]["label"]})
        assert (status, error["error"]["code"]) == (403, "feedback_token_forged")
    finally:
        gw.stop()


def test_cache_hits_add_no_redis_keys(gateway, redis_server):
    client = redis.Redis.from_url(redis_server.url)
    photo = PHOTOS[0].read_bytes()
    assert gateway.classify(photo, version=1)[0] == 200
    wait_until(lambda: gateway.classify(photo, version=1)[1]["cached"], timeout=10, what="the answer cached")
    before, hits = client.dbsize(), 200
    for _ in range(hits):
        status, answer, _ = gateway.classify(photo, version=1)
        assert status == 200 and answer["cached"]
    assert (client.dbsize() - before) / hits <= 0.01


def test_feedback_token_from_http_and_grpc_counts_once_on_any_replica(gateway, model_server, redis_server):
    status, answer, _ = gateway.classify(PHOTOS[1].read_bytes(), version=1)
    assert status == 200 and answer["feedback_token"]
    predicted = answer["predictions"][0]["label"]
    with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        grpc_answer = pb_grpc.ClassifierStub(channel).Classify(
            pb.ClassifyRequest(photo=PHOTOS[2].read_bytes(), version=2), timeout=30)
    assert grpc_answer.feedback_token
    other = Gateway(model_server.grpc_target, redis_server.url)  # same FEEDBACK_SECRET: another replica
    try:
        body = {"feedback_token": answer["feedback_token"], "request_id": answer["request_id"],
                "true_label": predicted}
        status, recorded, _ = other.request("POST", "/v1/feedback", body)
        assert status == 200 and recorded["correct"] and recorded["version"] == 1
        other_label = {**body, "true_label": next(c for c in LABELS if c != predicted)}
        assert gateway.request("POST", "/v1/feedback", other_label)[0] == 409  # once per answer, on any replica
        assert gateway.request("POST", "/v1/feedback", body)[:2] == (200, recorded)  # the same again: as recorded
        typo = {"feedback_token": grpc_answer.feedback_token, "true_label": grpc_answer.predictions[0].label.upper()}
        status, error, _ = other.request("POST", "/v1/feedback", typo)  # a replica that never answered version 2
        assert (status, error["error"]["code"]) == (400, "unknown_class"), error
        assert ", ".join(LABELS) in error["error"]["message"]
        wrong = {"feedback_token": grpc_answer.feedback_token,
                 "true_label": next(c for c in LABELS if c != grpc_answer.predictions[0].label)}
        status, recorded, _ = gateway.request("POST", "/v1/feedback", wrong)
        assert status == 200 and not recorded["correct"]  # the refused label did not use up the answer's feedback
    finally:
        other.stop()
    head, payload, signature = answer["feedback_token"].split(".")
    forged = f"{head}.{payload[:-2]}xx.{signature}"
    assert gateway.request("POST", "/v1/feedback", {"feedback_token": forged, "true_label": "x"})[0] in (400, 403)
    assert gateway.request("POST", "/v1/feedback", {"request_id": answer["request_id"], "true_label": "x"})[0] == 400
    status, summary, _ = gateway.request("GET", "/v1/admin/status", token="the-admin-token")
    assert summary["versions"]["1"]["feedback"] == {"correct": 1, "total": 1}
    assert summary["versions"]["2"]["feedback"] == {"correct": 0, "total": 1}


def test_a_burst_of_feedback_is_recorded_not_refused_for_want_of_a_redis_connection(gateway, redis_server):
    """redis-py's pool holds 100 connections and refuses a command beyond them at once ("Too many connections"): a
    burst of 300 feedbacks got 503 for two thirds. The gateway's state commands wait for a connection instead."""
    import asyncio

    import aiohttp

    photo, burst = PHOTOS[0].read_bytes(), 300
    answers = [gateway.classify(photo, version=1)[1] for _ in range(burst)]  # one answer each, cached after the first
    url = f"http://127.0.0.1:{gateway.http_port}/v1/feedback"

    async def send_all() -> list[int]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            async def one(answer: dict) -> int:
                body = {"feedback_token": answer["feedback_token"], "true_label": answer["predictions"][0]["label"]}
                async with session.post(url, json=body) as response:
                    return response.status

            return await asyncio.gather(*(one(answer) for answer in answers))

    statuses = asyncio.run(send_all())
    assert statuses == [200] * burst, {status: statuses.count(status) for status in set(statuses)}
    status, summary, _ = gateway.request("GET", "/v1/admin/status", token="the-admin-token")
    assert summary["versions"]["1"]["feedback"] == {"correct": burst, "total": burst}


def test_status_names_the_process_whose_counts_it_reports(gateway, model_server, redis_server):
    """Request counts are per process: the status says which process (``instance``: an id new at every start, and
    the start time), so that a reader can tell a restarted replica counting from zero from one that goes on."""
    import time

    assert gateway.classify(PHOTOS[0].read_bytes(), version=1)[0] == 200
    first = gateway.request("GET", "/v1/admin/status", token=ADMIN)[1]
    assert first["versions"]["1"]["requests"] == 1
    assert first["instance"] == gateway.request("GET", "/v1/admin/status", token=ADMIN)[1]["instance"]
    other = Gateway(model_server.grpc_target, redis_server.url, env={"GATEWAY_ADMIN_TOKEN": ADMIN})
    try:
        second = other.request("GET", "/v1/admin/status", token=ADMIN)[1]
    finally:
        other.stop()
    assert second["instance"]["id"] != first["instance"]["id"]
    assert first["instance"]["started"] <= second["instance"]["started"] <= time.time()
    assert "1" not in second["versions"] or second["versions"]["1"]["requests"] == 0


def test_feedback_tokens_expire_and_bind_the_model():
    now = [1_000_000.0]
    tokens = FeedbackTokens(b"0123456789abcdef0123", MODEL, lifetime_seconds=60, clock=lambda: now[0])
    token = tokens.issue("r1", 3, "amanita")
    claim = tokens.verify(token)
    assert (claim.request_id, claim.version, claim.predicted, claim.expires_at) == ("r1", 3, "amanita", 1_000_060)
    with pytest.raises(BadFeedbackToken, match="bad signature"):
        FeedbackTokens(b"another-secret-0123456", MODEL).verify(token)
    with pytest.raises(BadFeedbackToken) as other_model:
        FeedbackTokens(b"0123456789abcdef0123", "other", clock=lambda: now[0]).verify(token)
    assert other_model.value.reason == "forged"
    now[0] += 60
    with pytest.raises(BadFeedbackToken) as expired:
        tokens.verify(token)
    assert expired.value.reason == "expired"


def test_tokens_signed_with_an_older_secret_verify_while_it_is_listed():
    """Several secrets: the first signs, every one verifies; a secret no longer listed verifies nothing."""
    old, new = b"the-old-secret-0123456789", b"the-new-secret-0123456789"
    token = FeedbackTokens(old, MODEL).issue("r1", 1, "amanita")
    rotating = FeedbackTokens([new, old], MODEL)
    assert rotating.verify(token).request_id == "r1"
    assert FeedbackTokens(new, MODEL).verify(rotating.issue("r2", 1, "amanita")).request_id == "r2"
    assert FeedbackTokens(new, MODEL).verify(rotating.naming_photo(token, "ab" * 32)).photo_sha256 == "ab" * 32
    with pytest.raises(BadFeedbackToken) as refused:
        FeedbackTokens(new, MODEL).verify(token)
    assert refused.value.reason == "forged"
    with pytest.raises(ValueError, match="secret 2 is shorter than 16 bytes"):
        FeedbackTokens([new, b"short"], MODEL)


def swap_mounted_secret(folder: Path, files: dict[str, str]) -> None:
    """What the kubelet does to a Secret mounted as a volume when the Secret changes: the files are written to a new
    timestamped folder, then the ``..data`` link is swapped to it at once; each file name links through ``..data``."""
    import uuid

    data = folder / f"..{uuid.uuid4().hex}"
    data.mkdir(parents=True)
    for name, text in files.items():
        write_private(data / name, text)
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(f"..data/{name}")
    (folder / "..data_tmp").symlink_to(data.name)
    os.replace(folder / "..data_tmp", folder / "..data")


def test_a_feedback_secret_file_is_read_again_when_it_changes_and_a_bad_change_keeps_the_last(tmp_path, caplog):
    from services.gateway.feedback import tokens_from_config

    old, new = "the-old-secret-0123456789", "the-new-secret-0123456789"
    mounted = tmp_path / "feedback"
    swap_mounted_secret(mounted, {"secret": old + "\n"})
    tokens = tokens_from_config(str(mounted / "secret"), "an-environment-secret-0123", MODEL, 60)
    before = tokens.issue("r1", 1, "amanita")
    assert FeedbackTokens(old.encode(), MODEL).verify(before)  # the file wins over FEEDBACK_SECRET
    swap_mounted_secret(mounted, {"secret": f"# rotating: the first signs\n{new}\n\n{old}\n"})
    after = tokens.issue("r2", 1, "amanita")
    assert FeedbackTokens(new.encode(), MODEL).verify(after).request_id == "r2"
    assert tokens.verify(before).request_id == "r1"
    for broken in ("# no secret left\n", "too-short\n"):
        caplog.clear()
        swap_mounted_secret(mounted, {"secret": broken})
        assert tokens.verify(before) and FeedbackTokens(new.encode(), MODEL).verify(tokens.issue("r3", 1, "a"))
        tokens.issue("r4", 1, "a")
        assert [r.levelname for r in caplog.records if "not read again" in r.getMessage()] == ["ERROR"]  # once
    swap_mounted_secret(mounted, {"secret": new + "\n"})
    with pytest.raises(BadFeedbackToken, match="bad signature"):
        tokens.verify(before)
    assert tokens.verify(after).request_id == "r2"
    with pytest.raises(ValueError, match="holds no feedback secret"):
        tokens_from_config(str(write_private(tmp_path / "empty", "\n")), None, MODEL, 60)


def test_feedback_seen_set_forgets_expired_answers(redis_server):
    """The single-use set holds an answer only until its token expires: it stays bounded by the window."""
    import asyncio

    import redis.asyncio as aioredis

    from services.gateway.stats import Stats

    now = [1_000_000.0]
    tokens = FeedbackTokens(b"0123456789abcdef0123", MODEL, lifetime_seconds=60, clock=lambda: now[0])

    async def scenario():
        client = aioredis.from_url(redis_server.url)
        stats = Stats(client, MODEL, tokens)
        first = tokens.verify(tokens.issue("r1", 1, "a"))
        assert await stats.record_feedback(first, "a") is not None
        assert await stats.record_feedback(first, "b") is None
        now[0] += 61
        second = tokens.verify(tokens.issue("r2", 1, "a"))
        assert await stats.record_feedback(second, "b") is not None
        members = await client.zrange(keys.feedback_seen(MODEL), 0, -1)
        labels = await client.hgetall(keys.feedback_labels(MODEL))
        await client.aclose()
        return members, labels

    assert asyncio.run(scenario()) == ([b"r2"], {b"r2": b"b"})


def test_feedback_tokens_carry_the_identity_of_the_model_that_answered():
    tokens = FeedbackTokens(b"0123456789abcdef0123", MODEL)
    assert tokens.verify(tokens.issue("r1", 2, "amanita", identity="0a1b2c3d4e5f")).identity == "0a1b2c3d4e5f"
    assert tokens.verify(tokens.issue("r2", 2, "amanita")).identity is None  # as tokens issued before identities


class Models:
    """The gateway's version facts as feedback_counts reads them: ``serving`` {version: identity} AVAILABLE now,
    ``former`` {version: identity} of versions that left."""

    def __init__(self, serving: dict[int, str], former: dict[int, str]):
        from services.gateway.version_facts import Facts

        self.serving = {v: Facts(v, 224, i, ("a", "b")) for v, i in serving.items()}
        self.former = {v: Facts(v, 224, i, ("a", "b")) for v, i in former.items()}

    def known(self, version: int):
        return self.serving.get(version)

    def last_known(self, version: int):
        return self.serving.get(version) or self.former.get(version)


def test_feedback_is_tallied_per_model_and_unnamed_tallies_go_to_the_model_serving_their_number(redis_server):
    """Version 1's number is held by the model "new" now, after "old": each has its own tally. Unnamed tallies
    (tokens from before answers named their model) of a version being served are named after its model, in Redis,
    once; a version that left keeps its unnamed tally beside its model's; a version never learnt shows all."""
    import asyncio

    import redis.asyncio as aioredis

    from services.gateway.stats import Stats

    tokens = FeedbackTokens(b"0123456789abcdef0123", MODEL)
    feedback = [(1, "old", "a", "a"), (1, "old", "a", "b"), (1, "new", "a", "a"), (1, None, "a", "a"),
                (2, "two", "a", "b"), (2, None, "a", "a"), (3, "x", "a", "a"), (3, "y", "a", "b"), (3, None, "a", "a")]
    models = Models(serving={1: "new"}, former={2: "two"})

    async def scenario():
        client = aioredis.from_url(redis_server.url)
        await client.delete(keys.feedback_tally(MODEL), keys.feedback_seen(MODEL), keys.feedback_labels(MODEL))
        stats = Stats(client, MODEL, tokens, models)
        for n, (version, identity, predicted, true_label) in enumerate(feedback):
            claim = tokens.verify(tokens.issue(f"r{n}", version, predicted, identity=identity))
            assert await stats.record_feedback(claim, true_label) is not None
        first, everyone = await stats.feedback_counts(), await Stats(client, MODEL, tokens).feedback_counts()
        tally = await client.hgetall(keys.feedback_tally(MODEL))
        again = await stats.feedback_counts()
        await client.aclose()
        return first, everyone, {k.decode(): int(v) for k, v in tally.items()}, again

    first, everyone, tally, again = asyncio.run(scenario())
    assert first == again == {1: (2, 2), 2: (1, 2), 3: (2, 3)}
    assert everyone == {1: (3, 4), 2: (1, 2), 3: (2, 3)}
    assert tally == {"1:old:total": 2, "1:old:correct": 1, "1:new:total": 2, "1:new:correct": 2,
                     "2:two:total": 1, "2:two:correct": 0, "2:total": 1, "2:correct": 1,
                     "3:x:total": 1, "3:x:correct": 1, "3:y:total": 1, "3:y:correct": 0, "3:total": 1, "3:correct": 1}


def test_a_versions_own_figures_start_anew_when_another_model_holds_its_number():
    """Requests, errors and latency of version 1 count the model "old" until "new" holds the number: then none are
    shown until "new" answers, and its own are counted from there. A version whose model is not known yet (2) is
    counted as it comes."""
    import asyncio

    from services.gateway.stats import Stats

    class NoFeedback:
        async def hgetall(self, key):
            return {}

    models = Models(serving={1: "old"}, former={})
    stats = Stats(NoFeedback(), MODEL, models=models)

    def requests() -> dict[str, int]:
        return {v: row["requests"] for v, row in asyncio.run(stats.summary())["versions"].items()}

    stats.record(1, 0.01, cached=False)
    stats.record_error(1)
    stats.record(2, 0.01, cached=True)
    assert requests() == {"1": 2, "2": 1}
    models.former, models.serving = {1: models.serving[1]}, {}  # version 1 left: its figures stay the old model's
    assert requests() == {"1": 2, "2": 1}
    models.serving = Models(serving={1: "new"}, former={}).serving
    assert requests() == {"1": 0, "2": 1}
    stats.record(1, 0.02, cached=False)
    stats.record(2, 0.01, cached=True)
    assert requests() == {"1": 1, "2": 2}
    assert asyncio.run(stats.summary())["versions"]["1"]["p50_ms"] == pytest.approx(20.0)


# ---------------------------------------------------------------------------------------------- Redis down or frozen
ADMIN = "the-admin-token"


def tallied_total(client, version: int) -> int:
    """The feedback answers tallied for ``version``: every model's under its number (keys.feedback_tally)."""
    fields = client.hgetall(keys.feedback_tally(MODEL)).items()
    return sum(int(count) for name, count in fields
               if name.decode().startswith(f"{version}:") and name.decode().endswith(":total"))


def assert_state_calls_answer_503_promptly(gateway, answer) -> None:
    import time

    calls = [("PUT", "/v1/admin/routing", {"weights": {"1": 100}, "shadow": None}, ADMIN),
             ("GET", "/v1/admin/audit", None, ADMIN), ("GET", "/v1/admin/status", None, ADMIN),
             ("POST", "/v1/feedback", {"feedback_token": answer["feedback_token"], "true_label": LABELS[0]}, None)]
    for method, path, body, token in calls:
        start = time.monotonic()
        status, error, headers = gateway.request(method, path, body, token=token, timeout=20)
        assert (status, error["error"]["code"]) == (503, "redis_unavailable"), (method, path, status, error)
        assert int(headers["Retry-After"]) >= 1
        assert time.monotonic() - start < 5, f"{method} {path} took {time.monotonic() - start:.1f} s"


def test_admin_and_feedback_answer_503_while_redis_is_stopped(gateway, redis_server):
    status, answer, _ = gateway.classify(PHOTOS[0].read_bytes(), version=1)
    assert status == 200
    redis_server.stop()
    try:
        assert_state_calls_answer_503_promptly(gateway, answer)
    finally:
        redis_server.start()
    wait_until(lambda: gateway.request("GET", "/v1/admin/audit", token=ADMIN)[0] == 200, timeout=15,
               what="admin reads back after Redis restarted")


def test_admin_and_feedback_answer_503_while_redis_is_frozen(gateway, redis_server):
    status, answer, _ = gateway.classify(PHOTOS[0].read_bytes(), version=1)
    assert status == 200
    # one feedback first, so Redis holds the feedback script: a write sent while it is frozen can run when it thaws
    status, warm, _ = gateway.classify(PHOTOS[1].read_bytes(), version=1)
    assert gateway.request("POST", "/v1/feedback", {"feedback_token": warm["feedback_token"],
                                                    "true_label": LABELS[0]})[0] == 200
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        assert_state_calls_answer_503_promptly(gateway, answer)
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    wait_until(lambda: gateway.request("POST", "/v1/feedback", {"feedback_token": answer["feedback_token"],
                                                                "true_label": LABELS[0]})[0] == 200,
               timeout=15, what="feedback recorded after Redis thawed")
    client = redis.Redis.from_url(redis_server.url)  # the feedback answered 503 and its retry: counted once
    assert tallied_total(client, version=1) == 2
    client.close()


# ---------------------------------------------------------------------------------------------- routing changes
def test_two_replicas_changing_the_routing_at_once_audit_the_table_each_replaced(redis_server):
    """Two operators' PUTs reach two gateway replicas at once: each audit entry's ``old`` is the table its change
    replaced, so the audit reads as one chain (the later entry's old is the earlier entry's new)."""
    import asyncio

    import redis.asyncio as aioredis

    from services.gateway.routing import Router, RoutingTable

    async def scenario():
        clients = [aioredis.from_url(redis_server.url) for _ in range(2)]
        replicas = [Router(client, MODEL) for client in clients]
        for router in replicas:
            router.available = {1, 2, 3}
        await replicas[0].set_table(RoutingTable.from_json({"weights": {"1": 100}}), "setup")
        await asyncio.gather(*(client.ping() for client in clients))  # both connected: the two changes interleave
        await asyncio.gather(replicas[0].set_table(RoutingTable.from_json({"weights": {"1": 50, "2": 50}}), "alice"),
                             replicas[1].set_table(RoutingTable.from_json({"weights": {"1": 90, "3": 10}}), "bob"))
        entries = await replicas[0].audit()
        stored = json.loads(await clients[0].get(keys.routing(MODEL)))
        for client in clients:
            await client.aclose()
        return entries, stored

    (later, earlier, first), stored = asyncio.run(scenario())
    assert earlier["old"] == first["new"] == {"weights": {"1": 100.0}, "shadow": None}
    assert later["old"] == earlier["new"]
    assert stored == later["new"]


def test_a_change_stored_after_redis_lost_its_data_is_newer_than_every_table_seen(redis_server):
    """A change made before a replica wrote back the table Redis lost (its next refresh) takes a generation above
    the one replicas had seen: theirs would otherwise be the newer one, and written back over it."""
    import asyncio

    import redis.asyncio as aioredis

    from services.gateway.routing import Router, RoutingTable

    async def scenario():
        client = aioredis.from_url(redis_server.url)
        router = Router(client, MODEL)
        router.available = {1, 2}
        for _ in range(3):
            await router.set_table(RoutingTable.from_json({"weights": {"1": 100}}), "setup")
        await client.flushdb()  # the restart without data
        await router.set_table(RoutingTable.from_json({"weights": {"2": 100}}), "alice")
        generation = int(await client.get(keys.routing_generation(MODEL)))
        await client.aclose()
        return generation

    assert asyncio.run(scenario()) == 4


def test_a_routing_change_made_against_an_older_generation_is_refused_with_409(gateway):
    """GET /v1/admin/routing names the stored table's generation; a PUT with ?expected_generation= is applied only
    while the table is still that generation, so that a read-modify-write never undoes a change made meanwhile."""
    status, routing, _ = gateway.request("GET", "/v1/admin/routing", token=ADMIN)
    assert status == 200
    seen = routing["generation"]
    status, applied, _ = gateway.request("PUT", f"/v1/admin/routing?expected_generation={seen}",
                                         {"weights": {"1": 100}}, token=ADMIN)
    assert (status, applied["generation"]) == (200, seen + 1)
    status, error, _ = gateway.request("PUT", f"/v1/admin/routing?expected_generation={seen}",
                                       {"weights": {"2": 100}}, token=ADMIN)
    assert (status, error["error"]["code"]) == (409, "routing_changed")
    routing = gateway.request("GET", "/v1/admin/routing", token=ADMIN)[1]
    assert (routing["weights"], routing["generation"]) == ({"1": 100.0}, seen + 1)
    assert gateway.request("PUT", "/v1/admin/routing?expected_generation=x", {"weights": {"2": 100}},
                           token=ADMIN)[0] == 400


# ---------------------------------------------------------------------------------------------- supervised watchers
def routed_version(gateway) -> int:
    status, answer, _ = gateway.request("POST", "/v1/classify", PHOTOS[1].read_bytes(), "image/jpeg",
                                        headers={"X-Client-Id": "watcher-test"})
    assert status == 200, answer
    return answer["model"]["version"]


def test_routing_watcher_survives_a_refused_stored_table(gateway, redis_server):
    client = redis.Redis.from_url(redis_server.url)
    assert gateway.request("PUT", "/v1/admin/routing", {"weights": {"1": 100}, "shadow": None}, token=ADMIN)[0] == 200
    assert routed_version(gateway) == 1
    failures = gateway.metric("mushroom_gateway_loop_failures_total", loop="routing")
    client.set(keys.routing(MODEL), json.dumps({"weights": {"not-a-label!": 100}, "shadow": None}))
    wait_until(lambda: gateway.metric("mushroom_gateway_loop_failures_total", loop="routing") > failures,
               timeout=10, what="the refused table counted as a routing loop failure")
    assert routed_version(gateway) == 1  # the last good table still routes
    wait_until(lambda: "routing" in gateway.request("GET", "/readyz")[1]["reason"], timeout=15,
               what="/readyz to report the failing routing loop")
    client.set(keys.routing(MODEL), json.dumps({"weights": {"2": 100}, "shadow": None}))
    wait_until(lambda: routed_version(gateway) == 2, timeout=10, what="the valid table picked up afterwards")
    wait_until(lambda: gateway.request("GET", "/readyz")[1]["reason"] == "ok", timeout=10, what="readyz ok again")


def test_a_stored_table_that_is_not_json_is_reported_replaced_and_audited_as_stored(gateway, redis_server):
    """Someone (redis-cli, another tool) stores something that is not JSON under the routing key: reads answer with
    the last known table, an operator's change replaces it, and the audit records what it replaced, as text."""
    client = redis.Redis.from_url(redis_server.url)
    assert gateway.request("PUT", "/v1/admin/routing", {"weights": {"1": 100}, "shadow": None}, token=ADMIN)[0] == 200
    client.set(keys.routing(MODEL), "weights 1=100")
    status, body = gateway.request("GET", "/v1/admin/routing", token=ADMIN)[:2]
    assert status == 200 and body["weights"] == {"1": 100.0}, body  # the last known table
    wait_until(lambda: "not JSON" in gateway.request("GET", "/readyz")[1]["reason"], timeout=15,
               what="/readyz to say the stored table is not JSON")
    status, body = gateway.request("PUT", "/v1/admin/routing", {"weights": {"2": 100}, "shadow": None}, token=ADMIN)[:2]
    assert status == 200 and body["audit"]["old"] == "weights 1=100", body
    status, audit = gateway.request("GET", "/v1/admin/audit", token=ADMIN)[:2]
    audit = audit["entries"]
    assert status == 200 and audit[0]["old"] == "weights 1=100" and audit[0]["new"]["weights"] == {"2": 100.0}
    client.lpush(keys.audit(MODEL), "{an entry written by hand")  # one the gateway did not write
    status, audit = gateway.request("GET", "/v1/admin/audit", token=ADMIN)[:2]
    audit = audit["entries"]
    assert status == 200 and audit[0] == {"unreadable": "{an entry written by hand"}
    assert audit[1]["old"] == "weights 1=100"
    shown = subprocess.run([sys.executable, "-m", "services.gateway.operator_cli", "--url", gateway.url, "--token",
                            ADMIN, "audit"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "not written by the gateway: '{an entry written by hand'" in shown.stdout
    assert "admin: 'weights 1=100' -> {'2': 100.0}" in shown.stdout
    wait_until(lambda: routed_version(gateway) == 2, timeout=10, what="the operator's table in force")


def test_a_supervised_loop_backs_off_reports_stale_and_recovers():
    import asyncio

    from services.gateway import metrics
    from services.gateway.loops import Loops

    now = [0.0]
    calls, recovered = [], {}

    async def scenario():
        stopping = asyncio.Event()
        loops = Loops(stopping, clock=lambda: now[0])

        async def step():
            calls.append(asyncio.get_running_loop().time())
            if len(calls) <= 3:
                now[0] += 10  # three failures, each ten (fake) seconds after the last success
                raise RuntimeError(f"failure {len(calls)}")
            if len(calls) == 4:
                recovered.update(loops.stale())
                stopping.set()

        before = metrics.LOOP_FAILURES.labels(loop="unit")._value.get()
        await asyncio.wait_for(loops.run("unit", step, 0.01, max_backoff=1.0), 10)
        return loops, metrics.LOOP_FAILURES.labels(loop="unit")._value.get() - before

    loops, counted = asyncio.run(scenario())
    assert counted == 3
    assert "failure 3" in recovered["unit"]  # stale (30 s without success) before the fourth step succeeded
    assert loops.stale() == {}
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert gaps[2] >= 0.07 and gaps[2] > gaps[0]  # 0.02, 0.04, 0.08 s: the waits grow after each failure


# ---------------------------------------------------------------------------------------------- Redis restart
def stored_routing(client) -> tuple[dict | None, int]:
    raw, generation = client.mget(keys.routing(MODEL), keys.routing_generation(MODEL))
    return (json.loads(raw) if raw else None), int(generation or 0)


def test_gateway_writes_back_the_table_a_redis_restart_erased(gateway, redis_server):
    """The test's Redis has no persistence: its restart is the loss a misconfigured deployment would suffer. The
    gateway keeps routing by the table it knew and writes it back, with its generation and an audit entry."""
    assert gateway.request("PUT", "/v1/admin/routing", {"weights": {"1": 100}, "shadow": None}, token=ADMIN)[0] == 200
    assert routed_version(gateway) == 1 and gateway.metric("mushroom_gateway_routing_table_lost") == 0
    _, generation = stored_routing(redis.Redis.from_url(redis_server.url))
    redis_server.stop()
    redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    wait_until(lambda: stored_routing(client)[0] is not None, timeout=15, what="the table written back")
    assert stored_routing(client) == ({"weights": {"1": 100.0}, "shadow": None}, generation)
    assert gateway.metric("mushroom_gateway_routing_table_losses_total") == 1
    assert gateway.metric("mushroom_gateway_routing_table_lost") == 0
    assert [routed_version(gateway) for _ in range(5)] == [1] * 5  # not the newest version (2)
    assert "is gone from Redis" in gateway.log.read_text()
    entry = gateway.request("GET", "/v1/admin/audit", token=ADMIN)[1]["entries"][0]
    assert entry["who"] == "gateway" and "gone from Redis" in entry["restored"]
    assert (entry["old"], entry["new"]) == ({"weights": {}, "shadow": None}, {"weights": {"1": 100.0}, "shadow": None})
    shown = subprocess.run([sys.executable, "-m", "services.gateway.operator_cli", "--url", gateway.url, "--token",
                            ADMIN, "audit"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "gateway: {} -> {'1': 100.0}" in shown.stdout, shown.stderr
    assert gateway.request("PUT", "/v1/admin/routing", {"weights": {"2": 100}, "shadow": None}, token=ADMIN)[0] == 200
    assert routed_version(gateway) == 2 and stored_routing(client)[1] == generation + 1


def test_a_table_that_redis_brings_back_older_is_not_followed_but_written_over(gateway, redis_server):
    """A Redis restarted from data older than its last change (an append-only file fsynced every second, a replica
    promoted before it caught up) holds the table from before that change, at a lower generation: a gateway that
    followed it would undo an operator's change (a rollback back onto a bad version). It writes its table back."""
    client = redis.Redis.from_url(redis_server.url)
    assert gateway.request("PUT", "/v1/admin/routing", {"weights": {"1": 100}, "shadow": None}, token=ADMIN)[0] == 200
    before = stored_routing(client)
    assert gateway.request("PUT", "/v1/admin/routing", {"weights": {"2": 100}, "shadow": None}, token=ADMIN)[0] == 200
    after = stored_routing(client)
    assert routed_version(gateway) == 2
    client.mset({keys.routing(MODEL): json.dumps(before[0]), keys.routing_generation(MODEL): before[1]})
    wait_until(lambda: stored_routing(client) == after, timeout=15, what="the newer table written back")
    assert [routed_version(gateway) for _ in range(5)] == [2] * 5
    assert gateway.metric("mushroom_gateway_routing_table_losses_total") == 1
    assert f"back at generation {before[1]} in Redis, from {after[1]}" in gateway.log.read_text()
    entry = gateway.request("GET", "/v1/admin/audit", token=ADMIN)[1]["entries"][0]
    assert (entry["who"], entry["old"], entry["new"]) == ("gateway", before[0], after[0])


def test_operator_state_survives_a_restart_of_redis_run_as_the_stack_runs_it():
    from services.gateway.routing import RoutingTable
    from devstack.servers import REDIS_STATE_ARGS

    table = json.dumps(RoutingTable({1: 90.0, "canary": 10.0}).to_json())
    with RedisServer(extra_args=REDIS_STATE_ARGS) as server:
        client = redis.Redis.from_url(server.url)
        client.set(keys.routing(MODEL), table)
        client.lpush(keys.audit(MODEL), json.dumps({"who": "alice"}))
        client.hincrby(keys.feedback_tally(MODEL), "1:c0ffee:total", 3)
        client.set(keys.result(MODEL, 1, "c0ffee", 1, 224, "ab"), "{}", ex=3600)
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "volatile-lru"
        for key in (keys.routing(MODEL), keys.audit(MODEL), keys.feedback_tally(MODEL)):
            assert client.ttl(key) == -1  # no TTL: never a volatile-lru eviction candidate
        client.close()
        server.stop()
        server.start()
        client = redis.Redis.from_url(server.url)
        assert client.get(keys.routing(MODEL)).decode() == table
        assert json.loads(client.lindex(keys.audit(MODEL), 0)) == {"who": "alice"}
        assert client.hget(keys.feedback_tally(MODEL), "1:c0ffee:total") == b"3"
        client.close()


def test_cache_keys_expire_and_state_keys_do_not(gateway, redis_server):
    """volatile-lru evicts only keys with a TTL: every cache key has one, no operator-state key has one."""
    photo = PHOTOS[3].read_bytes()
    status, answer, _ = gateway.classify(photo, version=2)
    assert gateway.request("PUT", "/v1/admin/routing", {"weights": {"1": 100}, "shadow": None}, token=ADMIN)[0] == 200
    feedback = {"feedback_token": answer["feedback_token"], "true_label": LABELS[0]}
    assert gateway.request("POST", "/v1/feedback", feedback)[0] == 200
    client = redis.Redis.from_url(redis_server.url)
    identity = {v["version"]: v["identity"] for v in gateway.request("GET", "/v1/models").body["models"][0]["versions"]}
    key = keys.result(MODEL, 2, identity[2], _preprocessing_version(), 224, _sha256(photo))
    wait_until(lambda: client.exists(key), timeout=10, what="the answer cached")
    ttls = {key.decode(): client.ttl(key) for key in client.scan_iter()}
    state = {keys.routing(MODEL), keys.routing_generation(MODEL), keys.routing_writer(MODEL), keys.audit(MODEL),
             keys.feedback_tally(MODEL), keys.feedback_seen(MODEL), keys.feedback_labels(MODEL)}
    assert state <= set(ttls)
    assert all((ttl == -1) == (key in state) for key, ttl in ttls.items()), ttls


def _preprocessing_version():
    from training_job.preprocessing import PREPROCESSING_VERSION

    return PREPROCESSING_VERSION


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_compose_and_k8s_run_redis_with_the_stacks_state_settings():
    """The three deployments keep operator state alike: persisted on a volume, never evicted."""
    import yaml

    from devstack.servers import REDIS_STATE_ARGS

    def pairs(argv):
        return {(a, b) for a, b in zip(argv, argv[1:]) if a.startswith("--")}

    wanted = pairs(list(REDIS_STATE_ARGS))
    compose = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())["services"]["redis"]
    assert wanted <= pairs(compose["command"]) and any(v.endswith(":/data") for v in compose["volumes"])
    [deployment] = [d for d in yaml.safe_load_all((PROJECT_ROOT / "deploy/k8s/redis.yaml").read_text())
                    if d and d["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert wanted <= pairs(container["args"]) and ("--dir", "/data") in pairs(container["args"])
    [mount] = container["volumeMounts"]
    [volume] = deployment["spec"]["template"]["spec"]["volumes"]
    assert mount["mountPath"] == "/data" and volume["persistentVolumeClaim"]["claimName"] == "redis-data"


# ---------------------------------------------------------------------------------------------- operator tokens
def write_private(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def test_the_audit_records_the_token_owner_and_reads_need_a_token(model_server, redis_server, tmp_path):
    tokens = write_private(tmp_path / "operators", "# name:token\n" + "".join(f"{n}:{t}\n" for n, t in
                                                                           OPERATORS.items()))
    gw = Gateway(model_server.grpc_target, redis_server.url, f"--operator-tokens={tokens}",
                 env={"GATEWAY_ADMIN_TOKEN": ADMIN})
    try:
        table = {"weights": {"1": 100}, "shadow": None}
        status, _, _ = gw.request("PUT", "/v1/admin/routing", table, token=OPERATORS["alice"],
                                  headers={"X-Operator": "mallory"})
        assert status == 200
        assert gw.request("PUT", "/v1/admin/routing", {"weights": {"2": 100}, "shadow": None},
                          token=OPERATORS["bob"])[0] == 200
        assert gw.request("PUT", "/v1/admin/routing", table, token=ADMIN)[0] == 200  # the old single token
        status, audit, _ = gw.request("GET", "/v1/admin/audit", token=OPERATORS["bob"])
        assert status == 200
        assert [(e["who"], e.get("note")) for e in audit["entries"]] == [("admin", None), ("bob", None),
                                                                         ("alice", "mallory")]
        for path in ("/v1/admin/routing", "/v1/admin/audit", "/v1/admin/status"):
            assert gw.request("GET", path)[0] == 401
            assert gw.request("GET", path, token="not-a-token")[0] == 401
            assert gw.request("GET", path, token=OPERATORS["alice"])[0] == 200
    finally:
        gw.stop()


def test_operator_tokens_from_a_mounted_secret_folder_reload_when_it_changes(tmp_path):
    import time

    from services.gateway.operators import OperatorTokens, OperatorTokensError

    secret = tmp_path / "secret"
    (secret / "..2024_01_01").mkdir(parents=True)
    write_private(secret / "..2024_01_01" / "alice", OPERATORS["alice"] + "\n")
    (secret / "..data").symlink_to("..2024_01_01")
    (secret / "alice").symlink_to("..data/alice")
    tokens = OperatorTokens(secret, admin_token=ADMIN)
    assert tokens.names() == ["admin", "alice"]
    assert tokens.owner(OPERATORS["alice"]) == "alice" and tokens.owner(ADMIN) == "admin"
    assert tokens.owner("") is None and tokens.owner(OPERATORS["alice"] + "x") is None
    write_private(secret / "..2024_01_01" / "bob", OPERATORS["bob"])
    (secret / "bob").symlink_to("..data/bob")
    later = time.time() + 5
    os.utime(secret, (later, later))
    assert tokens.owner(OPERATORS["bob"]) == "bob"
    with pytest.raises(OperatorTokensError, match="share a token"):
        OperatorTokens(write_private(tmp_path / "dup", f"a:{ADMIN}\nb:{ADMIN}\n"))
    with pytest.raises(OperatorTokensError, match="name:token"):
        OperatorTokens(write_private(tmp_path / "bad", "just-a-token\n"))


def test_the_stacks_admin_token_file_is_private_from_its_creation(tmp_path, monkeypatch):
    from devstack import launch
    from devstack.health import StackError

    seen_modes = []
    chmod = Path.chmod

    def spying_chmod(self, mode, **kwargs):  # the mode the file had until this chmod
        seen_modes.append(self.stat().st_mode & 0o777)
        return chmod(self, mode, **kwargs)

    def start_nothing(stack, *args):
        seen_modes.append((stack.run_dir / "admin_token").stat().st_mode & 0o777)
        raise StackError("stopped by the test before any process")

    monkeypatch.setattr(Path, "chmod", spying_chmod)
    monkeypatch.setattr(launch, "_start_all", start_nothing)
    ports = launch.Ports(*(free_port() for _ in range(7)))
    umask = os.umask(0)
    try:
        with pytest.raises(StackError):
            launch.start_stack(tmp_path / "registry", MODEL, launch.new_run_dir(tmp_path / "runs"), ports,
                               admin_token="t" * 20)
    finally:
        os.umask(umask)
    assert seen_modes and set(seen_modes) == {0o600}
    [run_dir] = [p for p in (tmp_path / "runs").iterdir() if p.is_dir() and not p.is_symlink()]
    assert (run_dir / "admin_token").read_text().strip() == "t" * 20
    # the feedback secret kept beside the runs is made the same way
    assert (tmp_path / "runs" / "feedback_secret").stat().st_mode & 0o777 == 0o600


def test_compose_and_k8s_give_the_gateway_operator_tokens_and_a_shared_feedback_secret():
    import yaml

    compose = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())
    gateway_service = compose["services"]["gateway"]
    assert set(gateway_service["secrets"]) == {"operators", "feedback_secret"} <= set(compose["secrets"])
    assert gateway_service["environment"]["GATEWAY_OPERATOR_TOKENS"] == "/run/secrets/operators"
    assert gateway_service["environment"]["FEEDBACK_SECRET_FILE"] == "/run/secrets/feedback_secret"
    [deployment] = [d for d in yaml.safe_load_all((PROJECT_ROOT / "deploy/k8s/gateway.yaml").read_text())
                    if d and d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert env["GATEWAY_OPERATOR_TOKENS"] == mounts["operators"] and secrets["operators"] == "gateway-operators"
    assert env["FEEDBACK_SECRET_FILE"].startswith(mounts["feedback"] + "/")
    assert secrets["feedback"] == "gateway-feedback"
