"""Whole-network fine-tuning: the tuned copy learns, BatchNorm and the ImageNet classifier stay, one network serves
both, a stopped run resumes."""
from __future__ import annotations

import numpy as np
import pytest

from tests.support import IMAGENET_FUNGI, MUSHROOMS
from training_job.preprocessing import load_image_file


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from training_job.bottlenecks import BaseNetwork
    from training_job.prepare import prepare_dataset
    from training_job.train import TrainConfig, train_head

    work = tmp_path_factory.mktemp("whole")
    rows = prepare_dataset(MUSHROOMS, work / "dataset", per_class=12, validation_pct=25, test_pct=25, demo_pct=0,
                           progress=False)
    base = BaseNetwork("efficientnet_lite0")
    config = TrainConfig(architecture="efficientnet_lite0", epochs=20, patience=5, train_batch_size=8,
                         fine_tune_whole=True, fine_tune_epochs=2, fine_tune_learning_rate=3e-4,
                         fine_tune_warmup_epochs=1, fine_tune_patience=3, fine_tune_soup=1)
    result = train_head(rows, config, work / "tb", "tiny", base=base, progress=False, cache_root=work / "cache")
    return rows, config, base, result, work


class CrashAfterEpoch:
    def __new__(cls, last: int):
        import keras

        class Callback(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if epoch == last:
                    raise RuntimeError("stopped on purpose")

        return Callback()


class EpochsBegun:
    def __new__(cls, seen: list):
        import keras

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                seen.append(epoch)

        return Callback()


def test_stopped_fine_tuning_resumes_and_tunes_only_what_it_should(tiny):
    from training_job.whole_fine_tune import feature_model, fine_tune_whole

    rows, config, base, result, work = tiny
    checkpoint = work / "checkpoint"
    with pytest.raises(RuntimeError, match="on purpose"):
        fine_tune_whole(rows, config, base, result.head, work / "tb", checkpoint,
                        callbacks=[CrashAfterEpoch(0)], progress=False)
    assert (checkpoint / "run0" / "backup").exists() and (checkpoint / "run0" / "best" / "best.json").exists()
    begun = []
    tuned = fine_tune_whole(rows, config, base, result.head, work / "tb", checkpoint,
                            callbacks=[EpochsBegun(begun)], progress=False)
    assert begun == [1]  # resumed after the finished first epoch
    assert tuned.epochs_run == 2 and tuned.best_epoch in (1, 2)

    original = feature_model(base)
    tuned_layers = {layer.name: layer for layer in tuned.base.tuned.layers}
    conv_changed = [not np.allclose(layer.get_weights()[0], tuned_layers[layer.name].get_weights()[0])
                    for layer in original.layers if layer.name.endswith(("conv", "dwconv")) and layer.weights]
    assert sum(conv_changed) > len(conv_changed) // 2  # the whole network trained, not only its end
    for name in ("stem_bn", "block5_dw_bn", "head_bn"):
        for a, b in zip(original.get_layer(name).get_weights(), tuned_layers[name].get_weights()):
            np.testing.assert_array_equal(a, b)  # BatchNorm kept its ImageNet statistics and scale

    photo = load_image_file(IMAGENET_FUNGI / "n13044778_earthstar.JPEG", 224)[None]
    # the ImageNet classifier the open-set check reads is the original's, untouched, now on the tuned features: an
    # ImageNet fungus photo keeps its ImageNet answer
    classifier = base.imagenet_model.get_layer("predictions").get_weights()
    for a, b in zip(tuned.base.model.get_layer("imagenet_classifier").get_layer("predictions").get_weights(),
                    classifier):
        np.testing.assert_array_equal(a, b)
    assert tuned.base(photo)[1].argmax() == base(photo)[1].argmax()
    val_rows = [r for r in rows if r.split == "validation"]
    val_pixels = np.stack([load_image_file(r.path, 224) for r in val_rows])
    for answer, kept in zip(tuned.base(val_pixels), (tuned.split_bottlenecks["validation"].features,
                                                     tuned.split_bottlenecks["validation"].imagenet)):
        np.testing.assert_allclose(answer, kept, rtol=1e-4, atol=1e-4)


def cut_short(path) -> None:
    """What a process killed while writing ``path`` leaves: its first half."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("epochs_done", [1, 2])
def test_a_checkpoint_cut_short_by_a_kill_while_it_was_written_resumes_from_what_is_whole(tiny, epochs_done,
                                                                                          capsys):
    """A SIGKILL (the OOM killer, an evicted pod) while the epoch backup is written leaves it cut short: training
    goes on from the epoch before when a copy of it is whole, and otherwise starts the run over, saying why."""
    from training_job.whole_fine_tune import fine_tune_whole

    rows, config, base, result, work = tiny
    checkpoint = work / f"checkpoint-cut-{epochs_done}"
    with pytest.raises(RuntimeError, match="on purpose"):
        fine_tune_whole(rows, config, base, result.head, work / "tb", checkpoint,
                        callbacks=[CrashAfterEpoch(epochs_done - 1)], progress=False)
    backup = checkpoint / "run0" / "backup"
    cut_short(backup / "latest.weights.h5")
    begun = []
    tuned = fine_tune_whole(rows, config, base, result.head, work / "tb", checkpoint,
                            callbacks=[EpochsBegun(begun)], progress=False)
    if epochs_done == 2:
        assert begun == [1]  # from the copy of the first epoch's backup
    else:
        assert begun == [0, 1] and "cannot be read" in capsys.readouterr().err
    assert tuned.epochs_run == 2 and tuned.best_epoch in (1, 2)


def test_the_best_epoch_s_weights_are_never_cut_short_by_a_kill_while_they_are_written(tmp_path):
    from training_job.whole_fine_tune import BestEpoch

    class Killed(BaseException):
        pass

    class Model:
        def __init__(self, weights: bytes, killed: bool = False):
            self.weights, self.killed, self.stop_training = weights, killed, False

        def save_weights(self, path):
            with open(path, "wb") as f:
                f.write(self.weights[:len(self.weights) // 2])
                if self.killed:
                    raise Killed()
                f.write(self.weights[len(self.weights) // 2:])

    best = BestEpoch(tmp_path, patience=5, max_seconds=None, schedule=None, epochs=10)
    best.epoch_end(Model(b"epoch one " * 100), 0, {"val_cross_entropy": 1.0})
    with pytest.raises(Killed):
        best.epoch_end(Model(b"epoch two " * 100, killed=True), 1, {"val_cross_entropy": 0.5})
    assert best.weights_file.read_bytes() == b"epoch one " * 100


class CrashInSecondRun:
    """Stops the second fit it sees after its first epoch, as a Ctrl-C during a soup's second run would."""

    def __new__(cls):
        import keras

        class Callback(keras.callbacks.Callback):
            fits = 0

            def on_train_begin(self, logs=None):
                type(self).fits += 1

            def on_epoch_end(self, epoch, logs=None):
                if type(self).fits == 2 and epoch == 0:
                    raise RuntimeError("stopped on purpose")

        return Callback()


def test_a_soup_averages_its_runs_and_a_stop_in_the_second_keeps_the_first(tiny, capsys):
    import dataclasses

    from training_job.whole_fine_tune import _fine_tune_run, fine_tune_whole

    rows, config, base, result, work = tiny
    config = dataclasses.replace(config, fine_tune_soup=2, seed=7)
    checkpoint = work / "checkpoint-soup"
    with pytest.raises(RuntimeError, match="on purpose"):
        fine_tune_whole(rows, config, base, result.head, work / "tb", checkpoint,
                        callbacks=[CrashInSecondRun()], progress=False)
    assert (checkpoint / "run0" / "finished.weights.h5").exists() and (checkpoint / "run1" / "backup").exists()
    begun = []
    tuned = fine_tune_whole(rows, config, base, result.head, work / "tb", checkpoint,
                            callbacks=[EpochsBegun(begun)], progress=False)
    assert begun == [1]  # the first run is not trained again; the second resumes after its finished first epoch
    assert [r["seed"] for r in tuned.runs] == [7, 1007] and tuned.seconds == sum(r["seconds"] for r in tuned.runs)
    assert tuned.soup["runs"] == 2

    # the served network is the runs' average (or, when the average did worse on validation, the better run)
    runs = [_fine_tune_run(dataclasses.replace(config, seed=r["seed"]), base, result.head, None, None, None,
                           checkpoint / f"run{i}", work / "tb", None, (), False)[0]
            for i, r in enumerate(tuned.runs)]
    each = [m.get_layer("tuned_features").get_weights() for m in runs]
    assert not all(np.allclose(a, b) for a, b in zip(*each))  # two seeds, two networks
    heads = [[w for k in range(len(result.head.kernels)) for w in m.get_layer(f"head{k}").get_weights()]
             for m in runs]
    kept = tuned.soup["kept"]
    average = (lambda runs_weights: [np.mean(ws, axis=0) for ws in zip(*runs_weights)]) if kept == "soup" else \
        (lambda runs_weights: runs_weights[int(kept.split()[-1]) - 1])
    served_head = [w for k, b in zip(tuned.head.kernels, tuned.head.biases) for w in (k, b)]
    for a, b in zip([*tuned.base.tuned.get_weights(), *served_head], [*average(each), *average(heads)]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    val_pixels = np.stack([load_image_file(r.path, 224) for r in rows if r.split == "validation"])
    np.testing.assert_allclose(tuned.base(val_pixels)[0], tuned.split_bottlenecks["validation"].features,
                               rtol=1e-4, atol=1e-4)

    # finished runs trained by other settings are not averaged into this one: it starts over, saying so (the finished
    # first run is trained again from its first epoch, the second run's folder is gone; stopped there, as the rest
    # is what the lines above checked)
    begun = []
    with pytest.raises(RuntimeError, match="on purpose"):
        fine_tune_whole(rows, dataclasses.replace(config, fine_tune_learning_rate=1e-4), base, result.head,
                        work / "tb", checkpoint, callbacks=[EpochsBegun(begun), CrashAfterEpoch(0)], progress=False)
    assert begun == [0] and not (checkpoint / "run1").exists() and "starting over" in capsys.readouterr().err


def test_a_whole_fine_tuned_run_exports_the_tuned_network(tiny):
    import tensorflow as tf

    from training_job.explain import EXPLAIN_SIGNATURE, in_process_grad_cam
    from training_job.export import in_process_outputs
    from training_job.pipeline import export_run, load_run, run_base, train_run
    from training_job.whole_fine_tune import CHECKPOINT_FOLDER, TUNED_NETWORK_FILE, WholeTunedBase

    rows, config, base, _, work = tiny
    run_dir, metrics = train_run(rows, config, work / "run", base=base, tensorboard_root=work / "tb2",
                                 cache_root=work / "cache", progress=False)
    assert (run_dir / TUNED_NETWORK_FILE).exists() and not (run_dir / CHECKPOINT_FOLDER).exists()
    _, _, head, open_set = load_run(run_dir)
    served_base = run_base(run_dir, config, base)
    assert isinstance(served_base, WholeTunedBase)
    export_run(run_dir, work / "export", base, tflite=False, progress=False)
    serving = tf.saved_model.load(str(work / "export")).signatures["serving_default"]
    pixels = np.stack([load_image_file(r.path, 224) for r in rows if r.split == "test"][:3])
    expected = in_process_outputs(served_base, head, open_set, pixels)
    np.testing.assert_allclose(serving(images=tf.constant(pixels))["probabilities"].numpy(),
                               expected["probabilities"], atol=1e-4)
    frozen_features, frozen_imagenet = base(pixels)
    tuned_features, tuned_imagenet = served_base(pixels)
    assert not np.allclose(tuned_features, frozen_features, atol=1e-3)
    assert "fine_tune_whole" in (run_dir / "train_summary.json").read_text()
    # one network: the tuned copy's weights and the original ImageNet classifier, as many as the base has, and the
    # ImageNet probabilities the open-set check reads are the tuned network's
    assert sum(int(np.prod(w.shape)) for w in served_base.model.weights) == \
        sum(int(np.prod(w.shape)) for w in base.imagenet_model.weights)
    assert not np.allclose(tuned_imagenet, frozen_imagenet, atol=1e-6)
    np.testing.assert_allclose(tuned_imagenet.sum(axis=1), 1.0, atol=1e-4)
    # "Why this answer" explains the tuned network, as it does a frozen one (the default recipe must keep it)
    explained = tf.saved_model.load(str(work / "export")).signatures[EXPLAIN_SIGNATURE](
        images=tf.constant(pixels), class_index=tf.constant([-1], tf.int32))
    expected_cam, chosen = in_process_grad_cam(served_base, head, pixels)
    frozen_cam, _ = in_process_grad_cam(base, head, pixels, chosen)
    np.testing.assert_allclose(explained["heatmap"].numpy(), expected_cam, atol=1e-4)
    assert np.abs(expected_cam - frozen_cam).max() > 0.05


def test_frozen_blocks_keep_their_imagenet_weights_while_the_rest_trains(tiny):
    """--fine_tune_frozen_blocks 3: the stem and Lite0's blocks 0-2 keep the ImageNet weights, every later convolution
    trains; the blocks are told apart by the layer names of each family that has them."""
    from dataclasses import replace

    from training_job.whole_fine_tune import early_block, feature_model, fine_tune_whole

    rows, config, base, result, work = tiny
    frozen = fine_tune_whole(rows, replace(config, fine_tune_epochs=1, fine_tune_frozen_blocks=3), base, result.head,
                             work / "tb-frozen", work / "checkpoint-frozen", progress=False)
    tuned_layers = {layer.name: layer for layer in frozen.base.tuned.layers}
    kept, changed = [], []
    for layer in feature_model(base).layers:
        if layer.name.endswith(("conv", "dwconv")) and layer.weights:
            same = np.array_equal(layer.get_weights()[0], tuned_layers[layer.name].get_weights()[0])
            (kept if same else changed).append(layer.name)
    early = [name for name in kept + changed if name.startswith(("stem_", "block0_", "block1_", "block2_"))]
    assert len(early) == 1 + 2 + 3 + 3 and set(early) <= set(kept)  # the stem, block0 (no expansion), 1 and 2
    assert set(changed) == set(kept + changed) - set(early)  # every later convolution trained
    assert [early_block("efficientnet_lite", n) for n in ("stem_conv", "block0_dwconv", "block2_add", "head_conv")] \
        == [1, 1, 3, None]
    assert [early_block("mobilenet", n) for n in ("conv1", "conv1_relu", "conv_pad_2", "conv_pw_13_bn",
                                                   "global_average_pooling2d")] == [1, 1, 2, 13, None]


def test_frozen_blocks_default_where_the_base_has_blocks_and_are_refused_elsewhere():
    from training_job.cli import build_parser
    from training_job.commands.train import config_from_args
    from training_job.errors import UserError

    def config(*args):
        return config_from_args(build_parser().parse_args(["run", *args]))

    assert config("--architecture", "efficientnet_lite0", "--fine_tune_frozen_blocks", "15").fine_tune_frozen_blocks \
        == 15
    assert config("--architecture", "mobilenet_1.0_224", "--fine_tune_frozen_blocks", "12").fine_tune_frozen_blocks \
        == 12
    # by default the recipe's FROZEN_BLOCKS where the base has named blocks, none where it has not (not refused)
    from training_job.whole_fine_tune import FROZEN_BLOCKS, frozen_blocks_asked

    assert FROZEN_BLOCKS == 3
    for architecture, frozen in (("efficientnet_lite0", 3), ("efficientnet_lite2", 3), ("mobilenet_1.0_224", 3),
                                 ("mobilenet_v2_1.0_224", 0), ("inception_v3", 0)):
        assert frozen_blocks_asked(config("--architecture", architecture)) == frozen
    assert frozen_blocks_asked(config("--fine_tune_frozen_blocks", "0")) == 0
    for architecture, blocks, message in (("efficientnet_lite0", "16", "between 0 and 15"),
                                          ("efficientnet_lite0", "-1", "between 0 and 15"),
                                          ("mobilenet_1.0_224", "13", "between 0 and 12"),
                                          ("mobilenet_v2_1.0_224", "2", "not mobilenet_v2_1.0_224")):
        with pytest.raises(UserError, match=message):
            config("--architecture", architecture, "--fine_tune_frozen_blocks", blocks)


def test_learning_rate_warms_up_then_decays_to_zero():
    from training_job.train import TrainConfig
    from training_job.whole_fine_tune import learning_rate_schedule

    config = TrainConfig(train_batch_size=10, fine_tune_epochs=5, fine_tune_warmup_epochs=1,
                         fine_tune_learning_rate=1e-4)
    schedule = learning_rate_schedule(config, n_train=95)  # 10 steps per epoch
    rates = [float(schedule(step)) for step in range(50)]
    assert rates[0] == 0.0 and rates[5] == pytest.approx(5e-5) and rates[10] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:])) and rates[49] < 1e-6


def test_augmentation_crops_keep_at_least_the_side_asked_for():
    """--fine_tune_crop_min: 1 keeps the whole photo (mirror and brightness only); smaller values crop and resize
    back, never below the fraction asked; 0 and values above 1 are refused."""
    import tensorflow as tf

    from training_job.cli import build_parser
    from training_job.commands.train import config_from_args
    from training_job.errors import UserError
    from training_job.whole_fine_tune import augment

    size = 32
    ramp = np.broadcast_to(np.arange(size, dtype=np.float32)[None, :, None] * 4 + 50, (size, size, 3))
    image = tf.constant(ramp)
    tf.random.set_seed(0)
    for _ in range(10):
        out = augment(image, size, crop_min=1.0).numpy()
        row = out[0, :, 0]
        ratio = row / (ramp[0, :, 0] if row[0] < row[-1] else ramp[0, ::-1, 0])
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-4)  # the whole ramp, maybe mirrored, times one factor
        assert 0.9 - 1e-6 <= ratio[0] <= 1.1 + 1e-6
    # a crop of half the side spans about half the ramp once resized back
    spans = [np.ptp(augment(image, size, crop_min=0.5).numpy()[0, :, 0]) for _ in range(40)]
    full = np.ptp(ramp[0, :, 0])
    assert min(spans) >= 0.5 * 0.9 * full * (size - 2) / size and max(spans) < 1.1 * full
    assert min(spans) < 0.8 * full  # some crops were smaller than the old fixed minimum of 0.8
    for bad in ("0", "1.5"):
        with pytest.raises(UserError, match="--fine_tune_crop_min"):
            config_from_args(build_parser().parse_args(["run", "--fine_tune_crop_min", bad]))


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SavesNothing:
    """A model with no weights: save_weights writes an empty file."""
    stop_training = False

    def save_weights(self, path):
        open(path, "wb").close()


def test_a_slow_machine_runs_a_shorter_schedule_to_its_end(tmp_path):
    """--fine_tune_max_minutes: when fewer epochs fit in the budget at the pace of the epochs run than were asked,
    the cosine decay is brought forward to end with the last one that fits (the learning rate reaches 0 there) and
    training stops after it, rather than in the middle of the decay; a resumed run keeps the shortened schedule; a
    run the budget holds keeps its schedule."""
    from training_job.whole_fine_tune import BestEpoch, WarmupCosine

    def schedule():  # 10 steps per epoch, 1 warm-up epoch, 6 epochs asked
        return WarmupCosine(1e-3, warmup_steps=10, total_steps=60, steps_per_epoch=10)

    def run(folder, budget, epoch_seconds, epochs_to_run):
        clock, model, rates = Clock(), SavesNothing(), schedule()
        best = BestEpoch(folder, patience=10, max_seconds=budget, schedule=rates, epochs=6, clock=clock)
        best.train_begins()
        paces = epoch_seconds if isinstance(epoch_seconds, list) else [epoch_seconds] * epochs_to_run
        for epoch in range(epochs_to_run):
            clock.now += paces[epoch]
            best.epoch_end(model, epoch, {"val_cross_entropy": 1.0 / (epoch + 1)})
            if model.stop_training:
                break
        return best, rates

    # 30 s an epoch in a 100 s budget: three epochs fit, the third one ends the decay
    best, rates = run(tmp_path / "slow", 100, 30.0, 6)
    assert best.state["epochs_run"] == 3 and best.state["stopped_by"] == "time budget"
    assert best.state["planned_epochs"] == 3
    assert float(rates(29)) > 0 and float(rates(30)) == 0.0  # the rate reaches 0 with the last epoch run
    assert float(rates(10)) == pytest.approx(1e-3)  # the warm-up is kept
    # the same folder resumed: the fresh schedule ends where the budget had ended it
    resumed, rates = run(tmp_path / "slow", 100, 30.0, 0)
    assert float(rates(30)) == 0.0 and float(rates(35)) == 0.0
    # an epoch far slower than the first leaves no room even for the shortened plan: stopped, and said to be mid-decay
    best, rates = run(tmp_path / "stalled", 100, [30.0, 80.0, 30.0], 3)
    assert best.state["epochs_run"] == 2 and best.state["stopped_by"] == "time budget, before the end of the decay"
    # the first epoch also traces the steps: its pace alone (90 s) shortens nothing; the next epochs' pace (30 s) does
    best, rates = run(tmp_path / "traced", 200, [90.0] + [30.0] * 5, 6)
    assert best.state["epochs_run"] == 4 and best.state["stopped_by"] == "time budget"
    assert float(rates(39)) > 0 and float(rates(40)) == 0.0
    # a budget that holds all six epochs changes nothing
    best, rates = run(tmp_path / "fast", 1000, 30.0, 6)
    assert best.state["epochs_run"] == 6 and best.state["stopped_by"] is None
    assert float(rates(30)) > 0 and float(rates(59)) > 0 and float(rates(60)) == 0.0


def test_a_checkpoint_of_other_classes_is_set_aside_not_restored(tiny, capsys):
    """Stopped, then trained again after the photo folder changed (a class added or removed): the checkpoint's
    weights no longer fit the head. Fine-tuning starts over, saying so, instead of failing in Keras' restore."""
    from training_job.train import train_head
    from training_job.whole_fine_tune import fine_tune_whole

    rows, config, base, result, work = tiny
    checkpoint = work / "checkpoint-other-classes"
    with pytest.raises(RuntimeError, match="on purpose"):
        fine_tune_whole(rows, config, base, result.head, work / "tb", checkpoint,
                        callbacks=[CrashAfterEpoch(0)], progress=False)
    dropped = sorted({r.label for r in rows})[-1]
    fewer = [r for r in rows if r.label != dropped]
    three = train_head(fewer, config, work / "tb", "tiny-three", base=base, progress=False,
                       cache_root=work / "cache")
    begun = []
    tuned = fine_tune_whole(fewer, config, base, three.head, work / "tb", checkpoint,
                            callbacks=[EpochsBegun(begun)], progress=False)
    assert begun == [0, 1] and tuned.epochs_run == 2 and len(tuned.head.labels) == 3
    assert "starting over" in capsys.readouterr().err


def test_fine_tuning_written_to_a_log_file_prints_an_epoch_a_line_without_terminal_codes(tiny, capsys):
    """`make run` writes training to var/run/<run>/training.log: Keras's progress bar filled it with colour codes,
    carriage returns and backspaces; where the output is not a terminal each epoch is one plain line."""
    from training_job.whole_fine_tune import fine_tune_whole

    rows, config, base, result, work = tiny
    fine_tune_whole(rows, config, base, result.head, work / "tb", work / "checkpoint-log", progress=True)
    out = capsys.readouterr().out
    assert "Epoch 1/2" in out and "val_accuracy" in out
    assert not {"\x1b", "\r", "\b"} & set(out), out[-500:]
