"""Warm-up at load (services/model_server/warmup.py), as TF Serving's saved_model_warmup.cc replays
assets.extra/tf_serving_warmup_requests: every predict, classify, regress and multi_inference record runs on the new
servable, and a record that fails, or of a kind it cannot replay, fails the load; then the same for
assets.extra/saved_model_warmup_requests, the records of the signatures a model.tflite lacks."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2, inference_pb2, predict_pb2, prediction_log_pb2, regression_pb2,
)

from services.model_server.errors import ServingError
from services.model_server.loader import LoadOptions
from services.model_server.servable import load_servable
from training_job.export import SAVED_MODEL_WARMUP_FILE, WARMUP_FILE
from training_job.tiny_model import write_tiny_model

CLASSIFY, REGRESS = "tensorflow/serving/classify", "tensorflow/serving/regress"


def with_examples(request, rows: int = 2):
    for row in range(rows):
        example = request.input.example_list.examples.add()
        example.features.feature["mean_colour"].float_list.value.extend([0.1 * row, 0.2, 0.3])
    return request


def classify_log(signature: str = "classify_mean_colour") -> prediction_log_pb2.PredictionLog:
    request = with_examples(classification_pb2.ClassificationRequest())
    request.model_spec.signature_name = signature
    return prediction_log_pb2.PredictionLog(classify_log=prediction_log_pb2.ClassifyLog(request=request))


def regress_log() -> prediction_log_pb2.PredictionLog:
    request = with_examples(regression_pb2.RegressionRequest())
    request.model_spec.signature_name = "regress_mushroom_score"
    return prediction_log_pb2.PredictionLog(regress_log=prediction_log_pb2.RegressLog(request=request))


def multi_inference_log() -> prediction_log_pb2.PredictionLog:
    request = with_examples(inference_pb2.MultiInferenceRequest())
    for signature, method in (("classify_mean_colour", CLASSIFY), ("regress_mushroom_score", REGRESS)):
        task = request.tasks.add()
        task.model_spec.name = "m"
        task.model_spec.signature_name = signature
        task.method_name = method
    return prediction_log_pb2.PredictionLog(
        multi_inference_log=prediction_log_pb2.MultiInferenceLog(request=request))


def predict_log() -> prediction_log_pb2.PredictionLog:
    request = predict_pb2.PredictRequest()
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 8, 8, 3), np.uint8)))
    return prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))


def version_with(tmp_path, *records, saved_model_records=()):
    version_dir = write_tiny_model(tmp_path / "1")
    for name, entries in ((WARMUP_FILE, records), (SAVED_MODEL_WARMUP_FILE, saved_model_records)):
        if entries:
            with tf.io.TFRecordWriter(str(version_dir / name)) as writer:
                for record in entries:
                    writer.write(record.SerializeToString())
    return version_dir


def test_every_kind_of_request_tf_serving_replays_is_replayed(tmp_path, caplog):
    version_dir = version_with(tmp_path, predict_log(), classify_log(), regress_log(), multi_inference_log())
    caplog.set_level(logging.INFO, logger="model_server.servable")
    load_servable("m", 1, version_dir, LoadOptions(warmup_iterations=2))
    assert any("(4 warm-up records, each run 2 times)" in r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.parametrize("record, message", [
    (classify_log("no_such_signature"), "No signature was found with the name: no_such_signature"),
    (prediction_log_pb2.PredictionLog(session_run_log=prediction_log_pb2.SessionRunLog()),
     "Unsupported log_type for warmup: 5"),
])
def test_a_warm_up_record_that_cannot_run_fails_the_load(tmp_path, record, message):
    version_dir = version_with(tmp_path, predict_log(), record)
    with pytest.raises(ServingError, match=message):
        load_servable("m", 1, version_dir)


def test_the_records_of_the_signatures_a_tflite_file_lacks_are_replayed_too(tmp_path, caplog):
    """The training job writes them to their own file (TF Serving would replay its own on the TFLite model under
    --prefer_tflite_model, and fail the load on a signature the file lacks); replayed as TF Serving's are, so their
    first calls after a load are warm (bench/first_calls.py), and one that fails fails the load."""
    version_dir = version_with(tmp_path, predict_log(), saved_model_records=(classify_log(), regress_log()))
    caplog.set_level(logging.INFO, logger="model_server.servable")
    load_servable("m", 1, version_dir)
    assert any("(3 warm-up records, each run 1 times)" in r.getMessage() for r in caplog.records), caplog.text

    failing = version_with(tmp_path / "failing", predict_log(), saved_model_records=(classify_log("no_such"),))
    with pytest.raises(ServingError, match="No signature was found with the name: no_such"):
        load_servable("m", 1, failing)
