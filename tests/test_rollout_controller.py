"""The controller's state machine in process, against a real redis-server and stand-ins for the gateway and the model
server (its collaborators are passed in), for what the process tests cannot provoke on demand."""
from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from services.rollout import keys
from services.rollout.clients import ApiError
from services.rollout.controller import Controller
from services.rollout.policy import parse_policy
from tests.support import RedisServer


class FakeGateway:
    """Routing in memory; ``failures`` PUTs answer 503 first."""

    def __init__(self):
        self.table = {"weights": {}, "shadow": None}
        self.puts: list[tuple[dict, str]] = []
        self.failures = 0

    async def statuses(self):
        return [{"versions": {}}]

    async def routing(self):
        return self.table

    async def put_routing(self, table, note):
        if self.failures:
            self.failures -= 1
            raise ApiError(503, "the gateway is restarting")
        self.table = table
        self.puts.append((table, note))
        return table


class FakeModelServer:
    def __init__(self, available):
        self.versions = set(available)

    async def available(self):
        return set(self.versions)


@pytest.fixture()
def redis_server():
    with RedisServer() as server:
        yield server


def test_an_abort_whose_routing_change_fails_is_retried_not_lost(redis_server):
    policy = parse_policy({"tick_seconds": 1, "steps": [{"weight": 50, "hold_seconds": 3600}, {"weight": 100}]})

    async def scenario():
        client = aioredis.from_url(redis_server.url)
        gateway, model_server = FakeGateway(), FakeModelServer({1})
        controller = Controller(client, gateway, model_server, policy, "m", identity="unit")
        await controller.tick()  # adopts version 1, takes over the routing
        model_server.versions.add(2)
        await controller.tick()  # starts the rollout of version 2 at 50 %
        assert gateway.table["weights"] == {"1": 50, "2": 50}
        await controller.queue_command("abort", "alice")
        gateway.failures = 1
        with pytest.raises(ApiError):
            await controller.tick()  # the gateway refuses: the abort stays queued
        assert await client.llen(keys.commands("m")) == 1
        assert (await controller.load_state()).candidate == 2
        await controller.tick()  # applied now
        state = await controller.load_state()
        await client.aclose()
        return gateway, state

    gateway, state = asyncio.run(scenario())
    assert gateway.table["weights"] == {"1": 100} and state.candidate is None and state.rejected == [2]
    assert "rule operator_abort: aborted by alice" in gateway.puts[-1][1]
