"""Requests a model cannot take get INVALID_ARGUMENT (REST 400) saying why, and leave the model server serving: the
model server is a public TF Serving API, so any client may send them."""
from __future__ import annotations

import gzip
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from bench.common import cpu_seconds, peak_memory_mib, zeros_gzipped
from services.model_server.errors import ServingError
from services.model_server.servable import load_servable
from services.model_server.tflite_servable import TfLiteServable
from tests.model_server_harness import (
    MODEL, save_session_model, start_server, stop_server, version_states, wait_until, write_config,
)
from tests.support import closed_within
from training_job.tiny_model import write_tiny_model, write_tiny_model_with_tflite

SIZE = 8


class ConvModel(tf.Module):
    """A convolution over [-1, 8, 8, 3] photos: what every real model starts with (the tiny model has none)."""

    def __init__(self):
        super().__init__()
        self.kernel = tf.Variable(np.random.default_rng(1).normal(size=(3, 3, 3, 4)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3], tf.uint8, name="images")])
    def serve(self, images):
        features = tf.nn.conv2d(tf.cast(images, tf.float32), self.kernel, 1, "SAME")
        return {"scores": tf.reduce_mean(features, axis=[1, 2])}


def write_tf1_conv_model(version_dir) -> None:
    """The same convolution exported by TF1 (a Session graph, as Estimator exports are): its placeholder takes any
    rank, as TF1 placeholders often do, so only the convolution knows it needs photos."""
    graph = tf.Graph()
    with graph.as_default():
        images = tf.compat.v1.placeholder(tf.uint8, None, name="images")
        kernel = tf.compat.v1.Variable(np.random.default_rng(1).normal(size=(3, 3, 3, 4)).astype(np.float32),
                                       name="kernel", use_resource=False)
        features = tf.nn.conv2d(tf.cast(images, tf.float32), kernel, 1, "SAME")
        scores = tf.reduce_mean(features, axis=[1, 2], name="scores")
        signature = tf.compat.v1.saved_model.signature_def_utils.predict_signature_def({"images": images},
                                                                                      {"scores": scores})
    save_session_model(graph, version_dir, signature)


def serve_conv_model(models_dir, batching: str, exporter: str, *flags: str):
    if exporter == "tf2":
        model = ConvModel()
        tf.saved_model.save(model, str(models_dir / MODEL / "1"), signatures={"serving_default": model.serve})
    else:
        write_tf1_conv_model(models_dir / MODEL / "1")
    config = models_dir / "models.config"
    write_config(config, {MODEL: models_dir / MODEL})
    extra = list(flags)
    if batching == "batched":
        (models_dir / "batching.config").write_text("max_batch_size { value: 8 }\nbatch_timeout_micros { value: 0 }\n")
        extra = ["--enable_batching", f"--batching_parameters_file={models_dir / 'batching.config'}"]
    server = start_server(models_dir, config, *extra)
    try:
        wait_until(lambda: 1 in version_states(server.grpc_target, MODEL), what="version 1")
    except BaseException:
        stop_server(server)
        raise
    return server


@pytest.fixture(scope="module", params=[("tf2", "alone"), ("tf2", "batched"), ("tf1", "alone"), ("tf1", "batched")],
                ids="-".join)
def conv_server(request, tmp_path_factory):
    """The convolution exported by TF2 or TF1, served alone or batched."""
    exporter, batching = request.param
    server = serve_conv_model(tmp_path_factory.mktemp("registry"), batching, exporter)
    try:
        yield server
    finally:
        stop_server(server)


def rest_predict(server, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{server.rest_url}/v1/models/{MODEL}:predict", data=json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_an_input_of_another_rank_is_refused_and_the_server_keeps_serving(conv_server):
    # TensorFlow's oneDNN convolution fed a matrix aborts the process (a CHECK failure), so the server checks ranks:
    # a TF2 export's against its signature, a TF1 graph's (fed as given, as TF Serving feeds a Session: its
    # placeholder here takes any rank) by asking its ops, the convolution refusing it.
    status, answer = rest_predict(conv_server, {"instances": [[1, 2]]})
    assert status == 400, answer
    assert "input 'images'" in answer["error"] and "rank 2" in answer["error"] and "rank 4" in answer["error"]
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros((2, SIZE, SIZE), np.uint8)))
    with grpc.insecure_channel(conv_server.grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Predict(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "rank 3" in refused.value.details()
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros((2, SIZE, SIZE, 3), np.uint8)))
        assert tf.make_ndarray(stub.Predict(request, timeout=30).outputs["scores"]).shape == (2, 4)
    # Sizes other than the declared ones are fed as given, as TF Serving feeds them: a convolution takes them.
    status, answer = rest_predict(conv_server, {"instances": np.zeros((1, 3, 3, 3), int).tolist()})
    assert status == 200 and np.shape(answer["predictions"]) == (1, 4)
    assert conv_server.process.poll() is None


def test_json_nested_deeper_than_a_tensor_or_the_parser_goes_is_refused(conv_server):
    for depth, message in ((500, "at most 64 dimensions"), (100_000, "JSON Parse error")):
        request = urllib.request.Request(f"{conv_server.rest_url}/v1/models/{MODEL}:predict",
                                         data=b'{"instances": ' + b"[" * depth + b"1" + b"]" * depth + b"}")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 400 and message in json.loads(refused.value.read())["error"]


def test_json_of_an_integer_of_more_digits_than_python_converts_is_refused(conv_server):
    """json.loads raises ValueError past sys.get_int_max_str_digits() (4,300), not JSONDecodeError: a 500 for bad
    input. TF Serving's parser refuses such a number too ("Number too big to be stored in double")."""
    request = urllib.request.Request(f"{conv_server.rest_url}/v1/models/{MODEL}:predict",
                                     data=b'{"instances": [' + b"9" * 100_000 + b"]}")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 400 and "JSON Parse error" in json.loads(refused.value.read())["error"]


def test_a_tensorflow_error_says_what_the_op_said(tmp_path):
    saved_model, _ = load_servable("m", 1, write_tiny_model(tmp_path / "1"))
    with pytest.raises(ServingError) as refused:
        saved_model.run("predict_image_bytes", {"image_bytes": np.array([b"not a photo"], dtype=object)})
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.message.startswith("Unknown image file format"), refused.value.message
    assert "DecodeImage" in refused.value.message  # the node


def test_a_tflite_call_litert_cannot_run_is_refused_and_leaves_no_broken_interpreter(tmp_path):
    lite = TfLiteServable("m", 1, write_tiny_model_with_tflite(tmp_path / "1"))
    photos = np.zeros((1, 16, 16, 3), np.uint8)
    four_channels = np.zeros((1, 16, 16, 4), np.uint8)  # the file declares [-1, -1, -1, 3]
    messages = []
    for _ in range(2):
        with pytest.raises(ServingError) as refused:
            lite.run("serving_default", {"images": four_channels})
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        messages.append(refused.value.message)
    assert "[1, 16, 16, 4]" in messages[0] and messages[1] == messages[0]  # LiteRT's error text does not pile up
    with pytest.raises(ServingError) as refused:  # any rank is resized to, as TF Serving does, and LiteRT refuses it
        lite.run("serving_default", {"images": np.zeros((1, 2), np.uint8)})
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and "[1, 2]" in refused.value.message
    assert lite.run("serving_default", {"images": photos})["probabilities"].shape == (1, 4)


def filled_tensor(shape) -> tensor_pb2.TensorProto:
    """A TensorProto of one value, which fills its whole shape: a few bytes however large the shape."""
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_UINT8, int_val=[7])
    for size in shape:
        tensor.tensor_shape.dim.add(size=size)
    return tensor


def test_a_tensor_that_would_expand_past_a_message_is_refused_before_it_is_built(conv_server):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    with grpc.insecure_channel(conv_server.grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        # 301 MB of photos, and 1.7 PiB (more than numpy may allocate), each from a message of 30 bytes
        for shape in ((2000, 224, 224, 3), (100_000, 80_000, 80_000, 3)):
            request.inputs["images"].CopyFrom(filled_tensor(shape))
            with pytest.raises(grpc.RpcError) as refused:
                stub.Predict(request, timeout=60)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
            assert "more than the 268435456 bytes" in refused.value.details()
        request.inputs["images"].CopyFrom(filled_tensor((2, SIZE, SIZE, 3)))  # a fill within the bound is answered
        assert tf.make_ndarray(stub.Predict(request, timeout=30).outputs["scores"]).shape == (2, 4)
    assert conv_server.process.poll() is None


def test_a_predict_of_more_inputs_than_its_signature_takes_is_refused_before_they_are_read(conv_server):
    """Every input was read before the names were checked: 300,000 inputs of one value (6 MB) held the event loop
    3.6 s, and the refusal listed every name, 3 MB of status details, which a gRPC client refuses to receive (it saw
    RESOURCE_EXHAUSTED). A client's output filter of a long name is quoted no further than a client receives."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    one = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0])
    for i in range(100_000):
        request.inputs[f"x{i}"].CopyFrom(one)
    with grpc.insecure_channel(conv_server.grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Predict(request, timeout=60)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
        assert "100000 names, among them 'x" in refused.value.details()
        request.inputs.clear()
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros((1, SIZE, SIZE, 3), np.uint8)))
        request.inputs["imagse"].CopyFrom(one)
        with pytest.raises(grpc.RpcError) as refused:  # a few names: listed, the defaults with them, as before
            stub.Predict(request, timeout=60)
        assert "expected ['images'], got ['images', 'imagse']" in refused.value.details()
        del request.inputs["imagse"]
        request.output_filter.append("s" * 100_000)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Predict(request, timeout=60)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details().startswith("output tensor alias not found in signature: sss")
        assert refused.value.details().endswith("more characters)")
    assert conv_server.process.poll() is None


def test_a_request_that_does_not_parse_ends_with_tf_servings_status(conv_server):
    # TF Serving's C++ gRPC ends it with INTERNAL (GenericDeserialize); grpcio's own answer, UNKNOWN "Unexpected
    # DecodeError", is the status of a bug in the server.
    with grpc.insecure_channel(conv_server.grpc_target) as channel:
        for method, message in (("/tensorflow.serving.PredictionService/Predict", "tensorflow.serving.PredictRequest"),
                                ("/tensorflow.serving.ModelService/GetModelStatus",
                                 "tensorflow.serving.GetModelStatusRequest")):
            call = channel.unary_unary(method, request_serializer=bytes, response_deserializer=bytes)
            with pytest.raises(grpc.RpcError) as refused:
                call(b"\x0a\x05\xff\xfe\x00", timeout=30)  # field 1 cut short
            assert refused.value.code() == grpc.StatusCode.INTERNAL, refused.value.details()
            assert f"not a valid {message}" in refused.value.details()
        assert 1 in version_states(conv_server.grpc_target, MODEL)


def rest_post(server, body: bytes, headers: dict) -> tuple[int, str, dict]:
    request = urllib.request.Request(f"{server.rest_url}/v1/models/{MODEL}:predict", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers.get_content_type(), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get_content_type(), json.loads(exc.read())


def test_a_body_that_cannot_be_decoded_or_is_too_large_gets_tf_servings_json_error(conv_server):
    # TF Serving answers every error as {"error": "..."}; aiohttp's own answers (and a body it cannot decode, which
    # surfaced as an unhandled exception's 500) were plain text.
    photos = json.dumps({"instances": np.zeros((1, SIZE, SIZE, 3), int).tolist()}).encode()
    assert rest_post(conv_server, gzip.compress(photos), {"Content-Encoding": "gzip"})[0] == 200  # as TF Serving
    for body, encoding in ((b"\x1f\x8b not gzip", "gzip"), (b"not deflate", "deflate"), (b"not brotli", "br")):
        status, content_type, answer = rest_post(conv_server, body, {"Content-Encoding": encoding})
        assert (status, content_type) == (400, "application/json"), (encoding, status, answer)
        assert answer["error"].startswith("the body cannot be decoded"), answer
    too_large = gzip.compress(b" " * (257 * 1024 * 1024))  # 257 MiB of JSON whitespace once decoded
    status, content_type, answer = rest_post(conv_server, too_large, {"Content-Encoding": "gzip"})
    assert (status, content_type) == (413, "application/json") and "268435456" in answer["error"], answer
    assert rest_post(conv_server, photos, {})[0] == 200


def test_a_compression_bomb_is_decoded_no_further_than_the_body_limit(tmp_path):
    """4 GiB of zeros sent as 4 MB of gzip. aiohttp decoded it on the event loop and buffered it (for 2.6 s before
    the 413, the process 2.4 GB larger at its peak for this one request), then decoded the rest of it to keep the
    connection."""
    server = serve_conv_model(tmp_path, "alone", "tf2")
    try:
        cpu, peak = cpu_seconds(server.process.pid), peak_memory_mib(server.process.pid)
        status, content_type, answer = rest_post(server, zeros_gzipped(4096), {"Content-Encoding": "gzip"})
        assert (status, content_type) == (413, "application/json") and "268435456" in answer["error"], answer
        time.sleep(2)  # aiohttp reads the rest of a refused body for up to 10 s after the answer ("lingering")
        assert cpu_seconds(server.process.pid) - cpu < 3.0
        assert peak_memory_mib(server.process.pid) - peak < 1024  # MiB: the limit's 256 MiB, kept while joined
        request = urllib.request.Request(f"{server.rest_url}/v1/models/{MODEL}:predict", data=b"{}",
                                         headers={"Content-Encoding": "zstd"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == 415 and refused.value.headers["Accept-Encoding"] == "gzip, deflate, br"
        assert "zstd" in json.loads(refused.value.read())["error"]
    finally:
        stop_server(server)


def test_clients_slow_to_send_their_bodies_take_no_slot_from_the_others(tmp_path):
    # --rest_api_num_threads bounds the requests processed at once, as TF Serving's HTTP worker threads do; TF
    # Serving hands a worker a request only once libevent has its whole body, so a client sending slowly (a phone on
    # a bad network) holds its connection, not a worker. Two such clients used to take both slots here until the
    # REST timeout ended them.
    server = serve_conv_model(tmp_path, "alone", "tf2", "--rest_api_num_threads=2", "--rest_api_timeout_in_ms=60000")
    slow = []
    try:
        port = int(server.rest_url.rsplit(":", 1)[1])
        for _ in range(2):  # the headers of a predict, and 1 byte of its 100-byte body
            connection = socket.create_connection(("127.0.0.1", port))
            connection.sendall(f"POST /v1/models/{MODEL}:predict HTTP/1.1\r\nHost: m\r\nContent-Length: 100\r\n\r\n{{"
                               .encode())
            slow.append(connection)
        time.sleep(0.5)
        started = time.monotonic()
        status, answer = rest_predict(server, {"instances": np.zeros((1, SIZE, SIZE, 3), int).tolist()})
        assert status == 200 and time.monotonic() - started < 10, answer
    finally:
        for connection in slow:
            connection.close()
        stop_server(server)


def test_a_body_that_does_not_arrive_within_the_rest_timeout_gets_408(tmp_path):
    server = serve_conv_model(tmp_path, "alone", "tf2", "--rest_api_timeout_in_ms=1500")
    try:
        port = int(server.rest_url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
            connection.sendall(f"POST /v1/models/{MODEL}:predict HTTP/1.1\r\nHost: m\r\nContent-Length: 100\r\n\r\n{{"
                               .encode())
            answer = connection.recv(65536).decode()
        assert answer.startswith("HTTP/1.1 408"), answer
        assert '{"error": "the request body did not arrive within 1.5 s"}' in answer, answer
    finally:
        stop_server(server)


def test_a_connection_that_brings_no_request_within_the_rest_timeout_is_closed(tmp_path):
    # aiohttp keeps a connection waiting for its request's headers for an hour by default: a client that connected
    # and sent nothing, or trickles its headers, or whose network died, held a socket that long.
    server = serve_conv_model(tmp_path, "alone", "tf2", "--rest_api_timeout_in_ms=1500")
    try:
        port = int(server.rest_url.rsplit(":", 1)[1])
        for sent in (b"", f"POST /v1/models/{MODEL}:predict HTTP/1.1\r\nHost: m\r\n".encode()):
            with socket.create_connection(("127.0.0.1", port), timeout=20) as connection:
                connection.sendall(sent)
                closed, answered = closed_within(connection, 10)
            assert closed is not None and answered == b"", (sent, answered)  # closed, not answered
        assert rest_predict(server, {"instances": np.zeros((1, SIZE, SIZE, 3), int).tolist()})[0] == 200
    finally:
        stop_server(server)


def test_a_large_json_body_stalls_no_other_request(tmp_path):
    # Python's JSON parser holds the GIL for the whole parse: a large body parsed on the event loop kept every other
    # request of both APIs waiting for seconds. TF Serving parses each request on its own HTTP worker thread.
    server = serve_conv_model(tmp_path, "alone", "tf2")
    photos = np.random.default_rng(2).integers(0, 256, (190, 200, 200, 3))  # any size: the convolution takes it
    body = json.dumps({"instances": photos.tolist()}).encode()
    assert len(body) > 70_000_000
    waits, stop = [], threading.Event()

    def status_calls():
        while not stop.is_set():
            started = time.monotonic()
            version_states(server.grpc_target, MODEL)
            waits.append(time.monotonic() - started)
            time.sleep(0.05)

    caller = threading.Thread(target=status_calls)
    try:
        caller.start()
        time.sleep(0.5)
        started = time.monotonic()
        request = urllib.request.Request(f"{server.rest_url}/v1/models/{MODEL}:predict", data=body)
        with urllib.request.urlopen(request, timeout=120) as response:
            predictions = json.loads(response.read())["predictions"]
        took = time.monotonic() - started
    finally:
        stop.set()
        caller.join()
        stop_server(server)
    assert np.shape(predictions) == (190, 4)
    assert max(waits) < 1.0 and max(waits) < took / 3, (max(waits), took)
