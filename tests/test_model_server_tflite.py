"""The TFLite engine (--prefer_tflite_model): a version's model.tflite served by LiteRT in place of its SavedModel,
with the same answers, batching and metrics, and the SavedModel's signatures the file lacks still served from the
SavedModel; versions without one stay on their SavedModel."""
from __future__ import annotations

import asyncio
import queue
import re
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc
from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus

from services.model_server.batching import Batcher
from services.model_server.config import BatchingParameters, single_model_config
from services.model_server.errors import ServingError
from services.model_server.grpc_api import status_response
from services.model_server.manager import Manager
from services.model_server.servable import LoadOptions, load_servable
from services.model_server.source import FileSystemSource
from services.model_server import tflite_servable
from services.model_server.tflite_servable import TfLiteServable
from tests.model_server_harness import start_server, stop_server, version_states, wait_until, write_config
from training_job.tflite_signatures import TFLITE_FILE
from training_job.tiny_model import write_tiny_model, write_tiny_model_with_tflite

AVAILABLE = ModelVersionStatus.AVAILABLE
PHOTOS = np.random.default_rng(7).integers(0, 256, (6, 224, 224, 3), dtype=np.uint8)


def test_the_tflite_engine_answers_as_the_saved_model_does_at_any_batch_size(tmp_path):
    version_dir = write_tiny_model_with_tflite(tmp_path / "1")
    saved_model, _ = load_servable("m", 1, version_dir)
    lite, _ = load_servable("m", 1, version_dir, LoadOptions(prefer_tflite_model=True))
    assert lite.engine_of("serving_default") == TFLITE_FILE and saved_model.engine_of("serving_default") == "SavedModel"
    assert lite.signature_defs["serving_default"] == lite.lite.signature_defs["serving_default"]  # the file's
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


def test_a_call_that_starts_alone_gets_every_core_and_calls_side_by_side_get_their_share(tmp_path):
    lite = TfLiteServable("m", 1, write_tiny_model_with_tflite(tmp_path / "1"), threads=1, lone_call_threads=2)
    assert (lite.threads_for_call(0), lite.threads_for_call(1), lite.threads_for_call(3)) == (2, 1, 1)

    alone = lite.run("serving_default", {"images": PHOTOS})
    assert lite._idle[2].qsize() == 1  # it ran on a two-thread interpreter, now idle again

    beside = lite._acquire()  # a call in progress
    assert beside.threads == 2
    try:
        shared = lite.run("serving_default", {"images": PHOTOS})
        assert lite._idle[1].qsize() == 1 and lite._idle[2].qsize() == 0  # this one got one thread
    finally:
        lite._release(beside)
    assert lite._running == 0
    np.testing.assert_allclose(shared["probabilities"], alone["probabilities"], atol=1e-6)
    np.testing.assert_array_equal(shared["classes"], alone["classes"])


def test_intra_op_threads_an_operator_fixed_hold_for_lone_calls_too(tmp_path):
    version_dir = write_tiny_model_with_tflite(tmp_path / "1")
    fixed, _ = load_servable("m", 1, version_dir, LoadOptions(prefer_tflite_model=True, intra_op_threads=1))
    assert (fixed.lite.threads_for_call(0), fixed.lite.threads_for_call(1)) == (1, 1)


def _jpegs(photos: np.ndarray) -> np.ndarray:
    return np.array([tf.io.encode_jpeg(photo).numpy() for photo in photos], dtype=object)


def test_under_the_flag_the_signatures_model_tflite_lacks_are_served_from_the_saved_model(tmp_path):
    version_dir = write_tiny_model_with_tflite(tmp_path / "1")
    saved_model, _ = load_servable("m", 1, version_dir)
    served, _ = load_servable("m", 1, version_dir, LoadOptions(prefer_tflite_model=True))
    assert set(served.signature_defs) == set(saved_model.signature_defs)  # GetModelMetadata lists them all
    assert set(served.signatures) == set(saved_model.signatures)
    lacking = ["classify_mean_colour", "predict_image_bytes", "regress_mushroom_score"]
    assert served.engine_of("serving_default") == TFLITE_FILE and served.engine_of("") == TFLITE_FILE
    assert [served.engine_of(name) for name in lacking] == ["SavedModel"] * 3
    assert served.load_note == (f"serving_default from {TFLITE_FILE}; {', '.join(lacking)} from the SavedModel "
                                f"({TFLITE_FILE} lacks them)")  # GetModelStatus shows it
    for name in lacking:
        assert served.signature_defs[name] == saved_model.signature_defs[name]

    photos = _jpegs(PHOTOS[:3])
    expected = saved_model.run("predict_image_bytes", {"image_bytes": photos})
    answered = served.run("predict_image_bytes", {"image_bytes": photos})
    assert set(answered) == set(expected)
    for alias in expected:  # the same engine: the same numbers
        np.testing.assert_array_equal(answered[alias], expected[alias])
    only = served.run("predict_image_bytes", {"image_bytes": photos[:1]}, ("mushroom_score",))
    assert list(only) == ["mushroom_score"]
    with pytest.raises(ServingError, match="input names do not match signature 'predict_image_bytes'"):
        served.run("predict_image_bytes", {"images": PHOTOS[:1]})  # the checks are the same

    pixels = served.run("serving_default", {"images": PHOTOS[:3]})
    lite_alone = TfLiteServable("m", 1, version_dir).run("serving_default", {"images": PHOTOS[:3]})
    for alias in lite_alone:  # from LiteRT
        np.testing.assert_array_equal(pixels[alias], lite_alone[alias])


def test_a_saved_model_with_nothing_the_file_lacks_is_not_kept(tmp_path):
    from training_job.tiny_model import TinyClassifier

    version_dir = tmp_path / "1"
    module = TinyClassifier()
    tf.saved_model.save(module, str(version_dir), signatures={"serving_default": module.serve_pixels})
    converter = tf.lite.TFLiteConverter.from_saved_model(str(version_dir), signature_keys=["serving_default"])
    (version_dir / TFLITE_FILE).write_bytes(converter.convert())
    served, _ = load_servable("m", 1, version_dir, LoadOptions(prefer_tflite_model=True))
    assert isinstance(served, TfLiteServable)  # LiteRT alone: the SavedModel is not resident
    assert set(served.signature_defs) == {"serving_default"} and served.load_note == ""


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
    agreeing = write_tiny_model_with_tflite(tmp_path / "agreeing" / "1")
    write_warmup(agreeing, PHOTOS[:3])
    served, _ = load_servable("m", 1, agreeing, LoadOptions(prefer_tflite_model=True))
    assert served.engine_of("serving_default") == TFLITE_FILE

    other_version = write_tiny_model_with_tflite(tmp_path / "other" / "2")  # the file of another version ...
    version_dir = tmp_path / "m" / "1"
    write_tiny_model(version_dir, bias=4.0)  # ... beside this version's SavedModel
    (version_dir / "model.tflite").write_bytes((other_version / "model.tflite").read_bytes())
    write_warmup(version_dir, PHOTOS[:3])
    served, _ = load_servable("m", 1, version_dir, LoadOptions(prefer_tflite_model=True))
    assert {served.engine_of(name) for name in served.signatures} == {"SavedModel"}  # every signature
    assert served.load_note.startswith("serving the SavedModel: model.tflite disagrees with it (signature "
                                       "serving_default output ")
    manager = Manager()
    source = FileSystemSource(manager.set_aspired_versions, LoadOptions(prefer_tflite_model=True))
    config = single_model_config("m", str(tmp_path / "m"))
    manager.set_config(config)
    source.set_config(config)
    source.poll()
    manager.manage_state()
    (status,) = status_response(manager, "m", None).model_version_status
    assert (status.state, status.status.error_code) == (AVAILABLE, 0)  # it serves, from the SavedModel ...
    assert status.status.error_message == served.load_note  # ... and says why


class InputNamedOtherwise(tf.Module):
    """A well-formed file of another export: its input is ``input_1``, not ``images``."""

    @tf.function(input_signature=[tf.TensorSpec([None, 224, 224, 3], tf.uint8, name="input_1")])
    def serve(self, input_1):
        mean = tf.reduce_mean(tf.cast(input_1, tf.float32), axis=[1, 2])
        return {"probabilities": tf.nn.softmax(tf.concat([mean, mean[:, :1]], 1))}


@pytest.mark.parametrize("broken, reason", [
    ("truncated", "serving the SavedModel: model.tflite cannot be opened ("),
    ("input named otherwise", "serving the SavedModel: model.tflite fails on the warm-up requests ("),
])
def test_a_tflite_file_that_cannot_serve_beside_a_saved_model_leaves_the_saved_model_served(tmp_path, broken, reason):
    """As a file that disagrees with its SavedModel: the SavedModel is served, and GetModelStatus says why (a folder
    without saved_model.pb has nothing to fall back on: its load fails, as in TF Serving)."""
    version_dir = write_tiny_model_with_tflite(tmp_path / "m" / "1")
    write_warmup(version_dir, PHOTOS[:2])
    if broken == "truncated":  # a copy cut short
        data = (version_dir / TFLITE_FILE).read_bytes()
        (version_dir / TFLITE_FILE).write_bytes(data[:len(data) // 2])
    else:
        module = InputNamedOtherwise()
        converter = tf.lite.TFLiteConverter.from_concrete_functions([module.serve.get_concrete_function()], module)
        (version_dir / TFLITE_FILE).write_bytes(converter.convert())
    served, _ = load_servable("m", 1, version_dir, LoadOptions(prefer_tflite_model=True))
    assert {served.engine_of(name) for name in served.signatures} == {"SavedModel"}
    assert served.load_note.startswith(reason), served.load_note
    np.testing.assert_allclose(served.run("", {"images": PHOTOS[:1]})["probabilities"],
                               load_servable("m", 1, version_dir)[0].run("", {"images": PHOTOS[:1]})["probabilities"])


def _two_core_lite(tmp_path) -> TfLiteServable:
    """The tiny model's TFLite servable as on two cores, whatever the machine and the threads TensorFlow was given in
    this process: rows split onto single-thread interpreters, calls unsplit on two-thread ones."""
    lite, _ = load_servable("m", 1, write_tiny_model_with_tflite(tmp_path / "1"), LoadOptions(prefer_tflite_model=True))
    lite = lite.lite
    lite._split_parts, lite._part_threads, lite._threads, lite._lone_call_threads = 2, 1, 2, 2
    lite._idle.setdefault(1, queue.SimpleQueue())
    lite._idle.setdefault(2, queue.SimpleQueue())
    return lite


def test_a_batch_is_split_into_rows_the_row_workers_run_on_single_thread_interpreters_for_the_same_answers(tmp_path):
    """A multi-thread XNNPACK call synchronises its threads at every operator, and an interpreter resized to each
    batch's size re-plans its operators: two single-thread interpreters side by side, one row at a time each, ran
    the published model's batches of 32 8 % faster with the same bits (bench/model_server_bench.py: the server at
    concurrency 32 went from 0.936 to 0.988 of one two-thread interpreter at batch 32, 6.04 to 5.44 ms of CPU per
    photo)."""
    lite = _two_core_lite(tmp_path)
    assert lite._batch_first == {"serving_default"}
    whole = lite.run("serving_default", {"images": PHOTOS})
    split = lite.run_batch("serving_default", {"images": PHOTOS})
    assert set(split) == set(whole)
    for alias in whole:
        np.testing.assert_array_equal(split[alias], whole[alias])
    made = lite._idle[1].qsize()  # one per row worker that ran a row of this servable
    assert 1 <= made <= tflite_servable.MAX_SPLIT_PARTS
    parts = [lite._idle[1].get_nowait() for _ in range(made)]
    assert {(part.threads, part.interpreter.get_input_details()[0]["shape"][0]) for part in parts} == {(1, 1)}

    # a lone request (one row, no rows running) runs as run runs it: on the lone call's interpreter of every core
    for part in parts:
        lite._idle[1].put(part)
    lone = lite.run_batch("serving_default", {"images": PHOTOS[:1]})
    np.testing.assert_array_equal(lone["probabilities"], whole["probabilities"][:1])
    assert lite._idle[1].qsize() == made and lite._idle[2].qsize() == 1 and lite._running == 0


def test_a_batch_that_starts_while_rows_run_queues_its_rows_behind_them_on_the_same_threads(tmp_path):
    """With two batch threads, a batch starts while the previous one runs. Its rows wait in line for the row
    workers, which take them as they end the previous batch's rows: no interpreter runs beside the workers'
    (more threads than cores), and no core idles at a batch's end while rows are waiting."""
    lite = _two_core_lite(tmp_path)
    whole = lite.run("serving_default", {"images": PHOTOS})
    ran, gate = [], threading.Event()
    invoke = lite._invoke

    def held(instance, info, values, wanted):  # every row waits at the gate until the later batches are in line
        ran.append((threading.current_thread().name, instance.threads, len(values["images"])))
        gate.wait(30)
        return invoke(instance, info, values, wanted)

    lite._invoke = held
    with ThreadPoolExecutor(3) as batch_threads:
        first = batch_threads.submit(lite.run_batch, "serving_default", {"images": PHOTOS})
        wait_until(lambda: ran, timeout=30, what="the first batch's rows running")
        one_row = batch_threads.submit(lite.run_batch, "serving_default", {"images": PHOTOS[:1]})
        three_rows = batch_threads.submit(lite.run_batch, "serving_default", {"images": PHOTOS[3:]})
        wait_until(lambda: tflite_servable.row_workers()._pending == len(PHOTOS) + 1 + 3, timeout=30,
                   what="the later batches' rows in line")
        gate.set()
        answers = first.result(30), one_row.result(30), three_rows.result(30)
    for answer, rows in zip(answers, (slice(None), slice(0, 1), slice(3, None))):
        np.testing.assert_array_equal(answer["probabilities"], whole["probabilities"][rows])
    assert len(ran) == len(PHOTOS) + 1 + 3
    assert {(name.startswith("tflite-rows"), threads, rows) for name, threads, rows in ran} == {(True, 1, 1)}
    assert lite._running == 0 and not tflite_servable.row_workers().busy()


def test_a_row_that_fails_fails_its_batch_and_the_row_workers_go_on(tmp_path):
    lite = _two_core_lite(tmp_path)
    whole = lite.run("serving_default", {"images": PHOTOS})
    invoke = lite._invoke
    bad = PHOTOS[4, 0, 0].copy()

    def failing(instance, info, values, wanted):
        if (values["images"][0, 0, 0] == bad).all():
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "row 4 is bad")
        return invoke(instance, info, values, wanted)

    lite._invoke = failing
    with pytest.raises(ServingError, match="row 4 is bad"):
        lite.run_batch("serving_default", {"images": PHOTOS})
    lite._invoke = invoke
    np.testing.assert_array_equal(lite.run_batch("serving_default", {"images": PHOTOS})["probabilities"],
                                  whole["probabilities"])
    assert lite._running == 0 and not tflite_servable.row_workers().busy()


def test_a_split_batch_has_a_bounded_number_of_parts_on_a_machine_of_many_cores(tmp_path, monkeypatch):
    """Each interpreter holds its own copy of the model's packed weights (28 MB for the published float file): on a
    machine of many cores, a batch is split into MAX_SPLIT_PARTS parts, each with its share of the cores."""
    monkeypatch.setattr(tflite_servable, "usable_cores", lambda: 16)
    lite = TfLiteServable("m", 1, write_tiny_model_with_tflite(tmp_path / "1"))
    assert (lite._split_parts, lite._part_threads) == (tflite_servable.MAX_SPLIT_PARTS, 16 // 4)
    monkeypatch.setattr(tflite_servable, "usable_cores", lambda: 2)
    lite = TfLiteServable("m", 1, tmp_path / "1")
    assert (lite._split_parts, lite._part_threads) == (2, 1)
    assert TfLiteServable("m", 1, tmp_path / "1", threads=2)._split_parts == 1  # threads an operator fixed


def test_an_int8_files_batches_are_split_into_rows_too(tmp_path, monkeypatch):
    """A batch of a fixed size ran faster whole on one two-thread interpreter (913 photos/s against 863 split for the
    published int8 file), but batches under load come in varying sizes, each of which re-plans a whole-batch
    interpreter, and the row workers take the next batch's rows as they end one batch's: the int8 model server at
    concurrency 32 with two batch threads answered 748-767 photos/s split, 688-731 whole."""
    from training_job.tflite_export import convert_serving_default

    monkeypatch.setattr(tflite_servable, "usable_cores", lambda: 2)
    version_dir = write_tiny_model(tmp_path / "1")
    (version_dir / TFLITE_FILE).write_bytes(convert_serving_default(version_dir, PHOTOS))
    lite = TfLiteServable("m", 1, version_dir)
    assert lite.quantized and lite._split_parts == 2
    whole = lite.run("serving_default", {"images": PHOTOS})["probabilities"]
    np.testing.assert_array_equal(lite.run_batch("serving_default", {"images": PHOTOS})["probabilities"], whole)
    assert lite._idle[1].qsize() >= 1  # the rows ran on the row workers' single-thread interpreters


def test_a_file_of_a_fixed_batch_size_is_never_split(tmp_path):
    """Rows are only split where the file declares every input and output batch-first: an interpreter of a fixed
    batch size resized to one row could fail, or answer for a batch it was not made for."""
    class FixedBatch(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([6, 224, 224, 3], tf.uint8, name="images")])
        def serve(self, images):
            return {"mean_colour": tf.reduce_mean(tf.cast(images, tf.float32), axis=[1, 2])}

    module = FixedBatch()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([module.serve.get_concrete_function()], module)
    version_dir = tmp_path / "1"
    version_dir.mkdir()
    (version_dir / TFLITE_FILE).write_bytes(converter.convert())
    lite = TfLiteServable("m", 1, version_dir)
    lite._split_parts = 2
    assert lite._batch_first == set()
    answered = lite.run_batch("serving_default", {"images": PHOTOS})
    np.testing.assert_allclose(answered["mean_colour"], PHOTOS.mean(axis=(1, 2)), rtol=1e-5)
    assert lite._idle[1].qsize() == 0


def test_requests_queued_together_share_one_tflite_call(tmp_path):
    lite, _ = load_servable("m", 1, write_tiny_model_with_tflite(tmp_path / "1"), LoadOptions(prefer_tflite_model=True))
    expected = lite.run("", {"images": PHOTOS})["probabilities"]
    rows_per_call = []
    run_batch = lite.run_batch
    lite.run_batch = lambda signature, inputs, output_filter=(): rows_per_call.append(len(inputs["images"])) or \
        run_batch(signature, inputs, output_filter)

    async def six_at_once():
        params = BatchingParameters.from_text("max_batch_size { value: 16 } batch_timeout_micros { value: 0 } "
                                              "num_batch_threads { value: 1 }")
        batcher = Batcher(params, ThreadPoolExecutor(1))
        return await asyncio.gather(*(batcher.run(lite, "serving_default", {"images": PHOTOS[i:i + 1]},
                                                  ("probabilities",)) for i in range(len(PHOTOS))))

    answers = asyncio.run(six_at_once())
    assert rows_per_call == [len(PHOTOS)]  # one model call of the joined batch
    for row, answer in enumerate(answers):
        np.testing.assert_allclose(answer["probabilities"], expected[row:row + 1], atol=1e-6)


def test_requests_to_either_engine_are_batched_per_signature(tmp_path):
    served, _ = load_servable("m", 1, write_tiny_model_with_tflite(tmp_path / "1"),
                              LoadOptions(prefer_tflite_model=True))
    calls = []  # (engine, signature, rows) of each model call

    def spy(engine):
        call = engine.run_batch
        engine.run_batch = lambda signature, inputs, output_filter=(): calls.append(
            (engine.engine, signature, len(next(iter(inputs.values()))))) or call(signature, inputs, output_filter)

    spy(served.lite)
    spy(served.saved_model)
    jpegs = _jpegs(PHOTOS)

    async def both_at_once():
        params = BatchingParameters.from_text("max_batch_size { value: 16 } batch_timeout_micros { value: 0 } "
                                              "num_batch_threads { value: 1 }")
        batcher = Batcher(params, ThreadPoolExecutor(1))
        pixels = [batcher.run(served, "serving_default", {"images": PHOTOS[i:i + 1]}, ()) for i in range(6)]
        photos = [batcher.run(served, "predict_image_bytes", {"image_bytes": jpegs[i:i + 1]}, ()) for i in range(6)]
        return await asyncio.gather(*pixels, *photos)

    answers = asyncio.run(both_at_once())
    assert sorted(calls) == [("SavedModel", "predict_image_bytes", 6), (TFLITE_FILE, "serving_default", 6)]
    expected = served.saved_model.run("predict_image_bytes", {"image_bytes": jpegs})
    for row, answer in enumerate(answers[6:]):
        np.testing.assert_array_equal(answer["probabilities"], expected["probabilities"][row:row + 1])


def _signature_names(stub, model: str) -> set[str]:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = model
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    stub.GetModelMetadata(request, timeout=30).metadata["signature_def"].Unpack(signature_map)
    return set(signature_map.signature_def)


@pytest.mark.parametrize("batch_threads", [1, 2], ids=["one batch thread", "two batch threads (as shipped)"])
def test_under_the_flag_tflite_versions_answer_through_the_batcher_and_others_keep_their_saved_model(tmp_path,
                                                                                                       batch_threads):
    """With two batch threads, batches run side by side and their rows share the row workers: each request still
    gets its own row's answer."""
    write_tiny_model_with_tflite(tmp_path / "lite" / "1")
    write_tiny_model(tmp_path / "saved" / "1")
    config = tmp_path / "models.config"
    write_config(config, {"lite": tmp_path / "lite", "saved": tmp_path / "saved"})
    (tmp_path / "batching.config").write_text(
        f"max_batch_size {{ value: 16 }}\nbatch_timeout_micros {{ value: 20000 }}\n"
        f"num_batch_threads {{ value: {batch_threads} }}\n")
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
        assert {"serving_default", "predict_image_bytes"} <= _signature_names(stub, "saved")  # the SavedModel's
        assert _signature_names(stub, "lite") == _signature_names(stub, "saved")  # the file's and the SavedModel's
        note = version_states(server.grpc_target, "lite")[1][1]
        assert note.startswith(f"serving_default from {TFLITE_FILE}; ") and "predict_image_bytes" in note

        expected, _ = load_servable("m", 1, tmp_path / "saved" / "1")

        jpegs = _jpegs(PHOTOS)

        def predict(row: int) -> np.ndarray:
            """Even calls ask serving_default (LiteRT), odd ones predict_image_bytes (the SavedModel)."""
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "lite"
            if row % 2:
                request.model_spec.signature_name = "predict_image_bytes"
                request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(jpegs[row % len(PHOTOS):][:1]))
            else:
                request.inputs["images"].CopyFrom(tf.make_tensor_proto(PHOTOS[row % len(PHOTOS):][:1]))
            request.output_filter.append("probabilities")
            return tf.make_ndarray(stub.Predict(request, timeout=30).outputs["probabilities"])

        start = threading.Barrier(12)

        def together(row: int) -> np.ndarray:
            start.wait(timeout=30)
            return predict(row)

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(together, range(12)))
        for row, answer in enumerate(answers):
            at = row % len(PHOTOS)
            if row % 2:
                want = expected.run("predict_image_bytes", {"image_bytes": jpegs[at:at + 1]})["probabilities"]
                # the SavedModel's own numbers (LiteRT has no signature taking JPEGs), to the last bits a batch of
                # other rows may change
                np.testing.assert_allclose(answer, want, rtol=1e-6)
            else:
                np.testing.assert_allclose(answer, expected.run("", {"images": PHOTOS[at:at + 1]})["probabilities"],
                                           atol=1e-5)
        channel.close()
        text = urllib.request.urlopen(f"{server.rest_url}/metrics", timeout=10).read().decode()
        total = float(re.search(r'processed_batch_size_sum\{model_name="lite"\} (\S+)', text).group(1))
        assert total >= 12  # both engines through the batch scheduler (how many share a call depends on timing)
        served = [line for line in text.splitlines() if re.match(r":tensorflow:serving:request_count(_total)?\{", line)
                  and 'model_name="lite"' in line and 'status="OK"' in line]
        assert len(served) == 1 and float(served[0].split()[-1]) == 12, served  # counted as for SavedModels
    finally:
        stop_server(server)
