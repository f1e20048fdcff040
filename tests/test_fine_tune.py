"""--fine_tune_blocks: which layers are tuned, the activation cache, and a fine-tuned run end to end (trained,
evaluated, exported) against the real base network."""
import json
from pathlib import Path

import numpy as np
import pytest

from training_job.cli import main
from training_job.fine_tune import cut_activations, cut_layer_name
from training_job.train import TrainingError


def test_cut_layer_feeds_the_last_blocks():
    assert cut_layer_name("mobilenet_1.0_224", 1) == "conv_pw_12_relu"
    assert cut_layer_name("mobilenet_0.5_160", 2) == "conv_pw_11_relu"
    assert cut_layer_name("mobilenet_1.0_224", 13) == "conv1_relu"
    for blocks in (0, 14):
        with pytest.raises(TrainingError, match="between 1 and 13"):
            cut_layer_name("mobilenet_1.0_224", blocks)
    with pytest.raises(TrainingError, match="mobilenet_<alpha>_<size> family"):
        cut_layer_name("mobilenet_v2_1.0_224", 1)


def test_cut_activations_are_cached_per_photo_and_mirror(small_dataset, base_network, tmp_path):
    _, rows = small_dataset
    some = rows[:5]
    plain, computed = cut_activations(some, base_network, "conv_pw_12_relu", root=tmp_path, progress=False)
    again, recomputed = cut_activations(some, base_network, "conv_pw_12_relu", root=tmp_path, progress=False)
    mirrored, mirrored_computed = cut_activations(some, base_network, "conv_pw_12_relu", mirrored=True,
                                                  root=tmp_path, progress=False)
    assert (computed, recomputed, mirrored_computed) == (5, 0, 5)
    assert plain.shape == (5, 7, 7, 1024) and plain.dtype == np.float16
    np.testing.assert_array_equal(plain, again)
    # a mirrored photo's activations are (nearly) the mirror image of the photo's, not a copy of them
    assert not np.allclose(plain, mirrored)
    assert np.abs(plain[:, :, ::-1].astype(np.float32) - mirrored).mean() < np.abs(plain - mirrored).mean()


@pytest.fixture(scope="module")
def fine_tuned_run(small_dataset, base_network, tmp_path_factory):
    from training_job.pipeline import train_run
    from training_job.train import TrainConfig

    _, rows = small_dataset
    work = tmp_path_factory.mktemp("fine-tune")
    config = TrainConfig(architecture=base_network.architecture, epochs=60, patience=10, fine_tune_blocks=1,
                         fine_tune_whole=False, fine_tune_epochs=4)
    run_dir, metrics = train_run(rows, config, work / "runs" / "tuned", base=base_network,
                                 tensorboard_root=work / "tensorboard", progress=False)
    return run_dir, metrics


def test_fine_tuned_run_changes_the_last_block_and_keeps_the_imagenet_head(fine_tuned_run, base_network):
    from training_job.pipeline import load_run, run_base

    run_dir, metrics = fine_tuned_run
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["fine_tune"]["blocks"] == 1 and summary["fine_tune"]["epochs_run"] >= 1
    assert list((Path(summary["tensorboard"]) / "fine_tune" / "train").glob("events.out.tfevents.*"))
    # the same bar as the frozen short run (0.75 on this subset; chance is 0.25)
    assert metrics["test_accuracy"] >= 0.75, metrics

    rows, config, _, _ = load_run(run_dir)
    tuned = run_base(run_dir, config, base_network)
    assert tuned.architecture.startswith("mobilenet_1.0_224-tuned1-")
    assert set(tuned.tail_weights) == {"conv_dw_13", "conv_dw_13_bn", "conv_pw_13", "conv_pw_13_bn"}

    def original(name):
        return base_network.imagenet_model.get_layer(name).get_weights()

    assert not np.allclose(tuned.tail_weights["conv_pw_13"][0], original("conv_pw_13")[0])
    for frozen_batch_norm in ("conv_dw_13_bn", "conv_pw_13_bn"):
        for tuned_w, original_w in zip(tuned.tail_weights[frozen_batch_norm], original(frozen_batch_norm)):
            np.testing.assert_array_equal(tuned_w, original_w)
    from training_job.preprocessing import load_image_file

    pixels = np.stack([load_image_file(r.path) for r in rows[:4]])
    tuned_features, tuned_imagenet = tuned(pixels)
    frozen_features, frozen_imagenet = base_network(pixels)
    np.testing.assert_allclose(tuned_imagenet, frozen_imagenet, atol=1e-6)
    assert not np.allclose(tuned_features, frozen_features, atol=1e-3)


def test_fine_tuned_savedmodel_matches_the_in_process_model(fine_tuned_run, base_network, tmp_path):
    import tensorflow as tf

    from training_job.export import in_process_outputs
    from training_job.pipeline import load_run, publish_run, run_base
    from training_job.preprocessing import load_image_file

    run_dir, _ = fine_tuned_run
    _, version_dir, _ = publish_run(run_dir, tmp_path / "registry", base=base_network, tflite=False, progress=False)
    rows, config, head, open_set = load_run(run_dir)
    pixels = np.stack([load_image_file(r.path) for r in rows if r.split == "test"][:6])
    expected = in_process_outputs(run_base(run_dir, config, base_network), head, open_set, pixels)
    served = tf.saved_model.load(str(version_dir)).signatures["serving_default"](images=tf.constant(pixels))
    np.testing.assert_allclose(served["probabilities"].numpy(), expected["probabilities"], atol=1e-4)
    np.testing.assert_allclose(served["mushroom_score"].numpy(), expected["mushroom_score"], atol=1e-4)
    card = json.loads((version_dir / "assets.extra" / "model_card.json").read_text())
    assert card["hyper_parameters"]["fine_tune_blocks"] == 1


def test_cli_refuses_impossible_fine_tuning(capsys):
    assert main(["train", "--architecture", "mobilenet_1.0_224", "--fine_tune_blocks", "14"]) == 2
    assert "between 1 and 13" in capsys.readouterr().err
    assert main(["train", "--architecture", "mobilenet_v2_1.0_224", "--fine_tune_blocks", "1"]) == 2
    err = capsys.readouterr().err
    assert "mobilenet_<alpha>_<size> family" in err and "Traceback" not in err


def test_training_without_fine_tuning_into_a_used_run_folder_drops_its_old_blocks(fine_tuned_run, small_dataset,
                                                                                   base_network, tmp_path):
    import shutil

    from training_job.bottlenecks import BaseNetwork
    from training_job.fine_tune import FineTunedBase
    from training_job.pipeline import TUNED_BLOCKS_FILE, load_run, run_base, train_run
    from training_job.train import TrainConfig

    run_dir = tmp_path / "reused"
    shutil.copytree(fine_tuned_run[0], run_dir)
    assert isinstance(run_base(run_dir, load_run(run_dir)[1], base_network), FineTunedBase)
    train_run(small_dataset[1], TrainConfig(architecture=base_network.architecture, epochs=3, patience=3,
                                            fine_tune_whole=False), run_dir,
              base=base_network, tensorboard_root=tmp_path / "tensorboard", progress=False)
    assert not (run_dir / TUNED_BLOCKS_FILE).exists()
    assert type(run_base(run_dir, load_run(run_dir)[1], base_network)) is BaseNetwork
