"""The TFLite engine (--prefer_tflite_model): a version's model.tflite served by LiteRT in place of its SavedModel,
with the same answers, the same signatures, batching and metrics; versions without one stay on their SavedModel."""
from __future__ import annotations

import asyncio
import re
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc
from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus

from services.model_server.batching import Batcher
from services.model_server.config import BatchingParameters, single_model_config
from services.model_server.grpc_api import status_response
from services.model_server.manager import Manager
from services.model_server.servable import LoadOptions, load_servable
from services.model_server.source import FileSystemSource
from services.model_server.tflite_servable import TfLiteServable
from tests.model_server_harness import start_server, stop_server, version_states, wait_until, write_config
from training_job.tiny_model import write_tiny_model

AVAILABLE = ModelVersionStatus.AVAILABLE
PHOTOS = np.random.default_rng(7).integers(0, 256, (6, 224, 224, 3), dtype=np.uint8)


def write_tiny_with_tflite(version_dir: Path) -> Path:
    """The tiny SavedModel and, beside it, its serving_default converted to model.tflite (as TF Serving expects it)."""
    write_tiny_model(version_dir)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(version_dir), signature_keys=["serving_default"])
    (version_dir / "model.tflite").write_bytes(converter.convert())
    return version_dir


def test_the_tflite_engine_answers_as_the_saved_model_does_at_any_batch_size(tmp_path):
    version_dir = write_tiny_with_tflite(tmp_path / "1")
    saved_model, _ = load_servable("m", 1, version_dir)
    lite, _ = load_servable("m", 1, version_dir, LoadOptions(prefer_tflite_model=True))
    assert isinstance(lite, TfLiteServable) and not isinstance(saved_model, TfLiteServable)
    assert set(lite.signature_defs) == {"serving_default"}  # the signature the file carries
    assert lite.signatures["serving_default"].inputs == {"images": tf.uint8}
    assert lite.signatures["serving_default"].outputs == saved_model.signatures["serving_default"].outputs
    for rows in (6, 1, 3):  # the interpreter's input is resized to each batch
        expected = saved_model.run("serving_default", {"images": PHOTOS[:rows]})
        answered = lite.run("serving_default", {"images": PHOTOS[:rows]})
        np.testing.assert_allclose(answered["probabilities"], expected["probabilities"], atol=1e-5)
        np.testing.assert_array_equal(answered["classes"], expected["classes"])
        np.testing.assert_array_equal(answered["not_a_mushroom"], expected["not_a_mushroom"])
    only = lite.run("", {"images": PHOTOS[:2]}, ("mushroom_score",))
    assert list(only) == ["mushroom_score"] and only["mushroom_score"].shape == (2,)


def write_warmup(version_dir: Path, photos: np.ndarray) -> None:
    from tensorflow_serving.apis import prediction_log_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.signature_name = "serving_default"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(photos))
    (version_dir / "assets.extra").mkdir(exist_ok=True)
    with tf.io.TFRecordWriter(str(version_dir / "assets.extra" / "tf_serving_warmup_requests")) as writer:
        writer.write(prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request)).SerializeToString())


def test_a_tflite_file_that_disagrees_with_its_saved_model_is_refused_and_the_saved_model_served(tmp_path):
    agreeing = write_tiny_with_tflite(tmp_path / "agreeing" / "1")
    write_warmup(agreeing, PHOTOS[:3])
    served, _ = load_servable("m", 1, agreeing, LoadOptions(prefer_tflite_model=True))
    assert isinstance(served, TfLiteServable) and served.load_note == ""

    other_version = write_tiny_with_tflite(tmp_path / "other" / "2")  # the file of another version ...
    version_dir = tmp_path / "m" / "1"
    write_tiny_model(version_dir, bias=4.0)  # ... beside this version's SavedModel
    (version_dir / "model.tflite").write_bytes((other_version / "model.tflite").read_bytes())
    write_warmup(version_dir, PHOTOS[:3])
    served, _ = load_servable("m", 1, version_dir, LoadOptions(prefer_tflite_model=True))
    assert not isinstance(served, TfLiteServable)
    assert served.load_note.startswith("serving the SavedModel: model.tflite disagrees with it (signature "
                                       "serving_default output ")
    manager = Manager()
    source = FileSystemSource(manager.set_aspired_versions, LoadOptions(prefer_tflite_model=True))
    config = single_model_config("m", str(tmp_path / "m"))
    manager.set_config(config)
    source.set_config(config)
    source.poll()
    manager.manage_state()
    (status,) = status_response(manager, "m", None, None).model_version_status
    assert (status.state, status.status.error_code) == (AVAILABLE, 0)  # it serves, from the SavedModel ...
    assert status.status.error_message == served.load_note  # ... and says why


def test_requests_queued_together_share_one_tflite_call(tmp_path):
    lite, _ = load_servable("m", 1, write_tiny_with_tflite(tmp_path / "1"), LoadOptions(prefer_tflite_model=True))
    expected = lite.run("", {"images": PHOTOS})["probabilities"]
    rows_per_call = []
    run = lite.run
    lite.run = lambda signature, inputs, output_filter=(): rows_per_call.append(len(inputs["images"])) or run(
        signature, inputs, output_filter)

    async def six_at_once():
        params = BatchingParameters.from_text("max_batch_size { value: 16 } batch_timeout_micros { value: 0 } "
                                              "num_batch_threads { value: 1 }")
        batcher = Batcher(params, ThreadPoolExecutor(1))
        return await asyncio.gather(*(batcher.run(lite, "serving_default", {"images": PHOTOS[i:i + 1]},
                                                  ("probabilities",)) for i in range(len(PHOTOS))))

    answers = asyncio.run(six_at_once())
    assert rows_per_call == [len(PHOTOS)]  # one interpreter call, its input resized to the joined batch
    for row, answer in enumerate(answers):
        np.testing.assert_allclose(answer["probabilities"], expected[row:row + 1], atol=1e-6)


def _signature_names(stub, model: str) -> set[str]:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = model
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    stub.GetModelMetadata(request, timeout=30).metadata["signature_def"].Unpack(signature_map)
    return set(signature_map.signature_def)


def test_under_the_flag_tflite_versions_answer_through_the_batcher_and_others_keep_their_saved_model(tmp_path):
    write_tiny_with_tflite(tmp_path / "lite" / "1")
    write_tiny_model(tmp_path / "saved" / "1")
    config = tmp_path / "models.config"
    write_config(config, {"lite": tmp_path / "lite", "saved": tmp_path / "saved"})
    (tmp_path / "batching.config").write_text(
        "max_batch_size { value: 16 }\nbatch_timeout_micros { value: 20000 }\nnum_batch_threads { value: 1 }\n")
    (tmp_path / "monitoring.config").write_text('prometheus_config { enable: true path: "/metrics" }')
    server = start_server(tmp_path, config, "--prefer_tflite_model=true", "--enable_batching",
                          f"--batching_parameters_file={tmp_path / 'batching.config'}",
                          f"--monitoring_config_file={tmp_path / 'monitoring.config'}")
    try:
        for model in ("lite", "saved"):
            wait_until(lambda m=model: version_states(server.grpc_target, m).get(1, (0,))[0] == AVAILABLE,
                       what=f"{model} v1")
        channel = grpc.insecure_channel(server.grpc_target)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        assert _signature_names(stub, "lite") == {"serving_default"}  # model.tflite's signature only
        assert {"serving_default", "predict_image_bytes"} <= _signature_names(stub, "saved")  # the SavedModel's

        expected, _ = load_servable("m", 1, tmp_path / "saved" / "1")

        def predict(row: int) -> np.ndarray:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "lite"
            request.inputs["images"].CopyFrom(tf.make_tensor_proto(PHOTOS[row:row + 1]))
            request.output_filter.append("probabilities")
            return tf.make_ndarray(stub.Predict(request, timeout=30).outputs["probabilities"])

        start = threading.Barrier(12)

        def together(row: int) -> np.ndarray:
            start.wait(timeout=30)
            return predict(row % len(PHOTOS))

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(together, range(12)))
        for row, answer in enumerate(answers):
            np.testing.assert_allclose(
                answer, expected.run("", {"images": PHOTOS[row % len(PHOTOS):row % len(PHOTOS) + 1]})["probabilities"],
                atol=1e-5)
        channel.close()
        text = urllib.request.urlopen(f"{server.rest_url}/metrics", timeout=10).read().decode()
        total = float(re.search(r'processed_batch_size_sum\{model_name="lite"\} (\S+)', text).group(1))
        assert total >= 12  # through the batch scheduler (how many share a call depends on timing: see below)
        served = [line for line in text.splitlines() if re.match(r":tensorflow:serving:request_count(_total)?\{", line)
                  and 'model_name="lite"' in line and 'API="grpc_predict"' in line and 'status="OK"' in line]
        assert len(served) == 1 and float(served[0].split()[-1]) == 12, served  # counted as for SavedModels
    finally:
        stop_server(server)
