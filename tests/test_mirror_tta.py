"""--mirror_tta: the served features are the mean over the photo and its mirror image, end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.support import MUSHROOMS
from training_job.preprocessing import load_image_file


@pytest.fixture(scope="module")
def tiny_rows(tmp_path_factory):
    from training_job.prepare import prepare_dataset

    work = tmp_path_factory.mktemp("mirror")
    return prepare_dataset(MUSHROOMS, work / "dataset", per_class=12, validation_pct=25, test_pct=25, demo_pct=0,
                           progress=False), work


def test_mirror_averaged_base_is_the_mean_over_photo_and_mirror(base_network, tiny_rows):
    from training_job.mirror_tta import MirrorAveragedBase, plain_base

    rows, _ = tiny_rows
    pixels = np.stack([load_image_file(r.path) for r in rows[:3]])
    mirrored = MirrorAveragedBase(base_network)
    features, imagenet = mirrored(pixels)
    plain, plain_imagenet = base_network(pixels)
    flipped, flipped_imagenet = base_network(np.ascontiguousarray(pixels[:, :, ::-1]))
    np.testing.assert_allclose(features, (plain + flipped) / 2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(imagenet, (plain_imagenet + flipped_imagenet) / 2, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(mirrored(np.ascontiguousarray(pixels[:, :, ::-1]))[0], features, rtol=1e-4, atol=1e-5)
    assert mirrored.architecture == "mobilenet_1.0_224-mirror" and plain_base(mirrored) is base_network


def test_a_mirror_tta_run_serves_and_evaluates_the_averaged_features(base_network, tiny_rows):
    import tensorflow as tf

    from training_job.export import in_process_outputs
    from training_job.mirror_tta import MirrorAveragedBase
    from training_job.pipeline import export_run, load_run, run_base, train_run
    from training_job.train import TrainConfig

    rows, work = tiny_rows
    config = TrainConfig(architecture=base_network.architecture, epochs=30, patience=10, mirror_tta=True,
                         fine_tune_whole=False)
    run_dir, metrics = train_run(rows, config, work / "run", base=base_network, tensorboard_root=work / "tb",
                                 cache_root=work / "cache", progress=False)
    _, config, head, open_set = load_run(run_dir)
    served = run_base(run_dir, config, base_network)
    assert isinstance(served, MirrorAveragedBase)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["mirror_tta"] is True
    validation_rows = [r for r in rows if r.split == "validation"]
    on_validation = in_process_outputs(served, head, open_set,
                                       np.stack([load_image_file(r.path) for r in validation_rows]))
    # the validation accuracy the summary (and a sweep) gives is the mirror-averaged network's, the one served
    assert summary["served_validation_accuracy"] == pytest.approx(np.mean(
        on_validation["probabilities"].argmax(1) == [head.labels.index(r.label) for r in validation_rows]))
    test_rows = [r for r in rows if r.split == "test"]
    pixels = np.stack([load_image_file(r.path) for r in test_rows])
    expected = in_process_outputs(served, head, open_set, pixels)
    labels = np.array([head.labels.index(r.label) for r in test_rows])
    assert metrics["test_accuracy"] == pytest.approx(np.mean(expected["probabilities"].argmax(1) == labels))
    export_run(run_dir, work / "export", base_network, tflite=False, progress=False)
    serving = tf.saved_model.load(str(work / "export")).signatures["serving_default"]
    got = serving(images=tf.constant(pixels[:3]))
    np.testing.assert_allclose(got["probabilities"].numpy(), expected["probabilities"][:3], atol=1e-4)
    np.testing.assert_allclose(got["mushroom_score"].numpy(), expected["mushroom_score"][:3], atol=1e-4)
