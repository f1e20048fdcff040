"""Loading as TF Serving loads: TF1 SavedModels run through a Session on their MetaGraph (so SignatureDefs whose
shapes disagree with the graph still load), a version that cannot load at startup stops the server, and a config
reload whose new model cannot load fails the ReloadConfig RPC with the reason."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc, prediction_service_pb2_grpc

from services.model_server.servable import load_servable
from tests.model_server_harness import (
    MODEL, save_session_model, start_server, stop_server, version_states, wait_until, write_config,
)
from tests.support import free_port
from tests.test_model_server_behaviour import AVAILABLE, predict, publish_tiny
from training_job.paths import PROJECT_ROOT
from training_job.tiny_model import write_tiny_model


def write_tf1_half_plus_three(version_dir: Path) -> Path:
    """A TF1 SavedModel like TF Serving's saved_model_half_plus_three: y = 0.5 * x + 3 on a [None, 1] placeholder,
    whose SignatureDef declares x and y as scalars (TF2's loader refuses that: 'Shapes must be equal rank')."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 1], name="x")
        a = tf.compat.v1.Variable(0.5, name="a", use_resource=False)
        b = tf.compat.v1.Variable(3.0, name="b", use_resource=False)
        y = tf.add(tf.multiply(a, x), b, name="y")
        scalar = tf.TensorShape([]).as_proto()
        signature = tf.compat.v1.saved_model.signature_def_utils.build_signature_def(
            inputs={"x": tf.compat.v1.saved_model.utils.build_tensor_info(x)},
            outputs={"y": tf.compat.v1.saved_model.utils.build_tensor_info(y)},
            method_name="tensorflow/serving/predict")
        signature.inputs["x"].tensor_shape.CopyFrom(scalar)
        signature.outputs["y"].tensor_shape.CopyFrom(scalar)
    save_session_model(graph, version_dir, signature)
    return version_dir


def test_a_tf1_model_whose_signature_shapes_disagree_with_the_graph_loads_and_runs(tmp_path):
    version_dir = write_tf1_half_plus_three(tmp_path / "half_plus_three" / "123")
    with pytest.raises(ValueError, match="equal rank"):  # the premise: TF2's loader cannot run it
        tf.saved_model.load(str(version_dir)).signatures["serving_default"](x=tf.constant([[2.0]]))
    servable, _ = load_servable("half_plus_three", 123, version_dir)
    assert servable.signatures["serving_default"].inputs == {"x": tf.float32}
    assert servable.signatures["serving_default"].outputs == ["y"]
    # Fed as TF Serving feeds a Session: as given, whatever the SignatureDef or placeholder shape says.
    np.testing.assert_allclose(servable.run("serving_default", {"x": np.array([2.0], np.float32)})["y"], [4.0])
    np.testing.assert_allclose(servable.run("", {"x": np.array([[2.0], [4.0]], np.float32)})["y"], [[4.0], [5.0]])
    assert set(servable.signature_defs) == {"serving_default"}


def write_broken_version(base: Path, version: int = 1) -> Path:
    folder = base / str(version)
    folder.mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"this is not a SavedModel")
    return folder


# TF Serving names each version "{" + ServableId::DebugString() ("{name: m version: 1}") + " due to error: ...}, "
# inside the "{...}" of the list, hence three braces.
def test_a_version_that_cannot_load_at_startup_stops_the_server(tmp_path):
    write_broken_version(tmp_path / "broken")
    result = subprocess.run(
        [sys.executable, "-m", "services.model_server", f"--port={free_port()}", f"--rest_api_port={free_port()}",
         "--host=127.0.0.1",
         "--model_name=broken", f"--model_base_path={tmp_path / 'broken'}", "--max_num_load_retries=1",
         "--load_retry_interval_micros=0"],
        capture_output=True, text=True, timeout=180, cwd=PROJECT_ROOT)
    assert result.returncode == 255, result.stderr[-2000:]
    assert "Failed to start server. Error: UNKNOWN: 1 servable(s) did not become available: " \
           "{{{name: broken version: 1} due to error: " in result.stderr


def test_a_reload_whose_new_model_cannot_load_fails_the_rpc(tmp_path):
    publish_tiny(tmp_path)
    write_broken_version(tmp_path / "broken")
    config = tmp_path / "models.config"
    write_config(config, {MODEL: tmp_path / MODEL})
    server = start_server(tmp_path, config, "--max_num_load_retries=1", "--load_retry_interval_micros=0")
    try:
        wait_until(lambda: version_states(server.grpc_target, MODEL).get(1, (0,))[0] == AVAILABLE, what="v1")
        request = model_management_pb2.ReloadConfigRequest()
        text_format.Parse(f'model_config_list {{ config {{ name: "{MODEL}" base_path: "{tmp_path / MODEL}" '
                          f'model_platform: "tensorflow" }} config {{ name: "broken" base_path: '
                          f'"{tmp_path / "broken"}" model_platform: "tensorflow" }} }}', request.config)
        with grpc.insecure_channel(server.grpc_target) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(request, timeout=120)
            assert refused.value.code() == grpc.StatusCode.UNKNOWN
            assert refused.value.details().startswith(
                "1 model(s) did not become available: {{{name: broken version: 1} due to error: ")
            assert predict(prediction_service_pb2_grpc.PredictionServiceStub(channel)) == 1  # the others serve on
        state, error = version_states(server.grpc_target, "broken")[1]
        assert error
    finally:
        stop_server(server)


def test_a_half_copied_version_is_retried_after_the_interval_and_again_once_its_copy_completes(tmp_path):
    """A version folder copied in place (cp -r, rsync) is seen before its saved_model.pb lands: its load fails.
    TF Serving retries it --max_num_load_retries times, --load_retry_interval_micros apart; this server also tries a
    version it gave up on again once its folder's contents change."""
    from services.model_server.version_policy import State

    publish_tiny(tmp_path)
    complete = write_tiny_model(tmp_path / "complete", bias=1.0)
    config = tmp_path / "models.config"
    write_config(config, {MODEL: tmp_path / MODEL}, policy="all {}")
    server = start_server(tmp_path, config, "--max_num_load_retries=1", "--load_retry_interval_micros=3000000")
    try:
        wait_until(lambda: version_states(server.grpc_target, MODEL).get(1, (0,))[0] == AVAILABLE, what="v1")
        half = tmp_path / MODEL / "2"
        half.mkdir()
        shutil.copytree(complete / "variables", half / "variables")  # saved_model.pb is not there yet
        seen = wait_until(lambda: 2 in version_states(server.grpc_target, MODEL) and time.monotonic(), timeout=30,
                          interval=0.1, what="version 2 to be seen")
        given_up = wait_until(lambda: version_states(server.grpc_target, MODEL)[2][0] == State.END
                              and time.monotonic(), timeout=30, interval=0.1, what="version 2 to be given up on")
        assert given_up - seen > 2.5, "the retry did not wait for --load_retry_interval_micros"
        state, error = version_states(server.grpc_target, MODEL)[2]
        assert error
        shutil.copy(complete / "saved_model.pb", half / "saved_model.pb")  # the copy completes
        wait_until(lambda: version_states(server.grpc_target, MODEL)[2][0] == AVAILABLE, timeout=30,
                   what="version 2, once its copy completed")
    finally:
        stop_server(server)


def test_reloads_run_one_at_a_time_as_tf_servings_do(tmp_path):
    """TF Serving's ServerCore::ReloadConfig holds its config lock until the new models loaded or gave up: a reload
    sent meanwhile waits for it. Here a second reload (dropping the new model) used to apply at once, so the first
    one stopped waiting for a model no longer configured and answered OK for a config that never took effect, or,
    had that model been loading, waited for it without end (its unloaded version never becomes AVAILABLE)."""
    import concurrent.futures

    publish_tiny(tmp_path)
    write_broken_version(tmp_path / "broken")
    config = tmp_path / "models.config"
    write_config(config, {MODEL: tmp_path / MODEL})
    server = start_server(tmp_path, config, "--max_num_load_retries=1", "--load_retry_interval_micros=2000000")

    def reload(models: dict) -> tuple[str, float]:
        """The reload's answer, and how long it took."""
        started = time.monotonic()
        request = model_management_pb2.ReloadConfigRequest()
        entries = " ".join(f'config {{ name: "{name}" base_path: "{path}" model_platform: "tensorflow" }}'
                           for name, path in models.items())
        text_format.Parse(f"model_config_list {{ {entries} }}", request.config)
        with grpc.insecure_channel(server.grpc_target) as channel:
            try:
                model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(request, timeout=120)
                return "OK", time.monotonic() - started
            except grpc.RpcError as exc:
                return exc.code().name, time.monotonic() - started

    try:
        wait_until(lambda: version_states(server.grpc_target, MODEL).get(1, (0,))[0] == AVAILABLE, what="v1")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(reload, {MODEL: tmp_path / MODEL, "broken": tmp_path / "broken"})
            time.sleep(0.5)  # the first waits for the broken model's retry, 2 s after its failed load
            second = pool.submit(reload, {MODEL: tmp_path / MODEL})
            (first_status, _), (second_status, second_took) = first.result(), second.result()
        assert first_status == "UNKNOWN"  # its broken model did not become available
        # held until the first ended, at the broken model's retry 2 s after the first began (0.5 s before it); the
        # two answers come out together, so the order their client threads note the time in says nothing
        assert second_status == "OK" and second_took >= 1.0
        assert version_states(server.grpc_target, "broken") == {} or all(
            state != AVAILABLE for state, _ in version_states(server.grpc_target, "broken").values())
    finally:
        stop_server(server)
