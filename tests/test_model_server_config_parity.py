"""The model server's configuration, labels, status and batching answer as TF Serving's do: an operator or client that
checks a config, a label or a request against this server must meet the same answer from tensorflow/serving.

Each test names the TF Serving source it copies (tensorflow_serving/model_servers/server_core.cc ReloadConfig,
UpdateModelVersionLabelMap and ValidateModelConfigList; model_service_impl.cc HandleReloadConfigRequest;
get_model_status_impl.cc; server.cc; TensorFlow's shared batch scheduler and batching_util.h).
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import (
    get_model_status_pb2, model_management_pb2, model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc,
)
from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus

from services.model_server.servable import Servable, SignatureInfo
from tests.model_server_harness import MODEL, serve_registry, stop_server, version_states, wait_until
from tests.support import free_port
from training_job.paths import PROJECT_ROOT
from training_job.publish import publish_dir
from training_job.tiny_model import write_tiny_model

AVAILABLE = ModelVersionStatus.AVAILABLE
NOT_AVAILABLE = "which is not currently available for inference"


def publish_tiny(models_dir, bias: float) -> int:
    version, _ = publish_dir(lambda staging: write_tiny_model(staging, bias=bias), models_dir, MODEL)
    return version


def model_list(models_dir, policy: str = "all {}", labels: dict | None = None) -> str:
    label_text = "".join(f' version_labels {{ key: "{k}" value: {v} }}' for k, v in (labels or {}).items())
    return (f'model_config_list {{ config {{ name: "{MODEL}" base_path: "{models_dir / MODEL}" '
            f'model_platform: "tensorflow" model_version_policy {{ {policy} }}{label_text} }} }}')


def run_until_exit(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run([sys.executable, "-m", "services.model_server", f"--port={free_port()}",
                           f"--rest_api_port={free_port()}", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=PROJECT_ROOT)


def reload(server, text: str) -> model_management_pb2.ReloadConfigResponse:
    request = model_management_pb2.ReloadConfigRequest()
    text_format.Parse(text, request.config)
    with grpc.insecure_channel(server.grpc_target) as channel:
        return model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(request, timeout=60)


def rest_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def labelled_version(server, label: str) -> str | None:
    status, body = rest_json(f"{server.rest_url}/v1/models/{MODEL}/labels/{label}/metadata")
    return body["model_spec"]["version"] if status == 200 else None


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Versions 1 and 2 (policy all), ``stable`` on version 1, labels allowed on versions not yet loaded (as the
    stack, compose and k8s run TF Serving: a config file with labels cannot start it otherwise)."""
    models_dir = tmp_path_factory.mktemp("registry-labelled")
    publish_tiny(models_dir, bias=0.0)
    publish_tiny(models_dir, bias=1.0)
    server = serve_registry(models_dir, (1, 2), {"stable": 1})
    wait_until(lambda: labelled_version(server, "stable") == "1", what="the stable label")
    yield server
    stop_server(server)


# ---------------------------------------------------------------------------------------------- status and labels

def test_status_by_label_lists_every_version_newest_first(labelled):
    """get_model_status_impl.cc reads only model_spec.version: a label is ignored, and the versions come from the
    state monitor's map, ordered newest first (servable_state_monitor.h: std::greater<Version>)."""
    with grpc.insecure_channel(labelled.grpc_target) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        for label in ("stable", "no_such_label", None):
            request = get_model_status_pb2.GetModelStatusRequest()
            request.model_spec.name = MODEL
            if label:
                request.model_spec.version_label = label
            response = stub.GetModelStatus(request, timeout=10)
            assert [s.version for s in response.model_version_status] == [2, 1], label
    for path in ("", "/labels/stable", "/labels/no_such_label"):
        status, body = rest_json(f"{labelled.rest_url}/v1/models/{MODEL}{path}")
        assert status == 200 and [s["version"] for s in body["model_version_status"]] == ["2", "1"], path


def test_metadata_by_label_names_the_labelled_version(labelled):
    """GetModelMetadata resolves the label (get_model_metadata_impl.cc sets model_spec.version from the servable it
    resolved): the one way to ask either server where a label points."""
    assert labelled_version(labelled, "stable") == "1"
    assert labelled_version(labelled, "no_such_label") is None


def test_the_rollout_controller_reads_a_labels_version_as_tf_serving_answers(labelled):
    from services.rollout.clients import ModelServerStates

    async def ask():
        async with aiohttp.ClientSession() as session:
            states = ModelServerStates(session, labelled.rest_url, MODEL)
            return (await states.label_version("stable"), await states.label_version("no_such_label"),
                    await states.listed())

    stable, unknown, listed = asyncio.run(ask())
    assert (stable, unknown) == (1, None)  # not version 2, the newest in the (label-blind) status
    assert listed == {1: "AVAILABLE", 2: "AVAILABLE"}


# ---------------------------------------------------------------------------------------------- reloading

def test_a_reload_request_without_a_model_list_is_refused_and_changes_nothing(labelled):
    """model_service_impl.cc HandleReloadConfigRequest: only a ModelConfigList is reloaded; anything else (an empty
    config included) is INVALID_ARGUMENT, and nothing is unloaded."""
    for text in ("", 'custom_model_config { type_url: "x" }'):
        with pytest.raises(grpc.RpcError) as refused:
            reload(labelled, text)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Only ModelConfigList is currently supported" in refused.value.details()
    assert {v: s for v, (s, _) in version_states(labelled.grpc_target, MODEL).items()} == {1: AVAILABLE,
                                                                                          2: AVAILABLE}
    assert labelled_version(labelled, "stable") == "1"


def test_moving_a_label_to_a_version_not_available_refuses_the_whole_reload(labelled):
    """server_core.cc: UpdateModelVersionLabelMap runs before the config's models change. With
    --allow_version_labels_for_unavailable_models, a new label may point at a version not loaded yet, but an
    existing label moves only to an AVAILABLE version; a refused config changes nothing (here: version 2 stays)."""
    models_dir = labelled.models_dir
    with pytest.raises(grpc.RpcError) as refused:
        reload(labelled, model_list(models_dir, "specific { versions: 1 }", {"stable": 7}))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"Request to assign label to version 7 of model {MODEL}, {NOT_AVAILABLE}" in refused.value.details()
    assert version_states(labelled.grpc_target, MODEL)[2][0] == AVAILABLE
    assert labelled_version(labelled, "stable") == "1"

    try:  # a new label may point at a version not loaded yet: requests by it are NOT_FOUND until it loads
        reload(labelled, model_list(models_dir, "all {}", {"stable": 1, "canary": 7}))
        status, body = rest_json(f"{labelled.rest_url}/v1/models/{MODEL}/labels/canary/metadata")
        assert status == 404, body
        assert labelled_version(labelled, "stable") == "1"
    finally:
        reload(labelled, model_list(models_dir, "all {}", {"stable": 1}))


@pytest.mark.parametrize("text, error", [
    ('model_config_list { config { base_path: "/a" model_platform: "tensorflow" } }',
     "every model needs a name and a base_path"),
    ('model_config_list { config { name: "m" base_path: "/a" model_platform: "tensorflow" } '
     'config { name: "m" base_path: "/b" model_platform: "tensorflow" } }',
     "Illegal to list model m multiple times in config list"),
    ('model_config_list { config { name: "m" base_path: "relative/m" model_platform: "tensorflow" } }',
     "Expected model m to have an absolute path or URI; got base_path()=relative/m"),
    ('model_config_list { config { name: "m" base_path: "/a" } }',
     "Illegal setting neither ModelServerConfig::model_type (deprecated) nor ModelServerConfig::model_platform, "
     "model name is m"),
    ('model_config_list { config { name: "m" base_path: "/a" model_platform: "pytorch" } }',
     "Model m requests unsupported platform pytorch"),
])
def test_a_reload_tf_serving_refuses_is_refused_and_changes_nothing(labelled, text, error):
    """server_core.cc ValidateModelConfigList and GetPlatform / CreateStoragePathRoutes: INVALID_ARGUMENT."""
    with pytest.raises(grpc.RpcError) as refused:
        reload(labelled, text)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error in refused.value.details()
    assert version_states(labelled.grpc_target, MODEL)[2][0] == AVAILABLE


def test_a_model_removed_from_the_config_keeps_its_versions_in_end(labelled, tmp_path):
    """TF Serving's state monitor keeps the last state of every servable it saw (the server never calls
    ForgetUnloadedServableStates): a model taken out of the config answers its versions in END, newest first,
    where a model never configured is NOT_FOUND."""
    other = tmp_path / "registry"
    publish_dir(lambda staging: write_tiny_model(staging), other, "other")
    both = (f'model_config_list {{ config {{ name: "{MODEL}" base_path: "{labelled.models_dir / MODEL}" '
            f'model_platform: "tensorflow" version_labels {{ key: "stable" value: 1 }} }} '
            f'config {{ name: "other" base_path: "{other / "other"}" model_platform: "tensorflow" }} }}')
    try:
        reload(labelled, both)
        assert version_states(labelled.grpc_target, "other")[1][0] == AVAILABLE
        reload(labelled, model_list(labelled.models_dir, "all {}", {"stable": 1}))
        assert {v: s for v, (s, _) in version_states(labelled.grpc_target, "other").items()} == {
            1: ModelVersionStatus.END}
        status, body = rest_json(f"{labelled.rest_url}/v1/models/other")
        assert status == 200 and body["model_version_status"][0]["state"] == "END"
        assert version_states(labelled.grpc_target, "never_configured") == {}
    finally:
        reload(labelled, model_list(labelled.models_dir, "all {}", {"stable": 1}))


# ---------------------------------------------------------------------------------------------- startup

def test_startup_refuses_a_label_on_a_version_not_loaded_unless_allowed(tmp_path):
    """At startup nothing is loaded when server_core.cc's ReloadConfig checks the labels: a config file with labels
    stops tensorflow_model_server unless --allow_version_labels_for_unavailable_models is given."""
    publish_tiny(tmp_path, bias=0.0)
    config = tmp_path / "models.config"
    config.write_text(model_list(tmp_path, "all {}", {"stable": 1}))
    result = run_until_exit(f"--model_config_file={config}")
    assert result.returncode != 0
    assert f"Request to assign label to version 1 of model {MODEL}, {NOT_AVAILABLE}" in result.stderr


@pytest.mark.parametrize("text, error", [
    ('model_config_list { config { name: "m" model_platform: "tensorflow" } }',
     "models.config: every model needs a name and a base_path"),
    ('model_config_list { config { name: "m" base_path: "/a" model_platform: "tensorflow" } '
     'config { name: "m" base_path: "/b" model_platform: "tensorflow" } }',
     "Illegal to list model m multiple times in config list"),
    ('model_config_list { config { name: "m" base_path: "/a" model_platform: "pytorch" } }',
     "Model m requests unsupported platform pytorch"),
])
def test_startup_refuses_a_model_config_tf_serving_refuses(tmp_path, text, error):
    config = tmp_path / "models.config"
    config.write_text(text)
    result = run_until_exit(f"--model_config_file={config}")
    assert result.returncode != 0 and error in result.stderr


def test_a_batching_parameters_file_needs_enable_batching(tmp_path):
    """server.cc: a --batching_parameters_file without --enable_batching is refused, not ignored."""
    params = tmp_path / "batching.config"
    params.write_text("max_batch_size { value: 4 }\n")
    result = run_until_exit(f"--model_base_path={tmp_path}", f"--batching_parameters_file={params}")
    assert result.returncode != 0
    assert ("server_options.batching_parameters_file is set without setting server_options.enable_batching to "
            "true.") in result.stderr


# ---------------------------------------------------------------------------------------------- batching

@pytest.fixture(scope="module")
def batching_server(tmp_path_factory):
    models_dir = tmp_path_factory.mktemp("registry-batching")
    publish_tiny(models_dir, bias=0.0)
    params = models_dir / "batching.config"
    params.write_text("max_batch_size { value: 4 }\nbatch_timeout_micros { value: 1000 }\n")
    server = serve_registry(models_dir, (1,), None, "--enable_batching", f"--batching_parameters_file={params}")
    yield server
    stop_server(server)


def predict(server, rows: int) -> predict_pb2.PredictResponse:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros((rows, 8, 8, 3), np.uint8)))
    with grpc.insecure_channel(server.grpc_target) as channel:
        return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)


def test_batching_refuses_a_request_larger_than_max_batch_size(batching_server):
    """TensorFlow's shared batch scheduler refuses a task larger than the largest batch (TF Serving does not turn
    on large-batch splitting), so a client must split its own requests: the same here."""
    assert tf.make_ndarray(predict(batching_server, 4).outputs["probabilities"]).shape[0] == 4
    with pytest.raises(grpc.RpcError) as refused:
        predict(batching_server, 5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Task size 5 is larger than maximum input batch size 4" in refused.value.details()


class DoublingServable(Servable):
    """Signature ``s``: inputs ``x`` and ``k``, each doubled into the output of its name."""

    def __init__(self):
        self.model_name, self.version, self.path = "fake", 1, Path("/nonexistent")
        self.signature_defs = {}
        self.signatures = {"s": SignatureInfo("s", "tensorflow/serving/predict", {"x": tf.float64, "k": tf.float64},
                                              ["k", "x"])}

    def _call(self, info, inputs, wanted):
        return {k: inputs[k] * 2 for k in wanted}


@pytest.mark.parametrize("inputs, error", [
    ({"x": np.zeros((3, 2)), "k": np.zeros((1,))}, "Batching Run() input tensors must have equal 0th-dimension size"),
    ({"x": np.zeros((3, 2)), "k": np.float32(1.0)}, "Batching Run() input tensors must have at least one dimension"),
])
def test_batching_refuses_inputs_it_cannot_split_into_rows(inputs, error):
    """tensorflow_serving/batching/batching_util.h ComputeTensorBatchSize: every input of a batched request is cut
    along its first dimension, so they must all have one, of one size (a broadcast ``[1]`` beside ``[3]`` too)."""
    from concurrent.futures import ThreadPoolExecutor

    from services.model_server.batching import Batcher
    from services.model_server.config import BatchingParameters
    from services.model_server.errors import ServingError

    async def scenario():
        executor = ThreadPoolExecutor(max_workers=1)
        batcher = Batcher(BatchingParameters(max_batch_size=4), executor)
        try:
            answer = await batcher.run(DoublingServable(), "s", {"x": np.ones((3, 2)), "k": np.ones((3,))}, ())
            assert answer["x"].shape == (3, 2)
            with pytest.raises(ServingError) as refused:
                await batcher.run(DoublingServable(), "s", inputs, ())
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and error in refused.value.message
        finally:
            await batcher.close(grace_seconds=1)
            executor.shutdown()

    asyncio.run(scenario())


@pytest.mark.parametrize("output_filter, error", [
    (["probabilities", "probabilities"], "duplicate output tensor alias: probabilities"),
    (["nope"], "output tensor alias not found in signature: nope Outputs expected to be in the set {"),
])
def test_an_output_filter_tf_serving_refuses_is_refused_in_its_words(labelled, output_filter, error):
    """predict_util.cc PreProcessPrediction: each alias once, each one the signature's."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 8, 8, 3), np.uint8)))
    request.output_filter.extend(output_filter)
    with grpc.insecure_channel(labelled.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error in refused.value.details()
