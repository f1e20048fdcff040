"""The controller's state machine in process, against a real redis-server and stand-ins for the gateway and the model
server (its collaborators are passed in), for what the process tests cannot provoke on demand."""
from __future__ import annotations

import asyncio
import functools
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis.asyncio as aioredis

from devstack.configs import model_config_text, read_model_config
from services.gateway import keys as gateway_keys
from services.rollout import keys, metrics
from services.rollout.clients import ApiError
from services.rollout.controller import Controller, LeaseLost, StableUnavailable
from services.rollout.policy import parse_policy
from tests.support import RedisServer


class FakeGateway:
    """Routing in memory; ``failures`` PUTs and ``routing_failures`` GETs answer 503 first."""

    def __init__(self):
        self.table = {"weights": {}, "shadow": None}
        self.puts: list[tuple[dict, str]] = []
        self.failures = 0
        self.routing_failures = 0

    async def statuses(self):
        return {"http://gateway": {"versions": {}}}, {}

    async def routing(self):
        if self.routing_failures:
            self.routing_failures -= 1
            raise ApiError(503, "the gateway is restarting")
        return self.table

    async def put_routing(self, table, note, **fencing):  # lease, candidate, expected_generation: not checked
        if self.failures:
            self.failures -= 1
            raise ApiError(503, "the gateway is restarting")
        self.table = table
        self.puts.append((table, note))
        return table


class StandInReplicas:
    """Gateway replicas in process (aiohttp on free loopback ports) whose GET /v1/admin/status answers ``bodies[i]``,
    read by the controller's real GatewayAdmin; replica i answers 503 while ``i in failing``, and ``stop(i)`` makes it
    unreachable."""

    def __init__(self, bodies: list[dict]):
        self.bodies = bodies
        self.failing: set[int] = set()
        self.runners: list = []
        self.urls: list[str] = []

    async def start(self) -> "StandInReplicas":
        from aiohttp import web

        from tests.support import free_port

        for i in range(len(self.bodies)):
            async def status(request, i=i):
                if i in self.failing:
                    return web.json_response({"error": {"code": "redis_unavailable", "message": "down"}}, status=503)
                return web.json_response(self.bodies[i])

            app = web.Application()
            app.router.add_get("/v1/admin/status", status)
            runner = web.AppRunner(app)
            await runner.setup()
            port = free_port()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            self.runners.append(runner)
            self.urls.append(f"http://127.0.0.1:{port}")
        return self

    async def stop(self, i: int) -> None:
        await self.runners[i].cleanup()

    async def close(self) -> None:
        for runner in self.runners:
            await runner.cleanup()


class ReplicatedGateway(FakeGateway):
    """FakeGateway's routing; the figures of the stand-in replicas through a real GatewayAdmin."""

    def __init__(self, admin):
        super().__init__()
        self.admin = admin

    async def statuses(self):
        return await self.admin.statuses()


class InProcessGateway:
    """The gateway's own admin API (services/gateway/http_api.py: routing, audit and status over a real Router and
    Stats on the test's Redis) in process on a free loopback port, without a model server: ``available`` stands for
    the versions the version watcher would report."""

    OPERATOR_TOKEN = "alice-token-0123456789"  # the operator alice's; ``token`` is the controller's

    def __init__(self, redis_url: str, model: str, available: set[int], token: str = "controller-token"):
        self.redis_url, self.model, self.available, self.token = redis_url, model, available, token

    async def __aenter__(self) -> "InProcessGateway":
        from aiohttp import web

        from services.gateway.http_api import HttpApi
        from services.gateway.operators import OperatorTokens
        from services.gateway.routing import Router
        from services.gateway.stats import Stats
        from tests.support import free_port

        self.client = aioredis.from_url(self.redis_url)
        self.router = Router(self.client, self.model)
        self.router.available = self.available
        self.stats = Stats(self.client, self.model)
        self.folder = tempfile.TemporaryDirectory()
        tokens = Path(self.folder.name) / "operators"
        tokens.write_text(f"rollout-controller:{self.token}\nalice:{self.OPERATOR_TOKEN}\n")
        api = HttpApi(None, self.router, self.stats, None, OperatorTokens(tokens), max_body=1024,
                      ready=lambda: (True, "ok"))
        self.runner = web.AppRunner(api.app())
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()
        await self.client.aclose()
        self.folder.cleanup()

    async def put_by_operator(self, session, table: dict) -> dict:
        """alice's PUT /v1/admin/routing, as the CLI or the web panel sends it (no lease token)."""
        async with session.put(f"{self.url}/v1/admin/routing", json=table,
                               headers={"Authorization": f"Bearer {self.OPERATOR_TOKEN}"}) as response:
            assert response.status == 200, await response.text()
            return await response.json()

    async def table(self) -> dict:
        raw = await self.client.get(gateway_keys.routing(self.model))
        return json.loads(raw)["weights"] if raw else {}


async def serve(app) -> tuple:
    """``app`` (an aiohttp Application) served on a free loopback port: (its runner, its URL)."""
    from aiohttp import web

    from tests.support import free_port

    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def served(requests: int, errors: int) -> dict:
    """A version's row of GET /v1/admin/status."""
    return {"requests": requests, "error_rate": errors / requests if requests else 0.0}


class FakeModelServer:
    """``versions`` AVAILABLE, and ``others`` {version: state} listed beside them (LOADING, END ...)."""

    def __init__(self, available, others: dict[int, str] | None = None):
        self.versions = set(available)
        self.others = dict(others or {})

    async def listed(self):
        return {**self.others, **{v: "AVAILABLE" for v in self.versions}}


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


def test_an_idle_controller_retires_versions_nothing_routes_to_from_the_specific_list(redis_server, tmp_path):
    """A nightly retrain publishes a version a day: the model server's list stays the newest two and the stable
    version (rejected versions included) instead of growing with every publish."""
    from services.rollout.serving_config import retire_versions, serve_new_versions

    policy = parse_policy({"tick_seconds": 1, "steps": [{"weight": 50, "hold_seconds": 3600}, {"weight": 100}]})
    base = tmp_path / "registry" / "m"
    (base / "1").mkdir(parents=True)
    config = tmp_path / "models.config"
    config.write_text(model_config_text("m", base, [1]))

    def listed() -> list[int]:
        return read_model_config(config)[2]

    async def scenario():
        client = aioredis.from_url(redis_server.url)
        gateway, model_server = FakeGateway(), FakeModelServer({1})
        controller = Controller(client, gateway, model_server, policy, "m", identity="unit",
                                serve_new_versions=functools.partial(serve_new_versions, config, "m"),
                                retire_versions=functools.partial(retire_versions, config, "m"))

        async def publish_and_start(version: int) -> None:
            (base / str(version)).mkdir()
            await controller.tick()  # lists it (and, idle, retires what the new one pushed out of the newest two)
            model_server.versions = set(listed())  # the model server loads what is listed, unloads the rest
            await controller.tick()  # starts its rollout at 50 %
            assert (await controller.load_state()).candidate == version

        await controller.tick()  # adopts version 1
        for version in range(2, 6):
            await publish_and_start(version)
            assert listed() == [version - 1, version]
            await controller.queue_command("promote", "alice")
            await controller.tick()
            assert listed() == [version - 1, version]
        gateway.routing_failures = 1
        (base / "6").mkdir()
        await controller.tick()  # lists 6, idle, but the routing is unreadable: nothing is removed
        assert listed() == [4, 5, 6]
        retired_before = metrics.RETIRED_VERSIONS._value.get()
        await controller.tick()
        assert listed() == [5, 6] and metrics.RETIRED_VERSIONS._value.get() == retired_before + 1
        model_server.versions = set(listed())
        await controller.tick()  # starts the rollout of 6
        config.write_text(model_config_text("m", base, [2, 5, 6]))  # an operator lists version 2 again by hand
        await controller.tick()
        assert listed() == [2, 5, 6]  # a rollout is in progress: nothing leaves the list
        await controller.queue_command("abort", "alice")
        await controller.tick()  # rolled back, idle: 2 has no route and no label
        assert (await controller.load_state()).rejected == [6] and listed() == [5, 6]
        for version in (7, 8):
            await publish_and_start(version)
            await controller.queue_command("promote", "alice")
            await controller.tick()
        history = await controller.history(limit=100)
        await client.aclose()
        return history

    history = asyncio.run(scenario())
    assert listed() == [7, 8]  # the rejected version 6 went too, once two newer ones were published
    retired = [e["retired"] for e in reversed(history) if e["outcome"] == "retire"]
    assert retired == [[1], [2], [3], [4], [2], [5], [6]]
    assert all(e["stable"] is not None and e["version"] is None for e in history if e["outcome"] == "retire")


def test_a_candidate_not_available_for_a_moment_holds_and_rolls_back_only_after_the_grace(redis_server):
    """Kubernetes runs two TF Serving replicas behind one Service, which load a new version at different times: one
    reading of "not AVAILABLE" must not reject the version for good. The rollout holds meanwhile and rolls back only
    once every reading for the policy's candidate_unavailable_seconds said so."""
    policy = parse_policy({"tick_seconds": 1, "steps": [{"weight": 50, "hold_seconds": 0}, {"weight": 100}]})
    now = [1000.0]

    async def scenario():
        client = aioredis.from_url(redis_server.url)
        gateway, model_server = FakeGateway(), FakeModelServer({1})
        controller = Controller(client, gateway, model_server, policy, "m", identity="unit", clock=lambda: now[0])
        await controller.tick()  # adopts version 1
        model_server.versions.add(2)
        await controller.tick()  # starts the rollout of version 2 at 50 %
        model_server.versions = {1}  # answered by the replica that has not loaded version 2 yet
        await controller.tick()
        state = await controller.load_state()
        assert (state.candidate, state.rejected, state.step) == (2, [], 0)
        assert gateway.table["weights"] == {"1": 50, "2": 50}  # held: neither rolled back nor advanced
        assert "not AVAILABLE" in state.judgement["reason"]
        now[0] += 60
        model_server.versions = {1, 2}
        await controller.tick()  # AVAILABLE again: the grace starts again at the next absence; it advances
        assert (await controller.load_state()).step == 1
        grace = policy.candidate_unavailable_seconds
        model_server.versions = {1}
        await controller.tick()
        now[0] += grace - 1
        await controller.tick()
        assert (await controller.load_state()).candidate == 2
        now[0] += 1
        await controller.tick()
        state = await controller.load_state()
        history = await controller.history()
        await client.aclose()
        return gateway, state, history

    gateway, state, history = asyncio.run(scenario())
    assert state.candidate is None and state.rejected == [2] and gateway.table["weights"] == {"1": 100}
    assert history[0]["rule"] == "candidate_unavailable" and "for 180 s" in history[0]["reason"]


def test_an_operator_retries_a_rejected_version_through_the_cli_and_the_gateways_proxy(redis_server, capsys):
    """`operator_cli rollout retry 2` goes through the gateway's rollout proxy (audited there) to the controller's API
    and its command queue; the next tick clears version 2 from ``rejected`` (a history event naming the operator),
    and, being the newest AVAILABLE version, it starts again."""
    from aiohttp import web

    from services.gateway.operator_cli import main as operator_cli
    from services.gateway.operators import OperatorTokens
    from services.gateway.rollout_proxy import RolloutProxy
    from services.gateway.routing import Router
    from services.rollout.http_api import RolloutApi

    policy = parse_policy({"tick_seconds": 1, "steps": [{"weight": 50, "hold_seconds": 3600}, {"weight": 100}]})

    async def scenario():
        client = aioredis.from_url(redis_server.url)
        gateway, model_server = FakeGateway(), FakeModelServer({1})
        controller = Controller(client, gateway, model_server, policy, "m", identity="unit")
        await controller.tick()  # adopts version 1
        model_server.versions.add(2)
        await controller.tick()  # starts version 2
        await controller.queue_command("abort", "alice")
        await controller.tick()
        assert (await controller.load_state()).rejected == [2]
        api, api_url = await serve(RolloutApi(controller, OperatorTokens(None, "the-admin-token")).app())
        router = Router(client, "m")
        proxy_app = web.Application()
        RolloutProxy(api_url).add_routes(proxy_app, authorise=lambda request, write: "admin", audit=router)
        proxy, proxy_url = await serve(proxy_app)
        try:
            for argv in (["rollout", "retry", "2"], ["rollout", "retry", "7"]):
                await asyncio.to_thread(operator_cli, ["--url", proxy_url, "--token", "the-admin-token", *argv])
                assert "queued retry of v" in capsys.readouterr().out
            await controller.tick()
            state = await controller.load_state()
            history = await controller.history()
            audited = await router.audit()
        finally:
            await proxy.cleanup()
            await api.cleanup()
            await client.aclose()
        return gateway, state, history, audited

    gateway, state, history, audited = asyncio.run(scenario())
    assert state.rejected == [] and state.candidate == 2 and gateway.table["weights"] == {"1": 50, "2": 50}
    outcomes = [(e["outcome"], e["who"], e.get("version")) for e in reversed(history[:3])]
    assert outcomes == [("retry", "admin", 2), ("ignored", "admin", 7), ("start", "unit", 2)]
    assert "v2 removed from the rejected versions by admin" in history[2]["reason"]
    assert [(e["action"], e["status"], e["answer"]["queued"]["version"]) for e in reversed(audited)] == [
        ("rollout retry", 202, 2), ("rollout retry", 202, 7)]


def test_a_restarted_gateway_replica_counts_from_zero_and_the_others_from_their_baselines(redis_server):
    """Each replica counts per process, and its status names the process (``instance``). Before the rollout each of
    the two replicas served v1 5,000 requests with an old incident's 250 errors; replica B then restarts. Its counts
    start again from zero, and only its own: replica A's pre-rollout counts must not come back into the stable
    version's figures (they would hide v2's 4 % errors behind the stable version's old 4.9 %)."""
    import aiohttp

    from services.rollout.clients import GatewayAdmin

    policy = parse_policy({"tick_seconds": 1, "steps": [{"weight": 50, "hold_seconds": 3600}, {"weight": 100}]})
    before = {"versions": {"1": served(5000, 250)}}
    replicas = StandInReplicas([{**before, "instance": {"id": "a-1", "started": 1.0}},
                                {**before, "instance": {"id": "b-1", "started": 1.0}}])

    async def scenario():
        await replicas.start()
        session = aiohttp.ClientSession()
        client = aioredis.from_url(redis_server.url)
        try:
            admin = GatewayAdmin(session, replicas.urls[0], "token", replicas.urls, timeout=5)
            gateway, model_server = ReplicatedGateway(admin), FakeModelServer({1})
            controller = Controller(client, gateway, model_server, policy, "m", identity="unit")
            await controller.tick()  # adopts version 1
            model_server.versions.add(2)
            await controller.tick()  # starts version 2: the baselines
            replicas.bodies[0] = {"versions": {"1": served(6500, 250), "2": served(1500, 60)},
                                  "instance": {"id": "a-1", "started": 1.0}}
            replicas.bodies[1] = {"versions": {"1": served(20, 0), "2": served(3, 0)},  # restarted
                                  "instance": {"id": "b-2", "started": 2.0}}
            await controller.tick()
            return await controller.load_state(), await controller.history()
        finally:
            await client.aclose()
            await session.close()
            await replicas.close()

    state, history = asyncio.run(scenario())
    assert (state.candidate, state.rejected) == (None, [2])
    assert history[0]["rule"] == "error_rate" and "stable 0.00%" in history[0]["reason"]


def test_a_controller_that_lost_its_lease_cannot_change_the_routing(redis_server):
    """Controller a holds the lease, then its routing change is delayed past the lease (a paused process, a slow
    network); b takes the lease over, starts the rollout itself and an operator aborts it. a's late change must be
    refused by the gateway (the lease it was sent under is no longer held), not undo the abort."""
    import aiohttp

    from services.rollout.clients import GatewayAdmin

    policy = parse_policy({"tick_seconds": 1, "steps": [{"weight": 5, "hold_seconds": 600}, {"weight": 100}]})

    class DelayedAdmin(GatewayAdmin):
        delay = 0.0

        async def put_routing(self, *args, **kwargs):
            await asyncio.sleep(self.delay)
            return await super().put_routing(*args, **kwargs)

    async def scenario():
        client = aioredis.from_url(redis_server.url)
        session = aiohttp.ClientSession()
        async with InProcessGateway(redis_server.url, "m", {1}) as gateway:
            admins = [DelayedAdmin(session, gateway.url, gateway.token, timeout=10) for _ in range(2)]
            model_server = FakeModelServer({1})
            a = Controller(client, admins[0], model_server, policy, "m", identity="a", lease_seconds=1.0)
            b = Controller(client, admins[1], model_server, policy, "m", identity="b", lease_seconds=1.0)
            await a.tick()  # adopts version 1
            gateway.available.add(2)
            model_server.versions.add(2)
            admins[0].delay = 2.5
            a_tick = asyncio.create_task(a.tick())  # a starts v2: its routing change is on its way
            await asyncio.sleep(1.5)  # a's lease expires meanwhile
            await b.tick()  # b takes the lease over and starts v2 itself
            await b.queue_command("abort", "alice")
            await b.tick()  # {1: 100}, v2 rejected
            with pytest.raises(LeaseLost):
                await a_tick
            table = await gateway.table()
            await gateway.put_by_operator(session, {"weights": {"1": 100}})  # no lease token: always applied
            state = await b.load_state()
            audit = await gateway.router.audit()
        await session.close()
        await client.aclose()
        return table, state, audit

    table, state, audit = asyncio.run(scenario())
    assert state.rejected == [2] and table == {"1": 100.0}
    assert [e["new"]["weights"] for e in reversed(audit)] == [{"1": 100.0}, {"1": 95.0, "2": 5.0}, {"1": 100.0},
                                                               {"1": 100.0}]


def after_a_lost_state(redis_url: str, before) -> tuple:
    """A controller adopts version 1, ``await before(controller, gateway, model_server)`` plays what happened next,
    the controller lets go of the lease, model "m"'s saved state is deleted, and a second controller ticks once:
    (gateway, its state, its history). Policy: 5 % held 600 s, then 100 %."""
    policy = parse_policy({"tick_seconds": 1, "steps": [{"weight": 5, "hold_seconds": 600}, {"weight": 100}]})

    async def scenario():
        client = aioredis.from_url(redis_url)
        gateway, model_server = FakeGateway(), FakeModelServer({1})
        first = Controller(client, gateway, model_server, policy, "m", identity="first")
        await first.tick()  # adopts version 1
        await before(first, gateway, model_server)
        await first.release_lease()
        await client.delete(keys.state("m"))
        second = Controller(client, gateway, model_server, policy, "m", identity="second")
        await second.tick()
        state, history = await second.load_state(), await second.history()
        await client.aclose()
        return gateway, state, history

    return asyncio.run(scenario())


def test_a_lost_state_mid_canary_keeps_the_larger_share_as_stable_and_says_so(redis_server):
    """The state is gone (Redis restarted without its last second) while v2 serves 5 %: the controller must not take
    the canary for the stable version (promoting it to 100 % at once). The table's largest weight is the stable
    version, the history says the state was lost, and v2's rollout starts again from its first step."""
    async def canary(first, gateway, model_server):
        model_server.versions.add(2)
        await first.tick()  # v2 at 5 %
        assert gateway.table["weights"] == {"1": 95, "2": 5}

    gateway, state, history = after_a_lost_state(redis_server.url, canary)
    assert (state.stable, state.candidate, state.step) == (1, 2, 0)
    assert gateway.table["weights"] == {"1": 95, "2": 5} and {"2": 100} not in [t["weights"] for t, _ in gateway.puts]
    adopt = [e for e in history if e["outcome"] == "adopt"][0]
    assert adopt["state_lost"] is True and adopt["stable"] == 1 and "state lost" in adopt["reason"]


def test_a_lost_state_keeps_the_rejections_the_history_shows(redis_server):
    """v2 was rolled back, v3 rolled back then retried by an operator; the state is gone: the controller that adopts
    must not roll v2 out again (its users were protected from it once), and v3 stays free to go."""
    async def two_rollbacks_and_a_retry(first, gateway, model_server):
        for version in (2, 3):
            model_server.versions.add(version)
            await first.tick()  # the version at 5 %
            await first.queue_command("abort", "alice")
            await first.tick()  # rolled back: rejected
        await first.queue_command("retry", "alice", version=3)
        model_server.versions.discard(3)  # unloaded meanwhile: nothing starts it before the state is lost
        await first.tick()
        assert (await first.load_state()).rejected == [2]

    gateway, state, history = after_a_lost_state(redis_server.url, two_rollbacks_and_a_retry)
    assert state.rejected == [2] and state.candidate is None and gateway.table["weights"] == {"1": 100}
    adopt = [e for e in history if e["outcome"] == "adopt"][0]
    assert adopt["state_lost"] is True and "the rejected versions are those the history shows (v2)" in adopt["reason"]


def replicated(replicas: StandInReplicas, session) -> ReplicatedGateway:
    from services.rollout.clients import GatewayAdmin

    return ReplicatedGateway(GatewayAdmin(session, replicas.urls[0], "token", replicas.urls, timeout=5))


def test_an_unreachable_status_replica_holds_an_advance_and_blocks_no_operator_command(redis_server):
    """One of two gateway replicas stops answering its status: the rollout is judged on the replica that answers,
    marked partial, so it does not advance; an operator's abort is applied all the same (it needs no figures)."""
    import aiohttp

    policy = parse_policy({"tick_seconds": 1, "steps": [{"weight": 50, "hold_seconds": 0, "min_requests": 10},
                                                         {"weight": 100}]})
    replicas = StandInReplicas([{"versions": {"1": served(100, 0)}}, {"versions": {"1": served(100, 0)}}])

    async def scenario():
        await replicas.start()
        session = aiohttp.ClientSession()
        client = aioredis.from_url(redis_server.url)
        try:
            gateway, model_server = replicated(replicas, session), FakeModelServer({1})
            controller = Controller(client, gateway, model_server, policy, "m", identity="unit")
            await controller.tick()  # adopts version 1
            model_server.versions.add(2)
            await controller.tick()  # starts v2 at 50 %
            await replicas.stop(1)
            replicas.bodies[0] = {"versions": {"1": served(300, 0), "2": served(200, 0)}}
            await controller.tick()  # would advance (held 0 s, 200 of 10 requests), but replica 1 did not answer
            held = await controller.load_state()
            await controller.queue_command("abort", "alice")
            await controller.tick()
            return held, await controller.load_state(), gateway.table
        finally:
            await client.aclose()
            await session.close()
            await replicas.close()

    held, state, table = asyncio.run(scenario())
    assert (held.candidate, held.step) == (2, 0)
    assert held.judgement["partial"] == [replicas.urls[1]] and "partial" in held.judgement["reason"]
    assert (state.candidate, state.rejected, table["weights"]) == (None, [2], {"1": 100})


def test_a_breach_on_the_replicas_that_answered_rolls_back(redis_server):
    import aiohttp

    policy = parse_policy({"tick_seconds": 1, "steps": [{"weight": 50, "hold_seconds": 600}, {"weight": 100}]})
    replicas = StandInReplicas([{"versions": {"1": served(100, 0)}}, {"versions": {"1": served(100, 0)}}])

    async def scenario():
        await replicas.start()
        session = aiohttp.ClientSession()
        client = aioredis.from_url(redis_server.url)
        try:
            gateway, model_server = replicated(replicas, session), FakeModelServer({1})
            controller = Controller(client, gateway, model_server, policy, "m", identity="unit")
            await controller.tick()
            model_server.versions.add(2)
            await controller.tick()  # starts v2 at 50 %
            replicas.failing.add(1)
            replicas.bodies[0] = {"versions": {"1": served(300, 0), "2": served(200, 100)}}  # v2 fails half
            await controller.tick()
            return await controller.load_state(), await controller.history(), gateway.table
        finally:
            await client.aclose()
            await session.close()
            await replicas.close()

    state, history, table = asyncio.run(scenario())
    assert (state.candidate, state.rejected, table["weights"]) == (None, [2], {"1": 100})
    assert history[0]["rule"] == "error_rate" and history[0]["partial"] == [replicas.urls[1]]


def test_an_operators_table_during_a_rollout_pauses_it_and_is_kept_until_resumed(redis_server):
    """An operator takes v2 out by hand ({1: 100}) while it serves 5 %: the controller must not put its next step
    over the operator's table. It pauses the rollout, records an operator override naming her, and leaves the table
    alone until she resumes (the step's table comes back) or aborts; the PUT's answer says so."""
    import aiohttp

    from services.rollout.clients import GatewayAdmin

    policy = parse_policy({"tick_seconds": 1, "steps": [{"weight": 5, "hold_seconds": 600, "min_requests": 10},
                                                         {"weight": 50, "hold_seconds": 600}, {"weight": 100}]})
    now = [1000.0]

    async def scenario():
        client = aioredis.from_url(redis_server.url)
        session = aiohttp.ClientSession()
        async with InProcessGateway(redis_server.url, "m", {1, 2}) as gateway:
            admin = GatewayAdmin(session, gateway.url, gateway.token, timeout=10)
            model_server = FakeModelServer({1})
            controller = Controller(client, admin, model_server, policy, "m", identity="unit", clock=lambda: now[0])
            await controller.tick()  # adopts version 1
            model_server.versions.add(2)
            await controller.tick()  # v2 at 5 %
            answer = await gateway.put_by_operator(session, {"weights": {"1": 100}})
            for _ in range(20):
                gateway.stats.record(2, 0.01, cached=False)  # v2 answered enough, and the step held: it would advance
            now[0] += 601
            await controller.tick()
            overridden = (await gateway.table(), await controller.load_state())
            await controller.tick()
            still = await gateway.table()
            await controller.queue_command("resume", "alice")
            await controller.tick()
            resumed = await gateway.table()
            history = await controller.history()
            audit = await gateway.router.audit()
        await session.close()
        await client.aclose()
        return answer, overridden, still, resumed, history, audit

    answer, (table, state), still, resumed, history, audit = asyncio.run(scenario())
    assert table == still == {"1": 100.0}
    assert state.paused and state.step == 0 and state.override["weights"] == {"1": 100.0}
    assert resumed == {"1": 50.0, "2": 50.0}  # the step's table again, then (held long enough) the next step
    override = [e for e in history if e["outcome"] == "override"][0]
    assert override["who"] == "alice" and override["table"]["weights"] == {"1": 100.0}
    assert "operator override" in override["reason"]
    assert answer["rollout"]["candidate"] == 2 and "paused" in answer["rollout"]["message"]
    assert audit[-3]["who"] == "alice" and audit[-3]["rollout"]["candidate"] == 2  # her change, and what it overrode
    assert audit[1]["note"].startswith("rollout: resume v2") and audit[1]["new"]["weights"] == {"1": 95.0, "2": 5.0}
    assert audit[0]["note"].startswith("rollout: advance v2")


def test_the_controller_takes_its_rotated_gateway_token_without_a_restart(redis_server, tmp_path):
    """In Kubernetes the controller reads its token from the gateway-operators Secret the gateway reads: when an
    operator rotates it, both files change under the running processes, and the controller's next change is
    accepted. A token file that no longer reads keeps the token read before."""
    import os

    import aiohttp

    from services.rollout.clients import GatewayAdmin
    from services.rollout.main import gateway_token

    def replace(path: Path, text: str) -> None:  # a new file in its place, as the kubelet swaps a Secret's files
        (path.parent / f"{path.name}.new").write_text(text)
        os.replace(path.parent / f"{path.name}.new", path)

    token_file = tmp_path / "rollout-controller"
    token_file.write_text("controller-token\n")

    async def scenario():
        session = aiohttp.ClientSession()
        async with InProcessGateway(redis_server.url, "m", {1, 2}) as gateway:
            admin = GatewayAdmin(session, gateway.url, gateway_token(
                SimpleNamespace(gateway_token="", gateway_token_file=str(token_file))), timeout=10)
            await admin.put_routing({"weights": {"1": 100}, "shadow": None}, "before the rotation")
            replace(Path(gateway.folder.name) / "operators",
                    f"rollout-controller:rotated-controller-token\nalice:{gateway.OPERATOR_TOKEN}\n")
            replace(token_file, "rotated-controller-token\n")
            await admin.put_routing({"weights": {"2": 100}, "shadow": None}, "after the rotation")
            replace(token_file, "\n")
            await admin.put_routing({"weights": {"1": 50, "2": 50}, "shadow": None}, "after a bad change")
            table = await gateway.table()
        await session.close()
        return table

    assert asyncio.run(scenario()) == {"1": 50.0, "2": 50.0}
    with pytest.raises(ValueError, match="holds no token"):
        gateway_token(SimpleNamespace(gateway_token="", gateway_token_file=str(token_file)))


def test_an_operators_change_between_the_controllers_read_and_its_write_is_not_undone(redis_server):
    """The controller read the table, then an operator changes it before the controller's next step lands: the
    gateway refuses the controller's change (it names the generation it read), and the next tick sees the
    operator's table as an override."""
    import aiohttp

    from services.rollout.clients import GatewayAdmin

    policy = parse_policy({"tick_seconds": 1, "steps": [{"weight": 5, "hold_seconds": 0}, {"weight": 100}]})

    class OvertakenAdmin(GatewayAdmin):
        before_put = None  # a coroutine function run before the next PUT is sent

        async def put_routing(self, *args, **kwargs):
            if self.before_put is not None:
                before, self.before_put = self.before_put, None
                await before()
            return await super().put_routing(*args, **kwargs)

    async def scenario():
        client = aioredis.from_url(redis_server.url)
        session = aiohttp.ClientSession()
        async with InProcessGateway(redis_server.url, "m", {1, 2}) as gateway:
            admin = OvertakenAdmin(session, gateway.url, gateway.token, timeout=10)
            model_server = FakeModelServer({1})
            controller = Controller(client, admin, model_server, policy, "m", identity="unit")
            await controller.tick()  # adopts version 1
            model_server.versions.add(2)
            await controller.tick()  # v2 at 5 %
            admin.before_put = lambda: gateway.put_by_operator(session, {"weights": {"1": 100}})
            await controller.tick()  # would advance to 100 %: the operator's change lands first
            table = await gateway.table()
            await controller.tick()
            state = await controller.load_state()
        await session.close()
        await client.aclose()
        return table, state

    table, state = asyncio.run(scenario())
    assert table == {"1": 100.0}
    assert state.paused and state.step == 0 and state.override["weights"] == {"1": 100.0}


def test_operators_commands_are_applied_while_the_stable_version_is_unloaded(redis_server):
    """The stable version v1 is unloaded mid-rollout (the gateway already sends everything to v2): the controller can
    neither judge nor roll back, but an operator's commands still apply: pause is recorded, an abort (nothing to roll
    back to) is refused in the history, and a promote makes v2 the stable version."""
    policy = parse_policy({"tick_seconds": 1, "steps": [{"weight": 5, "hold_seconds": 600}, {"weight": 100}]})

    async def scenario():
        client = aioredis.from_url(redis_server.url)
        gateway, model_server = FakeGateway(), FakeModelServer({1})
        controller = Controller(client, gateway, model_server, policy, "m", identity="unit")
        await controller.tick()  # adopts version 1
        model_server.versions.add(2)
        await controller.tick()  # v2 at 5 %
        model_server.versions = {2}
        await controller.queue_command("pause", "alice")
        await controller.queue_command("abort", "bob")
        with pytest.raises(StableUnavailable):
            await controller.tick()
        paused = await controller.load_state()
        await controller.queue_command("promote", "carol")
        await controller.tick()
        state, history = await controller.load_state(), await controller.history()
        queued = await client.llen(keys.commands("m"))
        await client.aclose()
        return gateway, paused, state, history, queued

    gateway, paused, state, history, queued = asyncio.run(scenario())
    assert paused.paused and paused.candidate == 2
    assert (state.stable, state.candidate, queued) == (2, None, 0) and gateway.table["weights"] == {"2": 100}
    assert [(e["outcome"], e["who"]) for e in reversed(history[:3])] == [
        ("pause", "alice"), ("ignored", "bob"), ("promote", "carol")]
    assert "v1 is not AVAILABLE" in history[1]["reason"]


def test_hold_timers_run_on_redis_time_not_on_the_clock_of_the_controllers_host(redis_server):
    """Controller a starts a rollout whose first step holds 600 s; b takes over at once from a host whose clock is an
    hour ahead (a separate process whose time.time() says so). The step must not count as held for an hour: the
    timers are read from Redis TIME, the one clock every controller replica shares."""
    import subprocess
    import sys

    from training_job.paths import PROJECT_ROOT

    policy = {"tick_seconds": 1, "steps": [{"weight": 5, "hold_seconds": 600}, {"weight": 100}]}
    b_on_a_fast_host = f"""
import asyncio, time
real = time.time
time.time = lambda: real() + 3600  # this host's clock is an hour ahead
import redis.asyncio as aioredis
from services.rollout.controller import Controller
from services.rollout.policy import parse_policy
from tests.test_rollout_controller import FakeGateway, FakeModelServer

async def main():
    client = aioredis.from_url({redis_server.url!r})
    gateway = FakeGateway()
    gateway.table = {{"weights": {{"1": 95, "2": 5}}, "shadow": None}}  # the table a routed
    b = Controller(client, gateway, FakeModelServer({{1, 2}}), parse_policy({policy!r}), "m", identity="b")
    await b.tick()
    await client.aclose()

asyncio.run(main())
"""

    async def scenario():
        client = aioredis.from_url(redis_server.url)
        gateway, model_server = FakeGateway(), FakeModelServer({1})
        a = Controller(client, gateway, model_server, parse_policy(policy), "m", identity="a")
        await a.tick()  # adopts version 1
        model_server.versions.add(2)
        await a.tick()  # v2 at 5 %: the step's 600 s begin
        assert gateway.table["weights"] == {"1": 95, "2": 5}
        await a.release_lease()
        done = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", b_on_a_fast_host], cwd=PROJECT_ROOT,
                                       capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        state = await a.load_state()
        await client.aclose()
        return state

    state = asyncio.run(scenario())
    assert (state.candidate, state.step) == (2, 0)
    assert state.judgement["held_seconds"] < 60


async def stable_v3(redis_url: str):
    """(Redis client, gateway, model server, controller): a controller that adopted v3, the one AVAILABLE version, as
    stable under a two-step policy."""
    policy = parse_policy({"tick_seconds": 1, "steps": [{"weight": 5, "hold_seconds": 600}, {"weight": 100}]})
    client = aioredis.from_url(redis_url)
    gateway, model_server = FakeGateway(), FakeModelServer({3})
    controller = Controller(client, gateway, model_server, policy, "m", identity="unit")
    await controller.tick()
    return client, gateway, model_server, controller


async def starting_over(redis_url: str, available: set[int], others: dict[int, str], published: int):
    """A controller whose stable v3 and rejected v4 are gone from under it: the model server then lists
    ``available`` AVAILABLE and ``others`` beside them. Its state and routed table after a tick; after ``published``
    is AVAILABLE too and another tick; the rejections a state lost then is rebuilt with; the history."""
    client, gateway, model_server, controller = await stable_v3(redis_url)
    state = await controller.load_state()
    state.rejected = [4]
    await controller.save_state(state)
    model_server.versions, model_server.others = set(available), dict(others)
    await controller.tick()
    started_over, table = await controller.load_state(), dict(gateway.table["weights"])
    model_server.versions.add(published)
    await controller.tick()
    rolling, rolling_table = await controller.load_state(), dict(gateway.table["weights"])
    await client.delete(keys.state("m"))  # a state lost afterwards
    lost = await controller._rejected_in_history()
    history = await controller.history()
    await client.aclose()
    return SimpleNamespace(started_over=started_over, table=table, rolling=rolling, rolling_table=rolling_table,
                           lost=lost, renumbered=next(e for e in history if e["outcome"] == "renumbered"))


def test_version_numbers_that_started_again_start_the_rollouts_over(redis_server):
    """A registry removed and published anew (the model server restarted on it) numbers from 1 again: the state's
    stable v3 and rejected v4 name models that are gone. The controller takes the newest AVAILABLE version as stable,
    routes it alone, says so in the history, and rolls out the next new version 2 (the old v4's rejection does not
    carry over, nor into a state lost afterwards)."""
    run = asyncio.run(starting_over(redis_server.url, {1}, {}, published=2))
    assert (run.started_over.stable, run.started_over.candidate, run.started_over.rejected) == (1, None, [])
    assert run.table == {"1": 100}
    assert (run.rolling.stable, run.rolling.candidate) == (1, 2)
    assert run.lost == []
    assert run.renumbered["dropped"]["stable"] == 3 and run.renumbered["dropped"]["rejected"] == [4]
    assert "no version from the stable v3 up" in run.renumbered["reason"]


def test_a_stable_version_unloaded_with_nothing_from_it_up_starts_the_rollouts_over(redis_server):
    """A registry removed and published anew while the model server runs: it unloads the old versions and keeps
    listing them in END (TF Serving does until it restarts) beside the new v1. Nothing from the stable v3 up will be
    served again, so the controller starts over from v1, as after a restart, instead of failing every tick while its
    old table's numbers name the versions published anew: a v2 published next is rolled out step by step."""
    run = asyncio.run(starting_over(redis_server.url, {1}, {3: "END", 4: "END"}, published=2))
    assert (run.started_over.stable, run.started_over.candidate, run.started_over.rejected) == (1, None, [])
    assert run.table == {"1": 100}
    assert (run.rolling.stable, run.rolling.candidate) == (1, 2) and run.rolling_table == {"1": 95, "2": 5}
    assert run.renumbered["dropped"]["stable"] == 3 and run.renumbered["dropped"]["rejected"] == [4]
    assert "v3 END" in run.renumbered["reason"] and "unloaded" in run.renumbered["reason"]


def test_a_stable_version_removed_below_a_rejected_one_starts_over_and_keeps_it_rejected(redis_server):
    """The stable v3's folder removed while v4, which a rollout rejected, is still loaded beside the older v2: v4
    will never be routed, so nothing from v3 up will be served; the controller starts over from v2 (not from v4, the
    newest) and v4 stays rejected, in the state and for a state lost later. Before, every tick failed, for good: a
    restart of the model server would still list v4."""
    run = asyncio.run(starting_over(redis_server.url, {2, 4}, {3: "END"}, published=5))
    assert (run.started_over.stable, run.started_over.candidate, run.started_over.rejected) == (2, None, [4])
    assert run.table == {"2": 100}
    assert (run.rolling.stable, run.rolling.candidate) == (2, 5)
    assert run.lost == [4]
    assert "v4 stays rejected" in run.renumbered["reason"]


@pytest.mark.parametrize("others", [{3: "LOADING", 4: "START"}, {3: "END", 4: "LOADING"}, {3: "UNLOADING"}],
                         ids=["still_loading", "newer_loading", "stable_unloading"])
def test_a_model_server_that_will_serve_a_version_from_the_stable_up_is_no_renumbering(redis_server, others):
    """Restarted and still loading (v3 listed LOADING while v1 is AVAILABLE), the stable v3 unloaded while a newer v4
    loads (a `latest` policy), or v3 still unloading: the state stays; with v3 not AVAILABLE the controller says so
    and starts nothing."""
    async def scenario():
        client, gateway, model_server, controller = await stable_v3(redis_server.url)
        model_server.versions, model_server.others = {1}, others
        with pytest.raises(StableUnavailable):
            await controller.tick()
        state, history = await controller.load_state(), await controller.history()
        await client.aclose()
        return state, history

    state, history = asyncio.run(scenario())
    assert (state.stable, state.candidate) == (3, None)
    assert not any(e["outcome"] == "renumbered" for e in history)


def test_every_answer_of_the_rollout_api_and_the_gateways_proxy_is_json():
    """aiohttp's own 404 and 413 and an unhandled exception's 500 are plain text; the controller answers them as
    JSON errors as it answers its own. A controller's address that answers something else (an ingress's HTML page
    when no controller is behind it) reaches the operator through the gateway's proxy as a JSON error too."""
    import aiohttp
    from aiohttp import web

    from services.gateway.http_api import errors_as_json
    from services.gateway.operators import OperatorTokens
    from services.gateway.rollout_proxy import RolloutProxy
    from services.rollout.http_api import RolloutApi

    class BrokenController:
        async def describe(self):
            raise RuntimeError("a bug")

    async def html_page(request):
        return web.Response(status=502, text="<html><body>502 Bad Gateway</body></html>", content_type="text/html")

    async def scenario():
        api, api_url = await serve(RolloutApi(BrokenController(), OperatorTokens(None, "token")).app())
        ingress_app = web.Application()
        ingress_app.router.add_route("*", "/{tail:.*}", html_page)
        ingress, ingress_url = await serve(ingress_app)
        proxy_app = web.Application(middlewares=[errors_as_json])  # as the gateway's app answers errors
        RolloutProxy(ingress_url).add_routes(proxy_app)
        proxy, proxy_url = await serve(proxy_app)
        answers = []
        try:
            async with aiohttp.ClientSession(headers={"Authorization": "Bearer token"}) as session:
                for method, url, body in (("POST", api_url + "/v1/rollout/pause", b"{}" + b" " * 70_000),
                                          ("GET", api_url + "/v1/nothing-here", None),
                                          ("GET", api_url + "/v1/rollout", None),
                                          ("GET", proxy_url + "/v1/admin/rollout", None)):
                    async with session.request(method, url, data=body) as response:
                        answers.append((response.status, response.content_type, await response.json()))
        finally:
            await proxy.cleanup()
            await ingress.cleanup()
            await api.cleanup()
        return answers

    too_large, not_found, bug, html = asyncio.run(scenario())
    assert too_large[:2] == (413, "application/json") and too_large[2]["error"]["code"] == "too_large"
    assert not_found[:2] == (404, "application/json") and not_found[2]["error"]["code"] == "not_found"
    assert bug[:2] == (500, "application/json") and bug[2]["error"]["code"] == "internal_error"
    assert html[:2] == (502, "application/json"), html
    assert html[2]["error"]["code"] == "rollout_bad_answer" and "502 Bad Gateway" in html[2]["error"]["message"]
