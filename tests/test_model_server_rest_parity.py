"""Our REST API answers requests as TF Serving's does, to the status code and the error text: the JSON value types a
tensor takes (util/json_tensor.cc AddValueToTensor, FillTensorProto), which input names a request must give
(FillTensorMapFromInstancesList, FillTensorMapFromInputsMap), the paths it routes (model_servers/
http_rest_api_util.cc, http_rest_api_handler.cc), ``{"b64": ...}`` as absl::Base64Unescape decodes it, and the row
format's outputs (MakeRowFormatJsonFromTensors). One server, over the tiny model and a model of small signatures."""
from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus

from devstack.configs import MONITORING_PATH, write_monitoring_config
from tests.model_server_harness import start_server, stop_server, version_states, wait_until, write_config
from training_job.tiny_model import write_tiny_model

TINY, SIGS = "mushrooms", "sigs"
ECHO_DTYPES = {"float": tf.float32, "double": tf.float64, "int32": tf.int32, "uint8": tf.uint8, "int64": tf.int64,
               "bool": tf.bool, "string": tf.string}


def write_signatures_model(version_dir) -> None:
    """``echo_<type>``: input ``v`` of that dtype (any shape) -> output ``echo``; ``scaled``: ``x`` float [batch] and
    ``k`` int32 whose SignatureDef default is [2] -> ``y`` = x * k; ``uneven``: outputs of batch n and 2n; ``total``:
    a scalar output."""
    signatures = {}
    for name, dtype in ECHO_DTYPES.items():
        signatures[f"echo_{name}"] = tf.function(lambda v: {"echo": tf.identity(v)},
                                                 input_signature=[tf.TensorSpec(None, dtype, name="v")])
    default_k = tf.constant([2], tf.int32)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x"),
                                  tf.TensorSpec([None], tf.int32, name="k")])
    def scaled(x, k=default_k):
        return {"y": x * tf.cast(k, tf.float32)}

    x_spec = [tf.TensorSpec([None], tf.float32, name="x")]
    signatures["scaled"] = scaled
    signatures["uneven"] = tf.function(lambda x: {"a": x, "b": tf.concat([x, x], 0)}, input_signature=x_spec)
    signatures["total"] = tf.function(lambda x: {"sum": tf.reduce_sum(x)}, input_signature=x_spec)
    tf.saved_model.save(tf.Module(), str(version_dir), signatures=signatures)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("rest-parity")
    write_tiny_model(models / TINY / "1")
    write_signatures_model(models / SIGS / "1")
    config, monitoring = models / "models.config", models / "monitoring.config"
    write_config(config, {TINY: models / TINY, SIGS: models / SIGS})
    write_monitoring_config(monitoring)
    srv = start_server(models, config, f"--monitoring_config_file={monitoring}")
    try:
        for model in (TINY, SIGS):
            wait_until(lambda: version_states(srv.grpc_target, model).get(1, (0,))[0] == ModelVersionStatus.AVAILABLE,
                       what=f"{model} version 1")
        yield srv
    finally:
        stop_server(srv)


def call(server, method: str, path: str, body=None) -> tuple[int, object]:
    """(HTTP status, the JSON answer, or the raw text when it is not JSON)."""
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    request = urllib.request.Request(server.rest_url + path, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def predict(server, body, model=SIGS):
    return call(server, "POST", f"/v1/models/{model}:predict", body)


def element_error(index: int, message: str) -> str:
    """TF Serving's wrapping of an error in a plain (not object) element of "instances"."""
    return f"Failed to process element: {index} of 'instances' list. Error: INVALID_ARGUMENT: {message}"


# ------------------------------------------------------------------------------------- (a) JSON value types
@pytest.mark.parametrize("body, message", [
    ({"instances": [[[[0.9, 0.5, 0.99]]]]},
     element_error(0, "JSON Value: 0.9 Type: Number is not of expected type: uint8")),
    ({"inputs": {"images": [[[[200.7, 10.2, 99.5]]]]}},
     "JSON Value: 200.7 Type: Number is not of expected type: uint8"),
    ({"instances": [{"images": [[[1, 2, 3.0]]]}]},
     "Failed to process element: 0 key: images of 'instances' list. Error: INVALID_ARGUMENT: "
     "JSON Value: 3.0 Type: Number is not of expected type: uint8"),
])
def test_floats_sent_to_uint8_pixels_are_refused_not_truncated(server, body, message):
    assert predict(server, body, model=TINY) == (400, {"error": message})


@pytest.mark.parametrize("signature, values, message", [
    ("echo_float", ["1.0", True, 3], element_error(0, 'JSON Value: "1.0" Type: String is not of expected type: float')),
    ("echo_float", [1.5, True], element_error(1, "JSON Value: true Type: True is not of expected type: float")),
    ("echo_float", [None], element_error(0, "JSON Value: null Type: Null is not of expected type: float")),
    ("echo_float", [{"b64": "AAAA"}],
     element_error(0, 'JSON Value: {\n    "b64": "AAAA"\n} Type: Object is not of expected type: float')),
    ("echo_double", [False], element_error(0, "JSON Value: false Type: False is not of expected type: double")),
    ("echo_int32", [1, 2.0], element_error(1, "JSON Value: 2.0 Type: Number is not of expected type: int32")),
    ("echo_int32", [2 ** 31], element_error(0, "JSON Value: 2147483648 Type: Number is not of expected type: int32")),
    ("echo_uint8", [[1, 2], [3, 1e-07]],
     element_error(1, "JSON Value: 1e-7 Type: Number is not of expected type: uint8")),
    ("echo_int64", [1.5e300], element_error(0, "JSON Value: 1.5e300 Type: Number is not of expected type: int64")),
    ("echo_bool", [1], element_error(0, "JSON Value: 1 Type: Number is not of expected type: bool")),
    ("echo_string", [5], element_error(0, "JSON Value: 5 Type: Number is not of expected type: string")),
    ("echo_float", [[1, 2], [3]], element_error(1, "Expecting tensor size: 2 but got: 1")),
    ("echo_float", [[1, [2]]], element_error(0, "Encountered list at unexpected level: 1 expected < 1")),
])
def test_values_of_the_wrong_json_type_are_refused_as_tf_serving(server, signature, values, message):
    assert predict(server, {"signature_name": signature, "instances": values}) == (400, {"error": message})


def test_columnar_type_errors_are_not_wrapped(server):
    status, answer = predict(server, {"signature_name": "echo_string", "inputs": [{"b64": "aGk="}, {"a": 1}]})
    assert (status, answer) == (400, {"error": 'JSON Value: {\n    "a": 1\n} not formatted correctly for base64 data'})
    status, answer = predict(server, {"signature_name": "echo_bool", "inputs": [[True], ["no"]]})
    assert (status, answer) == (400, {"error": 'JSON Value: "no" Type: String is not of expected type: bool'})


@pytest.mark.parametrize("signature, values, expected", [
    ("echo_float", [1, 2.5], [1.0, 2.5]),  # JSON integers are numbers
    ("echo_double", [1, 0.1], [1.0, 0.1]),
    ("echo_uint8", [300, -1, 7], [44, 255, 7]),  # any int32, narrowed as TensorProto's int_val is (tensor.cc)
    ("echo_int32", [-2 ** 31, 2 ** 31 - 1], [-2 ** 31, 2 ** 31 - 1]),
    ("echo_int64", [2 ** 40, -5], [2 ** 40, -5]),
    ("echo_bool", [True, False], [True, False]),
    ("echo_string", ["a", {"b64": "aGk="}], ["a", "hi"]),
])
def test_values_of_the_right_json_type_are_taken(server, signature, values, expected):
    assert predict(server, {"signature_name": signature, "instances": values}) == (200, {"predictions": expected})


# -------------------------------------------------------------------------------- (b) which inputs a request gives
def test_row_format_must_name_every_input_the_defaulted_one_too(server):
    status, answer = predict(server, {"signature_name": "scaled", "instances": [{"x": 1.0}, {"x": 2.0}]})
    assert (status, answer) == (400, {"error": "Failed to process element: 0 of 'instances' list. JSON object: "
                                               '{\n    "x": 1.0\n} keys must be equal to: k,x'})
    body = {"signature_name": "scaled", "instances": [{"x": 1.0, "k": 3}, {"x": 2.0, "k": 3}]}
    assert predict(server, body) == (200, {"predictions": [3.0, 6.0]})


def test_columnar_format_needs_every_input_and_ignores_other_keys(server):
    status, answer = predict(server, {"signature_name": "scaled", "inputs": {"x": [1.0, 2.0]}})
    assert (status, answer) == (400, {"error": "Missing named input: k in 'inputs' object."})
    status, answer = predict(server, {"signature_name": "scaled",
                                      "inputs": {"x": [1.0, 2.0], "k": [3], "request_id": "abc"}})
    assert (status, answer) == (200, {"outputs": [3.0, 6.0]})


def test_grpc_predict_still_fills_in_the_signature_defaults(server):
    """TF Serving's gRPC Predict takes fewer inputs when the signature has defaults (predict_util.cc
    VerifyRequestInputsSize) and GetInputValues fills them in."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = SIGS, "scaled"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.float32([1.0, 2.0])))
    with grpc.insecure_channel(server.grpc_target) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    assert tf.make_ndarray(response.outputs["y"]).tolist() == [2.0, 4.0]


# ------------------------------------------------------------------------------------------------ (c) paths
MALFORMED = object()


@pytest.mark.parametrize("method, path, status, error", [
    ("GET", "/v1/models", 400, "Missing model name in request."),
    ("GET", "/v1/models/", 400, MALFORMED),
    ("GET", "/v1/version", 400, MALFORMED),
    ("GET", f"/v1/models/{TINY}:predict", 400, MALFORMED),
    ("POST", f"/v1/models/{TINY}", 400, MALFORMED),
    ("POST", f"/v1/models/{TINY}/metadata", 400, MALFORMED),
    ("POST", f"/v1/models/{TINY}:PREDICT", 400, MALFORMED),  # the verb is compared as written
    ("PUT", f"/v1/models/{TINY}:predict", 400, MALFORMED),
    ("DELETE", f"/v1/models/{TINY}", 400, MALFORMED),
    ("GET", f"/v1/models/{TINY}/versions/99999999999999999999", 400, ""),  # not an int64: no body at all
    ("GET", f"/V1/MODELS/{TINY}", 200, None),
    ("GET", f"/v1/models/{TINY}/Versions/1", 200, None),
    ("POST", f"/v1/Models/{TINY}:predict", 200, None),
])
def test_every_v1_path_is_answered_by_tf_servings_rules(server, method, path, status, error):
    body = {"instances": [[[[1, 2, 3]]]]} if method in ("POST", "PUT") else None
    got_status, answer = call(server, method, path, body)
    assert got_status == status, answer
    if error is MALFORMED:
        assert answer == {"error": f"Malformed request: {method} {path}"}
    elif error is not None:
        assert answer == ({"error": error} if error else "")


def test_a_capitalised_metadata_subresource_is_a_status_request(server):
    """kModelStatusApiRegex matches "/METADATA" but the handler compares the subresource with "metadata"."""
    status, answer = call(server, "GET", f"/v1/models/{TINY}/versions/1/METADATA")
    assert status == 200 and set(answer) == {"model_version_status"}
    status, answer = call(server, "GET", f"/V1/models/{TINY}/metadata")
    assert status == 200 and set(answer) == {"model_spec", "metadata"}


def test_paths_outside_v1_are_left_as_they_were(server):
    assert call(server, "GET", "/v2/models")[0] == 404
    assert call(server, "GET", MONITORING_PATH)[0] == 200
    assert call(server, "POST", MONITORING_PATH, {})[0] == 405


# ---------------------------------------------------------------------------------------- (d) {"b64": ...}
LONG_TEXT = "hello world, " * 10


@pytest.mark.parametrize("text, decoded", [
    (base64.encodebytes(LONG_TEXT.encode()).decode(), LONG_TEXT),  # MIME: a newline every 76 characters
    (base64.b64encode(LONG_TEXT.encode()).decode(), LONG_TEXT),
    (" aGVs bG8=\t", "hello"),
    ("aGVsbG8", "hello"),  # no padding
    ("aGVsbA", "hell"),
    ("aGVsbG8.", "hello"),  # absl takes '.' as a pad character
])
def test_b64_is_decoded_as_absl_base64unescape(server, text, decoded):
    status, answer = predict(server, {"signature_name": "echo_string", "inputs": [{"b64": text}]})
    assert (status, answer) == (200, {"outputs": [decoded]})


@pytest.mark.parametrize("text", ["aGVsbG8==", "aGVsbA=", "aG=VsbG8", "aGVsb", "aGVs-bG8", "@@@"])
def test_b64_with_wrong_padding_or_characters_is_refused(server, text):
    status, answer = predict(server, {"signature_name": "echo_string", "instances": [{"b64": text}]})
    assert (status, answer) == (400, {"error": element_error(0, "Unable to base64 decode")})


def test_a_mime_encoded_photo_is_classified(server):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, "PNG")
    body = {"signature_name": "predict_image_bytes", "instances": [{"b64": base64.encodebytes(buffer.getvalue())
                                                                     .decode()}]}
    status, answer = predict(server, body, model=TINY)
    assert status == 200 and len(answer["predictions"][0]["probabilities"]) == 4


# --------------------------------------------------------------------------------- (e) the request's own shape
@pytest.mark.parametrize("body, message", [
    ({"signature_name": None, "instances": [[[[1, 2, 3]]]]},
     'JSON Value: {\n    "signature_name": null,\n    "instances": [[[[1, 2, 3]]]]\n} not formatted correctly. '
     "'signature_name' key must be a string value."),
    ({"neither": 1}, "Missing 'inputs' or 'instances' key"),
    ({"instances": [[[[1, 2, 3]]]], "inputs": []},
     'JSON Value: {\n    "instances": [[[[1, 2, 3]]]],\n    "inputs": []\n} Not formatted correctly expecting only '
     "one of 'inputs' or 'instances' keys to exist "),
    ({"instances": []}, 'JSON Value: {\n    "instances": []\n} No values in \'instances\' array'),
    ([1], "JSON Value: [1] Is not object"),
])
def test_malformed_requests_get_tf_servings_messages(server, body, message):
    assert predict(server, body, model=TINY) == (400, {"error": message})


def test_long_json_values_in_messages_are_cut_as_tf_serving_cuts_them(server):
    """JsonValueToDebugString stops writing at the first value that starts after 256 bytes."""
    status, answer = predict(server, {"signature_name": None, "instances": list(range(200))}, model=TINY)
    assert status == 400
    printed = answer["error"][len("JSON Value: "):].split(" not formatted correctly")[0]
    assert printed == '{\n    "signature_name": null,\n    "instances": [' + ", ".join(map(str, range(55)))


# -------------------------------------------------------------------------------------- (f) row-format outputs
def test_row_format_outputs_must_share_their_batch_size(server):
    status, answer = predict(server, {"signature_name": "uneven", "instances": [1.0, 2.0]})
    assert status == 400 and "has inconsistent batch size:" in answer["error"], answer
    status, answer = predict(server, {"signature_name": "total", "instances": [1.0, 2.0]})
    assert (status, answer) == (400, {"error": "Tensor name: sum has no shape information "})
    assert predict(server, {"signature_name": "uneven", "inputs": [1.0, 2.0]}) == (
        200, {"outputs": {"a": [1.0, 2.0], "b": [1.0, 2.0, 1.0, 2.0]}})
    assert predict(server, {"signature_name": "total", "inputs": [1.0, 2.0]}) == (200, {"outputs": 3.0})
