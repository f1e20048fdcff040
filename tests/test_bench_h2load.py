"""bench/h2load.py: gRPC calls from h2load reach the model server as Predict calls, and the bench's check counts the
server's answers, since h2load takes a gRPC error (HTTP 200 with a grpc-status trailer) for an answer."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from bench import h2load
from bench.model_server_bench import h2load_predict, predict_requests, start_server
from tensorflow_serving.apis import predict_pb2
from training_job.tiny_model import write_tiny_model_with_tflite


def test_a_grpc_body_is_the_message_with_its_length_in_front():
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "tiny"
    body = h2load.grpc_body(request)
    assert body[0] == 0  # not compressed
    (length,) = struct.unpack(">I", body[1:5])
    assert length == len(body) - 5
    assert predict_pb2.PredictRequest.FromString(body[5:]) == request


def test_the_log_gives_latencies_by_start_and_counts_other_statuses():
    log = "1000000\t200\t3000\n990000\t200\t5000\n1001000\t503\t100\n\n"
    latencies, other, span = h2load.parse_log(log)
    assert latencies == [0.005, 0.003]  # by start time
    assert other == 1
    assert span == pytest.approx((1003000 - 990000) / 1e6)


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("h2load")
    version_dir = write_tiny_model_with_tflite(workdir / "registry" / "tiny" / "1")
    server = start_server(version_dir, True, workdir)
    try:
        yield server, workdir
    finally:
        server.process.terminate()
        server.process.wait(30)


def _request(model: str):
    return predict_requests(model, np.zeros((1, 224, 224, 3), np.uint8))[0]


def test_h2load_calls_are_answered_predict_calls(tiny_server):
    server, workdir = tiny_server
    load = h2load_predict(server, _request("tiny"), 4, workdir, calls=40)
    assert load.calls == 40 and load.other_statuses == 0
    assert len(load.latencies_s) == 40 and (load.latencies_s > 0).all()
    assert load.calls_per_s > 0
    assert load.cpu_s > 0  # h2load's own CPU, the load generator's cost beside the server's


def test_grpc_errors_that_h2load_counts_as_answers_fail_the_check(tiny_server):
    server, workdir = tiny_server
    load = h2load.run(server.grpc_target, h2load.PREDICT, _request("no_such_model"), concurrency=2,
                      workdir=workdir, calls=5)
    assert load.calls == 5  # HTTP 200 each: h2load alone cannot see the NOT_FOUND
    with pytest.raises(RuntimeError, match="answered 0 OK"):
        h2load_predict(server, _request("no_such_model"), 2, workdir, calls=5)
