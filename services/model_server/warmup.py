"""Warm-up: a version's ``assets.extra/tf_serving_warmup_requests`` (a TFRecord of PredictionLog) replayed on its new
servable at load, as TF Serving's saved_model_warmup.cc and saved_model_warmup_util.cc replay it; then, the same
way, ``assets.extra/saved_model_warmup_requests``, where the training job puts the records of the signatures a
version's model.tflite lacks (training_job/export.py: TF Serving, which ignores that file, would replay them on the
TFLite model under --prefer_tflite_model and fail the load), so their first calls are warm here whatever the engine.

Predict, classify, regress and multi_inference records run as the APIs would run them (Classify, Regress and
MultiInference through ``inference``'s checks and results); a record that fails, one of a kind that cannot be replayed
(session_run_log, predict_streamed_log: UNIMPLEMENTED), one that does not parse, or more than 1,000 records fail the
load. A record without a log type is skipped; a folder without the file has nothing to replay."""
from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import classification_pb2, inference_pb2, prediction_log_pb2, regression_pb2

from services.model_server import inference
from services.model_server.errors import ServingError
from services.model_server.servable import Servable
from training_job.export import SAVED_MODEL_WARMUP_FILE, WARMUP_FILE

MAX_RECORDS = 1000  # WarmupConsts::kMaxNumRecords, of each file


def records(version_dir: Path, name: Path = WARMUP_FILE) -> list[prediction_log_pb2.PredictionLog]:
    """The warm-up records of a version folder's file ``name`` (none without the file)."""
    path = Path(version_dir) / name
    if not path.exists():
        return []
    entries = []
    for record in tf.data.TFRecordDataset(str(path)):
        entry = prediction_log_pb2.PredictionLog()
        try:
            entry.ParseFromString(record.numpy())
        except Exception:  # noqa: BLE001 - protobuf's DecodeError, whatever the record holds
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Failed to parse warmup record from {path}") from None
        entries.append(entry)
        if len(entries) > MAX_RECORDS:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Number of warmup records exceeds the maximum ({MAX_RECORDS}) at {path}")
    return entries


def predict_requests(version_dir: Path) -> list[tuple[str, dict[str, np.ndarray]]]:
    """The (signature, inputs) of each predict record of a version folder."""
    return [(entry.predict_log.request.model_spec.signature_name,
             {k: tf.make_ndarray(v) for k, v in entry.predict_log.request.inputs.items()})
            for entry in records(version_dir) if entry.WhichOneof("log_type") == "predict_log"]


def replay(servable: Servable, iterations: int = 1) -> int:
    """Run each warm-up record of the servable's folder (both files) ``iterations`` times; returns how many records
    there were. Raises what a record raises."""
    entries = records(servable.path) + records(servable.path, SAVED_MODEL_WARMUP_FILE)
    for entry in entries:
        for _ in range(max(1, iterations)):
            run_record(servable, entry)
    return len(entries)


def run_record(servable: Servable, entry: prediction_log_pb2.PredictionLog) -> None:
    """One warm-up record on ``servable`` (saved_model_warmup.cc RunWarmupRequest)."""
    kind = entry.WhichOneof("log_type")
    if kind == "predict_log":
        request = entry.predict_log.request
        servable.run(request.model_spec.signature_name,
                     {k: tf.make_ndarray(v) for k, v in request.inputs.items()}, tuple(request.output_filter))
    elif kind == "classify_log":
        name, wanted, examples = inference.prepared(servable, entry.classify_log.request,
                                                    inference.classification_outputs)
        inference.classification_result(servable.run(name, {"inputs": examples}, wanted), len(examples),
                                        classification_pb2.ClassificationResult())
    elif kind == "regress_log":
        name, wanted, examples = inference.prepared(servable, entry.regress_log.request, inference.regression_outputs)
        inference.regression_result(servable.run(name, {"inputs": examples}, wanted), len(examples),
                                    regression_pb2.RegressionResult())
    elif kind == "multi_inference_log":
        request = entry.multi_inference_log.request
        plan = inference.multi_inference_plan(servable, request)
        examples = inference.serialized_examples(request.input)
        for task, name, wanted in plan:
            inference.inference_result(task, servable.run(name, {"inputs": examples}, wanted), len(examples),
                                       inference_pb2.InferenceResult())
    elif kind is not None:
        number = entry.DESCRIPTOR.fields_by_name[kind].number  # TF Serving prints the oneof's case, this number
        raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f"Unsupported log_type for warmup: {number}")
