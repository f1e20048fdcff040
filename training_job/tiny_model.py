"""A tiny SavedModel that honours the registry contract (DEVELOPERS.md), for fast server, gateway and fault tests
and the fault benchmark's --tiny run (bench/faults.py); no training, no photos.

It is not MobileNet: its "classifier" is a fixed linear map of the mean colour, so outputs are deterministic and
differ between photos, and a version can be told apart by ``bias`` (added to the first class's logit).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tensorflow as tf

from training_job.preprocessing import normalise

LABELS = ["amanita_muscaria", "amanita_vaginata", "boletus_edulis", "boletus_erythropus"]
DISPLAY_NAMES = {
    "amanita_muscaria": "Fly agaric", "amanita_vaginata": "Grisette",
    "boletus_edulis": "Penny bun", "boletus_erythropus": "Scarletina bolete",
}


class TinyClassifier(tf.Module):
    def __init__(self, labels=LABELS, bias: float = 0.0, size: int = 224):
        super().__init__()
        rng = np.random.default_rng(42)
        self.size = size
        self.weights = tf.Variable(rng.normal(size=(3, len(labels))).astype(np.float32) * 4.0)
        self.bias = tf.Variable(np.array([bias] + [0.0] * (len(labels) - 1), dtype=np.float32))
        self.labels = tf.constant(labels)

    def _outputs(self, images):
        mean_colour = tf.reduce_mean(normalise(images), axis=[1, 2])
        probabilities = tf.nn.softmax(tf.matmul(mean_colour, self.weights) + self.bias)
        batch = tf.shape(images)[0]
        mushroom_score = tf.reduce_max(probabilities, axis=1)
        return {
            "probabilities": probabilities,
            "classes": tf.tile(self.labels[None, :], [batch, 1]),
            "mushroom_score": mushroom_score,
            "not_a_mushroom": mushroom_score < 0.3,
        }

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve_pixels(self, images):
        return self._outputs(images)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(self, image_bytes):
        def decode(data):
            img = tf.io.decode_image(data, channels=3, expand_animations=False)
            return tf.cast(tf.image.resize(img, (self.size, self.size)), tf.uint8)

        images = tf.map_fn(decode, image_bytes, fn_output_signature=tf.TensorSpec([self.size, self.size, 3], tf.uint8))
        return self._outputs(images)

    def _from_mean_colour(self, examples):
        """The classifier run on serialized tf.Examples holding the float feature ``mean_colour`` (3 values in
        [-1, 1]): the same numbers as ``serving_default`` on a photo of that (normalised) mean colour."""
        features = tf.io.parse_example(examples, {"mean_colour": tf.io.FixedLenFeature([3], tf.float32)})
        probabilities = tf.nn.softmax(tf.matmul(features["mean_colour"], self.weights) + self.bias)
        return probabilities, tf.tile(self.labels[None, :], [tf.shape(examples)[0], 1])

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def classify_mean_colour(self, inputs):
        probabilities, classes = self._from_mean_colour(inputs)
        return {"classes": classes, "scores": probabilities}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def regress_mushroom_score(self, inputs):
        probabilities, _ = self._from_mean_colour(inputs)
        return {"outputs": tf.reduce_max(probabilities, axis=1)}


def write_tiny_model(version_dir: str | Path, bias: float = 0.0, labels=LABELS, image_size: int | None = None) -> Path:
    """Write a contract-shaped SavedModel straight into ``version_dir`` (tests only; publishing is atomic).

    ``image_size`` S: ``serving_default`` declares ``images`` uint8 [batch, S, S, 3], as an exported model of that
    input size does (EfficientNet-Lite1 240, Lite2 260), and refuses pixels of another size (INVALID_ARGUMENT), as
    TF Serving does; None = any height and width."""
    version_dir = Path(version_dir)
    module = TinyClassifier(labels, bias, size=image_size or 224)
    serve_pixels = module.serve_pixels
    if image_size is not None:
        def sized(images):
            tf.debugging.assert_equal(tf.shape(images)[1:3], tf.constant([image_size, image_size]),
                                      message=f"images must be {image_size}x{image_size}")
            return module._outputs(images)

        module.serve_sized_pixels = tf.function(
            sized, input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.uint8, name="images")])
        serve_pixels = module.serve_sized_pixels
    tf.saved_model.save(module, str(version_dir), signatures={
        "serving_default": serve_pixels, "predict_image_bytes": module.serve_bytes,
        # TF2 exports: method_name is tensorflow/serving/predict, served by Classify/Regress as TF Serving does
        "classify_mean_colour": module.classify_mean_colour, "regress_mushroom_score": module.regress_mushroom_score})
    extra = version_dir / "assets.extra"
    extra.mkdir(exist_ok=True)
    (extra / "labels.json").write_text(json.dumps(
        {"labels": list(labels), "display_names": {k: DISPLAY_NAMES.get(k, k) for k in labels}}))
    return version_dir


def write_tiny_model_with_tflite(version_dir: str | Path) -> Path:
    """The tiny SavedModel and, beside it, its ``serving_default`` converted to ``model.tflite`` (as TF Serving's
    ``--prefer_tflite_model`` expects it): a version whose TFLite engine does almost nothing per photo."""
    from training_job.tflite_signatures import TFLITE_FILE

    version_dir = write_tiny_model(version_dir)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(version_dir), signature_keys=["serving_default"])
    (version_dir / TFLITE_FILE).write_bytes(converter.convert())
    return version_dir


def publish_tiny_versions(registry: Path, model_name: str, biases=(0.0, 2.0)) -> None:
    """One tiny version per bias (versions 1, 2, ... in that order) published into ``registry/model_name``."""
    from training_job.publish import publish_dir

    for bias in biases:
        publish_dir(lambda d, b=bias: write_tiny_model(d, bias=b), registry, model_name)
