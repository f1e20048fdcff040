"""The "not a mushroom" check's calibration (training_job/open_set.py)."""
import numpy as np
import pytest

from training_job.base_weights import FUNGUS_CLASS_IDS
from training_job.bottlenecks import Bottlenecks
from training_job.open_set import OpenSet, calibrate


def _photos(fungus: np.ndarray, direction: int) -> tuple[np.ndarray, np.ndarray]:
    """Features on one class's axis (cosine 1 to its centroid) and ImageNet probabilities whose fungus mass is
    ``fungus``: the combined score is 1 + fungus."""
    features = np.zeros((len(fungus), 2), np.float32)
    features[:, direction] = 1.0
    imagenet = np.zeros((len(fungus), 1000), np.float32)
    imagenet[:, FUNGUS_CLASS_IDS[0]] = fungus
    return features, imagenet


def test_the_threshold_is_a_quantile_of_the_training_and_validation_scores_together():
    """A few validation photos alone put a low quantile at their lowest score; the training photos' many scores
    show where the mushrooms' low tail really is."""
    train_fungus = np.linspace(0.0, 1.0, 901)
    val_fungus = np.linspace(0.5, 1.0, 99)
    train_a, train_a_imagenet = _photos(train_fungus[::2], 0)
    train_b, train_b_imagenet = _photos(train_fungus[1::2], 1)
    train = np.concatenate([train_a, train_b])
    train_imagenet = np.concatenate([train_a_imagenet, train_b_imagenet])
    labels = np.repeat([0, 1], [len(train_a), len(train_b)])
    val, val_imagenet = _photos(val_fungus, 0)

    train_split, val_split = Bottlenecks(train, train_imagenet, 0), Bottlenecks(val, val_imagenet, 0)
    check = calibrate("combined", train_split, labels, 2, val_split, 0.1)
    assert check.threshold == pytest.approx(1 + np.quantile(np.concatenate([train_fungus, val_fungus]), 0.1))
    assert check.threshold == pytest.approx(1.11, abs=0.005)  # validation's alone: 1.55
    assert check.validation_rejected == 0.0  # the share of validation photos under it, reported
    assert check.reject_rate_target == 0.1

    not_mushrooms, not_mushrooms_imagenet = _photos(np.zeros(3), 0)
    assert check.not_a_mushroom(not_mushrooms, not_mushrooms_imagenet).all()
    with pytest.raises(ValueError, match="reject rate"):
        calibrate("combined", train_split, labels, 2, val_split, 0.5)


def test_an_open_set_survives_its_file(tmp_path):
    check = OpenSet("combined", 1.2, np.eye(2, dtype=np.float32), 0.02, 0.01)
    check.save(tmp_path / "open_set.npz")
    loaded = OpenSet.load(tmp_path / "open_set.npz")
    assert (loaded.method, loaded.threshold, loaded.reject_rate_target, loaded.validation_rejected) == (
        "combined", 1.2, 0.02, 0.01)
    np.testing.assert_array_equal(loaded.centroids, check.centroids)
