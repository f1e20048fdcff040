"""Redis result cache: the full answer of a model version for a photo, keyed so that nothing stale can be served.

Key = photo sha256 + model + resolved version and its identity (the digest of its answers to fixed probes,
version_facts.py: a number given again to another model gets another) + preprocessing version + the version's input
size. Redis trouble never fails a request: after a short timeout the request is served uncached, and a circuit
breaker skips Redis for a while before trying again.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

import redis.asyncio as aioredis

from services.gateway import keys, metrics
from training_job.preprocessing import PREPROCESSING_VERSION

log = logging.getLogger("gateway.cache")


class CircuitBreaker:
    def __init__(self, failures_to_open: int = 3, open_seconds: float = 2.0):
        self.failures_to_open = failures_to_open
        self.open_seconds = open_seconds
        self.failures = 0
        self.opened_at = 0.0

    def allow(self) -> bool:
        return self.failures < self.failures_to_open or time.monotonic() - self.opened_at >= self.open_seconds

    def success(self) -> None:
        if self.failures >= self.failures_to_open:
            log.info("redis is back: cache on again")
        self.failures = 0

    def failure(self) -> None:
        self.failures += 1
        if self.failures >= self.failures_to_open:
            if self.failures == self.failures_to_open:
                log.warning("redis failing: serving uncached for %.1fs before retrying", self.open_seconds)
            self.opened_at = time.monotonic()
        metrics.CACHE_OUTCOMES["error"].inc()


def cache_key(sha256: str, model: str, version: int, identity: str, image_size: int) -> str:
    return keys.result(model, version, identity, PREPROCESSING_VERSION, image_size, sha256)


def explanation_key(sha256: str, model: str, version: int, identity: str, image_size: int, target: str) -> str:
    return keys.explanation(model, version, identity, PREPROCESSING_VERSION, image_size, sha256, target)


class CommandConnections:
    """Connections for the cache's GET and SET, with the client's own settings (address, TLS, password, database,
    timeouts): a free one is taken for a command and given back after its reply. The client's pool machinery around
    each command (lock, retries, observability hooks, events) cost about as much CPU as the command itself; a cache
    command needs none of it, as a failed one is not retried but served uncached. A connection whose command failed
    is dropped (its reply may still be on the way); the next command opens a new one."""

    def __init__(self, redis: aioredis.Redis):
        self._pool = redis.connection_pool
        self._free: list = []

    async def command(self, *args):
        connection = self._free.pop() if self._free else self._pool.make_connection()
        try:
            await connection.connect()  # at once when connected
            await connection.send_command(*args)
            reply = await connection.read_response()
        except BaseException:
            await connection.disconnect(nowait=True)
            raise
        self._free.append(connection)
        return reply

    async def close(self) -> None:
        while self._free:
            await self._free.pop().disconnect()


class ResultCache:
    def __init__(self, redis: aioredis.Redis, ttl_seconds: int, breaker: CircuitBreaker | None = None):
        self.redis = redis
        self.connections = CommandConnections(redis)
        self.ttl = ttl_seconds
        self.breaker = breaker or CircuitBreaker()

    async def close(self) -> None:
        await self.connections.close()

    async def get(self, key: str, usable: Callable[[dict], bool] = lambda entry: True) -> dict | None:
        """The entry under ``key``, or None: none there (a miss), Redis out of reach, or an entry that is not a JSON
        object ``usable`` takes (damaged, or written under the same key by another release): that one is counted
        ``unreadable`` and treated as a miss, whose answer then replaces it."""
        if not self.breaker.allow():
            metrics.CACHE_OUTCOMES["bypass"].inc()
            return None
        try:
            raw = await self.connections.command("GET", key)
        except (aioredis.RedisError, OSError, asyncio.TimeoutError):
            self.breaker.failure()
            return None
        self.breaker.success()
        if raw is None:
            metrics.CACHE_OUTCOMES["miss"].inc()
            return None
        try:
            entry = json.loads(raw)
        except (ValueError, RecursionError):
            entry = None
        if not isinstance(entry, dict) or not usable(entry):
            metrics.CACHE_OUTCOMES["unreadable"].inc()
            log.warning("cache entry %s is not one this gateway can read: answered as a miss, then replaced", key)
            return None
        metrics.CACHE_OUTCOMES["hit"].inc()
        return entry

    async def put(self, key: str, value: dict) -> None:
        if not self.breaker.allow():
            return
        try:
            await self.connections.command("SET", key, json.dumps(value), "EX", self.ttl)
            self.breaker.success()
        except (aioredis.RedisError, OSError, asyncio.TimeoutError):
            self.breaker.failure()

