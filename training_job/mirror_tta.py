"""Mirror test-time augmentation (``--mirror_tta``): the base sees each photo and its mirror image, and the head
reads the mean of the two feature vectors.

``MirrorAveragedBase`` wraps any base (frozen or fine-tuned) inside the graph, so the SavedModel, the TFLite files and
the evaluation all serve it without changes of their own; the ImageNet probabilities the open-set check reads are
averaged the same way. It costs two passes through the base per photo.
"""
from __future__ import annotations

from training_job.bottlenecks import BaseNetwork


def mirror_layer():
    import keras

    class MirrorLeftRight(keras.layers.Layer):
        """Flips images (batch, height, width, channels) left to right."""

        def call(self, images):
            return keras.ops.flip(images, axis=2)

    return MirrorLeftRight(name="mirror_left_right")


class MirrorAveragedBase(BaseNetwork):
    """``base`` answering the mean of its outputs on the photo and on the photo's mirror image."""

    def __init__(self, base: BaseNetwork):
        import keras

        self.original = base
        self.architecture = f"{base.architecture}-mirror"
        self.image_size = base.image_size
        self.normalises_inside = base.normalises_inside
        self.imagenet_model = base.imagenet_model
        inputs = keras.Input(tuple(base.model.inputs[0].shape[1:]), name="mirror_input")
        plain_features, plain_imagenet = base.model(inputs)
        mirror_features, mirror_imagenet = base.model(mirror_layer()(inputs))
        features = keras.layers.Average(name="mirror_mean_features")([plain_features, mirror_features])
        imagenet = keras.layers.Average(name="mirror_mean_imagenet")([plain_imagenet, mirror_imagenet])
        self.model = keras.Model(inputs, [features, imagenet], name="mirror_averaged")
        self.feature_size = base.feature_size
        self._predict = None


def plain_base(base: BaseNetwork) -> BaseNetwork:
    """The untouched base network under any wrappers (fine-tuning, mirror averaging)."""
    while hasattr(base, "original"):
        base = base.original
    return base
