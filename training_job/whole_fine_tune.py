"""Whole-network fine-tuning (``--fine_tune_whole``): every convolution of the base trains with the head.

After the head has converged on frozen bottlenecks, a copy of the base's feature path (input to pooled features)
trains together with that head on photos augmented on the fly (mirror, random crop of ``fine_tune_crop_min`` (0.8)
to 100 % of the side resized back, brightness x0.9-1.1), with:
- BatchNorm layers in inference mode, keeping their ImageNet statistics (a few hundred photos are too few to
  re-estimate them);
- Adam at a low learning rate: linear warm-up over ``fine_tune_warmup_epochs``, then cosine decay;
- early stopping on the validation cross-entropy (the best epoch's weights are kept) and a wall-clock budget
  (``fine_tune_max_minutes``): after each epoch but a process's first (which also traces the steps), the epochs
  still left are those that fit in the budget at the pace of the epoch just run, and when fewer fit than planned
  the cosine decay is brought forward to end with the last one that fits, so a slow machine runs a shorter recipe
  to its end instead of stopping in the middle of one;
- the stem and first blocks (``fine_tune_frozen_blocks``, default FROZEN_BLOCKS) kept as ImageNet trained: a step
  costs less, as backpropagation stops at the first trained block;
- float32 throughout (mixed precision brings nothing on CPU);
- ``fine_tune_soup`` runs (default SOUP_SIZE) from the same start, each with its own seed (augmentation, order,
  dropout), their weights then averaged into one network of the same size (a uniform "model soup": runs fine-tuned
  from one start at a low rate stay in one basin, where the average of their weights answers like the average of
  their answers, at one run's serving cost); should the average do worse on validation than every run (runs that
  did not stay in one basin), the run best on validation is served instead. The time budget is all the runs'.

Stopped part-way (Ctrl-C, a killed pod), the same call with the same ``checkpoint_dir`` resumes after the last
finished epoch: ``keras.callbacks.BackupAndRestore`` restores the weights, optimizer and epoch, and
``BestEpoch`` its own record of the best epoch so far; a run that had finished is read back, not trained again.
A kill while a checkpoint is written (the OOM killer, an evicted pod) cannot cost the run: the best epoch's weights
are written whole or not at all (a file renamed into place), and the backup keeps a copy of the epoch before, which
``resumable_backup`` falls back on when the last one was cut short (and, with neither whole, the run starts over).

The tuned copy is the one network a version runs (``WholeTunedBase``): its pooled features feed the head and, through
the base's own ImageNet classifier (the layers after the pooling, never trained here), the ImageNet probabilities
the open-set check reads. The classifier stays the original's, so the check keeps its meaning as long as the
features move little, which the evaluation's open-set rates (validation, test, the not-a-mushroom photos) show for
each run.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training_job.base_weights import save_weights_whole
from training_job.bottlenecks import BaseNetwork, Bottlenecks, global_pooling, load_pixels
from training_job.fine_tune import MOBILENET_BLOCKS, trainable_head
from training_job.train import Head, TrainConfig, split_rows

# Fine-tuning epochs unless the config sets them: where the cosine decay ends. Chosen in cross-validation
# (bench/results/accuracy_cv_whole_short.json against accuracy_cv_whole.json's 15) to keep `make run` short.
EPOCHS = 6
# The peak learning rate unless the config sets one, chosen in cross-validation
# (bench/results/accuracy_cv_whole_lr.json against accuracy_cv_whole_short.json's 1e-4).
LEARNING_RATE = 3e-4
# The stem and first blocks kept frozen unless the config says otherwise, where the base has named blocks. Chosen in
# cross-validation (bench/results/accuracy_cv_whole_frozen.json, and accuracy_cv_whole_mirror.json's second run: 3
# blocks score as training every block within the noise between runs) for the cheaper step (fine_tune_step.json).
FROZEN_BLOCKS = 3
# Fine-tuning runs averaged into the served network unless the config says otherwise (TrainConfig.fine_tune_soup):
# chosen in cross-validation (bench/results/accuracy_cv_soup.json: the average against each of its runs alone, on
# the same folds), for twice the fine-tuning time within the same budget.
SOUP_SIZE = 2
SOUP_SEED_STEP = 1000  # run i of a soup trains with the config's seed + i * SOUP_SEED_STEP
TUNED_NETWORK_FILE = "fine_tuned_network.weights.h5"
# what stopped a run the time budget stopped: after the epoch it had brought the end of the decay forward to, or
# before that end
TIME_BUDGET = "time budget"
TIME_BUDGET_MID_DECAY = "time budget, before the end of the decay"
CHECKPOINT_FOLDER = "fine_tune_checkpoint"
RUN_FOLDER = "run"  # CHECKPOINT_FOLDER/run<i>: run i's epoch backup, best epoch and, once finished, its weights
FINISHED_WEIGHTS = "finished.weights.h5"
FINISHED_RECORD = "finished.json"


def feature_model(base: BaseNetwork):
    """The base's feature path (its input to the pooled features), as one Keras model."""
    import keras

    return keras.Model(base.imagenet_model.inputs, global_pooling(base.imagenet_model).output, name="features")


# The layers of a base network's first blocks, by family: the stem is part of block 1. EfficientNet-Lite's are
# "stem_*" and "block<i>_*" (i from 0); MobileNet v1's "conv1*" and "conv_{dw,pw,pad}_<k>*" (k from 1).
_LITE_BLOCK = re.compile(r"block(\d+)_")
_MOBILENET_BLOCK = re.compile(r"conv_(?:dw|pw|pad)_(\d+)")


def early_block(architecture_family: str, layer_name: str) -> int | None:
    """The 1-based block of the base network that ``layer_name`` belongs to, with the stem in block 1; None for the
    layers after the blocks (the last convolution, the pooling, the classifier) or a family without named blocks."""
    if architecture_family == "efficientnet_lite":
        if layer_name.startswith("stem_"):
            return 1
        match = _LITE_BLOCK.match(layer_name)
        return int(match.group(1)) + 1 if match else None
    if architecture_family == "mobilenet":
        if layer_name.startswith("conv1"):
            return 1
        match = _MOBILENET_BLOCK.match(layer_name)
        return int(match.group(1)) if match else None
    return None


def block_count(architecture: str) -> int:
    """The blocks of ``architecture`` as ``early_block`` numbers them (0 for a family without named blocks);
    ``--fine_tune_frozen_blocks`` may keep all but the last frozen."""
    from training_job.base_weights import parse_architecture
    from training_job.efficientnet_lite import LITE_SPECS, block_plan

    arch = parse_architecture(architecture)
    if arch.family == "efficientnet_lite":
        return len(block_plan(LITE_SPECS[arch.variant]))
    if arch.family == "mobilenet":
        return MOBILENET_BLOCKS
    return 0


def tuned_copy(base: BaseNetwork, weights_file: Path | None = None, frozen_blocks: int = 0):
    """A separate copy of the feature path (its own variables), named ``tuned_features``; BatchNorm frozen, and the
    stem and first ``frozen_blocks`` blocks frozen whole (backpropagation then stops at the first trained block)."""
    import keras

    from training_job.base_weights import parse_architecture

    original = feature_model(base)
    copy = keras.models.clone_model(original)
    copy.name = "tuned_features"
    if weights_file is not None:
        copy.load_weights(str(weights_file))
    else:
        copy.set_weights(original.get_weights())
    family = parse_architecture(base.architecture).family if frozen_blocks else None
    for layer in copy.layers:
        block = early_block(family, layer.name)
        layer.trainable = (not isinstance(layer, keras.layers.BatchNormalization)
                           and (block is None or block > frozen_blocks))
    return copy


def imagenet_classifier(base: BaseNetwork):
    """The base's ImageNet classifier after its global pooling (pooled output -> softmax), as one Keras model on the
    base's own layers and weights."""
    import keras

    return keras.Model(global_pooling(base.imagenet_model).output, base.imagenet_model.outputs[0],
                       name="imagenet_classifier")


def weights_fingerprint(model) -> str:
    import hashlib

    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()[:12]


class WholeTunedBase(BaseNetwork):
    """``base`` with its feature path whole fine-tuned: one network gives the features and, through the original
    ImageNet classifier, the ImageNet probabilities. Its last convolutional map is pooled in the outer graph, as in a
    plain base, so Grad-CAM (training_job/explain.py) explains the tuned network's answers."""

    def __init__(self, base: BaseNetwork, tuned):
        import keras

        self.original = base
        self.tuned = tuned
        # "whole1": the ImageNet probabilities are the tuned network's (bottlenecks cached under the plain "whole"
        # key held the original network's)
        self.architecture = f"{base.architecture}-whole1-{weights_fingerprint(tuned)}"
        self.image_size = base.image_size
        self.normalises_inside = base.normalises_inside
        self.imagenet_model = base.imagenet_model
        inputs = keras.Input(base.imagenet_model.inputs[0].shape[1:], name="base_input")
        pooling = global_pooling(tuned)
        conv = keras.Model(tuned.inputs, pooling.input, name="tuned_convolutions")(inputs)  # tuned's own weights
        pooled = keras.layers.GlobalAveragePooling2D(keepdims=pooling.keepdims, name="tuned_pooling")(conv)
        features = keras.layers.Flatten(name="bottleneck")(pooled)
        self.model = keras.Model(inputs, [features, imagenet_classifier(base)(pooled)],
                                 name="tuned_features_and_imagenet")
        self.feature_size = int(features.shape[-1])
        self._predict = None

    def save(self, path: Path) -> None:
        self.tuned.save_weights(str(path))

    @classmethod
    def load(cls, base: BaseNetwork, path: Path) -> "WholeTunedBase":
        return cls(base, tuned_copy(base, path))


class BestEpoch:
    """Early stopping and the time budget (fitting ``schedule`` to it), whose state survives a restart (kept in
    ``folder``)."""

    def __init__(self, folder: Path, patience: int, max_seconds: float | None, schedule: "WarmupCosine",
                 epochs: int, clock=time.monotonic):
        import keras

        outer = self

        class Callback(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                outer.train_begins()

            def on_epoch_end(self, epoch, logs=None):
                outer.epoch_end(self.model, epoch, logs or {})

        self.callback = Callback()
        self.folder = Path(folder)
        self.patience = patience
        self.max_seconds = max_seconds
        self.schedule = schedule
        self.epochs = epochs
        self.clock = clock
        self.first_epoch = True
        self.state_file = self.folder / "best.json"
        self.weights_file = self.folder / "best.weights.h5"
        self.state = {"best": None, "best_epoch": None, "epochs_run": 0, "seconds": 0.0, "stopped_by": None,
                      "planned_epochs": epochs}
        if self.state_file.exists():
            self.state = {**self.state, **json.loads(self.state_file.read_text())}
        self.started = self.clock()

    def train_begins(self) -> None:
        """A resumed run keeps the schedule its budget had fitted."""
        self.started = self.clock()
        self.first_epoch = True  # of this process: it also traces the steps, so its pace is not the run's
        if self.state["planned_epochs"] < self.epochs:
            self.schedule.end_at_epoch(self.state["planned_epochs"])

    def _fit_to_budget(self, done: int, epoch_seconds: float) -> int:
        """The epochs the run will end with: the plan so far, or fewer when fewer fit in what is left of the budget at
        this epoch's pace (never more: the decay only ever comes sooner). Moves the schedule's end there. The first
        epoch of a process only stops the run when no other epoch fits; the plan waits for an epoch without tracing."""
        left = self.max_seconds - self.state["seconds"]
        fit = done + int(max(0.0, left) // max(epoch_seconds, 1e-9))
        first, self.first_epoch = self.first_epoch, False
        if first and fit > done:
            return self.state["planned_epochs"]
        planned = min(self.state["planned_epochs"], fit)
        if done < planned < self.state["planned_epochs"]:
            self.schedule.end_at_epoch(planned)
        self.state["planned_epochs"] = max(planned, done)
        return planned

    def epoch_end(self, model, epoch: int, logs: dict) -> None:
        value = float(logs["val_cross_entropy"])
        self.folder.mkdir(parents=True, exist_ok=True)
        now = self.clock()
        epoch_seconds = now - self.started
        self.state["seconds"] += epoch_seconds
        self.started = now
        done = self.state["epochs_run"] = epoch + 1
        if self.state["best"] is None or value < self.state["best"]:
            self.state.update(best=value, best_epoch=done)
            save_weights_whole(model, self.weights_file)
        if done - self.state["best_epoch"] >= self.patience:
            self.state["stopped_by"] = "early stopping"
            model.stop_training = True
        elif self.max_seconds is not None and done < self.epochs:
            decay_ends_here = self.state["planned_epochs"] == done  # brought forward to this epoch before
            if self._fit_to_budget(done, epoch_seconds) <= done:
                # an epoch far slower than the ones before can leave no room even for the plan: stopped mid-decay
                self.state["stopped_by"] = TIME_BUDGET if decay_ends_here else TIME_BUDGET_MID_DECAY
                model.stop_training = True
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.state_file)

    def restore_best(self, model) -> None:
        if self.weights_file.exists():
            model.load_weights(str(self.weights_file))


def resumable_backup(backup: Path) -> bool:
    """Whether ``keras.callbacks.BackupAndRestore`` (with ``double_checkpoint``) can resume from ``backup``: its last
    epoch's weights and record are whole, or else the copies of the epoch before, which are then put in their place
    (a process killed while writing the last epoch's leaves them cut short). Neither whole: the unreadable backup is
    said on stderr, and False."""
    import shutil

    import h5py

    def whole(weights: Path, record: Path) -> bool:
        try:
            h5py.File(weights, "r").close()  # a file cut short fails here: HDF5 keeps the size it was written to
            json.loads(record.read_text())["epoch"]
            return True
        except (OSError, ValueError, KeyError, TypeError):
            return False

    weights, record = backup / "latest.weights.h5", backup / "training_metadata.json"
    if not backup.exists() or whole(weights, record):
        return backup.exists()
    previous = [Path(f"{weights}.bkp"), Path(f"{record}.bkp")]  # BackupAndRestore's names for them
    if whole(*previous):
        shutil.copyfile(previous[0], weights)
        shutil.copyfile(previous[1], record)
        return True
    print(f"the fine-tuning checkpoint in {backup} cannot be read (cut short by a process killed while writing "
          "it?): this run starts over", file=sys.stderr)
    return False


@dataclass
class WholeFineTuneResult:
    base: WholeTunedBase
    head: Head
    epochs_run: int
    best_epoch: int
    validation_accuracy: float
    seconds: float
    stopped_by: str | None
    planned_epochs: int  # the epochs the schedule ended with: fewer than asked when the time budget brought it forward
    split_bottlenecks: dict  # split -> Bottlenecks of the tuned network (features and ImageNet probabilities)
    # the first four fields above are the first run's, ``seconds`` all runs'; each run's record ({"seed",
    # "epochs_run", "best_epoch", "seconds", "stopped_by", "planned_epochs", "validation_cross_entropy"})
    runs: list = dataclasses.field(default_factory=list)
    # with several runs: {"runs", "validation_cross_entropy" of their average, "kept": "soup" or "run <i>"}
    soup: dict | None = None
    # with several runs: each run's own Keras model (pixels to probabilities) at its best epoch, to compare with
    # their average (bench/accuracy_cv.py)
    run_models: list = dataclasses.field(default_factory=list, repr=False)


def augment(image, size: int, crop_min: float = 0.8):
    """One photo's on-the-fly augmentation (TF ops, float pixels in [0, 255]): mirror, a random square crop whose
    side is ``crop_min`` to 1 of the photo's, resized back, brightness x0.9-1.1."""
    import tensorflow as tf

    image = tf.image.random_flip_left_right(image)
    side = tf.cast(tf.round(tf.random.uniform([], crop_min, 1.0) * size), tf.int32)
    image = tf.image.random_crop(image, tf.stack([side, side, 3]))
    image = tf.image.resize(image, (size, size), method="bilinear")
    image = image * tf.random.uniform([], 0.9, 1.1)
    return tf.clip_by_value(image, 0.0, 255.0)



def tuned_on_pixels(base: BaseNetwork, tuned):
    """(inputs, features): float pixels in [0, 255] in, normalised as ``base`` expects, through ``tuned``: the network
    whole fine-tuning trains, before its head."""
    import keras

    inputs = keras.Input((base.image_size, base.image_size, 3), name="pixels")
    x = inputs if base.normalises_inside else keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    return inputs, tuned(x)


def augmented_batches(pixels: np.ndarray, labels: np.ndarray, classes: int, config: TrainConfig, size: int):
    """The training photos (uint8 [N, S, S, 3]) as a tf.data pipeline: shuffled each epoch, ``augment``ed on the fly,
    in batches of ``train_batch_size`` with one-hot labels."""
    import tensorflow as tf

    return (tf.data.Dataset.from_tensor_slices((pixels, tf.one_hot(labels, classes)))
            .shuffle(len(pixels), seed=config.seed, reshuffle_each_iteration=True)
            .map(lambda image, y: (augment(tf.cast(image, tf.float32), size, config.fine_tune_crop_min), y),
                 num_parallel_calls=tf.data.AUTOTUNE)
            .batch(config.train_batch_size).prefetch(1))


def peak_learning_rate(config: TrainConfig) -> float:
    """The rate the schedule peaks at: the config's, or LEARNING_RATE."""
    return config.fine_tune_learning_rate or LEARNING_RATE


def frozen_blocks_asked(config: TrainConfig) -> int:
    """The first blocks whole fine-tuning keeps frozen: the config's, or FROZEN_BLOCKS where the base has named
    blocks (0 elsewhere)."""
    if config.fine_tune_frozen_blocks is not None:
        return config.fine_tune_frozen_blocks
    return FROZEN_BLOCKS if block_count(config.architecture) > FROZEN_BLOCKS else 0


def soup_size(config: TrainConfig) -> int:
    """The fine-tuning runs averaged: the config's, or SOUP_SIZE."""
    return config.fine_tune_soup or SOUP_SIZE


def run_seed(config: TrainConfig, i: int) -> int:
    return config.seed + SOUP_SEED_STEP * i


def epochs_asked(config: TrainConfig) -> int:
    """The epochs the schedule is planned for: the config's, or EPOCHS (the time budget may end it sooner)."""
    return config.fine_tune_epochs or EPOCHS

class WarmupCosine:
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then cosine decay to 0 at ``total_steps`` (Keras's
    ``CosineDecay`` with warm-up), as a function of the optimizer's step, so a resumed run continues it. The end of
    the decay is a variable: ``end_at_epoch`` brings it forward while the compiled training step runs."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, steps_per_epoch: int):
        import keras
        import tensorflow as tf

        self.peak = float(peak)
        self.warmup_steps = float(warmup_steps)
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = tf.Variable(float(total_steps), trainable=False, dtype=tf.float32, name="decay_end")
        outer = self

        class Schedule(keras.optimizers.schedules.LearningRateSchedule):
            def __call__(self, step):
                return outer(step)

            def get_config(self):
                return {"peak": outer.peak, "warmup_steps": outer.warmup_steps,
                        "total_steps": float(outer.total_steps.numpy())}

        self.keras_schedule = Schedule()

    def __call__(self, step):
        import tensorflow as tf

        step = tf.cast(step, tf.float32)
        warming = self.peak * step / max(self.warmup_steps, 1.0)
        progress = tf.clip_by_value((step - self.warmup_steps) / tf.maximum(self.total_steps - self.warmup_steps, 1.0),
                                    0.0, 1.0)
        decayed = 0.5 * self.peak * (1.0 + tf.cos(np.pi * progress))
        return tf.where(step < self.warmup_steps, warming, decayed)

    def end_at_epoch(self, epochs: int) -> None:
        self.total_steps.assign(float(epochs * self.steps_per_epoch))


def learning_rate_schedule(config: TrainConfig, n_train: int) -> WarmupCosine:
    """Warm-up to ``fine_tune_learning_rate`` (default LEARNING_RATE) over ``fine_tune_warmup_epochs``, then cosine
    decay to 0 at the end of ``fine_tune_epochs`` (default EPOCHS), or sooner when the time budget says so."""
    steps_per_epoch = max(1, -(-n_train // config.train_batch_size))
    return WarmupCosine(peak_learning_rate(config), steps_per_epoch * config.fine_tune_warmup_epochs,
                        steps_per_epoch * epochs_asked(config), steps_per_epoch)


CHECKPOINT_IDENTITY = "identity.json"
# the TrainConfig fields a fine-tuning run trains by, beyond those checkpoint_identity names otherwise
RUN_SETTINGS = ("fine_tune_learning_rate", "fine_tune_epochs", "fine_tune_warmup_epochs", "fine_tune_crop_min",
                "fine_tune_patience", "train_batch_size", "label_smoothing", "dropout", "l2", "hidden_units")


def checkpoint_identity(rows, config: TrainConfig, base: BaseNetwork, head: Head) -> dict:
    """What a fine-tuning checkpoint belongs to: the photos it trains and validates on, the classes, the base, the
    blocks it keeps frozen, the head's shape, the seed its runs' seeds come from and the settings a run trains by. A
    checkpoint of anything else cannot go on (nor be averaged with runs trained otherwise)."""
    from training_job.dataset import manifest_fingerprint

    return {"photos": manifest_fingerprint([r for r in rows if r.split in ("train", "validation")]),
            "labels": list(head.labels), "architecture": base.architecture,
            "frozen_blocks": frozen_blocks_asked(config), "head": [list(k.shape) for k in head.kernels],
            "seed": config.seed, "settings": {name: getattr(config, name) for name in RUN_SETTINGS}}


def claim_checkpoint(checkpoint_dir: Path, identity: dict) -> None:
    """Make ``checkpoint_dir`` this fine-tuning's: a checkpoint left by another (other photos or classes: the photo
    folder changed since it stopped) is set aside, and fine-tuning starts over, saying so."""
    import shutil
    import sys

    record = checkpoint_dir / CHECKPOINT_IDENTITY
    runs = sorted(checkpoint_dir.glob(f"{RUN_FOLDER}*")) if checkpoint_dir.is_dir() else []
    # and the one-run layout of before soups
    runs += [folder for folder in (checkpoint_dir / "backup", checkpoint_dir / "best") if folder.exists()]
    if runs:
        kept = json.loads(record.read_text()) if record.exists() else None
        if kept != identity:
            print(f"the fine-tuning checkpoint in {checkpoint_dir} belongs to other photos, classes or settings "
                  "(the photo folder changed since it stopped): starting over", file=sys.stderr)
            for folder in runs:
                shutil.rmtree(folder, ignore_errors=True)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(identity))


def fine_tune_whole(rows, config: TrainConfig, base: BaseNetwork, head: Head, tensorboard_dir: Path,
                    checkpoint_dir: Path, *, callbacks=(), progress: bool = True) -> WholeFineTuneResult:
    """Train the whole feature path with ``head`` (its starting point), ``soup_size(config)`` times from that same
    start with other seeds, and average the runs' weights (a uniform "model soup", Wortsman et al. 2022): one network
    of the same size, whose answers vary less with the seed than one run's. Resumable from ``checkpoint_dir``: each
    run has its folder there, and a finished run is not trained again."""
    import tensorflow as tf

    size = base.image_size
    index = {label: i for i, label in enumerate(head.labels)}
    splits = {s: split_rows(rows, s) for s in ("train", "validation", "test")}
    pixels = {s: np.stack([load_pixels(r.path, size) for r in rs]) for s, rs in splits.items() if rs}
    labels = {s: np.array([index[r.label] for r in rs]) for s, rs in splits.items() if rs}
    C = len(head.labels)
    validation = (tf.data.Dataset.from_tensor_slices(
        (tf.cast(pixels["validation"], tf.float32), tf.one_hot(labels["validation"], C)))
        .batch(config.validation_batch_size))

    checkpoint_dir = Path(checkpoint_dir)
    claim_checkpoint(checkpoint_dir, checkpoint_identity(rows, config, base, head))
    n = soup_size(config)
    budget = config.fine_tune_max_minutes * 60 if config.fine_tune_max_minutes else None
    runs, run_models = [], []
    for i in range(n):
        if progress and n > 1:
            print(f"fine-tuning run {i + 1} of {n} (seed {run_seed(config, i)}), averaged at the end")
        folder = checkpoint_dir / f"{RUN_FOLDER}{i}"
        left = None if budget is None else max(0.0, budget - sum(r["seconds"] for r in runs)) / (n - i)
        model, run = _fine_tune_run(
            dataclasses.replace(config, seed=run_seed(config, i)), base, head, pixels["train"],
            labels["train"], validation, folder, Path(tensorboard_dir) / "fine_tune_whole" / f"run{i}"
            if n > 1 else Path(tensorboard_dir) / "fine_tune_whole", left, callbacks, progress)
        runs.append(run)
        run_models.append(model)
    soup = None
    if n > 1:
        model = _pixels_to_head(config, base, head)  # the average's own: each run's model stays as it was trained
        run_losses = [r["validation_cross_entropy"] for r in runs]
        model.set_weights([np.mean(ws, axis=0) for ws in zip(*(m.get_weights() for m in run_models))])
        soup_loss = _validation_cross_entropy(model, validation)
        kept = "soup"
        if soup_loss > max(run_losses):  # the runs' weights do not average (they ended in different basins)
            best = int(np.argmin(run_losses))
            model.set_weights(run_models[best].get_weights())
            kept = f"run {best + 1}"
        soup = {"runs": n, "validation_cross_entropy": round(soup_loss, 4), "kept": kept}

    dense = [model.get_layer(f"head{i}") for i in range(len(head.kernels))]
    tuned_head = Head(head.labels, [d.get_weights()[0] for d in dense], [d.get_weights()[1] for d in dense])
    tuned_base = WholeTunedBase(base, model.get_layer("tuned_features"))
    tuned_splits = {}
    for split, split_pixels in pixels.items():
        features, imagenet = (np.concatenate(parts) for parts in zip(
            *(tuned_base(split_pixels[k:k + 32]) for k in range(0, len(split_pixels), 32))))
        tuned_splits[split] = Bottlenecks(features, imagenet, 0)
    val_accuracy = float(np.mean(tuned_head.predict(tuned_splits["validation"].features).argmax(1)
                                 == labels["validation"]))
    first = runs[0]
    return WholeFineTuneResult(tuned_base, tuned_head, first["epochs_run"], first["best_epoch"], val_accuracy,
                               sum(r["seconds"] for r in runs), first["stopped_by"], first["planned_epochs"],
                               tuned_splits, runs, soup, run_models if n > 1 else [])


def _pixels_to_head(config: TrainConfig, base: BaseNetwork, head: Head):
    """The Keras model whole fine-tuning trains: pixels, a tuned copy of the base (``tuned_features``), ``head``."""
    import keras

    tuned = tuned_copy(base, frozen_blocks=frozen_blocks_asked(config))
    inputs, features = tuned_on_pixels(base, tuned)
    return keras.Model(inputs, trainable_head(features, head, config))


def _validation_cross_entropy(model, validation) -> float:
    import keras

    loss = keras.metrics.CategoricalCrossentropy()
    for x, y in validation:
        loss.update_state(y, model(x, training=False))
    return float(loss.result())


def _fit_verbosity(progress: bool) -> int:
    """Keras's ``verbose`` for ``fit``: its progress bar on a terminal; elsewhere (a log file) one plain line an
    epoch, as its bar writes colour codes, carriage returns and backspaces."""
    if not progress:
        return 0
    return 1 if sys.stdout.isatty() else 2


def _fine_tune_run(config: TrainConfig, base: BaseNetwork, head: Head, train_pixels, train_labels, validation,
                   folder: Path, tensorboard_dir: Path, budget_seconds: float | None, callbacks, progress):
    """One fine-tuning run from ``head`` and the base's weights, with ``config.seed``: (the Keras model, pixels to
    head, at its best epoch; its record). A run finished before (its weights kept in ``folder``) is read back."""
    import keras

    keras.utils.set_random_seed(config.seed)
    model = _pixels_to_head(config, base, head)
    finished_weights, finished_record = folder / FINISHED_WEIGHTS, folder / FINISHED_RECORD
    if finished_weights.exists() and finished_record.exists():
        model.load_weights(str(finished_weights))
        return model, json.loads(finished_record.read_text())

    n_train = len(train_labels)
    schedule = learning_rate_schedule(config, n_train)
    model.compile(optimizer=keras.optimizers.Adam(schedule.keras_schedule),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
                  metrics=["accuracy", keras.metrics.CategoricalCrossentropy(name="cross_entropy")])
    train = augmented_batches(train_pixels, train_labels, model.output_shape[-1], config, base.image_size)
    if not resumable_backup(folder / "backup"):  # a fresh start: an older run's record of its best epoch goes
        import shutil

        shutil.rmtree(folder / "backup", ignore_errors=True)
        shutil.rmtree(folder / "best", ignore_errors=True)
    epochs = epochs_asked(config)
    best = BestEpoch(folder / "best", config.fine_tune_patience, budget_seconds, schedule, epochs)
    started = time.monotonic()
    model.fit(train, validation_data=validation, epochs=epochs,
              verbose=_fit_verbosity(progress), shuffle=False,  # the dataset shuffles itself each epoch
              callbacks=[keras.callbacks.BackupAndRestore(str(folder / "backup"), double_checkpoint=True),
                         best.callback,
                         keras.callbacks.TensorBoard(str(tensorboard_dir), write_graph=False, profile_batch=0),
                         *callbacks])
    best.restore_best(model)
    state = best.state
    record = {"seed": config.seed, "epochs_run": int(state["epochs_run"]), "best_epoch": int(state["best_epoch"] or 0),
              "seconds": float(state["seconds"]) or time.monotonic() - started, "stopped_by": state["stopped_by"],
              "planned_epochs": int(state["planned_epochs"]),
              "validation_cross_entropy": _validation_cross_entropy(model, validation)}
    save_weights_whole(model, finished_weights)
    tmp = finished_record.with_suffix(".tmp")  # the record last: a run is finished once it is whole
    tmp.write_text(json.dumps(record))
    tmp.replace(finished_record)
    return model, record
