"""The published SavedModel honours the contract and gives the same outputs as the in-process model."""
import json

import numpy as np
import pytest
import tensorflow as tf

from bench.common import jpeg_scan_bomb
from training_job.export import in_process_outputs
from training_job.pipeline import load_run
from training_job.preprocessing import load_image_file
from training_job.train import split_rows


def _sample(run_dir, n=6):
    rows, _, head, open_set = load_run(run_dir)
    test = split_rows(rows, "test")[:n]
    return test, head, open_set


def test_savedmodel_equals_in_process_model(published_model, base_network):
    test_rows, head, open_set = _sample(published_model.run_dir)
    pixels = np.stack([load_image_file(r.path) for r in test_rows])
    loaded = tf.saved_model.load(str(published_model.version_dir))
    out = loaded.signatures["serving_default"](images=tf.constant(pixels))
    expected = in_process_outputs(base_network, head, open_set, pixels)
    np.testing.assert_allclose(out["probabilities"].numpy(), expected["probabilities"], atol=1e-4)
    np.testing.assert_allclose(out["mushroom_score"].numpy(), expected["mushroom_score"], atol=1e-4)
    np.testing.assert_array_equal(out["not_a_mushroom"].numpy(), expected["not_a_mushroom"])
    classes = out["classes"].numpy().astype(str)
    assert classes.shape == (len(pixels), len(head.labels)) and list(classes[0]) == head.labels


def test_bytes_signature_classifies_encoded_photos(published_model):
    test_rows, head, _ = _sample(published_model.run_dir, 4)
    loaded = tf.saved_model.load(str(published_model.version_dir))
    sig = loaded.signatures["predict_image_bytes"]
    data = [open(r.path, "rb").read() for r in test_rows]
    out = sig(image_bytes=tf.constant(data))
    pixels_out = loaded.signatures["serving_default"](
        images=tf.constant(np.stack([load_image_file(r.path) for r in test_rows])))
    assert out["probabilities"].shape == (len(data), len(head.labels))
    np.testing.assert_allclose(out["probabilities"].numpy().sum(axis=1), 1.0, atol=1e-5)
    # in-graph decoding is not Pillow's, but it must agree on the answer for ordinary photos
    agree = np.mean(out["probabilities"].numpy().argmax(1) == pixels_out["probabilities"].numpy().argmax(1))
    assert agree >= 0.75


def test_bytes_signature_reads_webp_and_png_named_jpg(published_model):
    from tests.support import MUSHROOMS

    webp = MUSHROOMS / "amanita_muscaria" / "train_amanita_muscaria_272.jpg"  # RIFF/WEBP inside
    png = MUSHROOMS / "boletus_edulis" / "train_boletus_edulis_251.jpg"  # PNG inside
    assert webp.read_bytes()[:4] == b"RIFF" and png.read_bytes()[:4] == b"\x89PNG"
    loaded = tf.saved_model.load(str(published_model.version_dir))
    out = loaded.signatures["predict_image_bytes"](image_bytes=tf.constant([webp.read_bytes(), png.read_bytes()]))
    np.testing.assert_allclose(out["probabilities"].numpy().sum(axis=1), 1.0, atol=1e-5)
    assert not out["not_a_mushroom"].numpy().any()


def test_bytes_signature_refuses_a_jpeg_of_more_scans_than_the_contract_takes(published_model):
    """An INVALID_ARGUMENT from the model server, not seconds of its CPU (bench/scan_bombs.py)."""
    loaded = tf.saved_model.load(str(published_model.version_dir))
    with pytest.raises(tf.errors.InvalidArgumentError, match="too_many_scans: "):
        loaded.signatures["predict_image_bytes"](image_bytes=tf.constant([jpeg_scan_bomb(1000, 2000)]))


def test_signature_contract(published_model):
    loaded = tf.saved_model.load(str(published_model.version_dir))
    serving = loaded.signatures["serving_default"]
    spec = serving.structured_input_signature[1]["images"]
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, 224, 224, 3]
    outputs = serving.structured_outputs
    assert {k: v.dtype for k, v in outputs.items()} == {
        "probabilities": tf.float32, "classes": tf.string, "mushroom_score": tf.float32, "not_a_mushroom": tf.bool}
    assert loaded.signatures["predict_image_bytes"].structured_input_signature[1]["image_bytes"].dtype == tf.string


def test_assets_extra(published_model):
    from tensorflow_serving.apis import prediction_log_pb2

    extra = published_model.version_dir / "assets.extra"
    labels = json.loads((extra / "labels.json").read_text())
    assert labels["labels"] == sorted(labels["labels"]) and len(labels["labels"]) == 4
    assert labels["display_names"]["amanita_muscaria"] == "Fly agaric"
    card = json.loads((extra / "model_card.json").read_text())
    for key in ("hyper_parameters", "architecture", "image_size", "preprocessing_version", "base_weights_source",
                "code_revision", "created", "manifest_fingerprint", "open_set"):
        assert key in card, key
    assert card["open_set"]["method"] == "combined"
    metrics = json.loads((extra / "metrics.json").read_text())
    assert 0 < metrics["test_accuracy"] <= 1 and "confusion_matrix" in metrics and "open_set" in metrics
    assert (extra / "confusion_matrix.png").stat().st_size > 1000
    assert (extra / "manifest.csv").read_text().startswith("path,label,sha256,split,width,height,bytes")
    assert (extra / "misclassified.csv").exists()
    logs = []
    for record in tf.data.TFRecordDataset(str(extra / "tf_serving_warmup_requests")):
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(record.numpy())
        logs.append(log.predict_log.request)
    assert {r.model_spec.signature_name for r in logs} == {"serving_default", "predict_image_bytes", "explain",
                                                           "explain_image_bytes"}  # a version without model.tflite
    assert all(r.model_spec.name == "mushrooms" for r in logs)


def test_tflite_float_and_int8_accuracy(published_model, tmp_path):
    import shutil

    from training_job.tflite_export import INT8_FILE, export_tflite

    version_dir = tmp_path / "1"
    shutil.copytree(published_model.version_dir, version_dir)
    rows, _, head, _ = load_run(published_model.run_dir)
    metrics = json.loads((version_dir / "assets.extra" / "metrics.json").read_text())
    result = export_tflite(version_dir, rows, head.labels, 224, representative_photos=8, progress=False)
    assert (version_dir / "model.tflite").stat().st_size > 1e6 and (version_dir / INT8_FILE).is_file()
    assert result["float_file"] == "model.tflite" and result["int8_file"] == str(INT8_FILE)
    assert result["int8_bytes"] < result["float_bytes"] / 2
    assert abs(result["float_test_accuracy"] - metrics["test_accuracy"]) <= 0.05
    assert result["int8_test_accuracy"] >= metrics["test_accuracy"] - 0.2
