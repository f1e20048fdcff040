"""TF Serving conformance: driven only through tensorflow-serving-api stubs and plain HTTP.

By default it starts our server (services.model_server) on free loopback ports. To run the same suite against a real
TensorFlow Serving, start it on a folder you can write to and set TF_SERVING_GRPC=host:port TF_SERVING_REST=host:port
TF_SERVING_MODEL_BASE=<that folder as seen from here> (README, "Model server"); its model config must serve
`mushrooms` from <folder>/mushrooms with policy `all {}`, and `--file_system_poll_wait_seconds=1`.
"""
from __future__ import annotations

import base64
import json
import shutil
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

from tests.model_server_harness import (
    MODEL, external_server, start_server, stop_server, version_states, wait_until, write_config,
)
from tests.support import MUSHROOMS
from tests.tiny_model import write_tiny_model
from training_job.publish import publish_dir

AVAILABLE = 30
PHOTO = sorted((MUSHROOMS / "amanita_muscaria").iterdir())[0]


def publish_tiny(models_dir, bias: float) -> int:
    version, _ = publish_dir(lambda staging: write_tiny_model(staging, bias=bias), models_dir, MODEL)
    return version


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    external = external_server()
    if external is not None:
        yield external
        return
    models_dir = tmp_path_factory.mktemp("registry")
    publish_tiny(models_dir, bias=0.0)
    config = models_dir / "models.config"
    write_config(config, {MODEL: models_dir / MODEL}, policy="all {}")
    monitoring = models_dir / "monitoring.config"
    monitoring.write_text('prometheus_config { enable: true, path: "/monitoring/prometheus/metrics" }\n')
    srv = start_server(models_dir, config, f"--monitoring_config_file={monitoring}")
    wait_until(lambda: version_states(srv.grpc_target, MODEL).get(1, (0,))[0] == AVAILABLE, what="version 1")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.grpc_target)
    yield prediction_service_pb2_grpc.PredictionServiceStub(channel)
    channel.close()


def pixels(n=1, value=None) -> np.ndarray:
    rng = np.random.default_rng(n)
    if value is not None:
        return np.full((n, 224, 224, 3), value, np.uint8)
    return rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


def predict_request(images, version=None, label=None, signature="serving_default", model=MODEL):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
    return request


def http(method, url, body=None):
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def latest_version(server) -> int:
    states = version_states(server.grpc_target, MODEL)
    return max(v for v, (state, _) in states.items() if state == AVAILABLE)


# ---------------------------------------------------------------------------------------------- gRPC


def test_predict_returns_the_contract_outputs(stub, server):
    response = stub.Predict(predict_request(pixels(3)), timeout=30)
    probabilities = tf.make_ndarray(response.outputs["probabilities"])
    assert probabilities.shape == (3, 4)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert tf.make_ndarray(response.outputs["classes"])[0][0] == b"amanita_muscaria"
    assert response.model_spec.name == MODEL and response.model_spec.version.value == latest_version(server)


def test_predict_output_filter(stub):
    request = predict_request(pixels(1))
    request.output_filter.append("probabilities")
    assert list(stub.Predict(request, timeout=30).outputs) == ["probabilities"]


@pytest.mark.parametrize("mutate, code", [
    (lambda r: setattr(r.model_spec, "name", "no_such_model"), grpc.StatusCode.NOT_FOUND),
    (lambda r: r.model_spec.version.__setattr__("value", 999), grpc.StatusCode.NOT_FOUND),
    (lambda r: setattr(r.model_spec, "version_label", "no_such_label"), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda r: setattr(r.model_spec, "signature_name", "nope"), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda r: r.inputs["wrong_name"].CopyFrom(r.inputs.pop("images")), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda r: r.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 224, 224), np.uint8))),
     grpc.StatusCode.INVALID_ARGUMENT),
])
def test_predict_errors_use_tf_serving_status_codes(stub, mutate, code):
    request = predict_request(pixels(1))
    mutate(request)
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(request, timeout=30)
    assert err.value.code() == code


def test_get_model_metadata_describes_signatures(stub):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = MODEL
    request.metadata_field.append("signature_def")
    response = stub.GetModelMetadata(request, timeout=30)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    serving = signatures.signature_def["serving_default"]
    assert set(serving.inputs) == {"images"}
    assert {"probabilities", "classes", "mushroom_score", "not_a_mushroom"} <= set(serving.outputs)
    assert "predict_image_bytes" in signatures.signature_def


def test_classify_needs_a_classify_signature(stub):
    from tensorflow_serving.apis import classification_pb2

    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = MODEL
    request.input.example_list.examples.add()
    with pytest.raises(grpc.RpcError) as err:
        stub.Classify(request, timeout=30)
    assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)


# ---------------------------------------------------------------------------------------------- REST


def test_rest_status_and_metadata(server):
    status, body = http("GET", f"{server.rest_url}/v1/models/{MODEL}")
    assert status == 200
    states = {s["version"]: s["state"] for s in json.loads(body)["model_version_status"]}
    assert states[str(latest_version(server))] == "AVAILABLE"
    status, body = http("GET", f"{server.rest_url}/v1/models/{MODEL}/versions/1/metadata")
    assert status == 200
    metadata = json.loads(body)
    assert metadata["model_spec"]["version"] == "1"
    assert "serving_default" in metadata["metadata"]["signature_def"]["signature_def"]


def test_rest_predict_row_and_columnar_agree_with_grpc(server, stub):
    images = pixels(2)
    grpc_probs = tf.make_ndarray(stub.Predict(predict_request(images, version=1), timeout=30).outputs["probabilities"])
    url = f"{server.rest_url}/v1/models/{MODEL}/versions/1:predict"
    status, body = http("POST", url, {"instances": [{"images": img.tolist()} for img in images]})
    assert status == 200
    rows = json.loads(body)["predictions"]
    np.testing.assert_allclose([r["probabilities"] for r in rows], grpc_probs, rtol=1e-5)
    status, body = http("POST", url, {"inputs": {"images": images.tolist()}})
    assert status == 200
    np.testing.assert_allclose(json.loads(body)["outputs"]["probabilities"], grpc_probs, rtol=1e-5)


def test_rest_predict_b64_encoded_photo(server):
    photo = base64.b64encode(PHOTO.read_bytes()).decode()
    status, body = http("POST", f"{server.rest_url}/v1/models/{MODEL}:predict",
                        {"signature_name": "predict_image_bytes", "instances": [{"b64": photo}]})
    assert status == 200, body
    (row,) = json.loads(body)["predictions"]
    assert len(row["probabilities"]) == 4 and row["classes"][0] == "amanita_muscaria"


@pytest.mark.parametrize("path, body, status", [
    (f"/v1/models/{MODEL}:predict", b"{not json", 400),
    (f"/v1/models/{MODEL}:predict", {"neither": 1}, 400),
    (f"/v1/models/{MODEL}:predict", {"instances": [{"nope": [1]}]}, 400),
    (f"/v1/models/{MODEL}:predict", {"signature_name": "predict_image_bytes", "instances": [{"b64": "@@@"}]}, 400),
    ("/v1/models/no_such_model:predict", {"instances": [1]}, 404),
    (f"/v1/models/{MODEL}/versions/999:predict", {"instances": [1]}, 404),
])
def test_rest_errors_are_json(server, path, body, status):
    code, raw = http("POST", f"{server.rest_url}{path}", body)
    assert code == status
    assert isinstance(json.loads(raw)["error"], str)


# ---------------------------------------------------------------------------------------------- the registry


def test_new_version_under_load_no_request_fails(server, stub):
    before = latest_version(server)
    failures, answered_by = [], set()
    stop = threading.Event()

    def load():
        while not stop.is_set():
            try:
                answered_by.add(stub.Predict(predict_request(pixels(1)), timeout=30).model_spec.version.value)
            except grpc.RpcError as exc:
                failures.append(exc.code())

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        new = publish_tiny(server.models_dir, bias=3.0)
        wait_until(lambda: new in answered_by, timeout=60, what=f"version {new} to answer")
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert before in answered_by and new in answered_by


def test_half_written_temp_folder_is_never_served(server):
    staging = server.models_dir / MODEL / ".tmp-half-written"
    staging.mkdir()
    (staging / "saved_model.pb").write_bytes(b"half")
    time.sleep(2.5)  # two polls
    states = version_states(server.grpc_target, MODEL)
    assert all(isinstance(v, int) for v in states) and all(error == "" for _, error in states.values())
    shutil.rmtree(staging)


def test_corrupt_version_is_reported_and_others_keep_serving(server, stub):
    model_dir = server.models_dir / MODEL
    good = latest_version(server)
    corrupt = max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit()) + 1
    staging = model_dir / ".tmp-corrupt"
    shutil.copytree(model_dir / str(good), staging)
    (staging / "saved_model.pb").write_bytes(b"\x00not a saved model")
    staging.rename(model_dir / str(corrupt))
    try:
        wait_until(lambda: version_states(server.grpc_target, MODEL).get(corrupt, (0, ""))[1], timeout=60,
                   what="the corrupt version's error")
        assert stub.Predict(predict_request(pixels(1)), timeout=30).model_spec.version.value == good
    finally:
        shutil.rmtree(model_dir / str(corrupt))
    wait_until(lambda: corrupt not in version_states(server.grpc_target, MODEL), timeout=30,
               what="the corrupt version to be forgotten")


def test_removed_version_folder_is_unloaded(server, stub):
    extra = publish_tiny(server.models_dir, bias=-2.0)
    wait_until(lambda: version_states(server.grpc_target, MODEL).get(extra, (0,))[0] == AVAILABLE,
               what=f"version {extra}")
    shutil.rmtree(server.models_dir / MODEL / str(extra))
    wait_until(lambda: version_states(server.grpc_target, MODEL).get(extra, (50,))[0] == 50, timeout=30,
               what=f"version {extra} to end")
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(predict_request(pixels(1), version=extra), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_metrics_count_requests(server, stub):
    if server.external:
        pytest.skip("the real TF Serving's metric names differ; checked against ours only")
    stub.Predict(predict_request(pixels(1)), timeout=30)
    status, body = http("GET", f"{server.rest_url}/monitoring/prometheus/metrics")
    text = body.decode()
    assert status == 200
    assert ':tensorflow:serving:request_count_total{API="grpc_predict"' in text
    assert ":tensorflow:serving:request_latency_bucket" in text
    assert f':tensorflow:serving:loaded_versions{{model_name="{MODEL}"}}' in text


# ---------------------------------------------------------------------------------------------- version policy
# TF Serving's AvailabilityPreservingPolicy under `latest`: an unaspired version is unloaded as soon as an aspired
# one is AVAILABLE, so a newer folder that never loads costs the oldest version its place under `latest 2`, and
# nothing under `latest 1`. (Operators keep routed versions with a `specific` policy: README, "Model server".)


@pytest.fixture(scope="module")
def latest_server(tmp_path_factory):
    """Model `latest1` (latest 1) with version 1 and model `latest2` (latest 2) with versions 1 and 2."""
    if external_server() is not None:
        pytest.skip("needs its own model config (latest policies); run against our server only")
    models_dir = tmp_path_factory.mktemp("latest-registry")
    for model, count in (("latest1", 1), ("latest2", 2)):
        for bias in range(count):
            publish_dir(lambda staging, b=bias: write_tiny_model(staging, bias=float(b)), models_dir, model)
    config = models_dir / "models.config"
    config.write_text("model_config_list { " + " ".join(
        f'config {{ name: "{m}" base_path: "{models_dir / m}" model_platform: "tensorflow" '
        f'model_version_policy {{ latest {{ num_versions: {n} }} }} }}' for m, n in (("latest1", 1), ("latest2", 2)))
        + " }\n")
    srv = start_server(models_dir, config)
    wait_until(lambda: version_states(srv.grpc_target, "latest1").get(1, (0,))[0] == AVAILABLE
               and version_states(srv.grpc_target, "latest2").get(2, (0,))[0] == AVAILABLE, what="both models")
    yield srv
    stop_server(srv)


def add_broken_version(model_dir, version: int, corrupt: bool) -> None:
    staging = model_dir / f".tmp-broken-{version}"
    staging.mkdir()
    if corrupt:
        (staging / "saved_model.pb").write_bytes(b"\x00not a saved model")
    staging.rename(model_dir / str(version))


def served_by(server, model: str) -> int:
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        return stub.Predict(predict_request(pixels(1), model=model), timeout=30).model_spec.version.value


def test_latest_1_keeps_its_version_when_a_newer_folder_is_corrupt(latest_server):
    add_broken_version(latest_server.models_dir / "latest1", 2, corrupt=True)
    wait_until(lambda: version_states(latest_server.grpc_target, "latest1").get(2, (0, ""))[1], timeout=60,
               what="version 2's load error")
    states = version_states(latest_server.grpc_target, "latest1")
    assert states[1][0] == AVAILABLE and states[2][0] != AVAILABLE
    assert served_by(latest_server, "latest1") == 1


def test_latest_2_unloads_its_oldest_version_when_an_empty_newer_folder_appears(latest_server):
    add_broken_version(latest_server.models_dir / "latest2", 3, corrupt=False)
    wait_until(lambda: version_states(latest_server.grpc_target, "latest2").get(1, (50,))[0] == 50, timeout=60,
               what="version 1 to be unloaded")
    states = version_states(latest_server.grpc_target, "latest2")
    assert states[2][0] == AVAILABLE and states.get(3, (0,))[0] != AVAILABLE
    assert served_by(latest_server, "latest2") == 2
