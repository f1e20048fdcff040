"""The training job's TFLite export: ``<version>/model.tflite`` carries the SavedModel's ``serving_default`` the way
TF Serving reads it, a published version serves the same answers and signatures with and without
``--prefer_tflite_model`` (those the file lacks from the SavedModel), and the int8 file is published as its own model
``<model>_int8`` and, on request, as the next version of the model itself."""
from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc,
)
from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus

from services.model_server.servable import LoadOptions, load_servable
from services.model_server.tflite_servable import PARITY_ATOL
from tests.model_server_harness import start_server, stop_server, version_states, wait_until, write_config
from training_job.export import SAVED_MODEL_WARMUP_FILE
from training_job.pipeline import publish_variants
from training_job.publish import PublishError, publish_dir
from training_job.tflite_export import (
    INT8_FILE, VARIANT_FILE, convert_serving_default, publish_int8_variant, saved_model_signature_def,
)
from training_job.tflite_signatures import TFLITE_FILE, read_signature_defs
from training_job.tiny_model import write_tiny_model

AVAILABLE = ModelVersionStatus.AVAILABLE
PHOTOS = np.random.default_rng(11).integers(0, 256, (8, 224, 224, 3), dtype=np.uint8)
# plain colours: the tiny model's answer is a function of the mean colour, so these get clear top-1s (noise photos all
# have a mid-grey mean and near-tied probabilities, whose top-1 any rounding flips)
COLOURS = np.broadcast_to(np.random.default_rng(12).integers(0, 256, (8, 1, 1, 3), dtype=np.uint8),
                          (8, 224, 224, 3)).copy()


def _io_names(content: bytes) -> tuple[list[str], list[str]]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content)
    return ([d["name"] for d in interpreter.get_input_details()],
            [d["name"] for d in interpreter.get_output_details()])


def test_model_tflite_carries_serving_default_as_tf_serving_reads_it(tmp_path):
    version_dir = write_tiny_model(tmp_path / "1")
    content = convert_serving_default(version_dir)
    stored = read_signature_defs(content)
    assert list(stored) == ["serving_default"]  # TF Serving accepts one SignatureDef and serves it as serving_default
    expected = saved_model_signature_def(version_dir)
    assert stored["serving_default"].method_name == "tensorflow/serving/predict"
    for side in ("inputs", "outputs"):
        got, want = getattr(stored["serving_default"], side), getattr(expected, side)
        assert set(got) == set(want)
        for alias in want:
            assert (got[alias].dtype, got[alias].tensor_shape) == (want[alias].dtype, want[alias].tensor_shape)
            assert got[alias].name == f"{alias}:0"
    # tflite_session.cc matches a SignatureDef tensor name, its ":N" cut off, to the TFLite tensor's name
    inputs, outputs = _io_names(content)
    assert sorted(inputs) == ["images"]
    assert sorted(outputs) == ["classes", "mushroom_score", "not_a_mushroom", "probabilities"]

    (version_dir / TFLITE_FILE).write_bytes(content)
    saved_model, _ = load_servable("m", 1, version_dir)
    lite, _ = load_servable("m", 1, version_dir, LoadOptions(prefer_tflite_model=True))
    assert lite.engine_of("") == TFLITE_FILE and not lite.lite._native  # served through the stored SignatureDef
    expected_answers = saved_model.run("", {"images": PHOTOS})
    answered = lite.run("", {"images": PHOTOS})
    np.testing.assert_allclose(answered["probabilities"], expected_answers["probabilities"], atol=1e-5)
    np.testing.assert_array_equal(answered["classes"], expected_answers["classes"])


def _write_warmup(version_dir: Path, photos: np.ndarray) -> None:
    from training_job.export import write_warmup_requests

    write_warmup_requests(version_dir, photos, [], "m", explain=False, tflite=True)


def test_an_int8_file_is_held_to_the_looser_rule_and_a_wrong_one_is_still_refused(tmp_path):
    version_dir = write_tiny_model(tmp_path / "m" / "1")
    _write_warmup(version_dir, COLOURS)
    assert not (version_dir / SAVED_MODEL_WARMUP_FILE).exists()  # no other signature to warm: no empty file
    int8 = convert_serving_default(version_dir, COLOURS)
    (version_dir / TFLITE_FILE).write_bytes(int8)
    served, _ = load_servable("m", 1, version_dir, LoadOptions(prefer_tflite_model=True))
    assert served.engine_of("") == TFLITE_FILE and served.lite.quantized

    other = write_tiny_model(tmp_path / "other" / "1", bias=40.0)  # the int8 file of a model answering class 0
    (version_dir / TFLITE_FILE).write_bytes(convert_serving_default(other, COLOURS))
    served, _ = load_servable("m", 1, version_dir, LoadOptions(prefer_tflite_model=True))
    assert served.engine_of("") == "SavedModel" and "quantized file: top-1 agrees on" in served.load_note

    float_dir = write_tiny_model(tmp_path / "f" / "1")  # a float file keeps the strict rule
    _write_warmup(float_dir, COLOURS)
    (float_dir / TFLITE_FILE).write_bytes(convert_serving_default(write_tiny_model(tmp_path / "g" / "1", bias=0.05)))
    served, _ = load_servable("m", 1, float_dir, LoadOptions(prefer_tflite_model=True))
    assert served.engine_of("") == "SavedModel" and f"> {PARITY_ATOL}" in served.load_note


def test_the_int8_variant_is_published_as_its_own_model_with_the_same_version(tmp_path, capsys):
    def build(staging: Path) -> None:
        write_tiny_model(staging)
        (staging / TFLITE_FILE).write_bytes(convert_serving_default(staging))
        (staging / INT8_FILE).parent.mkdir(parents=True, exist_ok=True)
        (staging / INT8_FILE).write_bytes(convert_serving_default(staging, PHOTOS[:4]))

    publish_dir(lambda d: write_tiny_model(d), tmp_path, "mushrooms")
    n, version_dir = publish_dir(build, tmp_path, "mushrooms")
    variant_n, variant_dir = publish_int8_variant(version_dir, tmp_path, "mushrooms")
    assert (variant_n, variant_dir) == (2, tmp_path / "mushrooms_int8" / "2")
    assert (variant_dir / TFLITE_FILE).read_bytes() == (version_dir / INT8_FILE).read_bytes()
    assert (variant_dir / "saved_model.pb").read_bytes() == (version_dir / "saved_model.pb").read_bytes()
    assert not (variant_dir / INT8_FILE).exists()
    with pytest.raises(PublishError):  # a version is never overwritten
        publish_int8_variant(version_dir, tmp_path, "mushrooms")
    # after the float version is published, a taken number leaves the variant out with a warning, not a failed job
    assert publish_variants(version_dir, tmp_path, "mushrooms", progress=False) is None
    assert "int8 variant of mushrooms version 2 is not published" in capsys.readouterr().err


def test_publish_int8_makes_the_int8_file_the_next_version_so_the_gateway_can_weigh_it_against_float(tmp_path,
                                                                                                       capsys):
    """The gateway routes versions of one model, so an A/B of int8 against float needs the int8 file as a version of
    the same model: served by LiteRT under --prefer_tflite_model, answering as the float version does."""
    import json

    from training_job import cli

    def build(staging: Path) -> None:
        write_tiny_model(staging)
        _write_warmup(staging, COLOURS)
        (staging / TFLITE_FILE).write_bytes(convert_serving_default(staging))
        (staging / INT8_FILE).parent.mkdir(parents=True, exist_ok=True)
        (staging / INT8_FILE).write_bytes(convert_serving_default(staging, COLOURS))

    publish_dir(build, tmp_path, "mushrooms")
    publish_dir(lambda d: write_tiny_model(d, bias=1.0), tmp_path, "mushrooms")  # v2: no TFLite files
    argv = ["publish_int8", "--registry", str(tmp_path), "--model_name", "mushrooms", "--version"]
    assert cli.main([*argv, "1"]) == 0
    assert "int8 variant of mushrooms version 1 as version 3" in capsys.readouterr().out
    variant = tmp_path / "mushrooms" / "3"
    assert (variant / TFLITE_FILE).read_bytes() == (tmp_path / "mushrooms" / "1" / INT8_FILE).read_bytes()
    assert json.loads((variant / VARIANT_FILE).read_text())["of_version"] == 1
    assert not (variant / INT8_FILE).exists()
    for missing, says in (("2", "has no int8 file"), ("9", "has no published version 9")):
        assert cli.main([*argv, missing]) == 2
        assert says in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "mushrooms").iterdir() if p.name.isdigit()) == ["1", "2", "3"]

    config = tmp_path / "models.config"
    write_config(config, {"mushrooms": tmp_path / "mushrooms"}, policy="specific { versions: 1 versions: 3 }")
    server = start_server(tmp_path, config, "--prefer_tflite_model=true")
    try:
        for version in (1, 3):
            wait_until(lambda v=version: version_states(server.grpc_target, "mushrooms").get(v, (0,))[0] == AVAILABLE,
                       timeout=120, what=f"version {version}")
        assert version_states(server.grpc_target, "mushrooms")[3][1].startswith(f"serving_default from {TFLITE_FILE}")
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            answers = {}
            for version in (1, 3):
                request = predict_pb2.PredictRequest()
                request.model_spec.name = "mushrooms"
                request.model_spec.version.value = version
                request.inputs["images"].CopyFrom(tf.make_tensor_proto(COLOURS))
                answers[version] = tf.make_ndarray(stub.Predict(request, timeout=60).outputs["probabilities"])
        assert np.mean(answers[1].argmax(1) == answers[3].argmax(1)) >= 0.75  # the int8 rule of the parity check
    finally:
        stop_server(server)


@pytest.fixture(scope="module")
def published_with_tflite(trained_run, base_network, tmp_path_factory):
    """A real run published through ``publish_run`` with its TFLite files (and so its int8 variant)."""
    from training_job.pipeline import publish_run

    run_dir, _ = trained_run
    registry = tmp_path_factory.mktemp("tflite-registry")
    version, version_dir, metrics = publish_run(run_dir, registry, "mushrooms", base=base_network, progress=False)
    return registry, version, version_dir, metrics


def _metadata(stub, model: str) -> dict:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = model
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    stub.GetModelMetadata(request, timeout=30).metadata["signature_def"].Unpack(signature_map)
    return dict(signature_map.signature_def)


def _predict(stub, model: str, pixels: np.ndarray, signature: str = "", **more: np.ndarray) -> dict:
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = model, signature
    for alias, value in {"images": pixels, **more}.items():
        if value is not None:
            request.inputs[alias].CopyFrom(tf.make_tensor_proto(value))
    return {k: tf.make_ndarray(v) for k, v in stub.Predict(request, timeout=60).outputs.items()}


def test_the_signatures_model_tflite_lacks_warm_up_from_a_file_of_their_own(published_with_tflite, caplog):
    """TF Serving's warm-up file of a version with model.tflite holds serving_default's records only: under
    --prefer_tflite_model TF Serving replays it on the TFLite file, and a record for a signature the file lacks fails
    the load. The others' records are in SAVED_MODEL_WARMUP_FILE, which our model server replays too, so after a load
    no signature's first call waits for TensorFlow to instantiate its function (bench/first_calls.py)."""
    import logging

    from services.model_server.warmup import records
    from training_job.export import WARMUP_FILE

    _, version, version_dir, _ = published_with_tflite
    signatures = {name: sorted(r.predict_log.request.model_spec.signature_name for r in records(version_dir, name))
                  for name in (WARMUP_FILE, SAVED_MODEL_WARMUP_FILE)}
    assert signatures == {WARMUP_FILE: ["serving_default", "serving_default"],
                          SAVED_MODEL_WARMUP_FILE: ["explain", "explain_image_bytes", "predict_image_bytes"]}
    caplog.set_level(logging.INFO, logger="model_server.servable")
    servable, _ = load_servable("mushrooms", version, version_dir, LoadOptions(prefer_tflite_model=True))
    assert servable.engine_of("") == TFLITE_FILE and servable.engine_of("explain_image_bytes") == "SavedModel"
    assert "(5 warm-up records, each run 1 times)" in caplog.text


def test_a_published_version_answers_the_same_with_and_without_prefer_tflite_model(published_with_tflite, tmp_path):
    from training_job.preprocessing import load_image_file
    from training_job.train import split_rows

    registry, version, version_dir, metrics = published_with_tflite
    assert (version_dir / TFLITE_FILE).is_file() and metrics["tflite"]["float_file"] == TFLITE_FILE
    assert (registry / "mushrooms_int8" / str(version) / TFLITE_FILE).read_bytes() == \
        (version_dir / INT8_FILE).read_bytes()
    config = tmp_path / "models.config"
    write_config(config, {"mushrooms": registry / "mushrooms", "mushrooms_int8": registry / "mushrooms_int8"})
    plain = start_server(registry, config)
    lite = start_server(registry, config, "--prefer_tflite_model=true")
    try:
        for server in (plain, lite):
            for model in ("mushrooms", "mushrooms_int8"):
                wait_until(lambda s=server, m=model: version_states(s.grpc_target, m).get(version, (0,))[0]
                           == AVAILABLE, timeout=180, what=f"{model} v{version}")
        plain_channel, lite_channel = grpc.insecure_channel(plain.grpc_target), grpc.insecure_channel(lite.grpc_target)
        plain_stub = prediction_service_pb2_grpc.PredictionServiceStub(plain_channel)
        lite_stub = prediction_service_pb2_grpc.PredictionServiceStub(lite_channel)
        # both passed the parity check: serving_default from model.tflite, the rest from the SavedModel, as
        # GetModelStatus says
        lacking = "explain, explain_image_bytes, predict_image_bytes"
        for model in ("mushrooms", "mushrooms_int8"):
            assert version_states(lite.grpc_target, model)[version] == (AVAILABLE, (
                f"serving_default from {TFLITE_FILE}; {lacking} from the SavedModel ({TFLITE_FILE} lacks them)"))
        assert version_states(plain.grpc_target, "mushrooms")[version] == (AVAILABLE, "")

        plain_meta, lite_meta = _metadata(plain_stub, "mushrooms"), _metadata(lite_stub, "mushrooms")
        assert set(lite_meta) == set(plain_meta) == {"serving_default", *lacking.split(", ")}
        for name in lacking.split(", "):
            assert lite_meta[name] == plain_meta[name]
        for side in ("inputs", "outputs"):
            want, got = getattr(plain_meta["serving_default"], side), getattr(lite_meta["serving_default"], side)
            assert {a: (i.dtype, i.tensor_shape) for a, i in got.items()} == \
                {a: (i.dtype, i.tensor_shape) for a, i in want.items()}

        pixels = np.stack([load_image_file(r.path) for r in split_rows(_manifest_rows(version_dir), "test")[:12]])
        expected, answered = _predict(plain_stub, "mushrooms", pixels), _predict(lite_stub, "mushrooms", pixels)
        np.testing.assert_array_equal(answered["probabilities"].argmax(1), expected["probabilities"].argmax(1))
        np.testing.assert_allclose(answered["probabilities"], expected["probabilities"], atol=PARITY_ATOL)
        np.testing.assert_array_equal(answered["classes"], expected["classes"])
        np.testing.assert_array_equal(answered["not_a_mushroom"], expected["not_a_mushroom"])

        int8 = _predict(lite_stub, "mushrooms_int8", pixels)["probabilities"]  # the int8 servable answers ...
        assert int8.shape == expected["probabilities"].shape
        assert np.mean(int8.argmax(1) == expected["probabilities"].argmax(1)) >= 0.75
        assert np.abs(int8 - expected["probabilities"]).max() > 0  # ... with its own numbers; the default is float

        # the signatures the TFLite file lacks answer from the SavedModel, as without the flag
        photo_bytes = np.array([Path(r.path).read_bytes() for r in split_rows(_manifest_rows(version_dir),
                                                                              "test")[:2]], dtype=object)
        one_class = np.array([-1], np.int32)  # explain the predicted class
        for signature, more in (("predict_image_bytes", {"images": None, "image_bytes": photo_bytes}),
                                ("explain", {"class_index": one_class}),
                                ("explain_image_bytes", {"images": None, "image_bytes": photo_bytes[:1],
                                                         "class_index": one_class})):
            expected = _predict(plain_stub, "mushrooms", pixels[:1], signature, **more)
            answered = _predict(lite_stub, "mushrooms", pixels[:1], signature, **more)
            assert set(answered) == set(expected), signature
            for alias in expected:
                if expected[alias].dtype.kind == "f":
                    np.testing.assert_allclose(answered[alias], expected[alias], atol=1e-5, err_msg=signature)
                else:
                    np.testing.assert_array_equal(answered[alias], expected[alias], err_msg=signature)
        plain_channel.close()
        lite_channel.close()
    finally:
        stop_server(plain)
        stop_server(lite)


def _manifest_rows(version_dir: Path):
    from training_job.dataset import read_manifest

    return read_manifest(version_dir / "assets.extra" / "manifest.csv")
