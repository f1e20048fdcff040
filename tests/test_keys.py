"""The Redis layout lives in services/gateway/keys.py (and the rollout controller's in services/rollout/keys.py): no
other module spells a key, and tallies are read through known keys (never a keyspace SCAN)."""
from __future__ import annotations

import asyncio
import re

import pytest
import redis
import redis.asyncio as aioredis

from services.gateway import keys
from training_job.paths import PROJECT_ROOT
from tests.support import RedisServer

KEY_LITERAL = re.compile(r"""["']mushroom:""")
KEY_MODULES = {PROJECT_ROOT / "services/gateway/keys.py", PROJECT_ROOT / "services/rollout/keys.py"}


def test_no_module_but_keys_spells_a_redis_key():
    spelled = []
    for folder in ("services", "bench", "loadtests"):
        for path in sorted((PROJECT_ROOT / folder).rglob("*.py")):
            if path in KEY_MODULES or "proto_gen" in path.parts:
                continue
            spelled += [f"{path.relative_to(PROJECT_ROOT)}:{n}" for n, line in
                        enumerate(path.read_text().splitlines(), 1) if KEY_LITERAL.search(line)]
    assert spelled == []


def test_every_key_has_the_project_prefix_and_the_model_in_it():
    built = [keys.result("m", 1, "1d", 3, 224, "ab"), keys.result_pattern("m"),
             keys.explanation("m", 1, "1d", 3, 224, "ab", "predicted"),
             keys.explanation_pattern("m"), keys.routing("m"), keys.routing_generation("m"), keys.routing_writer("m"),
             keys.audit("m"), keys.feedback_tally("m"), keys.feedback_seen("m"), keys.feedback_labels("m"),
             keys.rollout_lease("m")]
    assert all(k.startswith("mushroom:") and ":m" in k for k in built)
    assert len(set(built)) == len(built)


def test_rollout_keys_have_their_own_prefix_and_the_model_in_them():
    from services.rollout import keys as rollout_keys

    built = [rollout_keys.state("m"), rollout_keys.lease("m"), rollout_keys.commands("m"), rollout_keys.history("m")]
    gateway_built = [keys.routing("m"), keys.routing_generation("m"), keys.routing_writer("m"), keys.audit("m"),
                     keys.feedback_tally("m"), keys.feedback_seen("m"), keys.feedback_labels("m")]
    assert all(k.startswith("mushroom:rollout:") and k.endswith(":m") for k in built)
    assert rollout_keys.lease("m") == keys.rollout_lease("m")  # the one lease key the gateway reads to fence
    assert len(set(built)) == len(built) and not set(built) & set(gateway_built)


@pytest.fixture()
def redis_server():
    with RedisServer() as server:
        yield server


def scan_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))


def test_feedback_tallies_are_read_through_a_known_key_without_scan(redis_server):
    from services.gateway.stats import Stats

    sync = redis.Redis.from_url(redis_server.url)

    async def scenario():
        client = aioredis.from_url(redis_server.url)
        stats = Stats(client, "mushrooms")
        await record_feedback(stats, version=1, predicted="a", true_label="a")
        await record_feedback(stats, version=1, predicted="a", true_label="b")
        await record_feedback(stats, version=2, predicted="c", true_label="c")
        counts = await stats.feedback_counts()
        await client.aclose()
        return counts

    assert asyncio.run(scenario()) == {1: (1, 2), 2: (1, 1)}
    assert scan_calls(sync) == 0
    assert sync.exists(keys.feedback_tally("mushrooms"))


async def record_feedback(stats, version: int, predicted: str, true_label: str) -> None:
    """One answer (its signed feedback token) and its feedback."""
    import uuid

    claim = stats.tokens.verify(stats.feedback_token(uuid.uuid4().hex, version, None, predicted))
    assert await stats.record_feedback(claim, true_label) is not None
