"""Grad-CAM ("why this answer") inside the exported SavedModel: the ``explain`` signature (uint8 pixels, like
``serving_default``) and ``explain_image_bytes`` (encoded photos, like ``predict_image_bytes``).

Grad-CAM (Selvaraju et al., 2017) for class c on the last convolutional block's activations A (h x w x K: the map
global average pooling turns into the head's features): alpha_k = mean_ij d logit_c / d A_ijk,
map = relu(sum_k alpha_k A_k), divided by its maximum so it lies in [0, 1] (all zeros when nothing in the photo
speaks for c). c is the predicted class, or ``class_index`` when the request gives one.

Signature contract (both signatures):
- inputs: ``images`` uint8 [batch, S, S, 3] or ``image_bytes`` string [batch]; ``class_index`` int32 [batch] or
  [1] (broadcast), negative = the predicted class. Its default ([-1]) is written into the SignatureDef's
  ``defaults``, which gRPC Predict (TF Serving's and our model server's) fills in when a request leaves the input
  out; their REST API fills in none, so a REST request names ``class_index`` too (-1 in each instance).
- outputs: ``probabilities``, ``classes``, ``mushroom_score``, ``not_a_mushroom`` exactly as ``serving_default``;
  ``explained_class`` int32 [batch] (the column explained); ``heatmap`` float32 [batch, h, w] in [0, 1];
  ``heatmap_image`` uint8 [batch, S, S] (the heatmap upsampled bilinearly to the model's input size, x 255).

Not a copy of the serving path: each explain signature runs the module's own serving body (``serve_pixels`` or
``serve_bytes`` of ``training_job.export``) with a stand-in for ``self`` whose ``base`` also hands out the
convolutional map and whose ``outputs`` adds the heatmap; so the explanation sees exactly the pixels, normalisation,
features and answer that serving does, whatever export.py does to decode them. What it relies on: a serving body
ends in ``self.outputs(images)``; ``outputs`` calls ``self.base(x, training=False)`` -> (pooled features, ImageNet
probabilities) once and runs the head (``self.kernels``, ``self.biases``: dense layers, ReLU between) on the features.

TFLite export skips these signatures (its converter builds its own pixels-only model).
"""
from __future__ import annotations

import numpy as np

EXPLAIN_SIGNATURE = "explain"
EXPLAIN_BYTES_SIGNATURE = "explain_image_bytes"
PREDICTED_CLASS = -1  # the default class_index: explain the predicted class


def last_conv_model(features_model):
    """A Keras model: the same input as ``features_model`` (a BaseNetwork's ``model``, outputs (features, ImageNet
    probabilities)) -> (the last convolutional block's map, the ImageNet probabilities). The map is the input of the
    global average pooling behind the "bottleneck" features."""
    import keras

    pooled = features_model.get_layer("bottleneck").input
    pooling = pooled._keras_history.operation
    if not isinstance(pooling, keras.layers.GlobalAveragePooling2D):
        raise ValueError(f"the features come from {type(pooling).__name__}, not global average pooling: "
                         "Grad-CAM here needs a convolutional map pooled into the features")
    return keras.Model(features_model.inputs, [pooling.input, features_model.outputs[1]], name="last_conv_and_imagenet")


def grad_cam_problem(features_model) -> str | None:
    """Why Grad-CAM cannot explain ``features_model`` (a BaseNetwork's ``model``), or None when it can. Mirror
    averaging wraps the base so that no single convolutional map feeds the features: such versions are exported
    without the explain signatures."""
    try:
        last_conv_model(features_model)
    except ValueError as exc:
        return str(exc).splitlines()[0]
    return None


def head_logits(kernels, biases, features):
    """The head's pre-softmax scores (TensorFlow ops): dense layers with ReLU between them."""
    import tensorflow as tf

    x = features
    for i, (kernel, bias) in enumerate(zip(kernels, biases)):
        x = tf.matmul(x, kernel) + bias
        if i < len(kernels) - 1:
            x = tf.nn.relu(x)
    return x


def cam_from_gradients(conv, gradients):
    """Grad-CAM map from the activations and d score / d activations (both [batch, h, w, K]): [batch, h, w]."""
    import tensorflow as tf

    alpha = tf.reduce_mean(gradients, axis=[1, 2])
    cam = tf.nn.relu(tf.einsum("bhwk,bk->bhw", conv, alpha))
    peak = tf.reduce_max(cam, axis=[1, 2], keepdims=True)
    return tf.math.divide_no_nan(cam, peak)


class _Explaining:
    """Stands in for the serving module inside its own serving body (see the module docstring)."""

    def __init__(self, module, conv_model, class_index, size: int):
        self._module = module
        self._conv_model = conv_model
        self._class_index = class_index
        self._size = size
        self._tape = None
        self._conv = None
        self._features = None

    def __getattr__(self, name):
        return getattr(self._module, name)

    def base(self, x, training=False):
        conv, imagenet = self._conv_model(x, training=training)
        self._tape.watch(conv)
        self._conv = conv
        self._features = tf_mean_pool(conv)
        return self._features, imagenet

    def outputs(self, images):
        import tensorflow as tf

        with tf.GradientTape() as tape:
            self._tape = tape
            answer = type(self._module).outputs(self, images)
            logits = head_logits(self._module.kernels, self._module.biases, self._features)
            classes = tf.shape(logits)[1]
            requested = tf.broadcast_to(tf.cast(self._class_index, tf.int32), tf.shape(logits)[:1])
            check = tf.debugging.assert_less(requested, classes, message="class_index is not a column of classes")
            with tf.control_dependencies([check]):
                chosen = tf.where(requested < 0, tf.argmax(logits, axis=1, output_type=tf.int32), requested)
            score = tf.reduce_sum(tf.gather(logits, chosen, axis=1, batch_dims=1))
        heatmap = cam_from_gradients(self._conv, tape.gradient(score, self._conv))
        upsampled = tf.image.resize(heatmap[..., None], (self._size, self._size), method="bilinear")[..., 0]
        return {**answer, "explained_class": chosen, "heatmap": heatmap,
                "heatmap_image": tf.cast(tf.clip_by_value(tf.round(upsampled * 255.0), 0, 255), tf.uint8)}


def tf_mean_pool(conv):
    """Global average pooling as the features see it: [batch, h, w, K] -> [batch, K]."""
    import tensorflow as tf

    return tf.reduce_mean(conv, axis=[1, 2])


def explain_signatures(module) -> dict:
    """``{"explain": ..., "explain_image_bytes": ...}`` concrete functions for ``tf.saved_model.save``'s signatures,
    built from ``module``'s own ``serve_pixels`` and ``serve_bytes`` (training_job.export)."""
    import tensorflow as tf

    pixels_spec = module.serve_pixels.input_signature[0]
    bytes_spec = module.serve_bytes.input_signature[0]
    size = int(pixels_spec.shape[1])
    conv_model = last_conv_model(module.base)
    index_spec = tf.TensorSpec([None], tf.int32, name="class_index")
    default = tf.constant([PREDICTED_CLASS], tf.int32)
    serve_pixels = type(module).serve_pixels.python_function
    serve_bytes = type(module).serve_bytes.python_function

    @tf.function(input_signature=[pixels_spec, index_spec], autograph=False)
    def explain(images, class_index=default):
        return serve_pixels(_Explaining(module, conv_model, class_index, size), images)

    @tf.function(input_signature=[bytes_spec, index_spec], autograph=False)
    def explain_image_bytes(image_bytes, class_index=default):
        return serve_bytes(_Explaining(module, conv_model, class_index, size), image_bytes)

    module.explain = explain  # tracked by the module, so the SavedModel keeps the functions and their variables
    module.explain_image_bytes = explain_image_bytes
    return {EXPLAIN_SIGNATURE: explain, EXPLAIN_BYTES_SIGNATURE: explain_image_bytes}


# ---------------------------------------------------------------------------------------------- in process (numpy)
def in_process_grad_cam(base, head, pixels: np.ndarray, class_index=None) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM computed the training way, without a gradient tape: the base's convolutional map (Keras), then the
    gradient of the numpy head's logit taken by hand. ``class_index`` None (or negative) = the predicted class.
    Returns (heatmaps float32 [N, h, w] in [0, 1], explained classes int [N])."""
    import tensorflow as tf

    from training_job.preprocessing import normalise

    to_input = getattr(base, "normalise", None) or normalise  # the base's own input scaling where it defines one
    conv_model = last_conv_model(base.model)
    conv = conv_model(to_input(tf.constant(pixels)), training=False)[0].numpy().astype(np.float64)
    features = conv.mean(axis=(1, 2))
    pre_activations, x = [], features
    for i, (kernel, bias) in enumerate(zip(head.kernels, head.biases)):
        x = x @ kernel.astype(np.float64) + bias
        pre_activations.append(x)
        if i < len(head.kernels) - 1:
            x = np.maximum(x, 0.0)
    n = len(pixels)
    requested = np.broadcast_to(np.full(n, -1) if class_index is None else np.asarray(class_index), (n,))
    chosen = np.where(requested < 0, x.argmax(axis=1), requested)
    grad = np.zeros_like(x)
    grad[np.arange(n), chosen] = 1.0  # d logit_c / d logits
    for i in range(len(head.kernels) - 1, -1, -1):
        grad = grad @ head.kernels[i].astype(np.float64).T  # d logit_c / d (layer i's input)
        if i > 0:
            grad = grad * (pre_activations[i - 1] > 0)
    h, w = conv.shape[1:3]
    alpha = grad / (h * w)  # the mean over h x w of d logit_c / d A_ijk, through the average pooling
    cam = np.maximum(np.einsum("bhwk,bk->bhw", conv, alpha), 0.0)
    peak = cam.max(axis=(1, 2), keepdims=True)
    heatmaps = np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0)
    return heatmaps.astype(np.float32), chosen
