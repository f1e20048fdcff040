"""FixRes (Touvron et al. 2019): a trained network read at a larger input size than it trained at, the same weights.

Whole fine-tuning crops photos at random (``whole_fine_tune.augment``), so the network learns objects seen larger than
a whole photo shows them at the same size; a larger input brings them back to the scale it learnt. The convolutions
and the global pooling work at any size, so ``ResizedBase`` rebuilds the architecture at ``size`` and copies every
weight by layer name; the features and the ImageNet probabilities (which the open-set check reads) are the wrapped
network's, computed on the larger photo. ``bench/accuracy_cv.py`` measures it (``<method>_at<S>``); no recipe serves
it, as it bought nothing there (README).
"""
from __future__ import annotations

from training_job.bottlenecks import BaseNetwork, global_pooling


def layer_weights(base: BaseNetwork) -> dict[str, list]:
    """The weights of ``base``'s ImageNet classifier by layer name, the whole fine-tuned feature path's in place of
    the original's. Raises ValueError for a base whose features and ImageNet probabilities come from different
    layers (``--fine_tune_blocks`` keeps the original last blocks for the ImageNet output) or another wrapper."""
    from training_job.whole_fine_tune import WholeTunedBase

    if type(base) not in (BaseNetwork, WholeTunedBase):
        raise ValueError(f"{type(base).__name__} cannot be read at another size (a plain or whole fine-tuned "
                         "network can)")
    weights = {layer.name: layer.get_weights() for layer in base.imagenet_model.layers}
    if isinstance(base, WholeTunedBase):
        weights.update({layer.name: layer.get_weights() for layer in base.tuned.layers})
    return weights


class ResizedBase(BaseNetwork):
    """``base`` (plain or whole fine-tuned) rebuilt to read ``size`` x ``size`` photos, with the same weights."""

    def __init__(self, base: BaseNetwork, size: int):
        from training_job.base_weights import untrained_imagenet_model
        from training_job.mirror_tta import plain_base

        weights = layer_weights(base)
        self.original = base
        self.architecture = f"{base.architecture}-at{size}"
        self.image_size = size
        self.normalises_inside = base.normalises_inside
        self.imagenet_model = untrained_imagenet_model(plain_base(base).architecture, size)
        for layer in self.imagenet_model.layers:
            if layer.weights:
                layer.set_weights(weights[layer.name])
        self._set_features(global_pooling(self.imagenet_model).output)
