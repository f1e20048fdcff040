"""The Redis client of a service's state commands: a bounded pool whose commands wait for a free connection.

redis-py's own pool holds at most 100 connections and refuses a command beyond them at once ("Too many
connections"): a burst of requests that each touch Redis (feedback, status reads) was answered 503 past the
hundredth, with Redis healthy, and a background loop meeting the same refusal (the rollout controller renewing its
lease) failed with them. Here a command beyond ``connections`` waits for one up to ``wait_seconds``, then fails as
Redis out of reach does.
"""
from __future__ import annotations

import redis.asyncio as aioredis

STATE_CONNECTIONS = 64
STATE_WAIT_SECONDS = 5.0


def state_client(url: str, socket_timeout: float, connections: int = STATE_CONNECTIONS,
                 wait_seconds: float = STATE_WAIT_SECONDS) -> aioredis.Redis:
    """A client of ``url`` (its password, TLS and database included) whose every command, and every connect, has
    ``socket_timeout``."""
    return aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(
        url, max_connections=connections, timeout=wait_seconds, socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout))
