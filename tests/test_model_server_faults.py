"""The model server under faults, with real server processes: requests admitted for a version that is unloaded end
promptly (success on the old servable, or UNAVAILABLE), SIGTERM under load exits within the grace period, and the
background polls survive errors (an invalid label in a reloaded config, an OSError on a base path).

Requests are made to queue deterministically with a "gated" model: its signature spins until a gate file exists
(bounded by ``GATE_MAX_SECONDS``), and batching runs one batch of one request at a time, so while the gate is closed
exactly one request executes and the others wait in the batch queue, which the server's metrics count."""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus

from services.model_server.servable import Servable, SignatureInfo
from tests.model_server_harness import MODEL, start_server, stop_server, version_states, wait_until, write_config
from tests.support import KeepAliveClients, exit_code_within
from training_job.tiny_model import TinyClassifier, write_tiny_model
from training_job.publish import publish_dir

AVAILABLE, END = ModelVersionStatus.AVAILABLE, ModelVersionStatus.END
GATE_MAX_SECONDS = 30.0  # a closed gate never holds a model call longer than this
SHUTDOWN_GRACE_SECONDS = 10.0  # services.model_server.main.SHUTDOWN_GRACE_SECONDS


class GatedClassifier(TinyClassifier):
    """The tiny classifier, but ``serving_default`` first waits (spinning) until ``gate`` exists."""

    def __init__(self, gate: Path):
        super().__init__(bias=5.0)
        self.gate = tf.constant(str(gate))

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve_pixels(self, images):
        start = tf.timestamp()

        def closed(_):
            return tf.logical_and(tf.size(tf.io.matching_files(self.gate)) == 0,
                                  tf.timestamp() - start < GATE_MAX_SECONDS)

        waited = tf.while_loop(closed, lambda i: (i + 1,), (tf.constant(0),))
        with tf.control_dependencies(waited):
            images = tf.identity(images)
        return self._outputs(images)


def write_gated_model(version_dir: Path, gate: Path) -> Path:
    module = GatedClassifier(gate)
    tf.saved_model.save(module, str(version_dir), signatures={"serving_default": module.serve_pixels})
    return version_dir


def pixels() -> np.ndarray:
    return np.zeros((1, 8, 8, 3), np.uint8)


def grpc_predict(target: str, version: int, timeout: float = 40.0) -> tuple[str, int]:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.model_spec.version.value = version
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(pixels()))
    with grpc.insecure_channel(target) as channel:
        try:
            response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code().name, 0
    return "OK", response.model_spec.version.value


def rest_predict(url: str, version: int, timeout: float = 40.0) -> tuple[str, int]:
    body = json.dumps({"instances": pixels().tolist()}).encode()
    request = urllib.request.Request(f"{url}/v1/models/{MODEL}/versions/{version}:predict", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return str(response.status), version
    except urllib.error.HTTPError as exc:
        return str(exc.code), 0
    except TimeoutError:
        return "timeout", 0
    except (urllib.error.URLError, ConnectionError) as exc:
        return f"connection: {exc}", 0


def queued_tasks(url: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    found = re.findall(r'^model_server_batch_queue_tasks\{model_name="%s"\} (\S+)$' % MODEL, text, re.M)
    return float(found[0]) if found else 0.0


class Clients:
    """Requests sent from threads; each records (kind, outcome, seconds)."""

    def __init__(self):
        self.results: list[tuple[str, str, float]] = []
        self.threads: list[threading.Thread] = []

    def send(self, kind: str, call, *args) -> None:
        def run():
            start = time.monotonic()
            outcome, _ = call(*args)
            self.results.append((kind, outcome, time.monotonic() - start))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))


@pytest.fixture
def gated_server(tmp_path):
    """Version 1: the tiny model; version 2: the gated model (gate closed). Policy `all`, batching one at a time."""
    gate = tmp_path / "gate"
    models_dir = tmp_path / "registry"
    publish_dir(lambda d: write_tiny_model(d), models_dir, MODEL)
    publish_dir(lambda d: write_gated_model(d, gate), models_dir, MODEL)
    config = tmp_path / "models.config"
    write_config(config, {MODEL: models_dir / MODEL}, policy="all {}")
    (tmp_path / "batching.config").write_text(
        "max_batch_size { value: 1 }\nbatch_timeout_micros { value: 10000000 }\nnum_batch_threads { value: 1 }\n")
    (tmp_path / "monitoring.config").write_text('prometheus_config { enable: true path: "/metrics" }')
    server = start_server(models_dir, config, "--enable_batching",
                          f"--batching_parameters_file={tmp_path / 'batching.config'}",
                          f"--monitoring_config_file={tmp_path / 'monitoring.config'}")
    try:
        wait_until(lambda: all(version_states(server.grpc_target, MODEL).get(v, (0,))[0] == AVAILABLE
                               for v in (1, 2)), timeout=90, what="versions 1 and 2")
        yield server, gate
    finally:
        gate.touch()
        stop_server(server)


def queue_requests_on_version_2(server, clients: Clients) -> None:
    """One request executes on version 2 (held by the closed gate) and four more wait in its batch queue."""
    clients.send("grpc", grpc_predict, server.grpc_target, 2)
    wait_until(lambda: queued_tasks(server.rest_url) == 0 and _executing(server), timeout=30,
               what="the first request to start executing")
    for kind, call, target in (("grpc", grpc_predict, server.grpc_target), ("rest", rest_predict, server.rest_url)) * 2:
        clients.send(kind, call, target, 2)
    wait_until(lambda: queued_tasks(server.rest_url) == 4, timeout=30, what="four queued requests")


def _executing(server) -> bool:
    text = urllib.request.urlopen(f"{server.rest_url}/metrics", timeout=10).read().decode()
    return bool(re.search(r'^model_server_batch_running\{model_name="%s"\} 1\.0$' % MODEL, text, re.M))


def reload_with_specific_policy(server, versions: list[int]) -> None:
    from google.protobuf import text_format
    from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc

    request = model_management_pb2.ReloadConfigRequest()
    text_format.Parse(f'model_config_list {{ config {{ name: "{MODEL}" base_path: "{server.models_dir / MODEL}" '
                      'model_platform: "tensorflow" model_version_policy { specific { '
                      + " ".join(f"versions: {v}" for v in versions) + " } } } }", request.config)
    with grpc.insecure_channel(server.grpc_target) as channel:
        response = model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(request, timeout=30)
    assert response.status.error_code == 0, response.status.error_message


@pytest.mark.parametrize("unload", ["delete the folder", "reload a specific policy"])
def test_requests_queued_for_a_version_being_unloaded_end_promptly(gated_server, unload):
    server, gate = gated_server
    clients = Clients()
    queue_requests_on_version_2(server, clients)

    # version 1 stays aspired and AVAILABLE, so version 2 is unloaded at once
    if unload == "delete the folder":
        shutil.rmtree(server.models_dir / MODEL / "2")
    else:
        reload_with_specific_policy(server, [1])
    wait_until(lambda: version_states(server.grpc_target, MODEL).get(2, (END,))[0] == END, timeout=30,
               what="version 2 to be unloaded")
    gate.touch()
    clients.join(timeout=20)
    outcomes = sorted((kind, outcome) for kind, outcome, _ in clients.results)
    assert len(outcomes) == 5, f"requests still waiting 20 s after the unload: {5 - len(outcomes)}"
    assert all(o in ("OK", "UNAVAILABLE", "200", "503") for _, o in outcomes), outcomes
    assert grpc_predict(server.grpc_target, 2)[0] == "NOT_FOUND"  # new requests no longer reach it
    assert grpc_predict(server.grpc_target, 1) == ("OK", 1)


def test_sigterm_with_stranded_requests_exits_within_the_grace_period(gated_server):
    server, gate = gated_server
    clients = Clients()
    queue_requests_on_version_2(server, clients)
    shutil.rmtree(server.models_dir / MODEL / "2")
    wait_until(lambda: version_states(server.grpc_target, MODEL).get(2, (END,))[0] == END, timeout=30,
               what="version 2 to be unloaded")
    gate.touch()
    start = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(timeout=SHUTDOWN_GRACE_SECONDS + 30)
    assert time.monotonic() - start < SHUTDOWN_GRACE_SECONDS + 5, "shutdown overran its grace period"
    assert server.process.returncode == 0
    clients.join(timeout=10)
    assert len(clients.results) == 5


def test_sigterm_under_steady_load_exits_within_the_grace_period(gated_server):
    server, gate = gated_server
    gate.touch()  # both versions answer at once
    outcomes: list[str] = []
    stop = threading.Event()

    def load(call, target, version):
        while not stop.is_set():
            outcome = call(target, version, 20.0)[0]
            outcomes.append(outcome)
            if outcome not in ("OK", "200"):
                return  # told the server is going: a client stops or goes elsewhere

    threads = [threading.Thread(target=load, args=(call, target, version), daemon=True)
               for call, target in ((grpc_predict, server.grpc_target), (rest_predict, server.rest_url))
               for version in (1, 2)]
    for thread in threads:
        thread.start()
    wait_until(lambda: outcomes.count("OK") + outcomes.count("200") >= 20, timeout=60, what="20 answers")
    start = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(timeout=SHUTDOWN_GRACE_SECONDS + 30)
    assert time.monotonic() - start < SHUTDOWN_GRACE_SECONDS + 5, "shutdown overran its grace period"
    assert server.process.returncode == 0
    stop.set()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "a request outlived the server"
    # every request either succeeded or was told at once that the server is going: UNAVAILABLE / 503 from the
    # server, a refused connection, or CANCELLED (seen once: gRPC's own answer to a call that reached the server
    # in the instant its listener closed)
    assert all(o in ("OK", "200", "UNAVAILABLE", "503", "CANCELLED") or o.startswith("connection")
               for o in outcomes), sorted(set(outcomes))


def test_sigterm_under_keepalive_rest_load_leaves_no_request_it_was_sent_unanswered(gated_server):
    """Eight REST clients keep their connections busy (a predict and a model status, in turn); SIGTERM. Each
    connection's last answer says ``Connection: close``: no request sent on one meets a closed or reset connection
    instead (``services.http_stop``, as the gateway stops; tests/test_gateway_shutdown.py). A predict the closed
    batch queue no longer takes is answered 503."""
    server, gate = gated_server
    gate.touch()
    predict = json.dumps({"instances": pixels().tolist()}).encode()
    requests = [("POST", f"/v1/models/{MODEL}/versions/1:predict", predict, {"Content-Type": "application/json"}),
                ("GET", f"/v1/models/{MODEL}", None, {})]
    with KeepAliveClients(urllib.parse.urlsplit(server.rest_url).port, requests) as clients:
        wait_until(lambda: len(clients.outcomes) >= 200, timeout=60, interval=0.05, what="steady load")
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=SHUTDOWN_GRACE_SECONDS + 30)
        time.sleep(0.3)  # the clients meet the closed port
    assert server.process.returncode == 0
    lost = [o for o in clients.outcomes if o.startswith("lost")]
    assert not lost, f"{len(lost)} requests lost of {len(clients.outcomes)}: {sorted(set(lost))}"
    assert set(clients.outcomes) <= {"200", "503", "refused"}, sorted(set(clients.outcomes))


def test_sigterm_while_a_model_call_hangs_exits_within_the_grace_period(gated_server):
    server, gate = gated_server
    clients = Clients()
    queue_requests_on_version_2(server, clients)  # the gate stays closed: the executing call outlives the grace
    start = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(timeout=GATE_MAX_SECONDS + 30)
    assert time.monotonic() - start < SHUTDOWN_GRACE_SECONDS + 5, "shutdown overran its grace period"
    clients.join(timeout=10)
    assert len(clients.results) == 5
    assert all(not o.startswith(("OK", "200")) for _, o, _ in clients.results), clients.results


def test_sigterm_while_a_version_loads_exits_without_waiting_for_the_load(tmp_path):
    """A load (here a warm-up held by the closed gate) is abandoned at shutdown, as a model call past the grace
    period is: under k8s a process that outlives its terminationGracePeriodSeconds is killed."""
    from tests.test_model_server_tflite import write_warmup

    gate = tmp_path / "gate"
    models_dir = tmp_path / "registry"
    publish_dir(lambda d: write_tiny_model(d), models_dir, MODEL)
    config = tmp_path / "models.config"
    write_config(config, {MODEL: models_dir / MODEL}, policy="all {}")
    server = start_server(models_dir, config)
    try:
        wait_until(lambda: version_states(server.grpc_target, MODEL).get(1, (0,))[0] == AVAILABLE, timeout=90,
                   what="version 1")
        publish_dir(lambda d: (write_gated_model(d, gate), write_warmup(d, pixels())), models_dir, MODEL)
        wait_until(lambda: version_states(server.grpc_target, MODEL).get(2, (0,))[0] == ModelVersionStatus.LOADING,
                   timeout=30, interval=0.1, what="version 2 to be loading")
        start = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=GATE_MAX_SECONDS + 30)
        assert time.monotonic() - start < SHUTDOWN_GRACE_SECONDS, "shutdown waited for the load"
        assert server.process.returncode == 0
    finally:
        gate.touch()
        stop_server(server)


# ---------------------------------------------------------------------------------------------- background loops


def _predict_label(target: str, label: str | None) -> str:
    """The status code's name of a Predict of ``label`` (of the latest version when None)."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    if label is not None:
        request.model_spec.version_label = label
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(pixels()))
    with grpc.insecure_channel(target) as channel:
        try:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=20)
        except grpc.RpcError as exc:
            return exc.code().name
    return "OK"


def _loop_failures(url: str, loop: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    found = re.findall(r'^model_server_background_loop_failures\{loop="%s"\} (\S+)$' % loop, text, re.M)
    return float(found[0]) if found else 0.0


def test_config_poll_survives_an_invalid_label_and_applies_a_later_valid_config(tmp_path):
    models_dir = tmp_path / "registry"
    publish_dir(lambda d: write_tiny_model(d), models_dir, MODEL)
    config = tmp_path / "models.config"
    write_config(config, {MODEL: models_dir / MODEL}, policy="all {}")
    (tmp_path / "monitoring.config").write_text('prometheus_config { enable: true path: "/metrics" }')
    server = start_server(models_dir, config, "--model_config_file_poll_wait_seconds=1",
                          f"--monitoring_config_file={tmp_path / 'monitoring.config'}")
    try:
        wait_until(lambda: version_states(server.grpc_target, MODEL).get(1, (0,))[0] == AVAILABLE, what="v1")
        write_config(config, {MODEL: models_dir / MODEL}, labels={MODEL: {"not-a-valid-label": 1}}, policy="all {}")
        wait_until(lambda: _loop_failures(server.rest_url, "config_file_poll") >= 1, timeout=30,
                   what="the refused config to be counted")
        assert "Invalid version label" in server.log()
        write_config(config, {MODEL: models_dir / MODEL}, labels={MODEL: {"stable": 1}}, policy="all {}")
        wait_until(lambda: _predict_label(server.grpc_target, "stable") == "OK", timeout=60,
                   what="the later valid config's label")
    finally:
        stop_server(server)


def test_a_polled_model_config_that_does_not_answer_holds_no_request_and_no_exit(tmp_path):
    """The polled model config on a network volume whose server is away (deploy/k8s keeps it on a ReadWriteMany
    volume the rollout controller writes) blocks each read for as long as the volume is away; here the file becomes
    a FIFO nobody writes to, which blocks the same way the moment it is opened for reading. Requests are answered
    meanwhile, and SIGTERM stops the server. Before: the read ran on the event loop and held it, so no request was
    answered and SIGTERM, handled on that loop, did nothing."""
    models_dir = tmp_path / "registry"
    publish_dir(lambda d: write_tiny_model(d), models_dir, MODEL)
    config = tmp_path / "models.config"
    write_config(config, {MODEL: models_dir / MODEL}, policy="all {}")
    server = start_server(models_dir, config, "--model_config_file_poll_wait_seconds=1")
    try:
        wait_until(lambda: version_states(server.grpc_target, MODEL).get(1, (0,))[0] == AVAILABLE, what="v1")
        config.unlink()
        os.mkfifo(config)
        time.sleep(3)  # the next polls open it, and block there
        assert _predict_label(server.grpc_target, None) == "OK"
        assert version_states(server.grpc_target, MODEL)[1][0] == AVAILABLE
        server.process.terminate()
        assert exit_code_within(server.process, 20) is not None, "the model server did not stop on SIGTERM"
    finally:
        stop_server(server)


def test_file_system_poll_survives_an_oserror_on_the_base_path_and_recovers(tmp_path):
    models_dir = tmp_path / "registry"
    publish_dir(lambda d: write_tiny_model(d), models_dir, MODEL)
    link = tmp_path / "base"  # the configured base path: a symlink to the model folder
    link.symlink_to(models_dir / MODEL)
    config = tmp_path / "models.config"
    write_config(config, {MODEL: link}, policy="all {}")
    (tmp_path / "monitoring.config").write_text('prometheus_config { enable: true path: "/metrics" }')
    server = start_server(models_dir, config, f"--monitoring_config_file={tmp_path / 'monitoring.config'}")
    try:
        wait_until(lambda: version_states(server.grpc_target, MODEL).get(1, (0,))[0] == AVAILABLE, what="v1")
        link.unlink()
        link.symlink_to(link)  # listing it now fails with ELOOP, an OSError that is not "not found"
        wait_until(lambda: _loop_failures(server.rest_url, "file_system_poll") >= 1, timeout=30,
                   what="the failed poll to be counted")
        assert version_states(server.grpc_target, MODEL)[1][0] == AVAILABLE  # a failed poll changes nothing
        link.unlink()
        link.symlink_to(models_dir / MODEL)
        publish_dir(lambda d: write_tiny_model(d, bias=1.0), models_dir, MODEL)
        wait_until(lambda: version_states(server.grpc_target, MODEL).get(2, (0,))[0] == AVAILABLE, timeout=60,
                   what="version 2, published after the base path recovered")
    finally:
        stop_server(server)


# ---------------------------------------------------------------------------------------------- the batcher alone


class BlockingServable(Servable):
    """A Servable whose signature ``s`` waits until ``release`` is set, then doubles its input ``x``."""

    def __init__(self):
        self.model_name, self.version, self.path = "fake", 1, Path("/nonexistent")
        self.signature_defs = {}
        self.signatures = {"s": SignatureInfo("s", "tensorflow/serving/predict", {"x": tf.int64}, ["out"])}
        self.release = threading.Event()

    def _call(self, info, inputs, wanted):
        self.release.wait(30)
        return {"out": inputs["x"] * 2}


async def _executing_batch(batcher) -> None:
    while not any(q.running for q in batcher._queues.values()):
        await asyncio.sleep(0.01)


def _batcher(threads):
    from concurrent.futures import ThreadPoolExecutor

    from services.model_server.batching import Batcher
    from services.model_server.config import BatchingParameters

    params = BatchingParameters(max_batch_size=1, batch_timeout_micros=10_000_000, num_batch_threads=1)
    return Batcher(params, ThreadPoolExecutor(max_workers=threads))


def test_an_unloaded_servables_queue_finishes_what_it_holds():
    async def scenario():
        batcher = _batcher(threads=2)
        servable = BlockingServable()
        calls = [asyncio.create_task(batcher.run(servable, "s", {"x": np.full((1,), i)}, ())) for i in range(3)]
        await asyncio.wait_for(_executing_batch(batcher), 10)
        batcher.forget(set())  # the version was unloaded: nothing is live
        late = asyncio.create_task(batcher.run(servable, "s", {"x": np.full((1,), 9)}, ()))  # resolved just before
        servable.release.set()
        results = await asyncio.wait_for(asyncio.gather(*calls, late), 10)
        assert [int(r["out"][0]) for r in results] == [0, 2, 4, 18]
        batcher.executor.shutdown()

    asyncio.run(scenario())


def test_closing_for_shutdown_fails_what_is_left_after_the_grace():
    from services.model_server.errors import ServingError

    async def scenario():
        batcher = _batcher(threads=1)
        servable = BlockingServable()
        calls = [asyncio.create_task(batcher.run(servable, "s", {"x": np.full((1,), i)}, ())) for i in range(3)]
        await asyncio.wait_for(_executing_batch(batcher), 10)
        await asyncio.wait_for(batcher.close(grace_seconds=0.2), 10)
        outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
        assert all(isinstance(o, ServingError) and o.code == grpc.StatusCode.UNAVAILABLE for o in outcomes), outcomes
        with pytest.raises(ServingError):
            await batcher.run(servable, "s", {"x": np.full((1,), 5)}, ())
        servable.release.set()
        batcher.executor.shutdown()

    asyncio.run(scenario())
