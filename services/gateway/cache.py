"""The result cache in Redis: full model outputs keyed by photo sha256 + model + resolved version + preprocessing.

Top-k is applied by the caller after a hit, so one entry serves every ``top_k``. Identical concurrent misses share one
upstream call (single-flight, per process). Redis is optional at run time: every call has a short timeout, and after
``failure_threshold`` consecutive failures a circuit breaker skips Redis for ``open_seconds`` before one trial call.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from typing import Awaitable, Callable

from redis.asyncio import Redis

from training_job.preprocessing import PREPROCESSING_VERSION


@dataclass(frozen=True)
class CachedResult:
    version: int
    labels: list[str]
    probabilities: list[float]
    mushroom_score: float
    not_a_mushroom: bool


def cache_key(photo: bytes, model: str, version: int) -> str:
    return f"gw:result:{model}:{version}:{PREPROCESSING_VERSION}:{hashlib.sha256(photo).hexdigest()}"


class CircuitBreaker:
    def __init__(self, failure_threshold: int = 3, open_seconds: float = 2.0, clock=time.monotonic):
        self.failure_threshold = failure_threshold
        self.open_seconds = open_seconds
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None

    def allow(self) -> bool:
        """False while open; after open_seconds one trial call goes through (half-open)."""
        if self.opened_at is None:
            return True
        if self.clock() - self.opened_at >= self.open_seconds:
            self.opened_at = self.clock()  # one trial per window
            return True
        return False

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None

    def failure(self) -> None:
        self.failures += 1
        if self.failures >= self.failure_threshold:
            self.opened_at = self.clock()


class ResultCache:
    def __init__(self, redis: Redis, ttl_seconds: int = 3600, timeout_seconds: float = 0.05,
                 breaker: CircuitBreaker | None = None, on_outcome: Callable[[str], None] = lambda outcome: None):
        self.redis = redis
        self.ttl = ttl_seconds
        self.timeout = timeout_seconds
        self.breaker = breaker or CircuitBreaker()
        self.on_outcome = on_outcome  # "hit", "miss", "error", "bypass" (breaker open) -> metrics
        self._inflight: dict[str, asyncio.Future] = {}

    async def _call(self, make_call):
        if not self.breaker.allow():
            self.on_outcome("bypass")
            return None, False
        try:
            value = await asyncio.wait_for(make_call(), self.timeout)
        except Exception:  # noqa: BLE001 - timeout, refused connection, any Redis error: serve uncached
            self.breaker.failure()
            self.on_outcome("error")
            return None, False
        self.breaker.success()
        return value, True

    async def get(self, key: str) -> CachedResult | None:
        raw, ok = await self._call(lambda: self.redis.get(key))
        if not ok:
            return None
        if raw is None:
            self.on_outcome("miss")
            return None
        self.on_outcome("hit")
        return CachedResult(**json.loads(raw))

    async def put(self, key: str, result: CachedResult) -> None:
        await self._call(lambda: self.redis.set(key, json.dumps(asdict(result)), ex=self.ttl))

    async def get_or_compute(self, key: str, compute: Callable[[], Awaitable[CachedResult]]) -> tuple[CachedResult, bool]:
        """(result, cached). Concurrent callers with the same key wait for the first one's upstream call."""
        cached = await self.get(key)
        if cached is not None:
            return cached, True
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending), False
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await compute()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved when nobody else waits
            raise
        finally:
            self._inflight.pop(key, None)
        future.set_result(result)
        await self.put(key, result)
        return result, False
