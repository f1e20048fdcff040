"""TensorFlow's profiler service on the model server's gRPC port (TF Serving's --enable_profiler, on by default):
TensorFlow's own client traces the server while it answers, and the trace lands in the client's log folder."""
from __future__ import annotations

import threading

import grpc
import tensorflow as tf
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tests.model_server_harness import MODEL, start_server, stop_server, version_states, wait_until, write_config
from tests.test_model_server_behaviour import AVAILABLE, predict, publish_tiny


def test_tensorflows_profiler_client_traces_the_server_through_its_grpc_port(tmp_path):
    publish_tiny(tmp_path)
    config = tmp_path / "models.config"
    write_config(config, {MODEL: tmp_path / MODEL})
    server = start_server(tmp_path, config)
    stop = threading.Event()
    try:
        wait_until(lambda: version_states(server.grpc_target, MODEL).get(1, (0,))[0] == AVAILABLE, what="v1")

        def keep_predicting():
            with grpc.insecure_channel(server.grpc_target) as channel:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                while not stop.is_set():
                    predict(stub)

        traffic = threading.Thread(target=keep_predicting)
        traffic.start()
        logdir = tmp_path / "logs"
        tf.profiler.experimental.client.trace(server.grpc_target, str(logdir), duration_ms=1000,
                                              num_tracing_attempts=3)
        stop.set()
        traffic.join(timeout=30)
        traces = list((logdir / "plugins" / "profile").glob("*/*.xplane.pb"))
        assert len(traces) == 1 and traces[0].stat().st_size > 0, traces
    finally:
        stop.set()
        stop_server(server)


def test_an_idle_servers_profile_holds_its_load_passes(tmp_path):
    """With no request during the trace, the profile still shows the server's work (a load pass each
    --file_system_poll_wait_seconds), so a trace of an idle server is not refused as empty."""
    publish_tiny(tmp_path)
    config = tmp_path / "models.config"
    write_config(config, {MODEL: tmp_path / MODEL})
    server = start_server(tmp_path, config)
    try:
        wait_until(lambda: version_states(server.grpc_target, MODEL).get(1, (0,))[0] == AVAILABLE, what="v1")
        logdir = tmp_path / "logs"
        tf.profiler.experimental.client.trace(server.grpc_target, str(logdir), duration_ms=1500,
                                              num_tracing_attempts=1)
        assert len(list((logdir / "plugins" / "profile").glob("*/*.xplane.pb"))) == 1
    finally:
        stop_server(server)
