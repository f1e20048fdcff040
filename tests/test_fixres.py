"""FixRes: a network read at another input size, with the same weights (the whole fine-tuned ones included)."""
from __future__ import annotations

import numpy as np
import pytest

from tests.support import MUSHROOMS
from training_job.preprocessing import load_image_file


@pytest.fixture(scope="module")
def lite0():
    from training_job.bottlenecks import BaseNetwork

    return BaseNetwork("efficientnet_lite0")


def _photos(size: int) -> np.ndarray:
    paths = sorted(p for p in MUSHROOMS.glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg"))[:3]
    return np.stack([load_image_file(str(p), size) for p in paths])


def test_at_its_own_size_a_resized_network_answers_as_the_original(lite0):
    from training_job.mirror_tta import plain_base
    from training_job.fixres import ResizedBase

    same = ResizedBase(lite0, lite0.image_size)
    for got, want in zip(same(_photos(224)), lite0(_photos(224))):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    larger = ResizedBase(lite0, 256)
    features, imagenet = larger(_photos(256))
    assert features.shape == (3, lite0.feature_size) and imagenet.shape == (3, 1000)
    assert larger.image_size == 256 and larger.architecture == "efficientnet_lite0-at256"
    assert plain_base(larger) is lite0
    # the same photos seen larger: close to, not the same as, the features at 224
    at_224 = lite0(_photos(224))[0]
    cosine = np.sum(features * at_224, 1) / np.linalg.norm(features, axis=1) / np.linalg.norm(at_224, axis=1)
    assert np.all(cosine > 0.8) and not np.allclose(features, at_224, atol=1e-3)


def test_a_whole_fine_tuned_network_is_resized_with_its_tuned_weights(lite0):
    from training_job.fixres import ResizedBase
    from training_job.whole_fine_tune import WholeTunedBase, tuned_copy

    tuned = tuned_copy(lite0)
    layer = tuned.get_layer("head_conv")
    layer.set_weights([w * 1.25 for w in layer.get_weights()])  # as if fine-tuning had changed it
    whole = WholeTunedBase(lite0, tuned)
    resized = ResizedBase(whole, lite0.image_size)
    for got, want, original in zip(resized(_photos(224)), whole(_photos(224)), lite0(_photos(224))):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert not np.allclose(got, original, atol=1e-4)
    assert ResizedBase(whole, 256).architecture == f"{whole.architecture}-at256"


def test_a_network_whose_features_and_imagenet_layers_differ_is_refused(lite0):
    from training_job.mirror_tta import MirrorAveragedBase
    from training_job.fixres import ResizedBase

    with pytest.raises(ValueError, match="cannot be read at another size"):
        ResizedBase(MirrorAveragedBase(lite0), 256)


def test_a_mobilenet_is_read_at_another_size_with_its_own_weights():
    """The weight-less builder names MobileNet's layers as the pretrained one's, so every weight copies across by
    name; at its own size the copy answers as the original."""
    from training_job.base_weights import untrained_imagenet_model
    from training_job.bottlenecks import BaseNetwork
    from training_job.fixres import ResizedBase

    mobilenet = BaseNetwork("mobilenet_1.0_224")
    untrained = untrained_imagenet_model("mobilenet_1.0_224", 256)
    assert untrained.input_shape == (None, 256, 256, 3)
    assert [layer.name for layer in untrained.layers if layer.weights] == \
        [layer.name for layer in mobilenet.imagenet_model.layers if layer.weights]
    for got, want in zip(ResizedBase(mobilenet, 224)(_photos(224)), mobilenet(_photos(224))):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert ResizedBase(mobilenet, 256)(_photos(256))[0].shape == (3, mobilenet.feature_size)
