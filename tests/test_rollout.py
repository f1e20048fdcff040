"""The rollout controller with the real stack on a compressed schedule: redis-server, our model server (tiny models,
training_job/tiny_model.py), the gateway and `python -m services.rollout` processes on free loopback ports. Traffic is a
bounded loop of classify (and feedback) calls to 127.0.0.1."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus

from bench.common import zeros_gzipped
from tests.model_server_harness import start_server, stop_server, version_states, wait_until, write_config
from tests.support import (
    MUSHROOMS, KeepAliveClients, RedisServer, closed_within, free_port, stop_process, wait_for_port,
)
from tests.test_gateway import assert_valid
from tests.test_gateway_state import Gateway
from tests.test_web import browser  # noqa: F401 - the headless Chromium fixture
from training_job.tiny_model import LABELS, write_tiny_model
from training_job.paths import PROJECT_ROOT
from training_job.publish import publish_dir

AVAILABLE, END = ModelVersionStatus.AVAILABLE, ModelVersionStatus.END

MODELS = ("promote", "feedback", "shadow", "resume", "pause", "web", "mirror", "stopping", "unusable")
CONTROLLER_TOKEN = "rollout-controller-token-0123456789"
ALICE_TOKEN = "alice-token-0123456789"
PHOTOS = [p for d in sorted(MUSHROOMS.iterdir()) for p in sorted(d.iterdir())[:130]]  # 520 photos
FAST_RULES = {  # latency is judged too, but loosely: tiny models on a shared 2-core machine
    "error_rate": {"max_increase": 0.05, "min_requests": 10},
    "p95_latency": {"max_ratio": 20, "slack_ms": 2000, "min_requests": 10},
    "shadow_agreement": {"min_agreement": 0.9, "min_requests": 10},
    "feedback_accuracy": {"alpha": 0.05, "min_feedback": 10},
}


@pytest.fixture(scope="module")
def stack_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout")
    registry = root / "registry"
    for model in MODELS:
        publish_dir(lambda d: write_tiny_model(d, bias=0.0), registry, model)
    config = root / "models.config"
    config.write_text("model_config_list { " + " ".join(
        f'config {{ name: "{m}" base_path: "{registry / m}" model_platform: "tensorflow" '
        f'model_version_policy {{ all {{}} }} }}' for m in MODELS) + " }\n")
    tokens = root / "operators"
    tokens.write_text(f"rollout-controller:{CONTROLLER_TOKEN}\nalice:{ALICE_TOKEN}\n")
    tokens.chmod(0o600)
    return root, registry, config, tokens


@pytest.fixture(scope="module")
def model_server(stack_files):
    _, registry, config, _ = stack_files
    server = start_server(registry, config)
    wait_until(lambda: all(version_states(server.grpc_target, m).get(1, (0,))[0] == AVAILABLE for m in MODELS),
               timeout=120, what="version 1 of every model")
    yield server
    stop_server(server)


@pytest.fixture()
def redis_server():
    with RedisServer() as server:
        yield server


class Controller:
    def __init__(self, model: str, redis_url: str, gateway: Gateway, model_server, files, policy: dict,
                 name: str = "ctl", lease_seconds: float = 2.0, extra: tuple = (), port: int | None = None):
        root, registry, _, tokens = files
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        policy_file = root / f"policy-{model}-{uuid.uuid4().hex[:6]}.json"
        policy_file.write_text(json.dumps(policy))
        self.log = Path(f"/tmp/rollout-test-{self.port}.log")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.rollout", "--host=127.0.0.1", f"--http-port={self.port}",
             f"--policy={policy_file}", f"--redis-url={redis_url}", f"--gateway-url={gateway.url}",
             f"--model-server-rest={model_server.rest_url}", f"--model-name={model}",
             f"--model-base-path={registry / model}", f"--operator-tokens={tokens}", f"--identity={name}",
             f"--lease-seconds={lease_seconds}", *extra],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
            env={**os.environ, "ROLLOUT_GATEWAY_TOKEN": CONTROLLER_TOKEN, "GATEWAY_ADMIN_TOKEN": ""})
        wait_for_port(self.port, timeout=60, process=self.process)

    def request(self, method: str, path: str, token: str = ALICE_TOKEN, body: bytes = b"", headers=None):
        req = urllib.request.Request(self.url + path, method=method, data=body if method == "POST" else None,
                                     headers={"Authorization": f"Bearer {token}", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def status(self) -> dict:
        code, body = self.request("GET", "/v1/rollout")
        assert code == 200, body
        return body

    def leader(self) -> bool:
        return self.request("GET", "/healthz")[1]["leader"]

    def last_tick(self) -> float:
        """Unix time of the controller's last successful tick, from its /metrics."""
        text = urllib.request.urlopen(self.url + "/metrics", timeout=10).read().decode()
        [line] = [x for x in text.splitlines() if x.startswith("mushroom_rollout_last_tick_timestamp_seconds ")]
        return float(line.split()[1])

    def stop(self):
        stop_process(self.process)


class Traffic:
    """Classify calls from 64 client ids over ``photos`` in a background thread, at most ``max_requests``, at most
    ``per_second`` and until stopped; with ``truth`` ({photo index: label}) every answer gets feedback. The pace
    keeps the budget spread over tens of seconds: cache hits are fast, and a controller slowed by a busy machine
    must still find traffic at its last step."""

    def __init__(self, gateway: Gateway, photos: list[bytes], truth: dict | None = None, max_requests: int = 4000,
                 per_second: float = 100.0):
        self.gateway, self.photos, self.truth, self.max_requests = gateway, photos, truth, max_requests
        self.interval = 1.0 / per_second
        self.sent = 0
        self.versions: dict[int, int] = {}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        started = time.monotonic()
        while not self._stop.is_set() and self.sent < self.max_requests:
            self._stop.wait(started + self.sent * self.interval - time.monotonic())
            i = self.sent % len(self.photos)
            code, body, _ = self.gateway.request("POST", "/v1/classify", self.photos[i], "image/jpeg",
                                                 headers={"X-Client-Id": f"client-{self.sent % 64}"})
            self.sent += 1
            if code != 200:
                continue
            version = body["model"]["version"]
            self.versions[version] = self.versions.get(version, 0) + 1
            if self.truth is not None:
                self.gateway.request("POST", "/v1/feedback", {"feedback_token": body["feedback_token"],
                                                              "true_label": self.truth[i]})

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join(timeout=30)


def publish(files, model: str, **kwargs) -> None:
    publish_dir(lambda d: write_tiny_model(d, **kwargs), files[1], model)


def wait_available(model_server, model: str, version: int) -> None:
    wait_until(lambda: version_states(model_server.grpc_target, model).get(version, (0,))[0] == AVAILABLE,
               timeout=60, what=f"{model} version {version} AVAILABLE")


def start_gateway(model_server, redis_server, files, model: str, *extra: str) -> Gateway:
    return Gateway(model_server.grpc_target, redis_server.url, f"--model-name={model}",
                   f"--operator-tokens={files[3]}", *extra)


def events(status: dict, outcome: str | None = None) -> list[dict]:
    return [e for e in reversed(status["history"]) if outcome is None or e["outcome"] == outcome]


def audit(gateway: Gateway) -> list[dict]:
    code, body, _ = gateway.request("GET", "/v1/admin/audit", token=ALICE_TOKEN)
    assert code == 200
    return list(reversed(body["entries"]))


def routing(gateway: Gateway) -> dict:
    return gateway.request("GET", "/v1/admin/routing", token=ALICE_TOKEN)[1]["weights"]


def wait_for_shadow(gateway: Gateway, version: int | str) -> None:
    """Until the controller's shadow step is in force at the gateway (``version``: a number, or the label naming it):
    only cache misses are mirrored to a shadow, so traffic of new photos sent before it would all be hits by the time
    the shadow is set, and the step would wait for mirrored requests that never come."""
    wait_until(lambda: gateway.request("GET", "/v1/admin/routing", token=ALICE_TOKEN)[1]["shadow"] == version,
               timeout=60, what=f"{version} as the shadow")


def photos(start: int, count: int) -> list[bytes]:
    assert start + count <= len(PHOTOS)
    return [p.read_bytes() for p in PHOTOS[start:start + count]]


@contextlib.contextmanager
def own_stack(tmp_path, redis_server, stack_files, model: str, policy: dict, versions: int = 1,
              version_policy: str = "all {}", labels: dict | None = None, server_args: tuple = (),
              controller_args: tuple = ()):
    """A model server of its own (``versions`` tiny versions of ``model`` published, the model's config under
    ``version_policy``), a gateway and a controller on ``policy``, each stopped at the end: for a test that changes
    the registry or the config under them. Yields (registry, config, server, gateway, controller) once the newest
    version is AVAILABLE; the config is ``tmp_path / "models.config"``."""
    registry = tmp_path / "registry"
    for _ in range(versions):
        publish_dir(lambda d: write_tiny_model(d), registry, model)
    config = tmp_path / "models.config"
    write_config(config, {model: registry / model}, labels=labels and {model: labels}, policy=version_policy)
    server = start_server(registry, config, *server_args)
    gateway = controller = None
    try:
        wait_available(server, model, versions)
        gateway = start_gateway(server, redis_server, stack_files, model)
        controller = Controller(model, redis_server.url, gateway, server, (tmp_path, registry, config, stack_files[3]),
                                policy, extra=controller_args)
        yield registry, config, server, gateway, controller
    finally:
        if controller is not None:
            controller.stop()
        if gateway is not None:
            gateway.stop()
        stop_server(server)


# ---------------------------------------------------------------------------------------------- tests
def test_good_version_goes_shadow_canary_full_and_becomes_stable(model_server, redis_server, stack_files):
    gateway = start_gateway(model_server, redis_server, stack_files, "promote")
    policy = {"tick_seconds": 0.3, "rules": FAST_RULES, "steps": [
        {"name": "shadow", "weight": 0, "hold_seconds": 1, "min_requests": 10},
        {"name": "half", "weight": 50, "hold_seconds": 1, "min_requests": 10},
        {"name": "full", "weight": 100, "hold_seconds": 1, "min_requests": 10}]}
    controller = Controller("promote", redis_server.url, gateway, model_server, stack_files, policy)
    try:
        wait_until(lambda: events(controller.status(), "adopt"), timeout=30, what="v1 adopted as stable")
        publish(stack_files, "promote", bias=0.0)  # the same answers: a good version
        wait_available(model_server, "promote", 2)
        wait_for_shadow(gateway, 2)
        with Traffic(gateway, photos(0, 200)) as traffic:  # new photos: cache misses are mirrored to the shadow
            status = wait_until(lambda: (s := controller.status())["state"]["stable"] == 2 and s, timeout=120,
                                what="version 2 promoted")
        assert [e["outcome"] for e in events(status)] == ["adopt", "start", "advance", "advance", "promote"]
        assert [e["step"] for e in events(status, "advance")] == ["half", "full"]
        assert status["state"]["candidate"] is None and status["state"]["rejected"] == []
        assert routing(gateway) == {"2": 100}
        assert traffic.versions.get(2, 0) > 0
        entries = audit(gateway)
        assert {e["who"] for e in entries} == {"rollout-controller"}
        assert [e["new"]["weights"] for e in entries] == [{"1": 100}, {"1": 100}, {"1": 50, "2": 50}, {"2": 100},
                                                          {"2": 100}]
        assert entries[0]["note"].startswith("rollout: take over: idle (stable v1)")
        assert entries[1]["new"]["shadow"] == 2 and entries[1]["note"].startswith("rollout: start v2")
        assert entries[-1]["note"].startswith("rollout: promote v2 to stable")
        text = urllib.request.urlopen(controller.url + "/metrics", timeout=10).read().decode()
        assert 'mushroom_rollout_decisions_total{outcome="promote"} 1.0' in text
        assert "mushroom_rollout_stable_version 2.0" in text and "mushroom_rollout_step -1.0" in text
    finally:
        controller.stop()
        gateway.stop()


def test_sigterm_under_keepalive_load_leaves_no_request_it_was_sent_unanswered(model_server, redis_server,
                                                                                stack_files):
    """Eight clients read the controller's status and health over keep-alive connections; SIGTERM. No request sent
    on one meets a closed or reset connection (``services.http_stop``, as the gateway and the model server stop)."""
    gateway = start_gateway(model_server, redis_server, stack_files, "stopping")
    policy = {"tick_seconds": 0.3, "rules": FAST_RULES, "steps": [
        {"name": "full", "weight": 100, "hold_seconds": 1, "min_requests": 10}]}
    controller = Controller("stopping", redis_server.url, gateway, model_server, stack_files, policy)
    try:
        requests = [("GET", "/v1/rollout", None, {"Authorization": f"Bearer {ALICE_TOKEN}"}),
                    ("GET", "/healthz", None, {})]
        with KeepAliveClients(controller.port, requests) as clients:
            wait_until(lambda: len(clients.outcomes) >= 200, timeout=60, interval=0.05, what="steady load")
            controller.process.send_signal(signal.SIGTERM)
            assert controller.process.wait(30) == 0
            time.sleep(0.3)  # the clients meet the closed port
        lost = [o for o in clients.outcomes if o.startswith("lost")]
        assert not lost, f"{len(lost)} requests lost of {len(clients.outcomes)}: {sorted(set(lost))}"
        assert set(clients.outcomes) <= {"200", "refused"}, sorted(set(clients.outcomes))
    finally:
        controller.stop()
        gateway.stop()


def test_a_connection_that_brings_no_request_is_closed_after_the_keepalive_timeout(model_server, redis_server,
                                                                                     stack_files):
    """aiohttp would wait an hour for a request's headers: a client that connected and sent nothing, or whose
    network died, held a socket of the controller that long."""
    gateway = start_gateway(model_server, redis_server, stack_files, "stopping")
    policy = {"tick_seconds": 0.3, "rules": FAST_RULES, "steps": [
        {"name": "full", "weight": 100, "hold_seconds": 1, "min_requests": 10}]}
    try:
        controller = Controller("stopping", redis_server.url, gateway, model_server, stack_files, policy,
                                extra=("--keepalive-timeout=1",))
    except BaseException:
        gateway.stop()
        raise
    try:
        for sent in (b"", b"GET /healthz HTTP/1.1\r\nHost: c\r\n"):
            with socket.create_connection(("127.0.0.1", controller.port), timeout=20) as connection:
                connection.sendall(sent)
                closed, answered = closed_within(connection, 10)
            assert closed is not None and answered == b"", (sent, answered)  # closed, not answered
        assert controller.request("GET", "/healthz")[0] == 200
    finally:
        controller.stop()
        gateway.stop()


def test_bad_version_is_rolled_back_by_feedback_accuracy(model_server, redis_server, stack_files):
    gateway = start_gateway(model_server, redis_server, stack_files, "feedback")
    code, body, _ = gateway.request("GET", "/v1/admin/rollout", token=ALICE_TOKEN)  # no --rollout-url given
    assert (code, body["error"]["code"]) == (404, "rollout_not_configured")
    sample = photos(200, 40)
    truth = {i: gateway.classify(photo, version=1)[1]["predictions"][0]["label"] for i, photo in enumerate(sample)}
    policy = {"tick_seconds": 0.3, "rules": FAST_RULES, "steps": [
        {"name": "half", "weight": 50, "hold_seconds": 600, "min_requests": 10},
        {"name": "full", "weight": 100, "hold_seconds": 600, "min_requests": 10}]}
    controller = Controller("feedback", redis_server.url, gateway, model_server, stack_files, policy)
    try:
        wait_until(lambda: events(controller.status(), "adopt"), timeout=30, what="v1 adopted as stable")
        publish(stack_files, "feedback", labels=LABELS[1:] + LABELS[:1])  # a head whose labels are shuffled
        wait_available(model_server, "feedback", 2)
        with Traffic(gateway, sample, truth):
            status = wait_until(lambda: (s := controller.status())["state"]["rejected"] == [2] and s, timeout=120,
                                what="version 2 rolled back")
        rollback = events(status, "rollback")[0]
        assert rollback["rule"] == "feedback_accuracy" and rollback["step"] == "half"
        assert "sequential p" in rollback["reason"]
        assert status["state"] == {**status["state"], "stable": 1, "candidate": None}
        assert routing(gateway) == {"1": 100}
        last = audit(gateway)[-1]
        assert last["who"] == "rollout-controller" and last["new"]["weights"] == {"1": 100}
        assert "rollback v2 at half: rule feedback_accuracy" in last["note"]
        # a rejected version is not tried again: over several more ticks nothing happens
        rolled_back_at = controller.last_tick()
        wait_until(lambda: controller.last_tick() > rolled_back_at + 1.5, timeout=30, what="more ticks")
        assert controller.status()["history"][0]["outcome"] == "rollback" and len(audit(gateway)) == 3
    finally:
        controller.stop()
        gateway.stop()


def test_a_version_the_gateway_cannot_use_is_rejected_and_stable_keeps_its_traffic(model_server, redis_server,
                                                                                     stack_files):
    from tests.test_gateway_unusable_version import ProbabilitiesOnly, write

    gateway = start_gateway(model_server, redis_server, stack_files, "unusable")
    policy = {"tick_seconds": 0.3, "rules": FAST_RULES, "steps": [
        {"name": "canary", "weight": 10, "hold_seconds": 600, "min_requests": 10},
        {"name": "full", "weight": 100}]}
    controller = Controller("unusable", redis_server.url, gateway, model_server, stack_files, policy)
    try:
        wait_until(lambda: events(controller.status(), "adopt"), timeout=30, what="v1 adopted as stable")
        publish_dir(write(ProbabilitiesOnly), stack_files[1], "unusable")  # another tool's export: no mushroom_score
        wait_available(model_server, "unusable", 2)
        status = wait_until(lambda: (s := controller.status())["state"]["rejected"] == [2] and s, timeout=60,
                            what="version 2 rejected")
        reject = events(status, "reject")[0]
        assert reject["rule"] == "unusable" and "mushroom_score" in reject["reason"], reject
        assert status["state"]["candidate"] is None and status["state"]["stable"] == 1
        assert routing(gateway) == {"1": 100}
        assert gateway.classify(PHOTOS[0].read_bytes())[1]["model"]["version"] == 1
    finally:
        controller.stop()
        gateway.stop()


def test_bad_version_is_rolled_back_by_shadow_disagreement(model_server, redis_server, stack_files):
    gateway = start_gateway(model_server, redis_server, stack_files, "shadow")
    policy = {"tick_seconds": 0.3, "rules": FAST_RULES, "steps": [
        {"name": "shadow", "weight": 0, "hold_seconds": 600, "min_requests": 10},
        {"name": "full", "weight": 100, "hold_seconds": 600, "min_requests": 10}]}
    controller = Controller("shadow", redis_server.url, gateway, model_server, stack_files, policy)
    try:
        wait_until(lambda: events(controller.status(), "adopt"), timeout=30, what="v1 adopted as stable")
        publish(stack_files, "shadow", bias=8.0)  # answers the first class for every photo
        wait_available(model_server, "shadow", 2)
        wait_for_shadow(gateway, 2)
        with Traffic(gateway, photos(240, 200)) as traffic:
            status = wait_until(lambda: (s := controller.status())["state"]["rejected"] == [2] and s, timeout=120,
                                what="version 2 rolled back")
        rollback = events(status, "rollback")[0]
        assert rollback["rule"] == "shadow_agreement" and rollback["step"] == "shadow"
        assert traffic.versions.get(2, 0) == 0  # a shadow never answers
        assert routing(gateway) == {"1": 100}
        notes = [e.get("note", "") for e in audit(gateway)]
        assert notes[1].startswith("rollout: start v2") and "rule shadow_agreement" in notes[-1]
    finally:
        controller.stop()
        gateway.stop()


def test_two_controllers_never_both_act_and_a_killed_one_is_resumed(model_server, redis_server, stack_files):
    gateway = start_gateway(model_server, redis_server, stack_files, "resume")
    policy = {"tick_seconds": 0.3, "rules": FAST_RULES, "steps": [
        {"name": "canary", "weight": 25, "hold_seconds": 0, "min_requests": 5},
        {"name": "half", "weight": 50, "hold_seconds": 3600, "min_requests": 5},
        {"name": "full", "weight": 100, "hold_seconds": 0, "min_requests": 0}]}
    first = Controller("resume", redis_server.url, gateway, model_server, stack_files, policy, name="first")
    second = Controller("resume", redis_server.url, gateway, model_server, stack_files, policy, name="second")
    try:
        wait_until(lambda: events(first.status(), "adopt"), timeout=30, what="v1 adopted as stable")
        publish(stack_files, "resume", bias=0.0)
        wait_available(model_server, "resume", 2)
        with Traffic(gateway, photos(440, 40)):
            before = wait_until(lambda: (s := first.status())["step"] and s["step"]["name"] == "half" and s,
                                timeout=60, what="the rollout at its 'half' step")
        assert [first.leader(), second.leader()].count(True) == 1
        leader, standby = (first, second) if first.leader() else (second, first)
        assert before["leader"].startswith("first" if leader is first else "second")
        acted = {e["who"] for e in events(before)}
        assert len(acted) == 1 and acted.pop() == before["leader"]  # every decision by the one lease holder
        assert [e["outcome"] for e in events(before)] == ["adopt", "start", "advance"]

        leader.process.send_signal(signal.SIGKILL)  # no clean hand-over: the lease must expire
        leader.process.wait()
        wait_until(standby.leader, timeout=30, what="the standby takes the lease")
        after = wait_until(lambda: (s := standby.status())["state"]["judgement"]["at"] > before["state"][
            "judgement"]["at"] + 1 and s, timeout=30, what="the new leader judging")
        assert after["state"]["step"] == before["state"]["step"] == 1
        assert after["state"]["step_started"] == before["state"]["step_started"]  # the timers carry over
        assert [e["outcome"] for e in events(after)] == ["adopt", "start", "advance"]
        assert routing(gateway) == {"1": 50, "2": 50} and len(audit(gateway)) == 3  # nothing re-done

        # an operator promotes through the CLI; the history names her
        cli = subprocess.run(
            [sys.executable, "-m", "services.gateway.operator_cli", "--token", ALICE_TOKEN, "rollout", "--rollout-url",
             standby.url, "promote"], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert "queued promote" in cli.stdout
        done = wait_until(lambda: (s := standby.status())["state"]["stable"] == 2 and s, timeout=30,
                          what="promoted by the operator")
        promote = events(done, "promote")[0]
        assert (promote["rule"], promote["who"]) == ("operator_promote", "alice")
        assert routing(gateway) == {"2": 100}
        shown = subprocess.run([sys.executable, "-m", "services.gateway.operator_cli", "--token", ALICE_TOKEN, "rollout",
                                "--rollout-url", standby.url], capture_output=True, text=True, cwd=PROJECT_ROOT,
                               timeout=60)
        assert shown.returncode == 0 and "stable v2" in shown.stdout and "promote" in shown.stdout
    finally:
        first.stop()
        second.stop()
        gateway.stop()


def operator_cli(gateway: Gateway, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "services.gateway.operator_cli", "--url", gateway.url, "--token",
                           ALICE_TOKEN, *args], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_paused_rollout_stays_put_until_resumed_and_abort_rolls_back(model_server, redis_server, stack_files):
    controller_port = free_port()
    gateway = start_gateway(model_server, redis_server, stack_files, "pause",
                            f"--rollout-url=http://127.0.0.1:{controller_port}")
    policy = {"tick_seconds": 0.3, "rules": FAST_RULES, "steps": [
        {"name": "canary", "weight": 25, "hold_seconds": 3, "min_requests": 5},
        {"name": "half", "weight": 50, "hold_seconds": 3600, "min_requests": 5},
        {"name": "full", "weight": 100}]}
    # the figures come from every address "localhost" resolves to (as from a Kubernetes headless Service)
    controller = Controller("pause", redis_server.url, gateway, model_server, stack_files, policy,
                            extra=(f"--gateway-status-dns=localhost:{gateway.http_port}",), port=controller_port)
    try:
        wait_until(lambda: events(controller.status(), "adopt"), timeout=30, what="v1 adopted as stable")
        assert controller.request("POST", "/v1/rollout/pause", token="wrong")[0] == 401
        assert controller.request("POST", "/v1/rollout/jump")[0] == 404
        nested = b"[" * 30_000 + b"]" * 30_000  # deeper than Python's JSON parser goes, within the body limit
        assert controller.request("POST", "/v1/rollout/pause", body=nested)[1]["error"]["code"] == "bad_command"
        for body, encoding, code in ((zeros_gzipped(64), "gzip", "too_large"), (b"{}", "zstd", "unsupported_encoding")):
            answer = controller.request("POST", "/v1/rollout/pause", body=body, headers={"Content-Encoding": encoding})
            assert answer[1]["error"]["code"] == code, answer
        assert gateway.request("POST", "/v1/admin/rollout/pause", token="wrong")[0] == 401
        publish(stack_files, "pause", bias=0.0)
        wait_available(model_server, "pause", 2)
        wait_until(lambda: controller.status()["state"]["candidate"] == 2, timeout=30, what="the rollout started")
        # an operator pauses through the gateway's admin API (the CLI's default): the gateway's audit names her
        assert "queued pause by alice" in operator_cli(gateway, "rollout", "pause")
        [entry] = [e for e in audit(gateway) if "action" in e]
        assert (entry["who"], entry["action"], entry["status"]) == ("alice", "rollout pause", 202)
        assert entry["answer"]["queued"]["who"] == "alice"  # the controller's answer, as it gave it
        assert "alice: rollout pause -> 202" in operator_cli(gateway, "audit")
        spec = gateway.request("GET", "/openapi.json")[1]  # /openapi.json describes both kinds of entries
        assert_valid(spec, "RolloutCommandEntry", entry)
        assert_valid(spec, "AuditEntry", audit(gateway)[0])  # the routing change that started the rollout
        wait_until(lambda: controller.status()["state"]["paused"], timeout=10, what="paused")
        with Traffic(gateway, photos(480, 40)):
            ready = wait_until(lambda: (s := controller.status())["state"]["judgement"]["reason"].startswith(
                "paused") and s, timeout=60, what="the step ready to advance but paused")
            later = wait_until(lambda: (s := controller.status())["state"]["judgement"]["at"] > ready["state"][
                "judgement"]["at"] + 2 and s, timeout=30, what="more ticks")
            assert later["state"]["step"] == 0 and later["step"]["name"] == "canary"
            assert routing(gateway) == {"1": 75, "2": 25}
            assert controller.request("POST", "/v1/rollout/resume")[0] == 202
            wait_until(lambda: controller.status()["state"]["step"] == 1, timeout=30, what="advanced after resume")
        assert controller.request("POST", "/v1/rollout/abort")[0] == 202
        status = wait_until(lambda: (s := controller.status())["state"]["rejected"] == [2] and s, timeout=30,
                            what="aborted")
        me = f"ctl-{controller.process.pid}"
        assert [(e["outcome"], e["who"]) for e in events(status)] == [
            ("adopt", me), ("start", me), ("pause", "alice"), ("resume", "alice"), ("advance", me),
            ("rollback", "alice")]
        assert events(status, "rollback")[0]["rule"] == "operator_abort"
        assert routing(gateway) == {"1": 100}
        assert "rule operator_abort: aborted by alice" in audit(gateway)[-1]["note"]
    finally:
        controller.stop()
        gateway.stop()


def test_a_bad_policy_file_is_refused_with_a_clear_message(tmp_path):
    bad = tmp_path / "policy.yaml"
    bad.write_text("steps:\n  - {weight: 10, hold_seconds: 60}\n  - {weight: 5}\n  - {weight: 100}\n")
    result = subprocess.run([sys.executable, "-m", "services.rollout", f"--policy={bad}"], capture_output=True,
                            text=True, cwd=PROJECT_ROOT, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: bad rollout policy: {bad}.steps[1].weight: 5 is lower than the step "
                                     "before (10): weights never go down in a rollout")
    good = subprocess.run([sys.executable, "-m", "services.rollout", "--print-default-policy"], capture_output=True,
                          text=True, cwd=PROJECT_ROOT, timeout=60)
    (tmp_path / "default.yaml").write_text(good.stdout)
    checked = subprocess.run([sys.executable, "-m", "services.rollout", f"--policy={tmp_path / 'default.yaml'}",
                              "--check-policy"], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60)
    assert checked.returncode == 0 and [s["weight"] for s in json.loads(checked.stdout)["steps"]] == [0, 5, 25, 50,
                                                                                                      100]


def test_a_burst_of_status_reads_is_answered_not_refused_for_want_of_a_redis_connection(redis_server):
    """redis-py's pool holds 100 connections and refuses a command beyond them at once ("Too many connections"):
    300 status reads at once (operators' panels, a dashboard) got 503 for half, and the controller's own tick,
    which renews its lease, could have met the same refusal. Commands beyond the pool now wait for a connection."""
    import asyncio

    import aiohttp

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "services.rollout", "--host=127.0.0.1", f"--http-port={port}",
                                f"--redis-url={redis_server.url}", "--gateway-url=http://127.0.0.1:1",
                                "--model-server-rest=http://127.0.0.1:1", "--model-name=burst"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=PROJECT_ROOT,
                               env={**os.environ, "ROLLOUT_GATEWAY_TOKEN": CONTROLLER_TOKEN,
                                    "GATEWAY_ADMIN_TOKEN": ALICE_TOKEN})
    try:
        wait_for_port(port, timeout=60, process=process)

        async def burst() -> list[int]:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                async def one() -> int:
                    async with session.get(f"http://127.0.0.1:{port}/v1/rollout",
                                           headers={"Authorization": f"Bearer {ALICE_TOKEN}"}) as response:
                        await response.read()
                        return response.status

                return await asyncio.gather(*(one() for _ in range(300)))

        statuses = asyncio.run(burst())
    finally:
        stop_process(process)
    assert statuses == [200] * 300, {status: statuses.count(status) for status in set(statuses)}


def test_a_taken_port_is_a_clear_startup_error():
    """Its HTTP session and Redis client were left open when the port failed to bind, which logged an asyncio
    error ("Unclosed client session") after the message."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "services.rollout", "--host=127.0.0.1", f"--http-port={port}",
                                 "--redis-url=redis://127.0.0.1:1/0", "--gateway-token=a-controller-token-0123"],
                                capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60)
    assert result.returncode == 1
    assert "error:" in result.stderr and "address already in use" in result.stderr and f"{port}" in result.stderr
    assert "Unclosed" not in result.stderr and "Traceback" not in result.stderr


def test_stack_up_with_rollout_starts_the_controller_acting_as_its_own_operator(tmp_path):
    from devstack.launch import Ports, Stack, new_run_dir, start_stack, stop_stack

    registry = tmp_path / "registry"
    publish_dir(lambda d: write_tiny_model(d), registry, "stacked")
    policy = tmp_path / "policy.yaml"
    policy.write_text("tick_seconds: 0.3\nsteps:\n  - {weight: 50, hold_seconds: 3600}\n  - {weight: 100}\n")
    ports = Ports(*(free_port() for _ in range(8)))
    run_dir = new_run_dir(tmp_path / "var" / "run")
    stack = start_stack(registry, "stacked", run_dir, ports, scrape_interval_s=1.0, admin_token="stack-admin-token",
                        rollout=True, rollout_policy=policy)
    try:
        assert set(Stack.load(run_dir).processes) == {"redis", "model_server", "gateway", "rollout", "prometheus"}
        assert oct((run_dir / "rollout_token").stat().st_mode & 0o777) == "0o600"
        assert oct((run_dir / "operators").stat().st_mode & 0o777) == "0o600"
        url = stack.urls["rollout controller"]

        def rollout_status():
            req = urllib.request.Request(url + "/v1/rollout", headers={"Authorization": "Bearer stack-admin-token"})
            with urllib.request.urlopen(req, timeout=10) as response:
                return json.loads(response.read())

        wait_until(lambda: rollout_status()["state"], timeout=60, what="the controller adopted version 1")
        publish_dir(lambda d: write_tiny_model(d), registry, "stacked")
        wait_until(lambda: rollout_status()["state"]["candidate"] == 2, timeout=60, what="the rollout of v2")
        req = urllib.request.Request(stack.urls["gateway"] + "/v1/admin/audit",
                                     headers={"Authorization": "Bearer stack-admin-token"})
        with urllib.request.urlopen(req, timeout=10) as response:
            entries = json.loads(response.read())["entries"]
        assert entries[0]["who"] == "rollout-controller" and entries[0]["new"]["weights"] == {"1": 50, "2": 50}
        assert "job_name: rollout" in (run_dir / "prometheus.yml").read_text()
    finally:
        stop_stack(stack)
    assert Stack.load(run_dir).alive() == []


def test_web_operator_panel_shows_the_rollout_and_sends_commands(model_server, redis_server, stack_files, browser):
    from selenium.webdriver.common.by import By

    from tests.test_web import SCREENSHOTS, WebDriverWait

    controller_port = free_port()
    gateway = start_gateway(model_server, redis_server, stack_files, "web",
                            f"--rollout-url=http://127.0.0.1:{controller_port}")
    policy = {"tick_seconds": 0.3, "rules": FAST_RULES, "steps": [
        {"name": "half", "weight": 50, "hold_seconds": 3600, "min_requests": 5}, {"name": "full", "weight": 100}]}
    controller = Controller("web", redis_server.url, gateway, model_server, stack_files, policy,
                            port=controller_port)
    page = browser

    def text(element_id: str, predicate, timeout: float = 30) -> str:
        return WebDriverWait(page, timeout).until(
            lambda d: (lambda t: t if predicate(t) else None)(d.find_element(By.ID, element_id).text))

    try:
        assert gateway.request("GET", "/v1/admin/rollout", token="wrong")[0] == 401  # checked by the controller
        page.get(gateway.url + "/")
        WebDriverWait(page, 15).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        field = page.find_element(By.ID, "admin-token")
        field.clear()
        field.send_keys(ALICE_TOKEN + "\n")
        text("rollout-summary", lambda t: t == "Stable: version 1. No rollout running.")
        assert not page.find_element(By.CSS_SELECTOR, "#rollout-controls [data-action=abort]").is_enabled()

        publish(stack_files, "web", bias=0.0)
        wait_available(model_server, "web", 2)
        with Traffic(gateway, photos(0, 20), max_requests=40):
            text("rollout-summary", lambda t: t.startswith(
                "Rolling out version 2 over stable version 1: step 1 of 2, half (50% of traffic)"))
            text("rollout-timers", lambda t: "Step held" in t and "of 3600 s" in t and "Controller: ctl-" in t)
            WebDriverWait(page, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#rollout-verdicts tr")) == 4)
        rules = [row.get_attribute("data-rule") for row in page.find_elements(By.CSS_SELECTOR, "#rollout-verdicts tr")]
        assert rules == ["error_rate", "p95_latency", "shadow_agreement", "feedback_accuracy"]

        page.find_element(By.CSS_SELECTOR, "#rollout-controls [data-action=pause]").click()
        text("rollout-command-status", lambda t: t.startswith("Queued pause (by alice)"))
        text("rollout-summary", lambda t: t.endswith("— PAUSED."))
        text("rollout-history", lambda t: " pause v2 at half by alice: paused by alice" in t.splitlines()[0])

        page.find_element(By.CSS_SELECTOR, "#rollout-controls [data-action=abort]").click()
        text("rollout-summary", lambda t: t == "Stable: version 1. No rollout running. Rejected versions: 2.")
        newest = page.find_element(By.CSS_SELECTOR, "#rollout-history li")
        assert newest.get_attribute("data-outcome") == "rollback"
        assert "by alice [rule operator_abort]: aborted by alice" in newest.text
        assert routing(gateway) == {"1": 100}
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.save_screenshot(str(SCREENSHOTS / "rollout-panel.png"))

        retry = WebDriverWait(page, 15).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "#rollout-rejected button[data-version='2']"))[0]
        assert retry.text == "Retry version 2"
        # the panel's refreshes leave the button under the keyboard focus: two refreshes of the status line go by, so
        # the rollout refresh started with the first has ended
        page.execute_script("arguments[0].focus()", retry)
        for _ in range(2):
            shown = page.find_element(By.ID, "status-updated").text
            text("status-updated", lambda t, shown=shown: t != shown, timeout=15)
        assert page.switch_to.active_element == retry
        retry.click()
        text("rollout-command-status", lambda t: t.startswith("Queued retry of version 2 (by alice)"))
        text("rollout-summary", lambda t: t.startswith("Rolling out version 2 over stable version 1: step 1 of 2"))
        assert page.find_elements(By.CSS_SELECTOR, "#rollout-rejected button") == []
        assert any(" retry " in line and "by alice" in line for line in text("rollout-history", bool).splitlines())
    finally:
        controller.stop()
        gateway.stop()


def test_with_labels_canary_and_stable_move_in_the_model_server_config(redis_server, stack_files, tmp_path):
    policy = {"tick_seconds": 0.3, "rules": FAST_RULES, "steps": [
        {"name": "shadow", "weight": 0, "hold_seconds": 1, "min_requests": 10},
        {"name": "half", "weight": 50, "hold_seconds": 1, "min_requests": 10},
        {"name": "full", "weight": 100, "hold_seconds": 1, "min_requests": 10}]}
    config = tmp_path / "models.config"  # where own_stack writes it
    with own_stack(tmp_path, redis_server, stack_files, "labelled", policy, labels={"stable": 1},
                   server_args=("--model_config_file_poll_wait_seconds=1",),
                   controller_args=(f"--labels-config={config}",)) as (registry, _, server, gateway, controller):
        wait_until(lambda: events(controller.status(), "adopt"), timeout=30, what="v1 adopted as stable")

        def labels_in_config() -> dict:
            from google.protobuf import text_format
            from tensorflow_serving.config import model_server_config_pb2

            parsed = text_format.Parse(config.read_text(), model_server_config_pb2.ModelServerConfig())
            return dict(parsed.model_config_list.config[0].version_labels)

        publish_dir(lambda d: write_tiny_model(d), registry, "labelled")  # good
        wait_available(server, "labelled", 2)
        wait_for_shadow(gateway, "canary")
        with Traffic(gateway, photos(0, 200)):
            wait_until(lambda: controller.status()["state"]["stable"] == 2, timeout=120, what="v2 promoted")
        assert [e["new"]["weights"] for e in audit(gateway)] == [
            {"stable": 100}, {"stable": 100}, {"stable": 50, "canary": 50}, {"canary": 100}, {"stable": 100}]
        assert audit(gateway)[1]["new"]["shadow"] == "canary"
        assert labels_in_config() == {"stable": 2}  # canary removed once the routing stopped naming it
        assert gateway.request("GET", "/v1/admin/routing", token=ALICE_TOKEN)[1]["resolved"] == {"stable": 2}

        publish_dir(lambda d: write_tiny_model(d, bias=8.0), registry, "labelled")  # bad: rolled back in shadow
        wait_available(server, "labelled", 3)
        wait_for_shadow(gateway, "canary")
        with Traffic(gateway, photos(240, 200)):
            status = wait_until(lambda: (s := controller.status())["state"]["rejected"] == [3] and s, timeout=120,
                                what="v3 rolled back")
        assert events(status, "rollback")[0]["rule"] == "shadow_agreement"
        last = audit(gateway)[-1]
        assert last["new"]["weights"] == {"stable": 100} and "rule shadow_agreement" in last["note"]
        assert labels_in_config() == {"stable": 2}  # canary moved back: removed with the rollback


def test_an_unloaded_stable_version_blocks_rollouts_with_a_clear_failure(redis_server, stack_files, tmp_path):
    policy = {"tick_seconds": 0.3, "steps": [{"weight": 50}, {"weight": 100}]}
    with own_stack(tmp_path, redis_server, stack_files, "single", policy, version_policy="latest { num_versions: 1 }"
                   ) as (registry, _, server, gateway, controller):
        wait_until(lambda: events(controller.status(), "adopt"), timeout=30, what="v1 adopted as stable")
        publish_dir(lambda d: write_tiny_model(d), registry, "single")  # latest {1}: version 1 is unloaded
        wait_available(server, "single", 2)
        wait_until(lambda: "the stable version 1 is not AVAILABLE" in controller.log.read_text(), timeout=30,
                   what="the controller saying why it cannot act")
        text = urllib.request.urlopen(controller.url + "/metrics", timeout=10).read().decode()
        [failures] = [line for line in text.splitlines() if line.startswith("mushroom_rollout_loop_failures_total ")]
        assert float(failures.split()[1]) >= 1
        status = controller.status()
        assert status["state"]["candidate"] is None and [e["outcome"] for e in events(status)] == ["adopt"]
        assert routing(gateway) == {"1": 100}  # the take-over table, never a rollout towards version 2


def test_a_registry_published_anew_on_a_running_model_server_is_rolled_out_from_its_first_version(
        redis_server, stack_files, tmp_path):
    """The registry removed and published anew while the model server runs: it unloads v1 and v2 (listed END until
    it restarts) and loads the new v1. The controller, whose stable version was v2, starts over from the new v1, and
    the new v2 published next is rolled out at the canary step: before, it failed every tick while its table, still
    routing v2 alone, sent the gateway's every request to the new v2 as soon as it loaded, never judged."""
    policy = {"tick_seconds": 0.3, "steps": [{"name": "canary", "weight": 50, "hold_seconds": 600},
                                             {"name": "full", "weight": 100}]}
    with own_stack(tmp_path, redis_server, stack_files, "anew", policy, versions=2) as (registry, _, server, gateway,
                                                                                       controller):
        status = wait_until(lambda: (s := controller.status())["state"] and s, timeout=30, what="a state adopted")
        assert status["state"]["stable"] == 2
        shutil.rmtree(registry / "anew")
        (registry / "anew").mkdir()  # as `rm -r var/registry` and the next publish leave it, polled in between
        wait_until(lambda: [s for s, _ in version_states(server.grpc_target, "anew").values()] == [END, END],
                   timeout=60, what="v1 and v2 unloaded")
        publish_dir(lambda d: write_tiny_model(d, bias=0.0), registry, "anew")
        wait_available(server, "anew", 1)
        status = wait_until(lambda: (s := controller.status())["state"]["stable"] == 1 and s, timeout=30,
                            what="the controller starting over from the new v1")
        assert routing(gateway) == {"1": 100}
        [renumbered] = events(status, "renumbered")
        assert renumbered["dropped"]["stable"] == 2 and "unloaded the stable v2" in renumbered["reason"]
        publish_dir(lambda d: write_tiny_model(d, bias=0.0), registry, "anew")
        wait_available(server, "anew", 2)
        status = wait_until(lambda: (s := controller.status())["state"]["candidate"] == 2 and s, timeout=30,
                            what="the new v2 rolled out")
        assert status["state"]["step"] == 0 and routing(gateway) == {"1": 50, "2": 50}


def test_shadow_agreement_compares_labels_not_column_positions(model_server, redis_server, stack_files):
    """A head whose label order is shuffled answers other labels from the same columns: it must count as disagreeing
    (the rollout's shadow rule depends on it)."""
    gateway = start_gateway(model_server, redis_server, stack_files, "mirror")
    try:
        publish(stack_files, "mirror", labels=LABELS[1:] + LABELS[:1])
        wait_available(model_server, "mirror", 2)
        wait_until(lambda: gateway.request("PUT", "/v1/admin/routing", {"weights": {"1": 100}, "shadow": 2},
                                           token=ALICE_TOKEN)[0] == 200, timeout=30, what="shadow 2 accepted")
        for photo in photos(100, 12):
            assert gateway.classify(photo)[0] == 200

        def mirrored():
            row = gateway.request("GET", "/v1/admin/status", token=ALICE_TOKEN)[1]["versions"].get("2", {})
            return row.get("shadow_requests", 0) >= 12 and row

        row = wait_until(mirrored, timeout=30, what="12 mirrored requests")
        assert row["shadow_agreement"] == 0.0
    finally:
        gateway.stop()
