"""Model server replicas that disagree on which versions they serve (each loads a new version when it sees it):
the gateway routes a version once every replica serving the model has it, and says so. Two real model servers
behind one static ``ipv4:`` target (as a headless Kubernetes Service gives the gateway every pod), Redis, a
gateway."""
from __future__ import annotations

import asyncio
import time

import pytest

from services.gateway import upstream
from services.gateway.replicas import AVAILABLE, START, Partial, agreed, resolve
from tests.gateway_harness import GatewayProcess
from tests.model_server_harness import MODEL, serve_registry, stop_server, wait_until
from tests.support import NOT_MUSHROOMS, RedisServer
from tests.test_gateway import TOKEN
from training_job.publish import publish_dir
from training_job.tiny_model import write_tiny_model

LOADING, END = 20, 50
PHOTO = sorted(NOT_MUSHROOMS.iterdir())[0].read_bytes()


def publish(registry, bias: float) -> None:
    publish_dir(lambda d: write_tiny_model(d, bias=bias), registry, MODEL)


@pytest.fixture
def replicas(tmp_path):
    """Replica a has versions 1 and 2, replica b version 1 only (it has not loaded 2 yet)."""
    a, b = tmp_path / "a", tmp_path / "b"
    for bias in (0.0, 2.0):
        publish(a, bias)
    publish(b, 0.0)
    redis = RedisServer().start()
    servers = []
    try:
        servers += [serve_registry(a, (1, 2)), serve_registry(b, (1,))]
        target = "ipv4:" + ",".join(server.grpc_target for server in servers)
        gateway = GatewayProcess(target, redis.url, env={"GATEWAY_ADMIN_TOKEN": TOKEN})
        try:
            yield gateway, b, servers
        finally:
            gateway.stop()
    finally:
        for server in servers:
            stop_server(server)
        redis.stop()


def listed(gateway) -> tuple[int, ...]:
    return tuple(v["version"] for v in gateway.request("GET", "/v1/models").body["models"][0]["versions"]
                 if v["state"] == "AVAILABLE")


def route(gateway, weights: dict) -> int:
    return gateway.request("PUT", "/v1/admin/routing", {"weights": weights}, token=TOKEN).status


def test_a_version_is_routed_once_every_replica_serves_it(replicas):
    gateway, registry_b, servers = replicas
    seen, refused = set(), set()
    for _ in range(12):  # one status call reached one replica: (1,) and (1, 2) came in turn, a table with 2 likewise
        seen.add(listed(gateway))
        refused.add(route(gateway, {"2": 100}))
        time.sleep(0.25)
    assert (seen, refused) == ({(1,)}, {400})
    assert "version 2 AVAILABLE on 1 of 2 model server replicas" in gateway.request("GET", "/readyz").body["reason"]

    publish(registry_b, 2.0)  # replica b loads version 2 too
    wait_until(lambda: listed(gateway) == (1, 2), timeout=30, what="version 2 on both replicas")
    wait_until(lambda: route(gateway, {"1": 50, "2": 50}) == 200, timeout=5, what="the version watcher's next poll")
    answered = {gateway.classify(PHOTO, client=f"c{i}").body["model"]["version"] for i in range(40)}
    assert answered == {1, 2}
    assert "replicas" not in gateway.request("GET", "/readyz").body["reason"]

    stop_server(servers[1])  # a replica that stops answering is left out; the other serves on
    wait_until(lambda: all(gateway.classify(PHOTO, client=f"d{i}").status == 200 for i in range(6)), timeout=30,
               what="served by the replica left")
    assert listed(gateway) == (1, 2) and gateway.request("GET", "/readyz").status == 200


def test_agreed_versions_are_those_available_on_every_replica_serving_the_model():
    a = {1: AVAILABLE, 2: AVAILABLE}
    assert agreed([a, {1: AVAILABLE, 2: LOADING}]) == ({1: AVAILABLE, 2: LOADING}, {2: Partial(1, 2)})
    assert agreed([a, {1: AVAILABLE}]) == ({1: AVAILABLE, 2: START}, {2: Partial(1, 2)})
    assert agreed([a, {1: END, 2: AVAILABLE}]) == ({1: END, 2: AVAILABLE}, {1: Partial(1, 2)})  # unloading: not used
    assert agreed([a, {}, {1: LOADING}]) == (a, {})  # replicas serving nothing yet (just started) are left out
    assert agreed([{1: LOADING}]) == ({1: LOADING}, {})
    assert agreed([]) == ({}, {})


@pytest.mark.parametrize("target, addresses", [
    ("ipv4:10.0.0.1:8500,10.0.0.2:8500", ["10.0.0.1:8500", "10.0.0.2:8500"]),
    ("127.0.0.1:8500", ["127.0.0.1:8500"]),
    ("dns:///127.0.0.1:8500", ["127.0.0.1:8500"]),
    ("dns://8.8.8.8/127.0.0.1:8500", ["127.0.0.1:8500"]),
    ("[::1]:8500", ["[::1]:8500"]),
    ("unix:/run/tfserving.sock", ["unix:/run/tfserving.sock"]),
])
def test_a_target_names_the_replicas_grpc_resolves_it_to(target, addresses):
    assert asyncio.run(resolve(target)) == addresses


def test_a_target_name_dns_does_not_resolve_in_time_is_asked_as_last_resolved(monkeypatch):
    """DNS down or slow (a resolver timing out takes seconds) must not hold up the version watcher, whose staleness
    makes the gateway unready: the replicas last resolved are asked, or the channel when none were."""
    client = upstream.ModelServerClient("dns:///tfserving-pods:8500", MODEL)
    resolved = [["10.0.0.1:8500", "10.0.0.2:8500"]]

    async def resolve_once(target):
        if resolved:
            return resolved.pop()
        await asyncio.sleep(3600)

    async def states_of(target, timeout, retries=None):
        return {1: AVAILABLE}

    async def watch() -> list[dict]:
        return [await client.version_states(timeout=0.2) for _ in range(2)]

    monkeypatch.setattr(upstream, "resolve", resolve_once)
    asked = []
    monkeypatch.setattr(client, "_states_of", lambda target, *args, **kwargs: asked.append(target) or states_of(
        target, *args, **kwargs))
    started = time.monotonic()
    assert asyncio.run(asyncio.wait_for(watch(), 5)) == [{1: AVAILABLE}] * 2
    assert time.monotonic() - started < 2
    assert asked == ["10.0.0.1:8500", "10.0.0.2:8500"] * 2
