"""tensorflow_model_server's flags on our server: each real flag is accepted and does what it does in TF Serving
(model_servers/main.cc, server.cc), or is refused by name with the reason in --help."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus

from tests.model_server_harness import MODEL, start_server, stop_server, version_states, wait_until, write_config
from tests.support import free_port
from training_job.tiny_model import write_tiny_model
from training_job.paths import PROJECT_ROOT

AVAILABLE = ModelVersionStatus.AVAILABLE


def run_server_until_exit(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run([sys.executable, "-m", "services.model_server", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=PROJECT_ROOT)


def test_bad_model_config_is_reported_in_tf_servings_words(tmp_path):
    """TF Serving's testBadModelConfig looks for this text on stderr."""
    config = tmp_path / "bad_model_config.txt"
    config.write_text("improperly formatted file")
    result = run_server_until_exit(f"--port={free_port()}", "--rest_api_port=0", f"--model_config_file={config}")
    assert result.returncode != 0
    assert "Error parsing text-format tensorflow.serving.ModelServerConfig" in result.stderr


# ---------------------------------------------------------------------------------------------- parsing


def parse(*argv: str):
    from services.model_server.main import parse_args

    return parse_args(["--model_base_path=/nowhere", *argv])


def test_every_flag_tf_servings_own_tests_pass_is_accepted():
    """The three flags TF Serving's test base adds to every command line, and the ones its tests add."""
    args = parse("--port=9000", "--rest_api_port=9001", "--rest_api_timeout_in_ms=5000",
                 "--grpc_socket_path=/tmp/tf-serving.sock",
                 "--grpc_channel_arguments=grpc.max_connection_age_ms=2000,grpc.lb_policy_name=grpclb,"
                 "grpc.so_reuseaddr=1", "--prefer_tflite_model=true", "--model_config_file_poll_wait_seconds=1")
    assert args.channel_arguments == (("grpc.max_connection_age_ms", 2000), ("grpc.lb_policy_name", "grpclb"),
                                      ("grpc.so_reuseaddr", 1))
    assert args.rest_api_timeout_in_ms == 5000 and args.grpc_socket_path == "/tmp/tf-serving.sock"


def test_real_flags_are_accepted_with_tf_servings_defaults():
    args = parse("--enable_model_warmup=false", "--saved_model_tags=serve,gpu", "--rest_api_num_threads=3",
                 "--enable_signature_method_name_check", "--num_request_iterations_for_warmup=2",
                 "--rest_api_enable_cors_support=true", "--enable_grpc_healthcheck_service",
                 "--enable_serialization_as_tensor_content=true", "--grpc_max_threads=8",
                 "--flush_filesystem_caches=false", "--remove_unused_fields_from_bundle_metagraph=true",
                 "--per_process_gpu_memory_fraction=0.5", "--skip_initialize_tpu")
    assert args.enable_model_warmup is False and args.saved_model_tags == "serve,gpu"
    assert args.enable_signature_method_name_check is True and args.rest_api_num_threads == 3
    defaults = parse()
    assert defaults.rest_api_timeout_in_ms == 30_000 and defaults.enable_model_warmup is True
    assert defaults.enable_signature_method_name_check is False and defaults.saved_model_tags == "serve"
    assert defaults.enable_serialization_as_tensor_content is False and defaults.channel_arguments == ()


def test_session_parallelism_sets_both_thread_counts_unless_they_are_given():
    from services.model_server.main import thread_counts

    assert thread_counts(parse("--tensorflow_session_parallelism=3")) == (3, 3)
    assert thread_counts(parse("--tensorflow_session_parallelism=3", "--tensorflow_intra_op_parallelism=2")) == (2, 0)
    assert thread_counts(parse()) == (0, 0)
    with pytest.raises(SystemExit):
        parse("--tensorflow_session_parallelism=3", "--tensorflow_intra_op_parallelism=2",
              "--tensorflow_inter_op_parallelism=2")


@pytest.mark.parametrize("argv", [["--grpc_channel_arguments=no_equals_sign"], ["--port=0"],
                                  ["--mixed_precision=bfloat16"], ["--platform_config_file=p.config"]])
def test_what_cannot_apply_is_refused_with_the_reason(argv, capsys):
    from services.model_server.main import UNSUPPORTED_TF_SERVING_FLAGS

    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    name = argv[0][2:].split("=")[0]
    if name in UNSUPPORTED_TF_SERVING_FLAGS:
        assert UNSUPPORTED_TF_SERVING_FLAGS[name] in error


def test_help_names_every_refused_flag_and_why():
    from services.model_server.main import NO_EFFECT_TF_SERVING_FLAGS, UNSUPPORTED_TF_SERVING_FLAGS, build_parser

    text = " ".join(build_parser().format_help().split())
    for name, why in {**UNSUPPORTED_TF_SERVING_FLAGS, **NO_EFFECT_TF_SERVING_FLAGS}.items():
        assert f"--{name}: {' '.join(why.split())}" in text


def test_prefer_tflite_model_reaches_the_servable_loader(tmp_path):
    from services.model_server.main import ModelServer

    server = ModelServer(parse("--prefer_tflite_model=true", "--saved_model_tags=serve",
                               "--num_request_iterations_for_warmup=4"))
    try:
        options = server.source.loader_options
        assert options.prefer_tflite_model is True and options.tags == ("serve",) and options.warmup_iterations == 4
    finally:
        server.core.executor.shutdown()


def test_version_flag_prints_the_version():
    result = run_server_until_exit("--version")
    assert result.returncode == 0 and "TensorFlow ModelServer:" in result.stdout


# ---------------------------------------------------------------------------------------------- loading


def test_warmup_flags_decide_whether_and_how_often_records_are_replayed(tmp_path, caplog):
    import logging

    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    from services.model_server.servable import LoadOptions, load_servable

    version_dir = write_tiny_model(tmp_path / "1")
    with tf.io.TFRecordWriter(str(version_dir / "assets.extra" / "tf_serving_warmup_requests")) as writer:
        for _ in range(2):
            request = predict_pb2.PredictRequest()
            request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 8, 8, 3), np.uint8)))
            writer.write(prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)).SerializeToString())
    caplog.set_level(logging.INFO, logger="model_server.servable")
    load_servable(MODEL, 1, version_dir, LoadOptions(warmup=False))
    load_servable(MODEL, 1, version_dir, LoadOptions(warmup_iterations=3))
    messages = [r.getMessage() for r in caplog.records if "warm-up" in r.getMessage()]
    assert "(no warm-up)" in messages[0]
    assert "(2 warm-up records, each run 3 times)" in messages[1]


def test_saved_model_tags_pick_the_meta_graph(tmp_path):
    from services.model_server.servable import LoadOptions, load_servable

    version_dir = write_tiny_model(tmp_path / "1")
    servable, _ = load_servable(MODEL, 1, version_dir, LoadOptions(tags=("serve",)))
    assert "serving_default" in servable.signature_defs
    with pytest.raises(RuntimeError, match="Could not find meta graph def matching supplied tags: { gpu serve }"):
        load_servable(MODEL, 1, version_dir, LoadOptions(tags=("serve", "gpu")))


# ---------------------------------------------------------------------------------------------- a server with them


@pytest.fixture(scope="module")
def flagged_server(tmp_path_factory):
    """One server started with the flags whose effect shows on the wire."""
    models_dir = tmp_path_factory.mktemp("registry")
    write_tiny_model(models_dir / MODEL / "1")
    config = models_dir / "models.config"
    write_config(config, {MODEL: models_dir / MODEL})
    socket_dir = Path(tempfile.mkdtemp(prefix="tfs-", dir="/tmp"))  # short: a UNIX socket path is <= 107 bytes
    socket_path = socket_dir / "grpc.sock"
    try:
        srv = start_server(models_dir, config, f"--grpc_socket_path={socket_path}",
                           "--grpc_channel_arguments=grpc.max_receive_message_length=100000,grpc.lb_policy_name=grpclb",
                           "--enable_signature_method_name_check=true", "--enable_serialization_as_tensor_content",
                           "--enable_grpc_healthcheck_service=true", "--rest_api_enable_cors_support",
                           "--rest_api_timeout_in_ms=20000", "--rest_api_num_threads=2", "--grpc_max_threads=4",
                           "--tensorflow_session_parallelism=1", "--saved_model_tags=serve")
        try:
            srv.socket_path = socket_path
            wait_until(lambda: version_states(srv.grpc_target, MODEL).get(1, (0,))[0] == AVAILABLE, what="version 1")
            yield srv
        finally:
            stop_server(srv)
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)


def small_predict_request(size: int = 1):
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros((1, size, size, 3), np.uint8)))
    return request


def test_grpc_answers_on_the_unix_socket(flagged_server):
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(f"unix:{flagged_server.socket_path}") as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(small_predict_request(),
                                                                                      timeout=30)
    assert response.model_spec.version.value == 1


def test_channel_arguments_reach_the_grpc_server(flagged_server):
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(flagged_server.grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        stub.Predict(small_predict_request(8), timeout=30)
        with pytest.raises(grpc.RpcError) as err:  # 224 x 224 x 3 bytes > grpc.max_receive_message_length
            stub.Predict(small_predict_request(224), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_serialization_as_tensor_content_on_request(flagged_server):
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(flagged_server.grpc_target) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(small_predict_request(),
                                                                                      timeout=30)
    probabilities = response.outputs["probabilities"]
    assert len(probabilities.tensor_content) == 4 * 4 and len(probabilities.float_val) == 0
    assert list(response.outputs["classes"].string_val)  # strings stay in string_val


def test_method_name_check_refuses_a_tf2_export_over_grpc_and_rest(flagged_server):
    import grpc
    from tensorflow_serving.apis import classification_pb2, prediction_service_pb2_grpc

    message = ("Expected classification signature method_name to be tensorflow/serving/classify. "
               "Was: tensorflow/serving/predict")
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = "classify_mean_colour"
    request.input.example_list.examples.add().features.feature["mean_colour"].float_list.value.extend([0, 0, 0])
    with grpc.insecure_channel(flagged_server.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as err:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Classify(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details() == message
    status, body = http("POST", f"{flagged_server.rest_url}/v1/models/{MODEL}:classify",
                        {"signature_name": "classify_mean_colour", "examples": [{"mean_colour": [0.0, 0.0, 0.0]}]})
    assert status == 400 and json.loads(body)["error"] == message


def test_health_service_reports_the_tf_serving_services(flagged_server):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(flagged_server.grpc_target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("ModelService", "PredictionService"):
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_cors_headers_and_preflight(flagged_server):
    request = urllib.request.Request(f"{flagged_server.rest_url}/v1/models/{MODEL}")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert response.headers["Access-Control-Allow-Methods"] == "POST, GET"
    status, _ = http("OPTIONS", f"{flagged_server.rest_url}/v1/models/{MODEL}:predict",
                     headers={"Origin": "https://example.org"})
    assert status == 200
    status, body = http("OPTIONS", f"{flagged_server.rest_url}/v1/models/{MODEL}:predict")
    assert status == 400 and "Origin header is missing" in json.loads(body)["error"]


# ---------------------------------------------------------------------------------------------- REST in-process


class StuckCore:
    """A PredictionCore whose model calls wait until released: what a slow model looks like to the REST API."""

    def __init__(self):
        import asyncio

        self.manager = self
        self.version = 1
        self.calls = 0
        self.release = asyncio.Event()

    def resolve(self, name, version=None, label=None):
        return self

    def signature(self, name):
        import tensorflow as tf

        from services.model_server.servable import SignatureInfo

        return SignatureInfo(name or "serving_default", "tensorflow/serving/predict", {"x": tf.float32}, ["y"])

    @property
    def signatures(self):
        return {"serving_default": self.signature("")}

    async def run(self, api, servable, signature, inputs, output_filter=()):
        import numpy as np

        self.calls += 1
        await self.release.wait()
        return {"y": np.float32([1.0])}


async def _rest_client(core, **options):
    from aiohttp.test_utils import TestClient, TestServer

    from services.model_server.inference import Inference
    from services.model_server.rest_api import RestApi

    client = TestClient(TestServer(RestApi(core, Inference(core), None, **options).app()))
    await client.start_server()
    return client


def test_rest_timeout_answers_504_as_tf_serving():
    import asyncio

    async def scenario():
        client = await _rest_client(StuckCore(), timeout_ms=200)
        try:
            response = await client.post(f"/v1/models/{MODEL}:predict", json={"instances": [1.0]})
            return response.status, await response.json()
        finally:
            await client.close()

    status, body = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert status == 504 and body == {"error": "Deadline Exceeded"}


def test_rest_num_threads_bounds_the_requests_processed_at_once():
    import asyncio

    async def scenario():
        core = StuckCore()
        client = await _rest_client(core, max_concurrent=1)
        try:
            requests = [asyncio.create_task(client.post(f"/v1/models/{MODEL}:predict", json={"instances": [1.0]}))
                        for _ in range(3)]
            while core.calls == 0:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # a window in which the other two could (wrongly) start
            running_while_blocked = core.calls
            core.release.set()
            statuses = [(await r).status for r in requests]
            return running_while_blocked, core.calls, statuses
        finally:
            await client.close()

    running_while_blocked, calls, statuses = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert running_while_blocked == 1 and calls == 3 and statuses == [200, 200, 200]


def http(method, url, body=None, headers=None):
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# ---------------------------------------------------------------------------------------------- TLS


def self_signed_certificate(folder: Path) -> tuple[str, str]:
    """(key PEM, certificate PEM) for localhost / 127.0.0.1, made by the openssl command."""
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return key.read_text(), cert.read_text()


def text_format_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_ssl_config_file_serves_grpc_over_tls(tmp_path):
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    key, cert = self_signed_certificate(tmp_path)
    ssl_config = tmp_path / "ssl.config"
    ssl_config.write_text(f"server_key: {text_format_string(key)}\nserver_cert: {text_format_string(cert)}\n"
                          "client_verify: false\n")
    write_tiny_model(tmp_path / MODEL / "1")
    config = tmp_path / "models.config"
    write_config(config, {MODEL: tmp_path / MODEL})
    srv = start_server(tmp_path, config, f"--ssl_config_file={ssl_config}")
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.encode())
        with grpc.secure_channel(srv.grpc_target, credentials) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            response = wait_until(lambda: _predict_or_none(stub), timeout=60, what="a Predict over TLS")
        assert response.model_spec.version.value == 1
        with grpc.insecure_channel(srv.grpc_target) as channel:
            with pytest.raises(grpc.RpcError) as err:
                prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(small_predict_request(),
                                                                                   timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stop_server(srv)


def _predict_or_none(stub):
    import grpc

    try:
        return stub.Predict(small_predict_request(), timeout=10)
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
            return None  # version 1 not loaded yet
        raise


def test_alts_and_ssl_together_are_refused_as_tf_serving_refuses_them(capsys):
    with pytest.raises(SystemExit):
        parse("--use_alts_credentials", "--ssl_config_file=ssl.config")
    assert "Either use_alts_credentials must be false or ssl_config_file must be empty." in capsys.readouterr().err


def test_a_socket_path_that_cannot_be_bound_is_a_clear_startup_error(tmp_path):
    blocker = tmp_path / "not-a-socket"
    blocker.write_text("a plain file: gRPC replaces a socket file there, never a regular file")
    write_tiny_model(tmp_path / MODEL / "1")
    result = run_server_until_exit(f"--port={free_port()}", "--rest_api_port=0", f"--model_name={MODEL}",
                                   f"--model_base_path={tmp_path / MODEL}", f"--grpc_socket_path={blocker}")
    assert result.returncode != 0
    assert f"cannot listen for gRPC on unix:{blocker}" in result.stderr and "Traceback" not in result.stderr


def test_a_rest_port_that_is_taken_is_a_clear_startup_error(tmp_path):
    """The gRPC server had started when the REST port failed to bind: it was left for the interpreter to collect,
    which printed a traceback after the error."""
    import socket

    write_tiny_model(tmp_path / MODEL / "1")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_server_until_exit(f"--port={free_port()}", f"--rest_api_port={port}", f"--model_name={MODEL}",
                                       f"--model_base_path={tmp_path / MODEL}")
    assert result.returncode == 1
    assert "address already in use" in result.stderr and f"{port}" in result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr


def test_the_stacks_model_server_refuses_a_grpc_port_another_one_serves(tmp_path):
    """gRPC binds with SO_REUSEPORT unless told not to (TF Serving's default too): a second model server on a gRPC
    port another serves started, and the kernel split the callers between the two. The local stack and the tests
    start theirs with grpc.so_reuseport=0 (devstack/servers.py): the second exits saying the port is taken."""
    from devstack.servers import model_server_argv, start_model_server, stop_process
    from tests.support import exit_code_within

    write_tiny_model(tmp_path / MODEL / "1")
    model = (f"--model_name={MODEL}", f"--model_base_path={tmp_path / MODEL}")
    first = start_model_server(*model)
    try:
        port = int(first.grpc_target.rsplit(":", 1)[1])
        second = subprocess.Popen(model_server_argv(port, free_port(), *model), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, cwd=PROJECT_ROOT,
                                  env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(PROJECT_ROOT)})
        assert exit_code_within(second, 60) == 1, "a second model server serves the taken gRPC port"
        assert f"cannot listen for gRPC on 127.0.0.1:{port}" in second.stdout.read()
    finally:
        stop_process(first.process)


def test_channel_argument_values_are_ints_only_where_absl_simpleatoi_reads_one():
    from services.model_server.grpc_api import parse_channel_arguments

    assert parse_channel_arguments("a=1,b=1_000,c= 7,d=-3,e=99999999999,f=grpclb") == (
        ("a", 1), ("b", "1_000"), ("c", 7), ("d", -3), ("e", "99999999999"), ("f", "grpclb"))
