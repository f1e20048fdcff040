"""The three flags TF Serving's test suite adds to every command line: --grpc_socket_path (gRPC on a Unix socket
too), --grpc_channel_arguments (gRPC server arguments) and --rest_api_timeout_in_ms (REST deadline, 504 past it)."""
from __future__ import annotations

import grpc
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tests.model_server_harness import MODEL, start_server, stop_server, version_states, wait_until, write_config
from tests.test_model_server_behaviour import AVAILABLE, predict, publish_tiny


def test_suite_flags_are_accepted_and_grpc_answers_on_the_unix_socket(tmp_path):
    publish_tiny(tmp_path)
    config = tmp_path / "models.config"
    write_config(config, {MODEL: tmp_path / MODEL})
    socket_path = tmp_path / "tf-serving.sock"
    server = start_server(tmp_path, config, f"--grpc_socket_path={socket_path}", "--rest_api_timeout_in_ms=5000",
                          "--grpc_channel_arguments=grpc.max_connection_age_ms=2000,grpc.lb_policy_name=grpclb,"
                          "grpc.so_reuseaddr=1")
    try:
        wait_until(lambda: version_states(server.grpc_target, MODEL).get(1, (0,))[0] == AVAILABLE, what="v1")
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            assert predict(prediction_service_pb2_grpc.PredictionServiceStub(channel)) == 1
    finally:
        stop_server(server)
