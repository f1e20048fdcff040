"""The result cache against a real redis-server: hits, single-flight, and surviving Redis going away and back."""
from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from services.gateway.cache import CachedResult, CircuitBreaker, ResultCache, cache_key
from tests.support import RedisServer

RESULT = CachedResult(3, ["a", "b"], [0.25, 0.75], 0.75, False)


@pytest.fixture
def redis_server():
    with RedisServer() as server:
        yield server


def test_key_depends_on_photo_model_version_and_preprocessing():
    keys = {cache_key(b"x", "m", 1), cache_key(b"y", "m", 1), cache_key(b"x", "n", 1), cache_key(b"x", "m", 2)}
    assert len(keys) == 4
    from training_job.preprocessing import PREPROCESSING_VERSION
    assert PREPROCESSING_VERSION in cache_key(b"x", "m", 1)


def test_breaker_opens_after_failures_and_half_opens():
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=2, open_seconds=1.0, clock=lambda: now[0])
    breaker.failure()
    assert breaker.allow()
    breaker.failure()
    assert not breaker.allow()
    now[0] = 1.5
    assert breaker.allow() and not breaker.allow()  # one trial
    breaker.success()
    assert breaker.allow() and not breaker.is_open


def test_repeat_is_a_hit_and_concurrent_misses_make_one_call(redis_server):
    async def scenario():
        outcomes = []
        cache = ResultCache(Redis.from_url(redis_server.url), ttl_seconds=60, timeout_seconds=0.5,
                            on_outcome=outcomes.append)
        calls = 0

        async def compute():
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.1)
            return RESULT

        key = cache_key(b"photo", "m", 3)
        results = await asyncio.gather(*[cache.get_or_compute(key, compute) for _ in range(10)])
        assert calls == 1 and all(r == RESULT and not cached for r, cached in results)
        assert await cache.get_or_compute(key, compute) == (RESULT, True)
        assert 0 < await cache.redis.ttl(key) <= 60
        assert "hit" in outcomes
        await cache.redis.aclose()

    asyncio.run(scenario())


def test_redis_down_serves_uncached_then_recovers(redis_server):
    async def scenario():
        outcomes = []
        cache = ResultCache(Redis.from_url(redis_server.url, socket_connect_timeout=0.1), timeout_seconds=0.2,
                            breaker=CircuitBreaker(failure_threshold=2, open_seconds=0.3), on_outcome=outcomes.append)

        async def compute():
            return RESULT

        key = cache_key(b"p", "m", 3)
        await cache.get_or_compute(key, compute)
        redis_server.stop()
        for _ in range(5):
            assert await cache.get_or_compute(key, compute) == (RESULT, False)
        assert "error" in outcomes and "bypass" in outcomes and cache.breaker.is_open
        redis_server.start()
        await asyncio.sleep(0.35)
        for _ in range(3):
            result, cached = await cache.get_or_compute(key, compute)
        assert cached and not cache.breaker.is_open
        await cache.redis.aclose()

    asyncio.run(scenario())
