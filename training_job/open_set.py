""""Not a mushroom": an open-set score computed from the base network's own outputs, calibrated on validation.

Candidates (all "higher = more mushroom-like"):
- ``fungus_mass``: the ImageNet head's probability on its fungus classes (``FUNGUS_CLASS_IDS``);
- ``centroid_cosine``: the largest cosine similarity between the photo's bottleneck and the training classes'
  mean bottleneck directions (a feature-space out-of-distribution score);
- ``combined`` (the default): their sum. The two fail differently — ImageNet has no class for many mushroom
  species and angles, while centroid similarity alone is fooled by brown, leafy, forest-floor scenes — so a photo
  is only rejected when both agree it looks unlike a mushroom.

The threshold is the ``reject_rate`` quantile of the scores of every labelled mushroom photo the run holds, its
training and validation splits, so about that share of mushrooms is rejected; the not-mushroom photos are never used
for calibration, only to report rates. The training photos count although the network was fitted to them: neither
score reads the trained head, and their scores are spread as unseen mushrooms' are (bench/accuracy_cv.py measures
the rates in each fold), while a quantile of the ~100 validation scores alone moved by several points between runs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from training_job.base_weights import FUNGUS_CLASS_IDS

METHODS = ("combined", "fungus_mass", "centroid_cosine")
DEFAULT_METHOD = "combined"
# The quantile of the labelled mushrooms' scores the threshold sits at: below the share of unseen mushrooms the check
# may reject (issue 14: 5 %), high enough to keep 90 % of non-mushroom photos out (bench/accuracy_cv.py and
# bench/open_set_rates.py measure both shares at each quantile).
DEFAULT_REJECT_RATE = 0.015


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class OpenSet:
    method: str
    threshold: float
    centroids: np.ndarray  # (C, D) unit vectors
    reject_rate_target: float
    validation_rejected: float

    def scores(self, features: np.ndarray, imagenet: np.ndarray) -> np.ndarray:
        return method_scores(self.method, features, imagenet, self.centroids)

    def not_a_mushroom(self, features: np.ndarray, imagenet: np.ndarray) -> np.ndarray:
        return self.scores(features, imagenet) < self.threshold

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("centroids")
        d["fungus_class_ids"] = list(FUNGUS_CLASS_IDS)
        return d

    def save(self, path) -> None:
        np.savez(path, centroids=self.centroids, method=self.method, threshold=self.threshold,
                 reject_rate_target=self.reject_rate_target, validation_rejected=self.validation_rejected)

    @classmethod
    def load(cls, path) -> "OpenSet":
        with np.load(path) as z:
            return cls(str(z["method"]), float(z["threshold"]), z["centroids"], float(z["reject_rate_target"]),
                       float(z["validation_rejected"]))


def class_centroids(features: np.ndarray, label_index: np.ndarray, n_classes: int) -> np.ndarray:
    unit = _unit(features)
    return _unit(np.stack([unit[label_index == c].mean(axis=0) for c in range(n_classes)])).astype(np.float32)


def method_scores(method: str, features: np.ndarray, imagenet: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    fungus = imagenet[:, list(FUNGUS_CLASS_IDS)].sum(axis=1)
    cosine = (_unit(features) @ centroids.T).max(axis=1)
    if method == "fungus_mass":
        return fungus.astype(np.float32)
    if method == "centroid_cosine":
        return cosine.astype(np.float32)
    if method == "combined":
        return (fungus + cosine).astype(np.float32)
    raise ValueError(f"unknown open-set method {method!r}; choose from {METHODS}")


def threshold_at(mushroom_scores: np.ndarray, reject_rate: float) -> float:
    """The threshold that rejects ``reject_rate`` of the labelled mushroom photos (training and validation): that
    quantile of their scores (0 when there are none)."""
    return float(np.quantile(mushroom_scores, reject_rate)) if len(mushroom_scores) else 0.0


def calibrate(method: str, train, train_label_index, n_classes: int, validation,
              reject_rate: float = DEFAULT_REJECT_RATE) -> OpenSet:
    """``train`` and ``validation``: the splits' ``Bottlenecks`` (features and ImageNet probabilities). Centroids
    from the training photos; the threshold from the training and validation photos' scores together;
    ``validation_rejected``: the validation photos' share under it."""
    if not 0 <= reject_rate < 0.5:
        raise ValueError(f"the open-set reject rate must be in [0, 0.5), got {reject_rate}")
    centroids = class_centroids(train.features, train_label_index, n_classes)
    val_scores = method_scores(method, validation.features, validation.imagenet, centroids)
    mushroom_scores = np.concatenate([method_scores(method, train.features, train.imagenet, centroids), val_scores])
    threshold = threshold_at(mushroom_scores, reject_rate)
    return OpenSet(method, threshold, centroids, reject_rate, float(np.mean(val_scores < threshold)))


def tf_scores(method: str, features, imagenet, centroids):
    """``method_scores`` in TensorFlow ops, for the exported graph."""
    import tensorflow as tf

    fungus = tf.reduce_sum(tf.gather(imagenet, list(FUNGUS_CLASS_IDS), axis=1), axis=1)
    unit = features / tf.maximum(tf.norm(features, axis=1, keepdims=True), 1e-12)
    cosine = tf.reduce_max(tf.matmul(unit, tf.constant(centroids), transpose_b=True), axis=1)
    return {"fungus_mass": fungus, "centroid_cosine": cosine, "combined": fungus + cosine}[method]
