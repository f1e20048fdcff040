"""TF Serving conformance: driven only through tensorflow-serving-api stubs and plain HTTP.

By default it starts our server (services.model_server) on free loopback ports. To run the same suite against a real
TensorFlow Serving, start it on a folder you can write to and set TF_SERVING_GRPC=host:port TF_SERVING_REST=host:port
TF_SERVING_MODEL_BASE=<that folder as seen from here> (README, "Model server"); its model config must serve
`mushrooms` from <folder>/mushrooms with policy `all {}`, with `--file_system_poll_wait_seconds=1` and a monitoring
config serving Prometheus metrics at /monitoring/prometheus/metrics.
"""
from __future__ import annotations

import base64
import json
import shutil
import threading
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.example import example_pb2
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    classification_pb2, get_model_metadata_pb2, get_model_status_pb2, inference_pb2, model_service_pb2_grpc,
    predict_pb2, prediction_service_pb2_grpc, regression_pb2,
)

from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus

from devstack.configs import MONITORING_PATH, write_monitoring_config
from tests.model_server_harness import (
    MODEL, external_server, start_server, stop_server, version_states, wait_until, write_config,
)
from tests.support import MUSHROOMS
from training_job.tiny_model import LABELS, write_tiny_model
from training_job import registry
from training_job.paths import PROJECT_ROOT
from training_job.publish import publish_dir

AVAILABLE, END = ModelVersionStatus.AVAILABLE, ModelVersionStatus.END
NO_RETRY_WAIT = "--load_retry_interval_micros=0"  # a failed load is retried at the next poll, not a minute later
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
    write_monitoring_config(monitoring)
    # a corrupt version is given up on after its retries, taken without the default minute between them
    srv = start_server(models_dir, config, f"--monitoring_config_file={monitoring}", NO_RETRY_WAIT)
    wait_until(lambda: version_states(srv.grpc_target, MODEL).get(1, (0,))[0] == AVAILABLE, what="version 1")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def deployed_batching_server(tmp_path_factory):
    """Our server with batching on, as the stack and deploy/ run it: deploy/tfserving/batching.config itself."""
    external = external_server()
    if external is not None:
        yield external
        return
    models_dir = tmp_path_factory.mktemp("registry-batched")
    publish_tiny(models_dir, bias=0.0)
    config = models_dir / "models.config"
    write_config(config, {MODEL: models_dir / MODEL}, policy="all {}")
    monitoring = models_dir / "monitoring.config"
    write_monitoring_config(monitoring)
    srv = start_server(models_dir, config, "--enable_batching",
                       f"--batching_parameters_file={PROJECT_ROOT / 'deploy' / 'tfserving' / 'batching.config'}",
                       f"--monitoring_config_file={monitoring}")
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
    # TF Serving's predict_util.cc: FAILED_PRECONDITION 'Serving signature key "nope" not found.' (its REST API
    # checks first and answers INVALID_ARGUMENT)
    (lambda r: setattr(r.model_spec, "signature_name", "nope"), grpc.StatusCode.FAILED_PRECONDITION),
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
    if request.model_spec.signature_name == "nope":
        assert err.value.details() == 'Serving signature key "nope" not found.'


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


def test_predict_fills_the_typed_fields_not_tensor_content(stub):
    """TF Serving's Predict answers with Tensor::AsProtoField (predict_util.cc): float_val, bool_val, string_val, ...
    Clients reading `.float_val` (TF Serving's mnist and resnet example clients) rely on it."""
    response = stub.Predict(predict_request(pixels(3)), timeout=30)
    probabilities = response.outputs["probabilities"]
    assert probabilities.dtype == types_pb2.DT_FLOAT and probabilities.tensor_content == b""
    assert [d.size for d in probabilities.tensor_shape.dim] == [3, 4]
    np.testing.assert_allclose(np.array(probabilities.float_val).reshape(3, 4).sum(axis=1), 1.0, rtol=1e-5)
    assert len(response.outputs["mushroom_score"].float_val) == 3
    assert len(response.outputs["not_a_mushroom"].bool_val) == 3
    assert list(response.outputs["classes"].string_val[:4]) == [label.encode() for label in LABELS]
    assert all(t.tensor_content == b"" for t in response.outputs.values())


def mean_colour_example(colour) -> example_pb2.Example:
    example = example_pb2.Example()
    example.features.feature["mean_colour"].float_list.value.extend(colour)
    return example


COLOURS = [(-0.5, 0.25, 0.75), (0.9, -0.9, 0.0)]


def probabilities_of_mean_colours(stub, colours=COLOURS) -> np.ndarray:
    """serving_default on photos of one flat colour each: the numbers Classify/Regress must give for that colour."""
    values = [np.round((np.array(c) + 1) * 127.5).astype(np.uint8) for c in colours]
    images = np.stack([v.reshape(1, 1, 3) for v in values])  # one pixel: its mean is exact
    response = stub.Predict(predict_request(images, version=1), timeout=30)
    return tf.make_ndarray(response.outputs["probabilities"])


def flat_colours(colours=COLOURS):
    return [tuple(np.round((np.array(c) + 1) * 127.5) / 127.5 - 1) for c in colours]


def test_classify_a_tf2_export_as_tf_serving_does(stub):
    """A TF2 export's signatures all have method_name tensorflow/serving/predict; TF Serving serves them by Classify
    unless --enable_signature_method_name_check (off by default)."""
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = "classify_mean_colour"
    request.model_spec.version.value = 1
    for colour in flat_colours():
        request.input.example_list.examples.append(mean_colour_example(colour))
    response = stub.Classify(request, timeout=30)
    expected = probabilities_of_mean_colours(stub)
    assert len(response.result.classifications) == 2
    for row, classification in enumerate(response.result.classifications):
        assert [c.label for c in classification.classes] == LABELS
        np.testing.assert_allclose([c.score for c in classification.classes], expected[row], rtol=1e-4)
    assert response.model_spec.name == MODEL and response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "classify_mean_colour"


def test_classify_merges_the_context_into_each_example(stub):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = "classify_mean_colour"
    request.model_spec.version.value = 1
    (colour,) = flat_colours(COLOURS[:1])
    request.input.example_list_with_context.context.CopyFrom(mean_colour_example(colour))
    request.input.example_list_with_context.examples.add()
    (classification,) = stub.Classify(request, timeout=30).result.classifications
    np.testing.assert_allclose([c.score for c in classification.classes],
                               probabilities_of_mean_colours(stub, COLOURS[:1])[0], rtol=1e-4)


def test_regress_a_tf2_export(stub):
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = "regress_mushroom_score"
    request.model_spec.version.value = 1
    for colour in flat_colours():
        request.input.example_list.examples.append(mean_colour_example(colour))
    response = stub.Regress(request, timeout=30)
    np.testing.assert_allclose([r.value for r in response.result.regressions],
                               probabilities_of_mean_colours(stub).max(axis=1), rtol=1e-4)
    assert response.model_spec.signature_name == "regress_mushroom_score"
    assert response.model_spec.version.value == 1


def test_multi_inference_runs_each_task_on_the_same_examples(stub):
    request = inference_pb2.MultiInferenceRequest()
    for signature, method in (("regress_mushroom_score", "tensorflow/serving/regress"),
                              ("classify_mean_colour", "tensorflow/serving/classify")):
        task = request.tasks.add()
        task.model_spec.name = MODEL
        task.model_spec.signature_name = signature
        task.model_spec.version.value = 1
        task.method_name = method
    for colour in flat_colours():
        request.input.example_list.examples.append(mean_colour_example(colour))
    response = stub.MultiInference(request, timeout=30)
    expected = probabilities_of_mean_colours(stub)
    regression, classification = response.results
    np.testing.assert_allclose([r.value for r in regression.regression_result.regressions], expected.max(axis=1),
                               rtol=1e-4)
    np.testing.assert_allclose([[c.score for c in cs.classes] for cs in classification.classification_result
                                .classifications], expected, rtol=1e-4)
    assert [r.model_spec.signature_name for r in response.results] == ["regress_mushroom_score",
                                                                       "classify_mean_colour"]
    assert all(r.model_spec.version.value == 1 for r in response.results)


@pytest.mark.parametrize("mutate", [
    lambda r: r.input.example_list.Clear(),  # no examples: "Input is empty."
    lambda r: setattr(r.model_spec, "signature_name", "serving_default"),  # input "images", not "inputs"
    lambda r: setattr(r.model_spec, "signature_name", "no_such_signature"),
])
def test_classify_and_regress_refuse_what_tf_serving_refuses(stub, mutate):
    for request, call in ((classification_pb2.ClassificationRequest(), stub.Classify),
                          (regression_pb2.RegressionRequest(), stub.Regress)):
        request.model_spec.name = MODEL
        request.model_spec.signature_name = ("classify_mean_colour" if call is stub.Classify
                                             else "regress_mushroom_score")
        request.input.example_list.examples.append(mean_colour_example(COLOURS[0]))
        mutate(request)
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_multi_inference_refuses_mixed_models_and_unknown_methods(stub):
    request = inference_pb2.MultiInferenceRequest()
    request.input.example_list.examples.append(mean_colour_example(COLOURS[0]))
    task = request.tasks.add(method_name="tensorflow/serving/predict")
    task.model_spec.name, task.model_spec.signature_name = MODEL, "regress_mushroom_score"
    with pytest.raises(grpc.RpcError) as err:
        stub.MultiInference(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    task.method_name = "tensorflow/serving/regress"
    other = request.tasks.add(method_name="tensorflow/serving/classify")
    other.model_spec.name, other.model_spec.signature_name = "another_model", "classify_mean_colour"
    with pytest.raises(grpc.RpcError) as err:
        stub.MultiInference(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_status_of_a_healthy_version_carries_an_ok_status(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = MODEL
        request.model_spec.version.value = 1
        (entry,) = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=10) \
            .model_version_status
    assert entry.HasField("status") and entry.status.error_code == 0 and entry.status.error_message == ""


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


def test_rest_status_prints_the_ok_status_as_tf_serving(server):
    """TF Serving prints its JSON with always_print_fields_with_no_presence (http_rest_api_util.cc)."""
    status, body = http("GET", f"{server.rest_url}/v1/models/{MODEL}/versions/1")
    assert status == 200
    assert json.loads(body) == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}


def test_rest_metadata_prints_default_valued_fields(server):
    status, body = http("GET", f"{server.rest_url}/v1/models/{MODEL}/versions/1/metadata")
    assert status == 200
    metadata = json.loads(body)
    assert metadata["model_spec"] == {"name": MODEL, "signature_name": "", "version": "1"}
    serving = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert serving["method_name"] == "tensorflow/serving/predict" and serving["defaults"] == {}
    images = serving["inputs"]["images"]
    assert images["dtype"] == "DT_UINT8" and images["tensor_shape"]["unknown_rank"] is False
    assert images["tensor_shape"]["dim"][0] == {"size": "-1", "name": ""}


def test_rest_classify_and_regress_in_tf_serving_json(server, stub):
    expected = probabilities_of_mean_colours(stub)
    examples = [{"mean_colour": list(colour)} for colour in flat_colours()]
    status, body = http("POST", f"{server.rest_url}/v1/models/{MODEL}/versions/1:classify",
                        {"signature_name": "classify_mean_colour", "examples": examples})
    assert status == 200, body
    results = json.loads(body)["results"]
    assert [[label for label, _ in row] for row in results] == [LABELS, LABELS]
    np.testing.assert_allclose([[score for _, score in row] for row in results], expected, rtol=1e-4)
    status, body = http("POST", f"{server.rest_url}/v1/models/{MODEL}/versions/1:regress",
                        {"signature_name": "regress_mushroom_score", "examples": examples})
    assert status == 200, body
    np.testing.assert_allclose(json.loads(body)["results"], expected.max(axis=1), rtol=1e-4)


def test_rest_classify_with_context(server, stub):
    (colour,) = flat_colours(COLOURS[:1])
    status, body = http("POST", f"{server.rest_url}/v1/models/{MODEL}/versions/1:classify",
                        {"signature_name": "classify_mean_colour", "context": {"mean_colour": list(colour)},
                         "examples": [{}]})
    assert status == 200, body
    (row,) = json.loads(body)["results"]
    np.testing.assert_allclose([score for _, score in row], probabilities_of_mean_colours(stub, COLOURS[:1])[0],
                               rtol=1e-4)


@pytest.mark.parametrize("method, body", [
    (":classify", {"signature_name": "classify_mean_colour"}),  # no "examples"
    (":classify", {"signature_name": "classify_mean_colour", "examples": []}),
    (":classify", {"signature_name": "classify_mean_colour", "examples": [{"mean_colour": [[1.0]]}]}),
    (":classify", {"examples": [{"mean_colour": [0.0, 0.0, 0.0]}]}),  # serving_default takes images
    (":regress", {"signature_name": "no_such_signature", "examples": [{"mean_colour": [0.0, 0.0, 0.0]}]}),
])
def test_rest_classify_and_regress_errors(server, method, body):
    status, raw = http("POST", f"{server.rest_url}/v1/models/{MODEL}{method}", body)
    assert status == 400
    message = json.loads(raw)["error"]
    assert isinstance(message, str) and "predict signatures only" not in message


def tf_serving_decimal(value: float) -> float:
    """The number TF Serving's REST API writes for a float32 (json_tensor.cc WriteDecimal): printf %g, or %.9g
    when six digits do not give the float back; as the double that JSON text parses to."""
    text = "%g" % value
    if np.float32(float(text)) != np.float32(value):
        text = "%.9g" % value
    return float(text)


def test_rest_writes_float32_outputs_as_tf_serving_writes_them(server, stub):
    """Not the float32's exact binary value widened to a double (0.10000000149011612), but its short decimal
    (0.1): a client comparing the JSON with TF Serving's sees the same numbers."""
    images = pixels(2)
    grpc_outputs = stub.Predict(predict_request(images, version=1), timeout=30).outputs
    expected = [[tf_serving_decimal(v) for v in row] for row in tf.make_ndarray(grpc_outputs["probabilities"]).tolist()]
    status, body = http("POST", f"{server.rest_url}/v1/models/{MODEL}/versions/1:predict",
                        {"inputs": {"images": images.tolist()}})
    assert status == 200
    outputs = json.loads(body)["outputs"]
    assert outputs["probabilities"] == expected
    assert outputs["mushroom_score"] == [tf_serving_decimal(v) for v in grpc_outputs["mushroom_score"].float_val]
    colours = [{"mean_colour": list(colour)} for colour in flat_colours()]
    status, body = http("POST", f"{server.rest_url}/v1/models/{MODEL}/versions/1:regress",
                        {"signature_name": "regress_mushroom_score", "examples": colours})
    regress = regression_pb2.RegressionRequest()
    regress.model_spec.name, regress.model_spec.signature_name = MODEL, "regress_mushroom_score"
    regress.model_spec.version.value = 1
    for colour in flat_colours():
        regress.input.example_list.examples.append(mean_colour_example(colour))
    values = [r.value for r in stub.Regress(regress, timeout=30).result.regressions]
    assert json.loads(body)["results"] == [tf_serving_decimal(v) for v in values]


# ---------------------------------------------------------------------------------------------- the registry


def test_new_version_under_load_no_request_fails(deployed_batching_server):
    server = deployed_batching_server
    channel = grpc.insecure_channel(server.grpc_target)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    before = latest_version(server)
    failures, answers = [], []
    stop = threading.Event()

    def load():
        while not stop.is_set():
            try:
                answers.append(stub.Predict(predict_request(pixels(1)), timeout=30).model_spec.version.value)
            except grpc.RpcError as exc:
                failures.append(exc.code())

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(answers) >= 8, timeout=60, interval=0.05, what="answers before the publish")
        new = publish_tiny(server.models_dir, bias=3.0)
        wait_until(lambda: new in answers, timeout=60, what=f"version {new} to answer")
        after_switch = len(answers)
        wait_until(lambda: len(answers) >= after_switch + 8, timeout=60, interval=0.05,
                   what="answers after the switch")
    finally:
        stop.set()
        for t in threads:
            t.join()
        channel.close()
    assert failures == []
    assert before in answers and new in answers


def test_half_written_temp_folder_is_never_served(server):
    model_dir = server.models_dir / MODEL
    staging = model_dir / ".tmp-half-written"
    staging.mkdir()
    (staging / "saved_model.pb").write_bytes(b"half")
    try:
        # A version published after the staging folder exists: once it is AVAILABLE, a poll has seen both.
        witness = publish_tiny(server.models_dir, bias=1.0)
        wait_until(lambda: version_states(server.grpc_target, MODEL).get(witness, (0,))[0] == AVAILABLE,
                   timeout=60, what=f"version {witness}, published after the staging folder")
        states = version_states(server.grpc_target, MODEL)
        assert set(states) <= set(registry.versions(model_dir)), states
        assert all(error == "" for _, error in states.values()), states
    finally:
        shutil.rmtree(staging)


def test_corrupt_version_is_reported_and_others_keep_serving(server, stub):
    model_dir = server.models_dir / MODEL
    good = latest_version(server)
    corrupt = max(registry.versions(model_dir)) + 1
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
    wait_until(lambda: version_states(server.grpc_target, MODEL).get(extra, (END,))[0] == END, timeout=30,
               what=f"version {extra} to end")
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(predict_request(pixels(1), version=extra), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def metrics_page(server) -> str:
    """The server's Prometheus page, at the path both servers are configured with (checked answered)."""
    status, body = http("GET", server.rest_url + MONITORING_PATH)
    assert status == 200
    return body.decode()


def test_metrics_count_requests(server, stub):
    """TF Serving's exporter (util/prometheus_exporter.cc) prints a counter under its own name, without the `_total`
    suffix prometheus_client adds: dashboards query `:tensorflow:serving:request_count`."""
    stub.Predict(predict_request(pixels(1)), timeout=30)
    text = metrics_page(server)
    assert "# TYPE :tensorflow:serving:request_count counter" in text
    assert ":tensorflow:serving:request_count{" in text and "request_count_total" not in text
    assert "_created" not in text
    if server.external:
        return  # the rest are our own metric names
    assert f':tensorflow:serving:request_count{{model_name="{MODEL}",status="OK"}}' in text
    assert ":tensorflow:serving:request_latency_bucket" in text
    assert f':tensorflow:serving:loaded_versions{{model_name="{MODEL}"}}' in text


def test_request_count_is_counted_by_model_and_status_alone_as_tf_serving_counts_it(server, stub):
    """TF Serving's request_count (RecordModelRequestCount, servables/tensorflow/util.cc) has the labels
    ``model_name`` and ``status`` (the status code's name): one series per model and outcome, however many versions
    a model server outlives."""
    for version in sorted(v for v, (state, _) in version_states(server.grpc_target, MODEL).items()
                          if state == AVAILABLE):
        stub.Predict(predict_request(pixels(1), version=version), timeout=30)
    with pytest.raises(grpc.RpcError) as missing:
        stub.Predict(predict_request(pixels(1), version=987654), timeout=30)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    samples = metric_samples(server, ":tensorflow:serving:request_count_total")  # the parser's name for a counter
    assert samples and {tuple(sorted(sample.labels)) for sample in samples} == {("model_name", "status")}
    assert {(s.labels["model_name"], s.labels["status"]) for s in samples} >= {(MODEL, "OK"), (MODEL, "NOT_FOUND")}


def metric_samples(server, name: str, **labels: str) -> list:
    """The samples called ``name`` with these label values on the server's Prometheus page."""
    from prometheus_client.parser import text_string_to_metric_families

    return [sample for family in text_string_to_metric_families(metrics_page(server)) for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())]


# Buckets::Exponential(10, 1.8, 33) of TF Serving's servables/tensorflow/util.cc, in microseconds, then +Inf
TF_SERVING_LATENCY_BOUNDS = [10 * 1.8 ** i for i in range(33)] + [float("inf")]


def test_latencies_are_tf_servings_microsecond_histograms(server, stub):
    """TF Serving records request_latency (a call answered OK, by API and entrypoint) and runtime_latency (the model
    run) in microseconds, in the same buckets (servables/tensorflow/util.cc; API "Predict" over gRPC, the URL's verb
    over REST; runtime "TF1"): a dashboard's quantiles read the same numbers from either server."""
    stub.Predict(predict_request(pixels(1)), timeout=30)
    status, _ = http("POST", f"{server.rest_url}/v1/models/{MODEL}:predict", {"instances": pixels(1).tolist()})
    assert status == 200
    with pytest.raises(grpc.RpcError):
        stub.Predict(predict_request(pixels(1), model="no_such_model"), timeout=30)
    for name, labels in ((":tensorflow:serving:request_latency", {"API": "Predict", "entrypoint": "GRPC"}),
                         (":tensorflow:serving:request_latency", {"API": "predict", "entrypoint": "REST"}),
                         (":tensorflow:serving:runtime_latency", {"API": "Predict", "runtime": "TF1"})):
        count = sum(s.value for s in metric_samples(server, name + "_count", model_name=MODEL, **labels))
        total = sum(s.value for s in metric_samples(server, name + "_sum", model_name=MODEL, **labels))
        assert count >= 1, (name, labels)
        assert 10 <= total / count <= 60e6, (name, labels, total / count)  # microseconds, not seconds
        bounds = sorted({float(s.labels["le"]) for s in metric_samples(server, name + "_bucket", model_name=MODEL,
                                                                        **labels)})
        assert bounds == pytest.approx(TF_SERVING_LATENCY_BOUNDS, rel=1e-5), name
    # only calls answered OK are timed (TF Serving's PredictionServiceImpl, http_server.cc)
    assert not metric_samples(server, ":tensorflow:serving:request_latency_count", model_name="no_such_model")


def test_bucket_bounds_are_written_as_tf_servings_exporter_writes_them(server, stub):
    """TF Serving's Prometheus exporter writes a bucket's bound with absl::StrCat, six significant digits as
    printf's %g ("18", "188.957", "1.27482e+06"; util/prometheus_exporter.cc). Prometheus 2 keeps ``le`` as the
    string it scraped, so a query or a sum by ``le`` over a fleet of TF Serving and this server needs the same
    strings from both."""
    stub.Predict(predict_request(pixels(1)), timeout=30)
    written = [s.labels["le"] for s in metric_samples(server, ":tensorflow:serving:request_latency_bucket",
                                                      model_name=MODEL, API="Predict", entrypoint="GRPC")]
    assert written == ["%.6g" % bound for bound in TF_SERVING_LATENCY_BOUNDS[:-1]] + ["+Inf"]
    assert written[:6] == ["10", "18", "32.4", "58.32", "104.976", "188.957"]


def test_batched_calls_are_timed_in_the_queue(deployed_batching_server):
    """TF Serving's batching session records each task's wait in the batch queue (queuing_latency, microseconds, by
    the batching parameters' thread_pool_name, "batch_threads" unless set); runtime_latency includes it, as a
    batched Session::Run blocks until its batch has run."""
    server = deployed_batching_server
    channel = grpc.insecure_channel(server.grpc_target)
    prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(predict_request(pixels(1)), timeout=30)
    channel.close()
    if server.external:
        return  # TF Serving's queuing_latency is the same, but the external server's batching is its own setting
    queuing = ":tensorflow:serving:batching_session:queuing_latency"
    count = sum(s.value for s in metric_samples(server, queuing + "_count", thread_pool_name="batch_threads"))
    total = sum(s.value for s in metric_samples(server, queuing + "_sum", thread_pool_name="batch_threads"))
    assert count >= 1 and 0 < total / count <= 60e6
    runtime = metric_samples(server, ":tensorflow:serving:runtime_latency_sum", model_name=MODEL, API="Predict")
    assert sum(s.value for s in runtime) >= total


# ---------------------------------------------------------------------------------------------- version policy
# TF Serving's AvailabilityPreservingPolicy under `latest`: an unaspired version is unloaded as soon as an aspired
# one is AVAILABLE, so a newer folder that never loads costs the oldest version its place under `latest 2`, and
# nothing under `latest 1`. (Operators keep routed versions with a `specific` policy: README, "Model server".)
# Under `specific`, the file-system source aspires only the listed versions it finds: a listed folder that vanishes
# is unloaded once another listed version is AVAILABLE (file_system_storage_path_source.cc, AspireSpecificVersions).


@pytest.fixture(scope="module")
def latest_server(tmp_path_factory):
    """Model `latest1` (latest 1) with version 1, model `latest2` (latest 2) with versions 1 and 2, and model
    `specific12` (specific 1, 2) with versions 1 and 2."""
    if external_server() is not None:
        pytest.skip("needs its own model config (latest policies); run against our server only")
    models_dir = tmp_path_factory.mktemp("latest-registry")
    policies = {"latest1": "latest { num_versions: 1 }", "latest2": "latest { num_versions: 2 }",
                "specific12": "specific { versions: 1 versions: 2 }"}
    for model, count in (("latest1", 1), ("latest2", 2), ("specific12", 2)):
        for bias in range(count):
            publish_dir(lambda staging, b=bias: write_tiny_model(staging, bias=float(b)), models_dir, model)
    config = models_dir / "models.config"
    config.write_text("model_config_list { " + " ".join(
        f'config {{ name: "{m}" base_path: "{models_dir / m}" model_platform: "tensorflow" '
        f'model_version_policy {{ {policy} }} }}' for m, policy in policies.items()) + " }\n")
    srv = start_server(models_dir, config, NO_RETRY_WAIT)
    wait_until(lambda: version_states(srv.grpc_target, "latest1").get(1, (0,))[0] == AVAILABLE
               and version_states(srv.grpc_target, "latest2").get(2, (0,))[0] == AVAILABLE
               and all(version_states(srv.grpc_target, "specific12").get(v, (0,))[0] == AVAILABLE for v in (1, 2)),
               what="the three models")
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
    wait_until(lambda: version_states(latest_server.grpc_target, "latest2").get(1, (END,))[0] == END, timeout=60,
               what="version 1 to be unloaded")
    states = version_states(latest_server.grpc_target, "latest2")
    assert states[2][0] == AVAILABLE and states.get(3, (0,))[0] != AVAILABLE
    assert served_by(latest_server, "latest2") == 2


def test_specific_unloads_a_listed_version_whose_folder_vanished(latest_server):
    model_dir = latest_server.models_dir / "specific12"
    (model_dir / "1").rename(model_dir / ".removed-1")
    wait_until(lambda: version_states(latest_server.grpc_target, "specific12").get(1, (50,))[0] == 50, timeout=60,
               what="version 1 to be unloaded")
    assert version_states(latest_server.grpc_target, "specific12")[2][0] == AVAILABLE
    assert served_by(latest_server, "specific12") == 2
