"""Export a trained run as a SavedModel honouring DEVELOPERS.md's "Model registry and SavedModel contract".

The whole model is in the graph: uint8 pixels -> normalise -> frozen base (pooled features + ImageNet softmax)
-> head softmax and open-set score. ``predict_image_bytes`` decodes encoded photos in-graph first, following the
preprocessing contract (``preprocessing_graph.decode_and_resize``: EXIF orientation, alpha over white, Pillow's
JPEG draft scale, antialiased bilinear resize).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from training_job.open_set import OpenSet, tf_scores
from training_job.preprocessing_graph import decode_and_resize
from training_job.train import Head


def build_serving_module(base, head: Head, open_set: OpenSet):
    import tensorflow as tf

    size = base.image_size

    class MushroomClassifier(tf.Module):
        def __init__(self):
            super().__init__()
            self.base = base.model
            self.kernels = [tf.Variable(k, trainable=False, name=f"head_kernel{i}") for i, k in enumerate(head.kernels)]
            self.biases = [tf.Variable(b, trainable=False, name=f"head_bias{i}") for i, b in enumerate(head.biases)]
            self.labels = tf.constant(head.labels)
            self.threshold = tf.constant(open_set.threshold, tf.float32)

        def outputs(self, images):
            features, imagenet = self.base(base.normalise(images), training=False)
            x = features
            for i, (kernel, bias) in enumerate(zip(self.kernels, self.biases)):
                x = tf.matmul(x, kernel) + bias
                if i < len(self.kernels) - 1:
                    x = tf.nn.relu(x)
            probabilities = tf.nn.softmax(x)
            score = tf_scores(open_set.method, features, imagenet, open_set.centroids)
            batch = tf.shape(images)[0]
            return {
                "probabilities": probabilities,
                "classes": tf.tile(self.labels[None, :], [batch, 1]),
                "mushroom_score": score,
                "not_a_mushroom": score < self.threshold,
            }

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8, name="images")],
                     autograph=False)
        def serve_pixels(self, images):
            return self.outputs(images)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")], autograph=False)
        def serve_bytes(self, image_bytes):
            images = tf.map_fn(lambda data: decode_and_resize(data, size), image_bytes,
                               fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))
            return self.outputs(images)

    return MushroomClassifier()


def save_model(module, export_dir) -> None:
    """The SavedModel, with the Grad-CAM twins of both signatures (training_job/explain.py) when the base allows
    them (explain.grad_cam_problem)."""
    import tensorflow as tf

    from training_job.explain import explain_signatures, grad_cam_problem

    signatures = {"serving_default": module.serve_pixels, "predict_image_bytes": module.serve_bytes}
    if grad_cam_problem(module.base) is None:
        signatures.update(explain_signatures(module))
    tf.saved_model.save(module, str(export_dir), signatures=signatures)


def in_process_outputs(base, head: Head, open_set: OpenSet, pixels: np.ndarray) -> dict:
    """The same outputs computed the training way (numpy head and open-set on the base's outputs)."""
    features, imagenet = base(pixels)
    score = open_set.scores(features, imagenet)
    return {"probabilities": head.predict(features), "mushroom_score": score,
            "not_a_mushroom": score < open_set.threshold}


# TF Serving's warm-up file, and this project's own for the signatures a model.tflite beside the SavedModel lacks.
WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
SAVED_MODEL_WARMUP_FILE = Path("assets.extra") / "saved_model_warmup_requests"


def write_warmup_requests(version_dir: Path, pixels: np.ndarray, photo_bytes: list[bytes], model_name: str,
                          explain: bool = True, tflite: bool = False) -> None:
    """The warm-up records of a version (PredictionLogs of single-photo predict requests): ``serving_default``'s
    (batch 1 and the whole sample) in TF Serving's ``WARMUP_FILE``; ``predict_image_bytes``'s and, when the model
    has them, ``explain``'s and ``explain_image_bytes``'s there too, or, for a version with a ``model.tflite``, in
    ``SAVED_MODEL_WARMUP_FILE``. Under --prefer_tflite_model TF Serving replays its file on the TFLite model, which
    serves ``serving_default`` only, and a record for another signature fails the load; the model server here
    replays both files, so no signature's first call after a load pays for instantiating its function."""
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    from training_job.explain import EXPLAIN_BYTES_SIGNATURE, EXPLAIN_SIGNATURE, PREDICTED_CLASS

    def log(signature: str, **inputs):
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature))
        for key, tensor in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(tensor))
        return prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))

    served_by_tflite = [log("serving_default", images=pixels[:1])]
    if len(pixels) > 1:
        served_by_tflite.append(log("serving_default", images=pixels))
    others = []
    photo = np.array(photo_bytes[:1], dtype=object)
    if photo_bytes:
        others.append(log("predict_image_bytes", image_bytes=photo))
    if explain:  # a failed warm-up fails the load: no default relied on
        predicted = np.array([PREDICTED_CLASS], np.int32)
        others.append(log(EXPLAIN_SIGNATURE, images=pixels[:1], class_index=predicted))
        if photo_bytes:
            others.append(log(EXPLAIN_BYTES_SIGNATURE, image_bytes=photo, class_index=predicted))
    files = {WARMUP_FILE: served_by_tflite, SAVED_MODEL_WARMUP_FILE: others} if tflite else \
        {WARMUP_FILE: served_by_tflite + others}
    for name, entries in files.items():
        if not entries:
            continue
        (Path(version_dir) / name).parent.mkdir(parents=True, exist_ok=True)
        with tf.io.TFRecordWriter(str(Path(version_dir) / name)) as writer:
            for entry in entries:
                writer.write(entry.SerializeToString())
