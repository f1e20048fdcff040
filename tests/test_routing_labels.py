"""A/B routing on version labels: the table's format (old numeric tables still load), label resolution through the
TF Serving API, and the real pieces (redis-server, our model server with version labels in a polled
--model_config_file, a gateway process) following a label moved or removed in the model server's config."""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from types import SimpleNamespace

import grpc
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus

from services.gateway import metrics
from services.gateway.labels import LabelResolver
from services.gateway.routing import Router, RoutingError, RoutingTable, UnknownLabel, parse_assignments
from services.gateway.upstream import ModelServerClient, UpstreamRejected, UpstreamUnavailable
from tests.model_server_harness import MODEL, start_server, stop_server, version_states, wait_until, write_config
from tests.support import NOT_MUSHROOMS, RedisServer
from tests.test_gateway import (
    PHOTOS, TOKEN, GatewayProcess, assert_valid, pb, pb_grpc, set_routing, wait_for_routing,
)
from tests.test_web import browser  # noqa: F401 - the headless Chromium fixture
from training_job.tiny_model import publish_tiny_versions
from training_job.paths import PROJECT_ROOT

CLIENTS = [f"client-{i}" for i in range(20000)]


# ---------------------------------------------------------------------------------------------- the table's format
def test_an_old_numeric_table_loads_and_is_written_back_unchanged():
    stored = {"weights": {"1": 90.0, "2": 10.0}, "shadow": 3}
    table = RoutingTable.from_json(json.loads(json.dumps(stored)))
    assert (table.weights, table.shadow) == ({1: 90.0, 2: 10.0}, 3)
    assert table.to_json() == stored and table.labels() == set()
    assert RoutingTable.from_json({"weights": {"10": 1, "9": 1}, "shadow": "4"}).to_json() == {
        "weights": {"9": 1.0, "10": 1.0}, "shadow": 4}


def test_labels_and_versions_mix_and_keep_their_names():
    table = RoutingTable.from_json({"weights": {"stable": 90, "2": 5, "canary_b": 5}, "shadow": "canary_b"})
    assert (table.weights, table.shadow) == ({"stable": 90.0, 2: 5.0, "canary_b": 5.0}, "canary_b")
    assert table.labels() == {"stable", "canary_b"}
    assert table.to_json() == {"weights": {"2": 5.0, "canary_b": 5.0, "stable": 90.0}, "shadow": "canary_b"}
    assert list(table.to_json()["weights"]) == ["2", "canary_b", "stable"]  # versions first, then labels


@pytest.mark.parametrize("label", ["stable", "Canary_2", "_", "v1", "0x", "A"])
def test_labels_follow_tf_servings_rule(label):
    assert RoutingTable.from_json({"weights": {label: 1}}).weights == {label: 1.0}
    assert parse_assignments(["1=1", f"shadow={label}"]).shadow == label


@pytest.mark.parametrize("label", ["canary-b", "can ary", "canary.2", "stable\n", "café", "-", "canary/1"])
def test_labels_tf_serving_would_refuse_are_refused_naming_the_rule(label):
    """TF Serving (and our model server) only accept [a-zA-Z0-9_]+ as a version label: the gateway refuses the rest
    up front with the rule, rather than as an "unknown" label once the model server is asked."""
    for table in ({"weights": {label: 1}}, {"weights": {"1": 1}, "shadow": label}):
        with pytest.raises(RoutingError, match=re.escape("[a-zA-Z0-9_]+")):
            RoutingTable.from_json(table)
    with pytest.raises(RoutingError, match="letters, digits and '_' only"):
        parse_assignments([f"{label}=10"])


def test_cli_assignments_with_labels():
    table = parse_assignments(["stable=90", "canary=10", "shadow=canary"])
    assert (table.weights, table.shadow) == ({"stable": 90.0, "canary": 10.0}, "canary")
    table = parse_assignments(["1=90", "canary=10"])
    assert (table.weights, table.shadow) == ({1: 90.0, "canary": 10.0}, None)
    with pytest.raises(RoutingError, match="neither a version number nor a version label"):
        parse_assignments(["can ary=10"])
    with pytest.raises(RoutingError, match="expected"):
        parse_assignments(["stable"])


class FakeLabels:
    """The resolver's cache only: what the model server answered last."""

    def __init__(self, versions):
        self.versions = dict(versions)

    async def resolve_all(self, labels):
        unknown = sorted(set(labels) - set(self.versions))
        if unknown:
            raise UnknownLabel(unknown[0], "INVALID_ARGUMENT: Unrecognized servable version label")
        return {label: self.versions[label] for label in labels}


def label_router(labels: dict[str, int], weights: dict, available=(1, 2, 3)) -> Router:
    router = Router(redis=None, model_name=MODEL, labels=FakeLabels(labels))
    router.table = RoutingTable.from_json({"weights": weights})
    router.available = set(available)
    return router


def test_moving_a_label_moves_no_client_between_entries():
    router = label_router({"stable": 1, "canary": 2}, {"stable": 90, "canary": 10})
    before = {c: router.choose(c)[0] for c in CLIENTS}
    assert abs(Counter(before.values())[1] / len(CLIENTS) - 0.9) < 0.01
    router.labels.versions["canary"] = 3  # the operator moved canary to version 3 in the model server's config
    after = {c: router.choose(c)[0] for c in CLIENTS}
    assert all(after[c] == (3 if before[c] == 2 else 1) for c in CLIENTS)


def missing_metric() -> float:
    return metrics.REGISTRY.get_sample_value("mushroom_gateway_routed_version_missing")


def test_a_vanished_label_spreads_its_share_and_raises_the_metric():
    router = label_router({"stable": 1, "canary": 2}, {"stable": 50, "canary": 30, "3": 20})
    assert router.effective_weights() == {1: 50.0, 2: 30.0, 3: 20.0}
    assert missing_metric() == 0
    before = {c: router.choose(c)[0] for c in CLIENTS[:5000]}
    del router.labels.versions["canary"]  # the model server no longer knows it
    after = {c: router.choose(c)[0] for c in CLIENTS[:5000]}
    assert missing_metric() == 1
    assert set(after.values()) == {1, 3}
    assert all(after[c] == before[c] for c in after if before[c] != 2)  # only canary's clients moved
    router.labels.versions["canary"] = 2
    router.choose("x")
    assert missing_metric() == 0


def test_a_table_whose_versions_are_all_gone_falls_back_to_the_version_nearest_below_it():
    """Every routed version gone (v5's folder removed): the answer comes from the newest AVAILABLE version the table
    does not pass (v4), never from a newer one it did not route (v6: published and not rolled out yet, or rejected
    by a rollout), unless nothing older is left (then the nearest above it). With no table, the newest."""
    router = label_router({"stable": 5}, {"stable": 70, "5": 30}, available=(3, 4, 6))
    assert router.choose("c") == (4, "fallback") and missing_metric() == 1
    assert router.describe()["fallback"] == 4 and router.describe()["effective"] == {}
    router.available = {6, 7}
    assert router.choose("c") == (6, "fallback")
    router.labels.versions.clear()  # a table of labels none of which resolves: nothing to be near
    router.table = RoutingTable.from_json({"weights": {"stable": 100}})
    assert router.choose("c") == (7, "fallback")
    router.table = RoutingTable()
    assert router.choose("c") == (7, "latest")


def test_entries_on_one_version_add_up_and_describe_shows_where_labels_point():
    router = label_router({"stable": 1, "canary": 1}, {"stable": 60, "canary": 30, "2": 10})
    router.table.shadow = "canary"
    assert router.effective_weights() == {1: 90.0, 2: 10.0}
    assert router.shadow_version() == 1
    assert router.describe() == {
        "weights": {"2": 10.0, "canary": 30.0, "stable": 60.0}, "shadow": "canary",
        "resolved": {"2": 2, "canary": 1, "stable": 1}, "effective": {"1": 90.0, "2": 10.0}, "fallback": None}


class HeldRedis:
    """A real redis.asyncio client whose first routing read (``hold_read``: the table is read at once, answered only
    when ``release`` is set: a watcher read in flight while an operator PUTs) or first routing change (``hold_write``:
    sent only when ``release`` is set: a table being stored while the label refresh runs) is held."""

    def __init__(self, url: str, hold_read: bool = False, hold_write: bool = False):
        import redis.asyncio as aioredis

        self.client = aioredis.from_url(url)
        self.hold_read, self.hold_write = hold_read, hold_write
        self.release = asyncio.Event()
        self.held = asyncio.Event()

    def __getattr__(self, name):
        return getattr(self.client, name)

    async def _hold(self) -> None:
        self.held.set()
        await self.release.wait()

    async def mget(self, *names):
        values = await self.client.mget(*names)
        if self.hold_read:
            self.hold_read = False
            await self._hold()
        return values

    def register_script(self, lua: str):
        script = self.client.register_script(lua)

        async def run(**kwargs):
            if self.hold_write:
                self.hold_write = False
                await self._hold()
            return await script(**kwargs)

        return run


@pytest.fixture()
def redis_server():
    with RedisServer() as server:
        yield server


def test_a_watcher_read_in_flight_never_undoes_a_table_just_set(redis_server):
    async def scenario():
        redis = HeldRedis(redis_server.url, hold_read=True)
        router = Router(redis=redis, model_name=MODEL)
        router.available = {1, 2}
        await redis.client.set(router.key, json.dumps(RoutingTable.from_json({"weights": {"1": 100}}).to_json()))
        refresh = asyncio.create_task(router.refresh())
        await redis.held.wait()  # the watcher has read the old table and waits for the answer
        await router.set_table(RoutingTable.from_json({"weights": {"2": 100}}), who="operator")
        redis.release.set()
        await refresh
        stored = json.loads(await redis.client.get(router.key))
        await redis.client.aclose()
        return router.table.to_json(), stored

    table, stored = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert stored["weights"] == {"2": 100.0}
    assert table == stored


def test_a_label_refresh_during_a_table_change_keeps_the_new_tables_labels(redis_server):
    """A rollout's promotion: the table goes from {canary: 100} to {stable: 100} just after stable moved to the
    canary's version. A label refresh that ends while the new table is being stored must not forget the stable
    label it has just resolved: unresolved, it would route nowhere (or to the latest version) until re-asked."""
    upstream = FakeUpstream({"stable": 2, "canary": 2})

    async def scenario():
        router = Router(redis=HeldRedis(redis_server.url, hold_write=True), model_name=MODEL,
                        labels=LabelResolver(upstream))
        router.available = {1, 2}
        router.table = RoutingTable.from_json({"weights": {"canary": 100}})
        await router.refresh_labels()
        del upstream.labels["canary"]  # the controller took canary out of the model server's config
        change = asyncio.create_task(router.set_table(RoutingTable.from_json({"weights": {"stable": 100}}), "ctl"))
        await router.redis.held.wait()  # the new table's labels are resolved; the write is in flight
        await router.refresh_labels()  # the once-a-second refresh, of the table in force until the write ends
        router.redis.release.set()
        await change
        await router.redis.client.aclose()
        return router.describe()["resolved"], router.choose("client")

    resolved, (version, _) = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert resolved == {"stable": 2}
    assert version == 2


def test_set_table_refuses_unknown_labels_and_labels_on_unavailable_versions():
    router = label_router({"stable": 1, "old": 7}, {})
    with pytest.raises(RoutingError, match="'nope' is unknown to the model server"):
        asyncio.run(router.set_table(parse_assignments(["stable=90", "nope=10"]), "test"))
    with pytest.raises(RoutingError, match="not AVAILABLE.*'old': 7"):
        asyncio.run(router.set_table(parse_assignments(["stable=90", "old=10"]), "test"))
    with pytest.raises(RoutingError, match="'nope' is unknown"):
        asyncio.run(router.set_table(parse_assignments(["stable=100", "shadow=nope"]), "test"))


class FakeUpstream:
    """Answers GetModelMetadata from a {label: version} dict the way TF Serving does."""

    model_name = MODEL

    def __init__(self, labels):
        self.labels = labels
        self.down = False

    async def version_for_label(self, label):
        if self.down:
            raise UpstreamUnavailable("model server down")
        if label not in self.labels:
            raise UpstreamRejected(grpc.StatusCode.INVALID_ARGUMENT, f"Unrecognized servable version label: {label}")
        return self.labels[label]


def test_client_asks_get_model_metadata_with_the_version_label():
    """ModelServerClient.version_for_label: the plain TF Serving request, answered with model_spec.version."""
    client = ModelServerClient("127.0.0.1:1", MODEL)
    asked = []

    async def get_model_metadata(request, timeout):
        asked.append(request)
        return SimpleNamespace(model_spec=SimpleNamespace(version=SimpleNamespace(value=4)))

    client._stubs = lambda: (SimpleNamespace(GetModelMetadata=get_model_metadata), None)
    assert asyncio.run(client.version_for_label("canary")) == 4
    (request,) = asked
    assert request.model_spec.name == MODEL and request.model_spec.version_label == "canary"
    assert list(request.metadata_field) == ["signature_def"]


def test_resolver_follows_moves_drops_vanished_labels_and_keeps_answers_while_the_server_is_down():
    upstream = FakeUpstream({"stable": 1, "canary": 2})
    resolver = LabelResolver(upstream)

    async def scenario():
        await resolver.refresh(["stable", "canary"])
        assert resolver.versions == {"stable": 1, "canary": 2}
        upstream.labels["canary"] = 3
        del upstream.labels["stable"]
        await resolver.refresh(["stable", "canary"])
        assert resolver.versions == {"canary": 3}
        upstream.down = True
        await resolver.refresh(["canary"])
        assert resolver.versions == {"canary": 3}
        with pytest.raises(UpstreamUnavailable):
            await resolver.resolve_all(["canary"])
        upstream.down = False
        with pytest.raises(UnknownLabel, match="INVALID_ARGUMENT"):
            await resolver.resolve_all(["canary", "stable"])
        resolver.retain([])
        assert resolver.versions == {}

    asyncio.run(scenario())


# ---------------------------------------------------------------------------------------------- the real pieces
LABELS = {"stable": 1, "canary": 2}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    registry = tmp_path_factory.mktemp("registry")
    publish_tiny_versions(registry, MODEL)
    config = registry / "models.config"
    write_config(config, {MODEL: registry / MODEL}, labels={MODEL: LABELS}, policy="all {}")
    redis = RedisServer().start()
    server = start_server(registry, config, "--model_config_file_poll_wait_seconds=1")
    wait_until(lambda: all(version_states(server.grpc_target, MODEL).get(v, (0,))[0]
                           == ModelVersionStatus.AVAILABLE for v in (1, 2)),
               what="versions 1 and 2")
    gateway = GatewayProcess(server.grpc_target, redis.url, registry / MODEL)
    yield SimpleNamespace(registry=registry, config=config, redis=redis, server=server, gateway=gateway)
    gateway.stop()
    stop_server(server)
    redis.stop()


def move_labels(stack, labels: dict[str, int]) -> float:
    """Rewrites the model server's config file (it polls it every second); returns when it was written."""
    write_config(stack.config, {MODEL: stack.registry / MODEL}, labels={MODEL: labels}, policy="all {}")
    return time.monotonic()


def test_a_gateway_whose_routed_version_is_removed_answers_from_the_one_below_it(tmp_path, browser):
    """Versions 1, 2, 3 served, the table routes 2 alone, 2's folder is removed: the answers come from 1, the newest
    version the table does not pass, not from 3, which nobody routed (before: 3, the newest). The status, the CLI
    and the operator panel say that 1 answers in 2's place."""
    from tests.gateway_harness import gateway_stack

    publish_tiny_versions(tmp_path, MODEL, biases=(0.0, 2.0, 4.0))
    with gateway_stack(tmp_path, (1, 2, 3), lambda server, redis: GatewayProcess(server, redis, tmp_path / MODEL)
                       ) as parts:
        gateway, photo = parts.gateway, PHOTOS[0].read_bytes()
        assert set_routing(gateway, {"2": 100})[0] == 200
        wait_for_routing(gateway, {"2": 100})
        clients = [f"client-{i}" for i in range(20)]
        assert set(versions_of(gateway, clients, photo).values()) == {2}
        shutil.rmtree(tmp_path / MODEL / "2")
        wait_until(lambda: version_states(parts.server.grpc_target, MODEL)[2][0] == ModelVersionStatus.END,
                   what="version 2 unloaded")
        wait_until(lambda: set(versions_of(gateway, clients, photo).values()) == {1}, timeout=10, interval=0.2,
                   what="the answers to come from version 1")
        assert routed_version_missing(gateway) == 1
        assert gateway.metric("mushroom_gateway_route_total", model_version="1", reason="fallback") >= len(clients)
        body = gateway.request("GET", "/v1/admin/status", token=TOKEN)[1]
        assert body["routing"]["fallback"] == 1 and body["routing"]["effective"] == {}
        assert_valid(gateway.request("GET", "/openapi.json")[1], "Status", body)
        shown = admin_cli(gateway.url, "status").stdout
        assert "no routed version is AVAILABLE: version 1 answers in their place (fallback)" in shown
        browser.get(gateway.url + "/")
        WebDriverWait(browser, 15).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        browser.find_element(By.ID, "admin-token").send_keys(TOKEN + "\n")
        row = '#status-rows tr[data-version="1"]'
        WebDriverWait(browser, 15).until(lambda d: d.find_elements(By.CSS_SELECTOR, row))
        share = WebDriverWait(browser, 15).until(
            lambda d: (lambda t: t if "fallback" in t else None)(d.find_element(By.CSS_SELECTOR, f"{row} .share").text))
        assert share == "100.0% (fallback: no routed version is available)"


def versions_of(gateway, clients, photo) -> dict[str, int]:
    answers = {c: gateway.classify(photo, client=c) for c in clients}
    assert all(status == 200 for status, _, _ in answers.values()), answers
    return {c: body["model"]["version"] for c, (_, body, _) in answers.items()}


def admin_cli(url, *args, token=TOKEN):
    return subprocess.run([sys.executable, "-m", "services.gateway.operator_cli", "--url", url, *args], capture_output=True,
                          text=True, env={**os.environ, "GATEWAY_ADMIN_TOKEN": token}, cwd=PROJECT_ROOT, timeout=60)


def routed_version_missing(gateway) -> float:
    text = urllib.request.urlopen(gateway.url + "/metrics", timeout=10).read().decode()
    return float(re.search(r"^mushroom_gateway_routed_version_missing (\S+)$", text, re.M).group(1))


def test_a_table_of_labels_routes_to_the_labelled_versions(stack):
    gateway = stack.gateway
    result = admin_cli(gateway.url, "set", "stable=70", "canary=30")
    assert result.returncode == 0, result.stderr
    assert "stable (version 1) 70" in result.stdout and "canary (version 2) 30" in result.stdout
    wait_for_routing(gateway, {"stable": 70, "canary": 30})
    photo = PHOTOS[1].read_bytes()
    routed = versions_of(gateway, [f"client-{i}" for i in range(300)], photo)
    counts = Counter(routed.values())
    assert set(counts) == {1, 2}  # answers carry the resolved version, never the label
    assert abs(counts[1] / 300 - 0.7) < 0.08, counts  # 300 clients: binomial sd ~0.026, tolerance ~3 sd
    # The cache is keyed by the resolved version: the answer routed through "canary" is what version=2 finds.
    canary_client = next(c for c, v in routed.items() if v == 2)
    status, again, _ = gateway.classify(photo, client=canary_client)
    assert again["cached"] and again["model"]["version"] == 2
    assert gateway.classify(photo, version=2)[1]["cached"]

    status, body, _ = gateway.request("GET", "/v1/admin/status", token=TOKEN)
    assert body["routing"]["weights"] == {"canary": 30.0, "stable": 70.0}
    assert body["routing"]["resolved"] == {"canary": 2, "stable": 1}
    assert body["routing"]["effective"] == {"1": 70.0, "2": 30.0}
    assert body["versions"]["1"]["requests"] > 0 and body["versions"]["2"]["requests"] > 0
    shown = admin_cli(gateway.url, "status").stdout
    assert "routing: canary (version 2) 30, stable (version 1) 70" in shown, shown
    entry = gateway.request("GET", "/v1/admin/audit", token=TOKEN)[1]["entries"][0]
    assert entry["new"] == {"weights": {"canary": 30.0, "stable": 70.0}, "shadow": None}


def test_versions_and_labels_mix_in_one_table(stack):
    gateway = stack.gateway
    result = admin_cli(gateway.url, "set", "1=80", "canary=20")
    assert result.returncode == 0, result.stderr
    assert "routing: 1 80, canary (version 2) 20" in result.stdout
    wait_for_routing(gateway, {"1": 80, "canary": 20})
    counts = Counter(versions_of(gateway, [f"mixed-{i}" for i in range(300)], PHOTOS[5].read_bytes()).values())
    assert abs(counts[1] / 300 - 0.8) < 0.07, counts  # binomial sd ~0.023
    with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        listed = pb_grpc.ClassifierStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
    assert [(arm.target, arm.weight) for arm in listed.routing] == [("1", 80.0), ("canary", 20.0)]
    models = gateway.request("GET", "/v1/models")[1]["models"][0]
    assert {v["version"]: v["weight"] for v in models["versions"]} == {1: 80.0, 2: 20.0}
    # /openapi.json describes these answers, label entries, resolved and effective included.
    spec = gateway.request("GET", "/openapi.json")[1]
    assert_valid(spec, "Models", gateway.request("GET", "/v1/models")[1])
    routing = gateway.request("GET", "/v1/admin/routing", token=TOKEN)[1]
    assert routing["resolved"] == {"1": 1, "canary": 2} and routing["effective"] == {"1": 80.0, "2": 20.0}
    assert_valid(spec, "RoutingAdmin", routing)
    assert_valid(spec, "Status", gateway.request("GET", "/v1/admin/status", token=TOKEN)[1])
    assert_valid(spec, "AuditEntry", gateway.request("GET", "/v1/admin/audit", token=TOKEN)[1]["entries"][0])


def test_moving_a_label_in_the_model_server_config_moves_its_clients(stack):
    gateway = stack.gateway
    assert set_routing(gateway, {"stable": 50, "canary": 50})[0] == 200
    wait_for_routing(gateway, {"stable": 50, "canary": 50})
    photo = PHOTOS[2].read_bytes()
    clients = [f"mover-{i}" for i in range(60)]
    before = versions_of(gateway, clients, photo)
    assert set(before.values()) == {1, 2}
    on_stable = next(c for c, v in before.items() if v == 1)
    on_canary = next(c for c, v in before.items() if v == 2)
    try:
        written = move_labels(stack, {"stable": 2, "canary": 1})
        wait_until(lambda: versions_of(gateway, [on_stable, on_canary], photo) == {on_stable: 2, on_canary: 1},
                   timeout=10, interval=0.1, what="the gateway to follow the swapped labels")
        followed = time.monotonic() - written
        print(f"label move followed {followed:.2f} s after the config file was written (server polls every 1 s)")
        assert followed < 5
        after = versions_of(gateway, clients, photo)
        assert all(after[c] == 3 - before[c] for c in clients)  # every client stayed on its entry
        body = gateway.request("GET", "/v1/admin/routing", token=TOKEN)[1]
        assert body["resolved"] == {"canary": 1, "stable": 2} and body["weights"] == {"canary": 50.0, "stable": 50.0}
    finally:
        move_labels(stack, LABELS)
    wait_until(lambda: versions_of(gateway, [on_stable], photo) == {on_stable: 1}, timeout=10, what="labels back")


def test_an_unknown_label_is_refused_with_400_and_the_table_is_kept(stack):
    gateway = stack.gateway
    assert set_routing(gateway, {"stable": 100})[0] == 200
    status, body, _ = set_routing(gateway, {"stable": 90, "nope": 10})
    assert status == 400 and body["error"]["code"] == "bad_routing"
    assert "version label 'nope' is unknown to the model server" in body["error"]["message"], body
    status, body, _ = set_routing(gateway, {"stable": 100}, shadow="nope")
    assert status == 400 and "'nope'" in body["error"]["message"]
    status, body, _ = set_routing(gateway, {"stable": 90, "bad label!": 10})
    assert status == 400 and "neither a version number nor a version label" in body["error"]["message"]
    # A label TF Serving could never hold is refused for its name, not asked of the model server as "unknown".
    status, body, _ = set_routing(gateway, {"stable": 90, "canary-b": 10})
    assert status == 400 and "[a-zA-Z0-9_]+" in body["error"]["message"], body
    assert "unknown" not in body["error"]["message"]
    refused = admin_cli(gateway.url, "set", "stable=90", "canary-b=10")
    assert refused.returncode != 0 and "[a-zA-Z0-9_]+" in refused.stderr, refused
    refused = admin_cli(gateway.url, "set", "stable=90", "nope=10")
    assert refused.returncode != 0 and "error 400" in refused.stderr and "'nope'" in refused.stderr, refused
    assert gateway.request("GET", "/v1/admin/routing", token=TOKEN)[1]["weights"] == {"stable": 100.0}


def test_a_label_removed_from_the_model_server_spreads_its_share_and_raises_the_metric(stack):
    gateway = stack.gateway
    assert set_routing(gateway, {"stable": 50, "canary": 50})[0] == 200
    wait_for_routing(gateway, {"stable": 50, "canary": 50})
    photo = PHOTOS[3].read_bytes()
    clients = [f"leaver-{i}" for i in range(40)]
    assert set(versions_of(gateway, clients, photo).values()) == {1, 2}
    assert routed_version_missing(gateway) == 0
    try:
        move_labels(stack, {"stable": 1})
        wait_until(lambda: set(versions_of(gateway, clients, photo).values()) == {1}, timeout=10, interval=0.2,
                   what="canary's clients to go to stable")
        assert routed_version_missing(gateway) == 1
        body = gateway.request("GET", "/v1/admin/status", token=TOKEN)[1]
        assert body["routing"]["resolved"] == {"canary": None, "stable": 1}
        assert_valid(gateway.request("GET", "/openapi.json")[1], "Status", body)  # null: a label gone
        assert "canary (unknown)" in admin_cli(gateway.url, "status").stdout
    finally:
        move_labels(stack, LABELS)
    wait_until(lambda: set(versions_of(gateway, clients, photo).values()) == {1, 2}, timeout=10, what="canary back")
    assert routed_version_missing(gateway) == 0


def test_a_label_can_be_the_shadow(stack):
    gateway = stack.gateway
    assert set_routing(gateway, {"stable": 100}, shadow="canary")[0] == 200
    wait_for_routing(gateway, {"stable": 100}, shadow="canary")
    for photo in sorted(NOT_MUSHROOMS.iterdir())[20:23]:  # never sent before: misses reach the model server
        status, answer, _ = gateway.classify(photo.read_bytes(), client="erin")
        assert status == 200 and answer["model"]["version"] == 1

    def shadowed():
        return gateway.request("GET", "/v1/admin/status", token=TOKEN)[1]["versions"].get("2", {})

    wait_until(lambda: shadowed().get("shadow_requests", 0) >= 3, timeout=10, what="3 shadow calls to version 2")
    assert gateway.request("GET", "/v1/admin/status", token=TOKEN)[1]["routing"]["resolved"]["canary"] == 2


def test_an_old_numeric_table_written_to_redis_is_followed(stack):
    import redis

    client = redis.Redis.from_url(stack.redis.url)
    client.set(f"mushroom:routing:{MODEL}", json.dumps({"weights": {"1": 70, "2": 30}, "shadow": 2}))
    client.close()
    gateway = stack.gateway

    def routing():
        return gateway.request("GET", "/v1/admin/routing", token=TOKEN)[1]

    wait_until(lambda: routing()["weights"] == {"1": 70.0, "2": 30.0}, timeout=5, what="the old table")
    assert routing()["shadow"] == 2 and routing()["resolved"] == {"1": 1, "2": 2}
    counts = Counter(versions_of(gateway, [f"old-{i}" for i in range(300)], PHOTOS[4].read_bytes()).values())
    assert abs(counts[1] / 300 - 0.7) < 0.08, counts
